"""The sympy derivations against numbers computed another way."""
import numpy as np
import pytest
import sympy as sp
from scipy.integrate import solve_ivp

from theory import TwoLayer, best_last_layer_loss, cross_moment, finetune, gradient_flow
from theory import p1_instance, relu_kernel
from theory import symbolic as S


def scalar_data(seed):
    """A k = d = 1 sample and its (s, beta)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(7)
    y = 0.8 * x + 0.3 * rng.standard_normal(7)
    s = np.mean(x * x)
    return x[:, None], y, s, np.mean(x * y) / s


def evaluate(expression, **values):
    symbols = {"t": S.t, "s": S.s, "beta": S.beta, "v0": S.v0, "b0": S.b0, "theta": S.theta}
    return float(expression.subs({symbols[name]: value for name, value in values.items()}).evalf(30))


def test_scalar_first_flow_matches_the_numpy_flow():
    X, y, s, beta = scalar_data(0)
    b_of_t = S.scalar_first_flow()
    assert sp.simplify(b_of_t - (S.beta / S.v0 + (S.b0 - S.beta / S.v0)
                                 * sp.exp(-S.s * S.v0**2 * S.t))) == 0
    net = TwoLayer([1.3], [[-0.4]])
    for time in (0.0, 0.3, 2.0, np.inf):
        flow = gradient_flow(net, X, y, "first", time=time)
        value = (beta / 1.3 if np.isinf(time)
                 else evaluate(b_of_t, t=time, s=s, beta=beta, v0=1.3, b0=-0.4))
        assert np.isclose(flow.B[0, 0], value, rtol=1e-12, atol=1e-14)


def test_scalar_all_invariant_is_zero():
    assert S.scalar_all_invariant() == 0


@pytest.mark.parametrize("v0, b0, seed", [(1.3, -0.4, 0), (0.2, 1.5, 1), (-0.9, -0.3, 2),
                                          (0.7, 0.7, 3)])
def test_scalar_all_flow_matches_ode_solver_and_gradient_descent(v0, b0, seed):
    X, y, s, beta = scalar_data(seed)
    v_expr, b_expr = S.scalar_all_flow()
    f = sp.lambdify(S.t, [e.subs({S.s: s, S.beta: beta, S.v0: v0, S.b0: b0}) for e in (v_expr, b_expr)])

    def rhs(_, state):
        v, b = state
        residual = v * b - beta
        return [-s * b * residual, -s * v * residual]

    times = np.array([0.0, 0.5, 1.5, 4.0])
    ode = solve_ivp(rhs, (0, times[-1]), [v0, b0], t_eval=times, rtol=1e-12, atol=1e-14)
    closed = np.array([f(time) for time in times]).T
    assert np.allclose(closed, ode.y, rtol=1e-9, atol=1e-11)
    assert np.isclose(closed[0, -1] ** 2 - closed[1, -1] ** 2, v0**2 - b0**2, rtol=1e-12)
    # Gradient descent with a small step approaches the same curve (error O(lr)).
    gd = finetune(TwoLayer([v0], [[b0]]), X, y, "all", steps=4000, lr=1e-3)
    assert np.allclose([gd.v[0], gd.B[0, 0]], closed[:, -1], atol=5e-3)
    # The limit fits: v b -> beta.
    late = np.array(f(200.0))
    assert np.isclose(late[0] * late[1], beta, rtol=1e-10)


def test_arccos_kernel_formula_matches_numpy_kernel_at_many_angles():
    expression = S.arccos_kernel()
    assert sp.simplify(expression - (sp.sin(S.theta) + (sp.pi - S.theta) * sp.cos(S.theta))
                       / (2 * sp.pi)) == 0
    mixed = S.relu_linear_moment()
    for angle in np.linspace(0, np.pi, 13):
        b = np.array([[np.cos(angle), np.sin(angle)]])
        a = np.array([[1.0, 0.0]])
        assert np.isclose(relu_kernel(a, b, np.eye(2)).item(), evaluate(expression, theta=angle),
                          rtol=1e-13, atol=1e-16)
        assert np.isclose(cross_moment(a, "relu", b, "linear", np.eye(2)).item(),
                          evaluate(mixed, theta=angle), rtol=1e-13, atol=1e-16)


def test_arccos_kernel_special_cases():
    special = S.arccos_kernel_special_cases()
    assert special == {0: sp.Rational(1, 2), sp.pi / 2: 1 / (2 * sp.pi), sp.pi: 0}
    for angle, value in special.items():
        assert sp.simplify(S.arccos_kernel().subs(S.theta, angle) - value) == 0


def test_p1_best_last_layer_losses():
    losses = S.p1_best_last_layer_losses()
    assert losses["linear"] == 1
    assert sp.simplify(losses["relu"] - (sp.Rational(1, 2) - 1 / (2 * sp.pi**2))) == 0
    for activation, value in losses.items():
        problem = p1_instance(activation)
        numeric = best_last_layer_loss(problem.pretrained, problem.target_teacher, problem.target)
        assert np.isclose(numeric, float(value), rtol=1e-13)
    assert abs(float(losses["relu"]) - 0.4493394) < 1e-7
