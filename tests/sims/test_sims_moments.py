"""The torch closed-form losses equal theory's numpy ones (which tests/theory checks
against Monte Carlo), batched over runs, mixtures and activations."""
import numpy as np
import pytest
import torch

import theory
from sims.moments import Target, cross_moment, relu_kernel
from sims.simulator import Batch


def random_cov(rng, d, rank):
    F = rng.standard_normal((d, rank))
    return F @ F.T / d


def test_relu_kernel_and_cross_moments_match_theory_with_broadcasting():
    rng = np.random.default_rng(0)
    Ba, Bb = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 2, 4))
    Bb[0, 1] = -0.5 * Ba[0, 0]                         # anti-parallel: theta = pi
    Bb[1, 0] = 2.0 * Ba[1, 2]                          # parallel: theta = 0
    covs = np.stack([random_cov(rng, 4, r) for r in (4, 2, 1, 4, 3)])
    torch_args = [torch.tensor(a) for a in (Ba, Bb, covs)]
    np.testing.assert_allclose(relu_kernel(*torch_args).numpy(),
                               theory.relu_kernel(Ba, Bb, covs), rtol=1e-12, atol=1e-14)
    for act_a in ("linear", "relu"):
        for act_b in ("linear", "relu"):
            ours = cross_moment(torch_args[0], act_a, torch_args[1], act_b, torch_args[2])
            np.testing.assert_allclose(ours.numpy(),
                                       theory.cross_moment(Ba, act_a, Bb, act_b, covs),
                                       rtol=1e-12, atol=1e-14)


def nets_and_targets(rng, activation, teacher_activation, R=6, d=5):
    nets, targets = [], []
    for i in range(R):
        k = int(rng.integers(1, 5))
        nets.append(theory.TwoLayer(rng.standard_normal(k), rng.standard_normal((k, d)),
                                    activation))
        kt = int(rng.integers(1, 4))
        teacher = theory.TwoLayer(rng.standard_normal(kt), rng.standard_normal((kt, d)),
                                  teacher_activation)
        J = 1 + i % 3                                  # 1 to 3 components: padding needed
        weights = rng.dirichlet(np.ones(J))
        covs = np.stack([random_cov(rng, d, int(rng.integers(1, d + 1))) for _ in range(J)])
        targets.append((teacher, theory.GaussianMixture(weights, covs)))
    return nets, targets


@pytest.mark.parametrize("activation,teacher_activation",
                         [("linear", "linear"), ("relu", "relu"), ("relu", "linear"),
                          ("linear", "relu")])
def test_batched_population_loss_equals_theory(activation, teacher_activation):
    rng = np.random.default_rng(1)
    nets, targets = nets_and_targets(rng, activation, teacher_activation)
    samples = [(np.zeros((1, net.d)), np.zeros(1)) for net in nets]
    batch = Batch.build(nets, samples, "last", 0.1, {"t": targets}, device="cpu")
    ours = batch.targets["t"].loss(batch.v, batch.B, activation).numpy()
    exact = [theory.population_loss(net, teacher, dist) for net, (teacher, dist)
             in zip(nets, targets)]
    np.testing.assert_allclose(ours, exact, rtol=1e-11, atol=1e-13)
    energy = batch.targets["t"].label_energy().numpy()
    zero = [theory.population_loss(theory.TwoLayer([0.0], np.zeros((1, net.d))), teacher, dist)
            for net, (teacher, dist) in zip(nets, targets)]
    np.testing.assert_allclose(energy, zero, rtol=1e-11, atol=1e-13)


def test_exact_linear_fit_scores_rounding_level_not_cancellation():
    # The direct form (w - w*)^T cov (w - w*): an exact fit gives ~1e-32, as in theory.
    teacher = theory.TwoLayer([1.0], [[0.3, -1.2, 2.0]])
    net = theory.TwoLayer([2.0, 1.0], [[0.1, -0.2, 0.5], [0.1, -0.8, 1.0]])
    batch = Batch.build([net], [(np.zeros((1, 3)), np.zeros(1))], "last", 0.1,
                        {"t": [(teacher, np.eye(3))]}, device="cpu")
    assert batch.targets["t"].loss(batch.v, batch.B, "linear").item() < 1e-30


def test_target_select_keeps_the_chosen_runs():
    rng = np.random.default_rng(2)
    nets, targets = nets_and_targets(rng, "relu", "relu")
    samples = [(np.zeros((1, net.d)), np.zeros(1)) for net in nets]
    batch = Batch.build(nets, samples, "last", 0.1, {"t": targets}, device="cpu")
    index = torch.tensor([4, 1])
    picked = batch.targets["t"].select(index)
    assert isinstance(picked, Target)
    torch.testing.assert_close(picked.loss(batch.v[index], batch.B[index], "relu"),
                               batch.targets["t"].loss(batch.v, batch.B, "relu")[index])


def test_an_unknown_activation_is_refused_not_read_as_half_linear():
    """Any name but "linear" and "relu" once fell through to the mixed case (linear / 2)."""
    B, cov = np.eye(2), np.eye(2)
    for a, b in (("tanh", "tanh"), ("relu", "gelu"), ("Linear", "linear")):
        with pytest.raises(ValueError, match="activation must be one of"):
            theory.cross_moment(B, a, B, b, cov)
        with pytest.raises(ValueError, match="activation must be one of"):
            cross_moment(torch.eye(2), a, torch.eye(2), b, torch.eye(2))


def test_a_head_of_another_run_count_or_shape_is_refused_not_broadcast():
    """v of 1 run with B of 2: torch broadcast run 0's head over both, scoring run 1 with
    run 0's head (0.68 where its loss is 1.69); wrong d, dtype or numpy are named too."""
    rng = np.random.default_rng(2)
    nets, targets = nets_and_targets(rng, "relu", "relu")
    samples = [(np.zeros((1, net.d)), np.zeros(1)) for net in nets]
    batch = Batch.build(nets, samples, "last", 0.1, {"t": targets}, device="cpu")
    target, v, B = batch.targets["t"], batch.v, batch.B
    R, d = B.shape[0], B.shape[2]
    for bad_v, bad_B in ((v[:1], B), (v, B[:, :, :d - 1]), (v[:, :1], B), (v[..., None], B)):
        with pytest.raises(ValueError, match=f"expected v \\(R, k\\) and B \\(R, k, d\\) with "
                                             f"R = {R} runs and d = {d}"):
            target.loss(bad_v, bad_B, "relu")
    with pytest.raises(ValueError, match="must be torch.float64 like the target"):
        target.loss(v.float(), B.float(), "relu")
    with pytest.raises(ValueError, match="must be torch tensors, got ndarray"):
        target.loss(v.numpy(), B, "relu")


def test_a_relu_teacher_with_its_units_permuted_scores_a_loss_of_zero_never_below():
    # guards: the per-component clamp dropped. The same function computed with its hidden
    # units in another order leaves own - 2 cross + E[y^2] at rounding level (~1e-14 here,
    # of either sign, on 64 random teachers and two-component mixtures); the loss is a mean
    # square, so it must come out >= 0 (theory clips each component at 0 too).
    rng = np.random.default_rng(0)
    R, k, d = 64, 3, 4
    tv = torch.tensor(rng.standard_normal((R, k)))
    tB = torch.tensor(rng.standard_normal((R, k, d)))
    A = rng.standard_normal((R, 2, d, d))
    target = Target(tv, tB, "relu", torch.full((R, 2), 0.5, dtype=torch.float64),
                    torch.tensor(A @ A.transpose(0, 1, 3, 2)))
    loss = target.loss(tv[:, [2, 0, 1]], tB[:, [2, 0, 1]], "relu")
    assert loss.min() >= 0 and loss.max() < 1e-12 * target.label_energy().min()
