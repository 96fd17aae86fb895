"""What each optimizer step really runs with: the scheduled learning rate, Auto-RGN's
per-tensor multipliers, the prefix cache when a method's tuned set moves back, and
which parameters a block prefix names. Each was a planted bug no other test caught."""

from __future__ import annotations

import pytest
import torch

import deep.train as train_module
from deep.blocks import blocks_for, tuned_parameter_names
from deep.checkpoints import load_model
from deep.data import get_benchmark
from deep.data.base import TensorSplit
from deep.methods import AutoRGN, AutoSNR, EpochContext, EpochPlan, Method
from deep.models import build_model
from deep.models.registry import matches, matches_any
from deep.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet26-w4"
BLOCKS = blocks_for(ARCH)


def random_split(n=20, seed=0, classes=4) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % classes,
                       name="t")


@pytest.fixture
def step_lrs(monkeypatch):
    """Filled by the next `fit` with one {parameter name: lr} per optimizer step."""
    steps = []
    real = train_module._optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def recorded_step(*a, **k):
            steps.append({n: g["lr"] for g in optimizer.param_groups for n in g["names"]})
            return step(*a, **k)
        optimizer.step = recorded_step
        return optimizer
    monkeypatch.setattr(train_module, "_optimizer", recording)
    return steps


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_each_epoch_steps_at_the_scheduled_rate(step_lrs, schedule):
    """Against torch's own schedulers stepped once per epoch (epoch 1 at the full rate)."""
    epochs, lr = 5, 0.1
    config = TrainConfig(lr=lr, epochs=epochs, batch_size=10, schedule=schedule,
                         **({"milestones": [2, 4], "gamma": 0.1} if schedule == "step" else {}))
    torch.manual_seed(0)
    fit(build_model(ARCH, 4), random_split(), None, None, "last", config, BLOCKS)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = {"cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs),
                 "step": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 4], 0.1),
                 "constant": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 1.0)}[schedule](reference)
    expected = []
    for _ in range(epochs):
        expected += [reference.param_groups[0]["lr"]] * 2  # 20 images, batches of 10
        reference.step()
        scheduler.step()
    assert len(step_lrs) == 2 * epochs
    for used, want in zip(step_lrs, expected):
        assert list(used.values()) == pytest.approx([want] * len(used), rel=1e-12)


def test_auto_rgns_multipliers_reach_the_optimizer(step_lrs):
    """Each tensor steps at lr times its relative gradient norm's multiplier, epoch by
    epoch, not only in the plan."""
    torch.manual_seed(0)
    method = AutoRGN(BLOCKS)
    plans = []
    real_plan = method.plan
    method.plan = lambda epoch, ctx: plans.append(real_plan(epoch, ctx)) or plans[-1]
    lr = 1e-2
    fit(build_model(ARCH, 4), random_split(), None, None, method,
        TrainConfig(lr=lr, epochs=2, batch_size=10), BLOCKS)
    assert len(plans) == 2 and len(step_lrs) == 4
    for epoch, plan in enumerate(plans):
        scales = plan.lr_scale
        assert min(scales.values()) < 0.5 < max(scales.values())  # a test that can fail
        for used in step_lrs[2 * epoch: 2 * epoch + 2]:
            assert used == pytest.approx({n: lr * scales.get(n, 1.0) for n in used})


class LastFirstLast(Method):
    """Tunes the last block, then the first, then the last again: the set of tuned
    parameters moves back, and with it the stage where the cached prefix ends."""

    name = "last-first-last"

    def candidates(self):
        return self._names("first") + self._names("last")

    def plan(self, epoch, ctx):
        return EpochPlan(self._names("first" if epoch == 2 else "last"))


class LastThenFirst(Method):
    """Tunes the last block in epoch 1, the first in epoch 2; keeps, at the start of
    epoch 2, a copy of the last block's parameters (what epoch 1 left)."""

    name = "last-then-first"

    def candidates(self):
        return self._names("first") + self._names("last")

    def plan(self, epoch, ctx):
        if epoch == 2:
            self.after_epoch_1 = {n: p.detach().clone() for n, p in self.model.named_parameters()
                                  if n in self._names("last")}
        return EpochPlan(self._names("first" if epoch == 2 else "last"))


def test_a_block_frozen_this_epoch_is_left_bitwise_unchanged():
    """The last block, tuned in epoch 1 and frozen in epoch 2, keeps epoch 1's values
    exactly: neither Adam's moments from epoch 1 nor weight decay move it (they would if
    its gradient were a zero tensor instead of none)."""
    torch.manual_seed(0)
    model, method = build_model(ARCH, 4), LastThenFirst(BLOCKS)
    config = TrainConfig(lr=1e-2, epochs=2, batch_size=10, weight_decay=1e-2)
    fit(model, random_split(), None, None, method, config, BLOCKS)  # no val: epoch 2 is kept
    named = dict(model.named_parameters())
    assert method.after_epoch_1
    assert all(torch.equal(named[n], v) for n, v in method.after_epoch_1.items())


def test_augmentation_is_applied_with_batch_norm_frozen():
    """A staged model with frozen BN and no augmentation gets a prefix cache of the
    images' activations; with `augment` every training batch must go through it instead
    (activations cached from the plain images would silently drop the augmentation)."""
    calls = []

    def augment(x, generator):
        calls.append(len(x))
        return x.flip(-1)
    torch.manual_seed(0)
    config = TrainConfig(lr=1e-2, epochs=2, batch_size=10, augment=augment)
    assert config.freeze_bn
    fit(build_model(ARCH, 4), random_split(), random_split(8, seed=1), None, "last", config,
        BLOCKS)
    assert calls == [10, 10, 10, 10]


def test_augmentation_draws_from_a_stream_of_its_own_seeded_seed_plus_one():
    """The augmentation's generator is seeded `seed + 1` (deep.errors.check_seed keeps room
    for it), not `seed`, whose stream draws the minibatch order."""
    draws = []

    def augment(x, generator):
        draws.append(torch.rand(3, generator=generator))
        return x
    torch.manual_seed(0)
    fit(build_model(ARCH, 4), random_split(), None, None, "last",
        TrainConfig(lr=1e-2, epochs=1, batch_size=20, seed=5, augment=augment), BLOCKS)
    assert len(draws) == 1
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(6)))


def test_auto_rgn_measures_each_epoch_on_minibatches_of_its_own(monkeypatch):
    """Each epoch's gradient probes draw their own random training minibatches (the public
    code takes the next ones from its loader), not epoch 1's again and again."""
    import deep.methods as methods_module
    seen = []
    real = methods_module.relative_gradient_norms

    def recording(model, names, minibatches):
        seen.append([x.clone() for x, _ in minibatches])
        return real(model, names, minibatches)

    monkeypatch.setattr(methods_module, "relative_gradient_norms", recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    train = TensorSplit(torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                        torch.arange(40) % 4)
    fit(model, train, random_split(8, seed=2), None, AutoRGN(),
        TrainConfig(lr=1e-3, epochs=3, batch_size=4, use_cache=False))
    assert len(seen) == 3 and all(len(s) == 5 for s in seen)   # 5 minibatches an epoch
    images = [torch.cat(s) for s in seen]
    assert all(any(torch.equal(x, t) for t in train.images) for x in images[0])  # training images
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


@pytest.mark.parametrize("statistic, probe", [("per-example", "per_example_gradient_moments"),
                                              ("eb-criterion", "eb_criterion")])
def test_auto_snr_measures_each_epoch_on_five_minibatches_of_its_own(monkeypatch, statistic,
                                                                     probe):
    """As Auto-RGN (above): every epoch's statistic sees 5 random training minibatches
    (README: "over 5 random training minibatches"), new ones each epoch."""
    import deep.methods as methods_module
    seen = []
    real = getattr(methods_module, probe)

    def recording(model, names, minibatches, *args):
        seen.append([x.clone() for x, _ in minibatches])
        return real(model, names, minibatches, *args)

    monkeypatch.setattr(methods_module, probe, recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    train = TensorSplit(torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                        torch.arange(40) % 4)
    fit(model, train, None, None, AutoSNR(statistic=statistic, threshold=0.0),
        TrainConfig(lr=1e-3, epochs=3, batch_size=4, use_cache=False))
    assert len(seen) == 3 and all(len(s) == 5 for s in seen)
    images = [torch.cat(s) for s in seen]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_gradient_probe_minibatches_follow_the_runs_seed():
    """Runs with other seeds probe other random minibatches (a seed-free generator gave
    every seed of a sweep the same probes); the same seed and epoch give the same ones."""
    train = random_split(40, seed=3)
    model = torch.nn.Linear(1, 1)

    def probes(seed, epoch):
        config = TrainConfig(lr=1e-3, epochs=2, batch_size=4, seed=seed)
        return torch.cat([x for x, _ in EpochContext(model, train, config).minibatches(5, epoch)])
    assert torch.equal(probes(0, 1), probes(0, 1))
    assert not torch.equal(probes(0, 1), probes(1, 1))
    assert not torch.equal(probes(1, 1), probes(2, 1))


def test_a_cache_stays_right_when_the_tuned_set_moves_back(synthetic_checkpoint):
    """After epoch 2 tuned the first block, epoch 3's inputs to the last block must come
    from the tuned first block, not from activations cached in epoch 1."""
    task = get_benchmark("synthetic").load_task(None, "noise", n_target=96, val_per_class=10,
                                                test_per_class=20, seed=0)
    results, params = [], []
    for use_cache in (True, False):
        model = load_model(synthetic_checkpoint, ARCH, 4, 3)
        config = TrainConfig(lr=1e-2, epochs=3, use_cache=use_cache, fold_bn=False,
                             channels_last=False)
        results.append(fit(model, task.train, task.val, task.test, LastFirstLast(BLOCKS),
                           config, BLOCKS))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    cached, plain = results
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(plain.losses), atol=1e-5)
    assert [h["val_acc"] for h in cached.history] == [h["val_acc"] for h in plain.history]
    assert cached.test.acc == plain.test.acc
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_a_prefix_names_its_module_not_a_sibling_with_a_longer_number():
    assert matches("layer1.0.conv1.weight", "layer1") and matches("layer1", "layer1")
    assert not matches("layer10.0.conv1.weight", "layer1")
    assert not matches("visual.transformer.resblocks.10.attn.in_proj_weight",
                       "visual.transformer.resblocks.1")
    assert matches_any("fc.bias", ["conv1", "fc"]) and not matches_any("fcx.bias", ["fc"])
    # where it matters: ViT-B/16's first three blocks are resblocks 0-2, not 10 and 11
    model = build_model("clip-vit-b16", 2)
    first3 = tuned_parameter_names(model, "first3", blocks_for("clip-vit-b16"))
    assert {n.split(".")[3] for n in first3} == {"0", "1", "2"}
