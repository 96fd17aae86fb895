"""Exact Gaussian expectations against Monte Carlo (tolerance: 5 standard errors)."""
import numpy as np
import pytest

from theory import (GaussianMixture, TwoLayer, best_last_layer, best_last_layer_loss,
                    check_cov, cross_moment, feature_moments, population_loss, relu_kernel)

N_MC = 200_000
Z_TOL = 5.0   # standard errors


def random_cov(rng, d, rank=None):
    F = rng.standard_normal((d, rank or d))
    return F @ F.T / d


def sample(cov, n, rng):
    return GaussianMixture.gaussian(cov).sample(n, rng)[0]


def assert_mc_close(exact, samples):
    """|exact - mean(samples)| within Z_TOL standard errors (entrywise on axis 0)."""
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    assert np.all(np.abs(exact - mean) <= Z_TOL * se + 1e-12), (exact, mean, se)


COVS = {
    "full": lambda rng: random_cov(rng, 4),
    "rank-2": lambda rng: random_cov(rng, 4, rank=2),
    "rank-1 diagonal": lambda rng: np.diag([0.0, 2.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("cov_name", COVS)
def test_relu_kernel_and_mixed_moment_vs_monte_carlo(cov_name):
    rng = np.random.default_rng(1)
    cov = COVS[cov_name](rng)
    Ba, Bb = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    Bb[1] = -0.7 * Ba[0]          # an anti-parallel pair
    X = sample(cov, N_MC, rng)
    Ha, Hb = np.maximum(X @ Ba.T, 0), np.maximum(X @ Bb.T, 0)
    assert_mc_close(relu_kernel(Ba, Bb, cov), Ha[:, :, None] * Hb[:, None, :])
    assert_mc_close(cross_moment(Ba, "relu", Bb, "linear", cov),
                    Ha[:, :, None] * (X @ Bb.T)[:, None, :])
    assert_mc_close(cross_moment(Ba, "linear", Bb, "relu", cov),
                    (X @ Ba.T)[:, :, None] * Hb[:, None, :])


def test_relu_kernel_special_geometry_is_exact():
    cov = np.diag([1.0, 2.0, 0.0])
    a = np.array([[0.3, -1.2, 5.0]])
    norm2 = (a @ cov @ a.T).item()
    assert np.isclose(relu_kernel(a, a, cov).item(), norm2 / 2, rtol=1e-14)       # theta = 0
    assert abs(relu_kernel(a, -a, cov).item()) <= 1e-15 * norm2                   # theta = pi
    assert relu_kernel(a, np.array([[0.0, 0.0, 1.0]]), cov).item() == 0.0         # null direction
    b = np.array([[2.4, 0.3, 0.0]])          # cov-orthogonal to a: 0.3*2.4 - 1.2*2*0.3 = 0
    nb2 = (b @ cov @ b.T).item()
    assert np.isclose(relu_kernel(a, b, cov).item(), np.sqrt(norm2 * nb2) / (2 * np.pi),
                      rtol=1e-14)                                                  # theta = pi/2
    # nearly parallel rows: the kernel is smooth there, no arccos blow-up
    eps = 1e-9
    c = a + eps * b
    assert np.isclose(relu_kernel(a, c, cov).item(), (a @ cov @ c.T).item() / 2, rtol=1e-13)


def test_relu_kernel_broadcasts_over_a_batch():
    rng = np.random.default_rng(2)
    Ba, Bb = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 2, 4))
    covs = np.stack([random_cov(rng, 4) for _ in range(5)])
    batched = relu_kernel(Ba, Bb, covs)
    assert batched.shape == (5, 3, 2)
    for i in range(5):
        assert np.allclose(batched[i], relu_kernel(Ba[i], Bb[i], covs[i]), rtol=1e-14)


NETS = [("linear", "linear"), ("relu", "relu"), ("linear", "relu"), ("relu", "linear")]


@pytest.mark.parametrize("cov_name", COVS)
@pytest.mark.parametrize("activations", NETS)
def test_population_loss_vs_monte_carlo(activations, cov_name):
    rng = np.random.default_rng(3)
    cov = COVS[cov_name](rng)
    net = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), activations[0])
    teacher = TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 4)), activations[1])
    X = sample(cov, N_MC, rng)
    assert_mc_close(population_loss(net, teacher, cov), (net(X) - teacher(X)) ** 2)


def test_population_loss_of_a_mixture_vs_monte_carlo():
    rng = np.random.default_rng(4)
    mixture = GaussianMixture([0.2, 0.5, 0.3], [random_cov(rng, 3), random_cov(rng, 3, 1),
                                                np.diag([0.0, 0.0, 4.0])])
    net = TwoLayer(rng.standard_normal(4), rng.standard_normal((4, 3)), "relu")
    teacher = TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 3)), "relu")
    X, component = mixture.sample(N_MC, rng)
    assert np.allclose(np.bincount(component) / N_MC, mixture.weights, atol=5e-3)
    exact = population_loss(net, teacher, mixture)
    assert_mc_close(exact, (net(X) - teacher(X)) ** 2)
    # A mixture's loss is the weighted sum over components ...
    parts = [population_loss(net, teacher, c) for c in mixture.covs]
    assert np.isclose(exact, mixture.weights @ parts, rtol=1e-14)
    # ... and for linear networks only the second moment matters.
    lin_net, lin_teacher = net.replace(activation="linear"), teacher.replace(activation="linear")
    assert np.isclose(population_loss(lin_net, lin_teacher, mixture),
                      population_loss(lin_net, lin_teacher, mixture.second_moment), rtol=1e-12)


def test_population_loss_of_identical_networks_is_zero():
    rng = np.random.default_rng(5)
    cov = random_cov(rng, 4)
    for activation in ("linear", "relu"):
        net = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), activation)
        scale = population_loss(net, net.replace(v=np.zeros(3)), cov)
        assert 0.0 <= population_loss(net, net, cov) <= 1e-14 * scale


def test_mixture_sampling_moments_and_exact_null_directions():
    rng = np.random.default_rng(6)
    mixture = GaussianMixture([0.5, 0.5], [np.diag([1.0, 1.0, 0.0]), random_cov(rng, 3)])
    X, component = mixture.sample(N_MC, rng)
    assert np.all(X[component == 0, 2] == 0.0)     # exact zeros, not ~1e-17
    second = X[:, :, None] * X[:, None, :]
    assert_mc_close(mixture.second_moment, second)
    X2, c2 = mixture.sample(10, np.random.default_rng(7))
    X3, c3 = mixture.sample(10, np.random.default_rng(7))
    assert np.array_equal(X2, X3) and np.array_equal(c2, c3)


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_best_last_layer_vs_large_sample_least_squares(activation):
    rng = np.random.default_rng(8)
    cov = random_cov(rng, 4)
    net = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), activation)
    teacher = TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 4)), "relu")
    best = best_last_layer(net, teacher, cov)
    loss = best_last_layer_loss(net, teacher, cov)
    # The formula E[y^2] - c^T G^+ c equals the loss of the head it returns ...
    assert np.isclose(loss, population_loss(best, teacher, cov), rtol=1e-10)
    # ... no perturbed head does better ...
    for _ in range(20):
        other = best.replace(v=best.v + 0.05 * rng.standard_normal(3))
        assert population_loss(other, teacher, cov) >= loss
    # ... and least squares on a large sample finds nearly the same head.
    X = sample(cov, N_MC, rng)
    v_hat = np.linalg.lstsq(net.features(X), teacher(X), rcond=None)[0]
    assert np.allclose(v_hat, best.v, atol=0.02)
    assert np.isclose(population_loss(best.replace(v=v_hat), teacher, cov), loss, rtol=1e-2)


def test_best_last_layer_loss_on_a_mixture_is_the_loss_of_its_head():
    """On a mixture every moment is weighted by its component's weight, E[y^2] too: the
    formula E[y^2] - c^T G^+ c equals the population loss of the head it returns (rtol
    1e-10, rounding only), and E[y^2] is the loss of the zero head. An unweighted E[y^2]
    (sum_i E_i[y^2] for sum_i w_i E_i[y^2]) breaks both."""
    rng = np.random.default_rng(0)
    mixture = GaussianMixture([0.3, 0.7], [random_cov(rng, 4), random_cov(rng, 4)])
    net = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), "relu")
    teacher = TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 4)), "relu")
    loss = best_last_layer_loss(net, teacher, mixture)
    assert np.isclose(loss, population_loss(best_last_layer(net, teacher, mixture), teacher,
                                            mixture), rtol=1e-10)
    _, _, y2 = feature_moments(net, teacher, mixture)
    assert np.isclose(y2, population_loss(net.replace(v=np.zeros(3)), teacher, mixture),
                      rtol=1e-12)


def test_best_last_layer_with_singular_features():
    # Two identical hidden units and one that is zero on the support of cov: G is singular.
    cov = np.diag([1.0, 0.0])
    net = TwoLayer(np.ones(3), [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "relu")
    teacher = TwoLayer([2.0], [[1.0, 0.0]], "relu")
    assert abs(best_last_layer_loss(net, teacher, cov)) < 1e-14
    assert np.allclose(best_last_layer(net, teacher, cov).v, [1.0, 1.0, 0.0])


def test_best_last_layer_loss_of_features_that_fit_is_never_negative():
    # A loss is >= 0. When the net's own features fit the teacher (net = teacher), the
    # formula E[y^2] - c^T G^+ c cancels to rounding, below 0 for about half of these draws.
    rng = np.random.default_rng(0)
    for activation in ("linear", "relu"):
        for _ in range(20):
            teacher = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), activation)
            cov = random_cov(rng, 4)
            scale = population_loss(TwoLayer([0.0], np.zeros((1, 4))), teacher, cov)
            assert 0 <= best_last_layer_loss(teacher, teacher, cov) < 1e-12 * scale


@pytest.mark.parametrize("cov, match", [
    (np.array([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), "positive semi-definite"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN"),
    (np.eye(3), r"\(2, 2\)"),
    (np.ones((2, 3)), "square"),
    (np.ones(2), "dimension"),
])
def test_bad_cov_names_cov(cov, match):
    net = TwoLayer([1.0], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="cov") as error:
        population_loss(net, net, cov)
    assert error.match(match)


def test_psd_tolerance_accepts_rounding_only():
    F = np.random.default_rng(9).standard_normal((5, 2))
    cov = F @ F.T                       # rank 2: eigenvalues ~ -1e-16 from rounding
    check_cov(cov)
    with pytest.raises(ValueError, match="positive semi-definite"):
        check_cov(cov - 1e-6 * np.eye(5))


@pytest.mark.parametrize("weights, covs, name", [
    ([0.5, 0.6], np.stack([np.eye(2)] * 2), "weights"),
    ([1.5, -0.5], np.stack([np.eye(2)] * 2), "weights"),
    ([0.5, 0.5], np.stack([np.eye(2)] * 3), "covs"),
    ([0.5, 0.5], np.stack([np.eye(2), -np.eye(2)]), r"covs\[1\]"),
])
def test_bad_mixture_names_the_argument(weights, covs, name):
    with pytest.raises(ValueError, match=name):
        GaussianMixture(weights, covs)


def test_mismatched_dimensions_and_types():
    net = TwoLayer([1.0], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="teacher"):
        population_loss(net, TwoLayer([1.0], [[1.0, 0.0, 0.0]]), np.eye(2))
    with pytest.raises(ValueError, match="teacher"):
        population_loss(net, np.ones(2), np.eye(2))
    with pytest.raises(ValueError, match="cov"):
        population_loss(net, net, GaussianMixture.gaussian(np.eye(3)))
    with pytest.raises(ValueError, match="rng"):
        GaussianMixture.gaussian(np.eye(2)).sample(3, 0)


def test_cross_moment_refuses_an_unknown_activation_on_either_side():
    # Only "linear" and "relu" have a moment here; anything else would silently get the
    # mixed moment a^T cov b / 2.
    B, cov = np.ones((1, 2)), np.eye(2)
    for pair in (("tanh", "relu"), ("relu", "tanh"), ("linear", "gelu")):
        with pytest.raises(ValueError, match="activation must be one of"):
            cross_moment(B, pair[0], B, pair[1], cov)


@pytest.mark.parametrize("n", [True, False, 0, -2, 2.0])
def test_sample_sizes_must_be_positive_integers_not_bools(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        GaussianMixture.gaussian(np.eye(2)).sample(n, np.random.default_rng(0))


def test_population_loss_between_rescaled_copies_of_a_relu_net_is_never_negative():
    # relu is positively homogeneous: (3 v, B / 3) computes the same function as (v, B), so
    # the loss is 0, and as a mean of squares it is >= 0. The kernel sum E[f^2] - 2 E[f g]
    # + E[g^2] cancels to rounding and lands below 0 for about 4 in 10 of these draws.
    rng = np.random.default_rng(10)
    for _ in range(40):
        cov = random_cov(rng, 4)
        net = TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 4)), "relu")
        copy = net.replace(v=3 * net.v, B=net.B / 3)
        scale = population_loss(net, net.replace(v=np.zeros(3)), cov)
        assert 0.0 <= population_loss(net, copy, cov) < 1e-13 * scale
