"""Gradient descent: its gradients, its limits against the closed forms, invariants, errors."""
import numpy as np
import pytest

from theory import TwoLayer, finetune, finetune_path, gradient_flow


def problem(rng, n, d, k, activation="linear"):
    net = TwoLayer(rng.standard_normal(k), rng.standard_normal((k, d)) / np.sqrt(d), activation)
    X = rng.standard_normal((n, d))
    y = X @ rng.standard_normal(d)
    return net, X, y


def train_loss(v, B, activation, X, y):
    net = TwoLayer(v, B, activation)
    return np.mean((net(X) - y) ** 2) / 2


def hessian_bound(net, X, tune):
    """2 / (this) is the stability limit of lr for the convex modes (largest curvature)."""
    n = X.shape[0]
    if tune == "last":
        H = net.features(X)
        return np.linalg.eigvalsh(H.T @ H / n).max()
    return (net.v @ net.v) * np.linalg.eigvalsh(X.T @ X / n).max()


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("tune", ["first", "last", "all"])
def test_one_step_is_minus_lr_times_the_finite_difference_gradient(tune, activation):
    rng = np.random.default_rng(0)
    net, X, y = problem(rng, n=7, d=3, k=4, activation=activation)
    lr, h = 1e-3, 1e-6
    stepped = finetune(net, X, y, tune, steps=1, lr=lr)
    for name in ("v", "B"):
        param = getattr(net, name)
        grad = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            plus, minus = param.copy(), param.copy()
            plus[index] += h
            minus[index] -= h
            args = lambda p: (p, net.B) if name == "v" else (net.v, p)
            grad[index] = (train_loss(*args(plus), activation, X, y)
                           - train_loss(*args(minus), activation, X, y)) / (2 * h)
        moves = (name == "v" and tune != "first") or (name == "B" and tune != "last")
        expected = param - lr * grad if moves else param
        assert np.allclose(getattr(stepped, name), expected, rtol=0, atol=1e-10), name


@pytest.mark.parametrize("n", [3, 12])          # fewer and more samples than d
def test_first_layer_descent_reaches_the_closed_form_limit(n):
    rng = np.random.default_rng(1)
    net, X, y = problem(rng, n=n, d=6, k=3)
    limit = gradient_flow(net, X, y, "first")
    gd = finetune(net, X, y, "first", steps=20_000, lr=1.0 / hessian_bound(net, X, "first"))
    assert np.allclose(gd.B, limit.B, rtol=0, atol=1e-9)
    assert np.array_equal(gd.v, net.v)
    # Structure of the limit: B = B_src + v_src c^T, c = X^+ (y - X w_src) / |v_src|^2.
    c = np.linalg.pinv(X) @ (y - X @ net.effective_weights()) / (net.v @ net.v)
    assert np.allclose(limit.B, net.B + np.outer(net.v, c), atol=1e-12)


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("n", [3, 12])
def test_last_layer_descent_reaches_the_closed_form_limit(activation, n):
    rng = np.random.default_rng(2)
    net, X, y = problem(rng, n=n, d=6, k=4, activation=activation)
    limit = gradient_flow(net, X, y, "last")
    gd = finetune(net, X, y, "last", steps=20_000, lr=1.0 / hessian_bound(net, X, "last"))
    assert np.allclose(gd.v, limit.v, rtol=0, atol=1e-9)
    assert np.array_equal(gd.B, net.B)
    H = net.features(X)
    assert np.allclose(limit.v, net.v + np.linalg.pinv(H) @ (y - H @ net.v), atol=1e-12)


@pytest.mark.parametrize("tune", ["first", "last"])
def test_descent_approaches_the_flow_at_finite_time_with_error_of_order_lr(tune):
    rng = np.random.default_rng(3)
    net, X, y = problem(rng, n=5, d=4, k=3)
    time = 2.0 / hessian_bound(net, X, tune)
    flow = gradient_flow(net, X, y, tune, time=time)
    errors = []
    for steps in (100, 200):
        gd = finetune(net, X, y, tune, steps=steps, lr=time / steps)
        errors.append(np.abs(gd.B - flow.B).max() + np.abs(gd.v - flow.v).max())
    assert 1.8 < errors[0] / errors[1] < 2.2, errors
    assert errors[1] < 1e-2 * (np.abs(flow.B - net.B).max() + np.abs(flow.v - net.v).max())


def balancedness(v, B):
    return np.outer(v, v) - B @ B.T


def test_balancedness_is_conserved_up_to_order_lr_along_full_tuning():
    rng = np.random.default_rng(4)
    net, X, y = problem(rng, n=6, d=5, k=3)
    time, drift = 4.0, []
    start = balancedness(net.v, net.B)
    for steps in (1000, 2000):
        path = finetune_path(net, X, y, "all", steps=steps, lr=time / steps, every=steps // 8)
        assert path.train_loss[-1] < 0.05 * path.train_loss[0]    # it actually moved
        drift.append(max(np.abs(balancedness(v, B) - start).max()
                         for v, B in zip(path.v, path.B)))
    change = np.abs(net.B - path.B[-1]).max()
    assert drift[1] < 1e-2 * change
    assert 1.8 < drift[0] / drift[1] < 2.2, drift


def test_relu_conserves_each_units_balance():
    # ReLU is 1-homogeneous, so v_j^2 - |B_j|^2 (the diagonal) is conserved; the
    # off-diagonal of v v^T - B B^T is not.
    rng = np.random.default_rng(5)
    net, X, y = problem(rng, n=6, d=5, k=3, activation="relu")
    diag = lambda v, B: np.diag(balancedness(v, B))
    drift = []
    for steps in (1000, 2000):
        end = finetune(net, X, y, "all", steps=steps, lr=4.0 / steps)
        drift.append(np.abs(diag(end.v, end.B) - diag(net.v, net.B)).max())
    off = np.abs(balancedness(end.v, end.B) - balancedness(net.v, net.B)).max()
    assert 1.8 < drift[0] / drift[1] < 2.2 and off > 30 * drift[1]


def test_lp_ft_is_last_then_all():
    rng = np.random.default_rng(6)
    net, X, y = problem(rng, n=6, d=5, k=3, activation="relu")
    probed = finetune(net, X, y, "last", steps=50, lr=0.05)
    both = finetune(probed, X, y, "all", steps=50, lr=0.05)
    lpft = finetune(net, X, y, "lp-ft", steps=50, lr=0.05)
    assert np.array_equal(lpft.v, both.v) and np.array_equal(lpft.B, both.B)


def test_finetune_never_modifies_its_input_and_records_a_trajectory():
    rng = np.random.default_rng(7)
    net, X, y = problem(rng, n=6, d=5, k=3)
    v, B = net.v.copy(), net.B.copy()
    path = finetune_path(net, X, y, "lp-ft", steps=25, lr=0.05, every=10)
    assert np.array_equal(net.v, v) and np.array_equal(net.B, B)
    assert list(path.step) == [0, 10, 20, 30, 40, 50]
    assert path.v.shape == (6, 3) and path.B.shape == (6, 3, 5) and len(path) == 6
    for i in range(len(path)):
        assert np.isclose(path.train_loss[i], train_loss(path.v[i], path.B[i], "linear", X, y))
    end = finetune(net, X, y, "lp-ft", steps=25, lr=0.05)
    assert np.array_equal(path.net(-1).B, end.B)
    unchanged = finetune(net, X, y, "all", steps=0, lr=0.05)
    assert np.array_equal(unchanged.B, net.B) and unchanged is not net


@pytest.mark.parametrize("tune", ["first", "last", "all", "lp-ft"])
def test_diverging_lr_raises_naming_lr(tune):
    rng = np.random.default_rng(8)
    net, X, y = problem(rng, n=6, d=5, k=3)
    lr = 10.0 / min(hessian_bound(net, X, "first"), hessian_bound(net, X, "last"))
    with pytest.raises(ValueError, match="lr"):
        finetune(net, X, y, tune, steps=1000, lr=lr)


@pytest.mark.parametrize("kwargs, name", [
    (dict(tune="middle"), "tune"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=True), "lr"),
    (dict(y=np.ones(5)), "y"),
    (dict(y=np.full(6, np.nan)), "y"),
    (dict(X=np.ones((6, 4))), "X"),
    (dict(net="not a net"), "net"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    rng = np.random.default_rng(9)
    net, X, y = problem(rng, n=6, d=5, k=3)
    args = dict(net=net, X=X, y=y, tune="all", steps=10, lr=0.01) | kwargs
    with pytest.raises(ValueError, match=name):
        finetune(**args)


def test_gradient_flow_refuses_what_has_no_closed_form():
    rng = np.random.default_rng(10)
    net, X, y = problem(rng, n=6, d=5, k=3, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        gradient_flow(net, X, y, "first")
    with pytest.raises(ValueError, match="tune"):
        gradient_flow(net, X, y, "all")
    for time in (-1.0, None, "abc"):
        with pytest.raises(ValueError, match="time must be >= 0"):
            gradient_flow(net, X, y, "last", time=time)


def test_divergence_is_judged_against_E_y2_not_only_against_a_near_zero_start():
    # A near-exact fit (train loss ~1e-20) stepped at lr 2.2 / curvature: the error along
    # the top curvature direction grows 1.2-fold a step, the loss 1e10-fold within 65
    # steps, yet after 100 steps it is still far below DIVERGENCE_FACTOR * |y|^2 / (2n),
    # the scale the docstrings name (max(start, |y|^2 / (2n))): not a divergence.
    rng = np.random.default_rng(11)
    net, X, _ = problem(rng, n=6, d=5, k=3)
    y = net(X) + 1e-9 * rng.standard_normal(6)
    H, n = net.features(X), 6
    lr = 2.2 / hessian_bound(net, X, "last")
    v = net.v.copy()
    for _ in range(100):                                      # the same steps, by hand
        v = v - lr * H.T @ (H @ v - y) / n
    start, end = train_loss(net.v, net.B, "linear", X, y), train_loss(v, net.B, "linear", X, y)
    assert start < 1e-17 and end > 1e10 * start and end < 1e-3 * (y @ y / (2 * n))
    tuned = finetune(net, X, y, "last", steps=100, lr=lr)
    assert np.allclose(tuned.v, v, rtol=1e-9, atol=0) and np.array_equal(tuned.B, net.B)
    with pytest.raises(ValueError, match="lr"):               # run on, it does diverge
        finetune(net, X, y, "last", steps=400, lr=lr)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0.0), "lr"),
    (dict(steps=True), "steps"),
    (dict(every=0), "every"),
    (dict(every=True), "every"),
    (dict(every=2.0), "every"),
])
def test_zero_lr_bool_steps_and_nonpositive_every_are_refused_naming_themselves(kwargs, name):
    # lr must be > 0 (0 would "tune" nothing), steps and every are integers (True is not
    # a count), every >= 1 (0 would be a modulo by zero).
    rng = np.random.default_rng(12)
    net, X, y = problem(rng, n=6, d=5, k=3)
    args = dict(net=net, X=X, y=y, tune="all", steps=10, lr=0.01) | kwargs
    with pytest.raises(ValueError, match=f"{name} must be"):
        finetune_path(**args)


def test_trajectory_always_records_the_start_and_the_last_step():
    # every=None: only the start and the end; every=7 over 20 steps: 0, 7, 14 and 20.
    rng = np.random.default_rng(13)
    net, X, y = problem(rng, n=6, d=5, k=3)
    ends = finetune_path(net, X, y, "all", steps=20, lr=0.01, every=None)
    assert list(ends.step) == [0, 20]
    assert np.array_equal(ends.v[0], net.v) and np.array_equal(ends.B[0], net.B)
    assert np.isclose(ends.train_loss[0], train_loss(net.v, net.B, "linear", X, y))
    sparse = finetune_path(net, X, y, "all", steps=20, lr=0.01, every=7)
    assert list(sparse.step) == [0, 7, 14, 20]
    assert np.array_equal(sparse.B[-1], ends.B[-1])


def test_first_layer_flow_with_a_zero_head_leaves_B_where_it_was():
    # dL/dB = v r^T X / n = 0 when v = 0: B never moves, at any time (the docstring's case).
    rng = np.random.default_rng(14)
    net, X, y = problem(rng, n=6, d=5, k=3)
    still = net.replace(v=np.zeros(3))
    for time in (0.5, np.inf):
        assert np.array_equal(gradient_flow(still, X, y, "first", time=time).B, still.B)
    assert np.array_equal(finetune(still, X, y, "first", steps=10, lr=0.1).B, still.B)


def test_a_loss_1e10_times_its_starting_scale_is_a_divergence():
    # The module's rule: train loss above DIVERGENCE_FACTOR = 1e10 times max(start loss,
    # |y|^2 / (2n)) raises. Last-layer steps at lr = 2.2 / curvature grow the error along
    # the top curvature direction 1.2-fold a step, the loss ~1.44-fold: after 90 steps
    # (computed here by hand) it is above 1e10 and below 1e20 times the scale.
    rng = np.random.default_rng(15)
    net, X, y = problem(rng, n=6, d=5, k=3)
    H, n = net.features(X), 6
    lr = 2.2 / hessian_bound(net, X, "last")
    scale = max(train_loss(net.v, net.B, "linear", X, y), y @ y / (2 * n))
    v = net.v.copy()
    for _ in range(90):
        v = v - lr * H.T @ (H @ v - y) / n
    assert 1e12 * scale < train_loss(v, net.B, "linear", X, y) < 1e18 * scale
    with pytest.raises(ValueError, match="diverged"):
        finetune(net, X, y, "last", steps=90, lr=lr)
