"""Checkpoints: our format, torchvision-layout state dicts, key checks, manifests."""

from __future__ import annotations

import json

import pytest
import torch

from deep.checkpoints import (CheckpointError, load_checkpoint, load_model, load_torchvision_state,
                              manifest_path, save_checkpoint, sha256_file, verify_checkpoint,
                              write_manifest)
from deep.models import build_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_own_format_round_trip(tmp_path):
    model = build_model("resnet26-w4", 5, 1)
    path = save_checkpoint(tmp_path / "m.pt", model, "resnet26-w4", 5, 1, meta={"note": "x"})
    ckpt = load_checkpoint(path)
    assert (ckpt.arch, ckpt.num_classes, ckpt.in_channels, ckpt.meta) == ("resnet26-w4", 5, 1, {"note": "x"})
    assert _same(ckpt.build(), model)
    assert _same(load_model(path, "resnet26-w4", 5, 1), model)
    with pytest.raises(CheckpointError, match="holds arch=resnet26-w4, num_classes=5.*num_classes=10"):
        load_model(path, "resnet26-w4", 10, 1)
    # guards in_channels in the comparison (a grey model given to a colour benchmark)
    with pytest.raises(CheckpointError, match=r"holds arch=resnet26-w4, num_classes=5, "
                                              r"in_channels=1; the benchmark needs arch="
                                              r"resnet26-w4, num_classes=5, in_channels=3$"):
        load_model(path, "resnet26-w4", 5, 3)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


def test_an_own_checkpoint_is_built_by_the_requested_name_of_its_network(tmp_path, monkeypatch):
    """Guards `ckpt.arch = arch` in load_model: a checkpoint of one network loaded under
    another registered name of it (`network=`) is built by that name's own `build`, not
    by the recorded one's (the built-in pair, resnet50 and resnet50-public, build the same
    class, so only a registered pair whose builds differ can tell)."""
    from deep.models import registry

    def marked(num_classes, in_channels):
        model = build_model("resnet26-w4", num_classes, in_channels)
        model.built_as = "w4-marked"
        return model

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after
    registry.register_architecture(registry.Architecture(
        "w4-marked", build=marked, blocks={"last": ("fc",)}, network="resnet26-w4"))
    torch.manual_seed(0)
    model = build_model("resnet26-w4", 5, 1)
    path = save_checkpoint(tmp_path / "m.pt", model, "resnet26-w4", 5, 1)
    loaded = load_model(path, "w4-marked", 5, 1)
    assert getattr(loaded, "built_as", None) == "w4-marked" and _same(loaded, model)


def test_torchvision_state_dict_variants(tmp_path):
    model = build_model("resnet50", 10)
    state = model.state_dict()
    raw = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # old files
    torch.save(raw, tmp_path / "raw.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
               tmp_path / "wrapped.pth")
    for name in ("raw.pth", "wrapped.pth"):
        assert set(load_torchvision_state(tmp_path / name)) <= set(state)
        assert _same(load_model(tmp_path / name, "resnet50", 10, 3), model)


def refusal_of(state: dict, tmp_path) -> str:
    """The CheckpointError message of loading `state` as a 4-class resnet26-w4."""
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth", "resnet26-w4", 4, 3)
    return str(err.value)


def test_key_mismatch_names_missing_and_unexpected(tmp_path):
    state = build_model("resnet26-w4", 4).state_dict()
    state["head.weight"] = state.pop("fc.weight")
    state["layer1.0.conv1.weight"] = torch.zeros(1)
    message = refusal_of(state, tmp_path)
    assert "missing keys (1): fc.weight" in message
    assert "unexpected keys (1): head.weight" in message
    assert "layer1.0.conv1.weight: file (1,) vs model (4, 4, 3, 3)" in message


def test_an_own_file_recording_an_unregistered_arch_is_read_by_its_tensors(tmp_path):
    """Guards `recorded in architecture_names()` in check_recorded_arch: a file of ours
    whose network is registered by a module not imported here cannot be compared by
    network, so its tensors decide (not get_architecture's "unknown arch" ConfigError)."""
    from deep.checkpoints import load_backbone
    torch.manual_seed(0)
    model = build_model("resnet26-w4", 5)
    path = save_checkpoint(tmp_path / "m.pt", model, "my-resnet", 5, 3)
    state = load_torchvision_state(path, arch="resnet26-w4")
    assert state.keys() == model.state_dict().keys()
    target = build_model("resnet26-w4", 5)
    assert load_backbone(target, path, arch="resnet26-w4") == [] and _same(target, model)


def test_missing_and_unexpected_keys_are_counted_apart_and_no_classifier_hint_follows(tmp_path):
    """Guards each count of load_state_strict's message (one missing key, two unexpected:
    equal counts, as above, cannot tell them apart), and `_only_head_differs` requiring
    the same keys: a file that lacks a backbone key is not told to start from its
    classifier."""
    state = build_model("resnet26-w4", 4).state_dict()
    state["head.weight"] = state.pop("layer2.0.conv1.weight")
    state["head.bias"] = torch.zeros(4)
    state["fc.weight"] = torch.zeros(7, state["fc.weight"].shape[1])
    message = refusal_of(state, tmp_path)
    assert "missing keys (1): layer2.0.conv1.weight" in message
    assert "unexpected keys (2): head.bias, head.weight" in message
    assert "fc.weight: file (7, " in message and "only its classifier" not in message


def test_a_long_list_of_missing_keys_shows_eight_and_counts_the_rest(tmp_path):
    """Guards `_head`: the message names the first eight keys, then how many more there
    are (the total less the eight shown, not the total again)."""
    state = build_model("resnet26-w4", 10).state_dict()
    kept = {k: v for k, v in state.items() if k.startswith("fc.")}
    missing = sorted(k for k in state if k not in kept and not k.endswith("num_batches_tracked"))
    assert len(missing) > 8
    torch.save(kept, tmp_path / "head_only.pth")
    with pytest.raises(CheckpointError) as refused:
        load_model(tmp_path / "head_only.pth", "resnet26-w4", 10, 3)
    assert (f"missing keys ({len(missing)}): {', '.join(missing[:8])}, ... "
            f"({len(missing) - 8} more)") in str(refused.value)


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt", "resnet26", 10, 3)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for trusted in (False, True):  # one line, the same whether trusted or not
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / "junk.pt", "resnet26", 10, 3, trust_checkpoint=trusted)
        assert str(err.value) == (f"checkpoint {tmp_path / 'junk.pt'} is not a file written by "
                                  "torch.save (neither a zip archive nor a pickle; it starts "
                                  "with b'not ')")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        load_model(tmp_path / "empty.pt", "resnet26", 10, 3)
    # a torch file cut short: torch's reason, on one line
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "cut.pt", "resnet26", 10, 3)
    assert str(err.value).startswith(f"cannot read checkpoint {tmp_path / 'cut.pt'}: ")
    assert "\n" not in str(err.value)


def test_random_init_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        a = load_model("none", "resnet26-w4", 4, 3, seed=1)
    with pytest.warns(UserWarning):
        b = load_model("none", "resnet26-w4", 4, 3, seed=1)
    assert _same(a, b)


def test_random_init_leaves_the_global_random_state_alone():
    """Guards the fork_rng around the seeded build: `load_model("none", seed=...)` must not
    reseed the caller's generator (every later draw of the run would depend on it)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        load_model("none", "resnet26-w4", 4, 3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_manifest_verification(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet26-w4", 4), "resnet26-w4", 4, 3)
    out = write_manifest(path, source_test_acc=0.9, seed=0)
    assert out == manifest_path(path) == tmp_path / "m.pt.json"
    info = verify_checkpoint(path)
    assert info["sha256"] == sha256_file(path) and info["source_test_acc"] == 0.9
    info["sha256"] = "0" * 64
    out.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        verify_checkpoint(path)
    out.unlink()
    with pytest.raises(CheckpointError, match="manifest not found"):
        verify_checkpoint(path)


def test_the_manifest_sha256_covers_every_byte_of_a_large_file(tmp_path):
    """sha256_file reads in 1 MiB chunks: the digest must be that of the whole file (as
    hashlib computes it over the bytes at once), so a change past the first MiB is seen."""
    import hashlib
    path = tmp_path / "big.pt"
    data = bytes(range(256)) * (4096 + 1)          # 1 MiB + 256 bytes
    path.write_bytes(data)
    info = json.loads(write_manifest(path).read_text())
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    path.write_bytes(data[:-1] + b"\x00")           # the last byte, past the first MiB
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        verify_checkpoint(path)


@pytest.mark.parametrize("text", ['{"file": "m.pt"}', '{"sha256": "0"', '["m.pt"]'])
def test_a_manifest_without_a_sha256_is_a_checkpoint_error(tmp_path, text):
    """Guards verify_checkpoint's manifest parsing: a manifest with no sha256 field, cut
    short, or not an object is a CheckpointError naming the manifest, not a bare KeyError,
    JSONDecodeError or TypeError from deep inside."""
    path = tmp_path / "m.pt"
    path.write_bytes(b"weights")
    manifest_path(path).write_text(text)
    with pytest.raises(CheckpointError, match=r"m\.pt\.json: not a manifest with a sha256"):
        verify_checkpoint(path)


def test_a_missing_checkpoint_beside_its_manifest_is_a_checkpoint_error(tmp_path):
    """Guards the checkpoint-file check: a manifest whose checkpoint was deleted is a
    CheckpointError naming the missing file, not a FileNotFoundError from hashing it."""
    path = tmp_path / "m.pt"
    path.write_bytes(b"weights")
    write_manifest(path)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*m\.pt$"):
        verify_checkpoint(path)
