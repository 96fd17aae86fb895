"""Weight files of other projects load safely: MEMO's `{"net": ..., "err_cls": np.float64}`,
RobustBench's `{"state_dict": {"module.": ...}}`, raw state dicts; a file or a CIFAR-10
batch that names any other global is refused before it can run anything."""

from __future__ import annotations

import fractions
import os
import pickle
import re

import numpy as np
import pytest
import torch

from deep.checkpoints import (CheckpointError, UnsafeCheckpointError, extract_state_dict,
                              load_model, load_torchvision_state)
from deep.data import DataError, get_benchmark
from deep.models import build_model
from tests.deep.fixtures import writers

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(model: torch.nn.Module, state: dict) -> bool:
    got = model.state_dict()
    return set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def _trained_state(arch: str = "resnet26-gn"):
    """Weights and an SGD optimizer state after one step (momentum buffers included)."""
    torch.manual_seed(0)
    model = build_model(arch, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def memo_checkpoint(path, numpy1_names: bool = False):
    """A file laid out as TTT/MEMO's ckpt.pth. With `numpy1_names`, written in torch's
    legacy format with the global spelled as numpy 1 did (numpy.core.multiarray.scalar),
    as in files written before numpy 2."""
    net, optimizer = _trained_state()
    payload = {"err_cls": np.float64(0.0917), "err_ssh": 0, "net": net, "optimizer": optimizer}
    if not numpy1_names:
        torch.save(payload, path)
        return net
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data.count(b"numpy._core.multiarray\nscalar") == 1
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    return net


@pytest.mark.parametrize("numpy1_names", [False, True])
def test_memo_checkpoint_loads_with_its_numpy_scalar(tmp_path, numpy1_names):
    path = tmp_path / "ckpt.pth"
    net = memo_checkpoint(path, numpy1_names)
    model = load_model(path, "resnet26-gn", 10, 3)
    assert _same_weights(model, net)


def test_memo_checkpoint_is_refused_by_plain_weights_only(tmp_path):
    """What makes the allowlist necessary: torch alone refuses the numpy scalar."""
    path = tmp_path / "ckpt.pth"
    memo_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)


def test_robustbench_layout_loads(tmp_path):
    """RobustBench: {"state_dict": {"module.<name>": ...}} for the WideResNet-28-10."""
    torch.manual_seed(0)
    state = build_model("wrn28-10", 10).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "Standard.pt")
    assert _same_weights(load_model(tmp_path / "Standard.pt", "wrn28-10", 10, 3), state)


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: {"model": {f"model.{k}": v for k, v in s.items()}},
    lambda s: {"net": {f"module.{k}": v for k, v in s.items()}, "epoch": 150},
    lambda s: {"state_dict": s, "net": {"ignored": torch.zeros(1)}},  # state_dict wins
    # PyTorch's recipe for a general checkpoint (its "Saving and loading" tutorial)
    lambda s: {"epoch": 15, "model_state_dict": s, "optimizer_state_dict": {}, "loss": 0.5},
])
def test_key_formats(tmp_path, wrap):
    state, _ = _trained_state()
    torch.save(wrap(state), tmp_path / "w.pt")
    assert _same_weights(load_model(tmp_path / "w.pt", "resnet26-gn", 10, 3), state)


def test_not_a_state_dict_names_the_accepted_layouts(tmp_path):
    torch.save({"weights": [1, 2], "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"state_dict, net, model, model_state_dict; found "
                                              r"keys 'weights', 'epoch'.*torch\.save\(state_dict"):
        load_torchvision_state(tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="got list"):
        extract_state_dict([torch.zeros(1)])


def test_prefix_collision_is_an_error():
    state = {"module.fc.weight": torch.zeros(1), "fc.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match="both become 'fc.weight'"):
        extract_state_dict(state)


def test_prefixes_are_removed_from_every_key_whatever_the_first_key_holds():
    """Each key loses its own prefixes: a file whose first entry lacks `module.` still
    has it removed from the others."""
    bias, weight, conv = torch.zeros(2), torch.ones(2, 2), torch.ones(1, 1, 3, 3)
    out = extract_state_dict({"fc.bias": bias, "module.fc.weight": weight,
                              "model.conv1.weight": conv})
    assert list(out) == ["fc.bias", "fc.weight", "conv1.weight"]
    assert out["fc.bias"] is bias and out["fc.weight"] is weight and out["conv1.weight"] is conv


@pytest.mark.parametrize("dropped", ["fc.bias", "bn1.running_var", "layer1.0.bn1.running_mean"])
def test_a_file_missing_a_weight_or_a_statistic_is_refused(tmp_path, dropped):
    """Only num_batches_tracked may be absent (old torchvision files): a missing weight or
    running statistic would otherwise keep its fresh value (0, 1) without a word."""
    state = build_model("resnet26-w4", 4, 1).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    assert _same_weights(load_model(tmp_path / "old.pt", "resnet26-w4", 4, 1), state)
    torch.save({k: v for k, v in state.items() if k != dropped}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {re.escape(dropped)}$"):
        load_model(tmp_path / "w.pt", "resnet26-w4", 4, 1)


def test_wrong_architecture_names_the_keys(tmp_path):
    state, _ = _trained_state("resnet26-gn")
    torch.save({"net": state}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="missing keys .*block1"):
        load_model(tmp_path / "ckpt.pth", "wrn28-10", 10, 3)


@pytest.mark.parametrize("given, wanted, hint", [
    ("resnet26-gn", "resnet26", "resnet26-gn"),      # MEMO's file under our BatchNorm ResNet-26
    ("resnet26-w4", "resnet26-gn", "resnet26-w4"),
    ("resnet50", "wrn28-10", "resnet50 or resnet50-public"),
])
def test_another_registered_networks_file_names_the_arch_it_fits(tmp_path, given, wanted, hint):
    """A file of another project holds no arch name, but its keys and shapes may be exactly
    those of another registered architecture: say which, as for our own files."""
    torch.save({"net": build_model(given, 10, 3).state_dict()}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=rf"does not fit .*; its keys and shapes are exactly "
                                              rf"those of {hint}: give --arch {given}$"):
        load_model(tmp_path / "ckpt.pth", wanted, 10, 3)


def test_a_file_without_batch_counters_still_names_the_arch_it_fits(tmp_path):
    """Old torchvision files lack BatchNorm's num_batches_tracked, which loading allows
    (`optional_key`): such a file of another network is still recognised by its keys."""
    state = {k: v for k, v in build_model("resnet26-w4", 10, 3).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=r"those of resnet26-w4: give --arch resnet26-w4$"):
        load_model(tmp_path / "old.pth", "resnet26-gn", 10, 3)


def test_a_weight_file_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    """`--init=~/w.pt` reaches the loader unexpanded by the shell: `~` is the home folder
    for every reader, load_torchvision_state included."""
    monkeypatch.setenv("HOME", str(tmp_path))
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.save(state, tmp_path / "w.pt")
    loaded = load_torchvision_state("~/w.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


class RunsCommand:
    """Unpickling this calls os.system: what a malicious weight file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_checkpoint_is_refused_before_running(tmp_path, legacy):
    marker = tmp_path / "ran"
    state, _ = _trained_state()
    path = tmp_path / "evil.pth"
    torch.save({"net": state, "err_cls": RunsCommand(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to posix\.system.*--trust-checkpoint"):
        load_model(path, "resnet26-gn", 10, 3)
    assert not marker.exists()


def test_trust_checkpoint_loads_other_globals(tmp_path):
    """A harmless global outside the allowlist: refused by default, loaded when trusted."""
    state, _ = _trained_state()
    torch.save({"net": state, "err_cls": fractions.Fraction(917, 10000)}, tmp_path / "c.pth")
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction.*trust_checkpoint=True"):
        load_model(tmp_path / "c.pth", "resnet26-gn", 10, 3)
    model = load_model(tmp_path / "c.pth", "resnet26-gn", 10, 3, trust_checkpoint=True)
    assert _same_weights(model, state)


def test_numpy_arrays_are_not_admitted(tmp_path):
    """Only scalars and dtypes: an array in a checkpoint is outside what such files hold."""
    state, _ = _trained_state()
    torch.save({"net": state, "errs": np.zeros(3)}, tmp_path / "c.pth")
    with pytest.raises(UnsafeCheckpointError, match="_reconstruct"):
        load_model(tmp_path / "c.pth", "resnet26-gn", 10, 3)


# ------------------------------------------------------------------ CIFAR-10 python batches

def test_cifar_batch_with_another_global_is_refused(tmp_path):
    writers.write_cifar10_batches(tmp_path)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    content[b"batch_label"] = RunsCommand(marker)
    with open(batch, "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2.*refused global posix\.system"):
        get_benchmark("cifar10c").load_source(tmp_path)
    assert not marker.exists()


def test_cifar_batches_in_python2_layout_still_load(tmp_path):
    """The real files are Python 2 pickles: numpy 1 module names, bytes as str; the same
    globals under numpy 1's names must stay admitted."""
    writers.write_cifar10_batches(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = batch.read_bytes()
    batch.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray\n_reconstruct" in batch.read_bytes()
    source = get_benchmark("cifar10c").load_source(tmp_path)
    assert len(source.test) == 40


def test_a_whole_model_pickle_loads_when_trusted(tmp_path):
    """torch.save(model): refused by default; once trusted, its weights are used (the hint
    to trust it must not lead to a second refusal)."""
    torch.manual_seed(0)
    model = build_model("resnet26-w4", 4, 1)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_model(tmp_path / "whole.pt", "resnet26-w4", 4, 1)
    loaded = load_model(tmp_path / "whole.pt", "resnet26-w4", 4, 1, trust_checkpoint=True)
    assert _same_weights(loaded, model.state_dict())


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_plain_pickle_is_named_as_such(tmp_path, protocol):
    """Protocol 2 too: it starts like torch's legacy format (0x80 0x02), but without the
    pickled magic number torch.save writes first."""
    state = build_model("resnet26-w4", 4, 1).state_dict()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(state, f, protocol=protocol)
    for trust in (False, True):     # torch.load reads neither way ("invalid magic number")
        with pytest.raises(CheckpointError,
                           match=rf"plain pickle \(protocol {protocol}\).*torch\.save"):
            load_model(tmp_path / "plain.pkl", "resnet26-w4", 4, 1, trust_checkpoint=trust)


def test_a_safetensors_file_is_named_with_how_to_convert_it(tmp_path):
    """The safetensors layout, written by hand from its specification: an 8-byte
    little-endian header length, a JSON header, then the raw bytes."""
    import json
    import struct
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                             + struct.pack("<2f", 1.0, 2.0))
    with pytest.raises(CheckpointError, match=r"w\.safetensors is a safetensors file.*"
                                              r"safetensors\.torch\.load_file, then torch\.save"):
        load_torchvision_state(tmp_path / "w.safetensors")


@pytest.mark.parametrize("spoil, message", [
    (lambda s: s.__setitem__("fc.weight", s["fc.weight"].long()), r"fc\.weight: torch\.int64"),
    (lambda s: s["conv1.weight"].view(-1)[0].fill_(float("nan")), r"conv1\.weight: NaN or inf"),
])
def test_weights_that_are_not_weights_are_refused(tmp_path, spoil, message):
    state = build_model("resnet26-w4", 4, 1).state_dict()
    spoil(state)
    torch.save(state, tmp_path / "bad.pt")
    # "$": every key and shape fits, so no hint follows (not "only its classifier differs")
    with pytest.raises(CheckpointError, match="bad values.*" + message + "$"):
        load_model(tmp_path / "bad.pt", "resnet26-w4", 4, 1)


def test_float64_weights_load_as_a_cast(tmp_path):
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "double.pt")
    model = load_model(tmp_path / "double.pt", "resnet26-w4", 4, 1)
    assert _same_weights(model, state)


@pytest.mark.parametrize("field, value", [("num_classes", "ten"), ("state_dict", None),
                                          ("arch", 7), ("in_channels", True),
                                          # guards `> 0` and a state dict being non-empty
                                          ("num_classes", 0), ("state_dict", {})])
def test_a_malformed_own_format_file_is_named(tmp_path, field, value):
    from deep.checkpoints import save_checkpoint
    save_checkpoint(tmp_path / "own.pt", build_model("resnet26-w4", 4, 1), "resnet26-w4", 4, 1)
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "own.pt")
    # the message's words, not "malformed" alone: this test's tmp_path holds that word, so
    # any error naming the file (a later "holds arch=7" or "missing keys") matched it
    with pytest.raises(CheckpointError, match=r"own\.pt: malformed surgical-ft-checkpoint file: "
                                              r"expected arch \(a name\)"):
        load_model(tmp_path / "own.pt", "resnet26-w4", 4, 1)


def test_an_own_format_file_missing_a_weight_is_refused(tmp_path):
    """Our own format is held to the same strict load as other projects' files."""
    from deep.checkpoints import save_checkpoint
    save_checkpoint(tmp_path / "own.pt", build_model("resnet26-w4", 4, 1), "resnet26-w4", 4, 1)
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    del raw["state_dict"]["layer2.0.bn1.running_var"]
    torch.save(raw, tmp_path / "own.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layer2\.0\.bn1\.running_var"):
        load_model(tmp_path / "own.pt", "resnet26-w4", 4, 1)


def test_legacy_torch_files_of_any_protocol_are_not_taken_for_plain_pickles(tmp_path):
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.save(state, tmp_path / "legacy4.pt", _use_new_zipfile_serialization=False,
               pickle_protocol=4)
    # torch's safe unpickler reads no protocol-4 file; trusted, it is a torch file as any.
    with pytest.raises(UnsafeCheckpointError, match="legacy format.*--trust-checkpoint"):
        load_model(tmp_path / "legacy4.pt", "resnet26-w4", 4, 1)
    model = load_model(tmp_path / "legacy4.pt", "resnet26-w4", 4, 1, trust_checkpoint=True)
    assert _same_weights(model, state)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bytes_that_start_with_0x80_but_no_pickle_protocol_are_not_called_a_plain_pickle(tmp_path):
    """Guards `start[1] < 2` in `_plain_pickle_protocol`: pickle.dump writes PROTO with
    protocol 2 or more, so a file starting 0x80 0x00 or 0x80 0x01 (a damaged or foreign
    binary file) is no plain pickle; calling it one would send the user to pickle.load."""
    for second in (0, 1):
        (tmp_path / "odd.pt").write_bytes(bytes([0x80, second]) + bytes(range(40)))
        with pytest.raises(CheckpointError) as refused:
            load_model(tmp_path / "odd.pt", "resnet26-w4", 4, 1)
        assert "plain pickle" not in str(refused.value)
        assert re.search(r"cannot read checkpoint .*odd\.pt", str(refused.value))


def test_stacked_prefixes_are_all_removed(tmp_path):
    """DataParallel around a wrapper model: `module.model.` before every key."""
    from deep.checkpoints import extract_state_dict
    weight = torch.ones(2, 2)
    assert extract_state_dict({"module.model.fc.weight": weight}) == {"fc.weight": weight}
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.save({"state_dict": {"module.model." + k: v for k, v in state.items()}},
               tmp_path / "wrapped.pt")
    assert _same_weights(load_model(tmp_path / "wrapped.pt", "resnet26-w4", 4, 1), state)


def test_infinite_weights_and_same_size_misshapen_ones_are_named(tmp_path):
    state = build_model("resnet26-w4", 4, 1).state_dict()
    state["conv1.weight"].view(-1)[0].fill_(float("-inf"))
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match=r"bad values.*conv1\.weight: NaN or inf"):
        load_model(tmp_path / "inf.pt", "resnet26-w4", 4, 1)
    # the same number of values in another shape: named as a shape mismatch, not left to
    # torch's copy (which would refuse it without naming the file)
    state = build_model("resnet26-w4", 4, 1).state_dict()
    shape = tuple(state["conv1.weight"].shape)
    state["conv1.weight"] = state["conv1.weight"].reshape(shape[1], shape[0], *shape[2:])
    assert shape[0] != shape[1]
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): conv1\.weight"):
        load_model(tmp_path / "shape.pt", "resnet26-w4", 4, 1)


def test_a_file_damaged_inside_a_tensor_is_refused(tmp_path):
    """torch.load does not check the CRC-32 that torch.save records for each part of its
    zip archive: a copy with bytes spoiled inside a tensor (not truncated: the archive's
    directory is intact) would load other weights without a word."""
    state = build_model("resnet26-w4", 4, 1).state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    data = bytearray(path.read_bytes())
    at = data.find(state["layer3.0.conv1.weight"].numpy().tobytes())
    assert at > 0
    data[at:at + 64] = bytes(64)
    path.write_bytes(bytes(data))
    spoiled = torch.load(path, weights_only=True)  # the premise: torch alone reads it
    assert not torch.equal(spoiled["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    with pytest.raises(CheckpointError, match=r"w\.pt is damaged: .*data/\d+.* copy it again"):
        load_model(path, "resnet26-w4", 4, 1)


def test_a_tensor_larger_than_one_read_is_checked_to_its_end(tmp_path):
    """The CRC check reads each part in 16 MiB pieces; zipfile compares the CRC only once
    the whole part is read, so a part of 18 MB (a CLIP text embedding is 100 MB) damaged
    in its last bytes is refused too."""
    weight = torch.ones(4_500_000)                     # 18 MB of float32 in one part
    path = tmp_path / "big.pt"
    torch.save({"w": weight}, path)
    data = bytearray(path.read_bytes())
    end = data.find(weight.numpy().tobytes()) + 4 * weight.numel()
    assert end > 4 * weight.numel()
    data[end - 64:end] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"big\.pt is damaged: .*data/\d+"):
        load_torchvision_state(path)


def test_a_file_saved_without_checksums_still_loads(tmp_path):
    """torch.save can skip the CRC-32s (set_crc32_options(False)): a zero one is not checked."""
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert _same_weights(load_model(tmp_path / "nocrc.pt", "resnet26-w4", 4, 1), state)


@pytest.mark.parametrize("arch, state_of, message", [
    # a network registered where the file was written, not here (a user's own, a fork's)
    ("resnet99", "resnet26-w4", r"own\.pt holds arch=resnet99, which is not registered here"),
    # the recorded arch's name over another network's tensors
    ("resnet26-w4", "resnet26-gn", r"own\.pt \(resnet26-w4 checkpoint\) does not fit"),
])
def test_an_own_format_file_is_named_in_its_errors(tmp_path, arch, state_of, message):
    from deep.checkpoints import save_checkpoint
    save_checkpoint(tmp_path / "own.pt", build_model("resnet26-w4", 4, 1), "resnet26-w4", 4, 1)
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    raw["arch"], raw["state_dict"] = arch, build_model(state_of, 4, 1).state_dict()
    torch.save(raw, tmp_path / "own.pt")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "own.pt", "resnet26-w4", 4, 1)


@pytest.mark.parametrize("keep", [100, 1000])
def test_a_legacy_file_cut_short_says_so(tmp_path, keep):
    """A legacy-format file cut short: torch says only `EOFError`, or a struct message."""
    state = build_model("resnet26-w4", 4, 1).state_dict()
    torch.save(state, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "w.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:keep])
    with pytest.raises(CheckpointError,
                       match=r"w\.pt: the file ends early or is damaged \(truncated"):
        load_model(tmp_path / "w.pt", "resnet26-w4", 4, 1)


@pytest.mark.parametrize("text, message", [
    # a download that got a web page instead (Google Drive's quota or virus-scan page)
    ("\n<!DOCTYPE html><html><head><title>Google Drive</title>",
     r"an HTML page.*download it again"),
    ("<html><body>Too many users have viewed or downloaded this file", r"an HTML page"),
    # a clone without git-lfs: the pointer file in place of the weights
    ("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 1465093\n",
     r"a Git LFS pointer.*git lfs pull"),
])
def test_a_web_page_or_an_lfs_pointer_is_named_with_what_to_do(tmp_path, text, message):
    (tmp_path / "Standard.pt").write_text(text)
    with pytest.raises(CheckpointError,
                       match=r"Standard\.pt is not a file written by torch\.save.*: it is " + message):
        load_model(tmp_path / "Standard.pt", "wrn28-10", 10, 3)


def test_a_file_whose_classifier_alone_differs_says_how_to_start_from_it(tmp_path):
    """ImageNet weights for a 2-class benchmark: the sweep tunes a source model with the
    benchmark's classifier, which `pretrain --init` trains from such a file."""
    torch.save(build_model("resnet50", 1000).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError, match=r"fc\.bias: file \(1000,\) vs model \(2,\); only "
                                              r"its classifier \(fc\) differs.*pretrain --init"):
        load_model(tmp_path / "resnet50.pth", "resnet50", 2, 3)
