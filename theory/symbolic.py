"""Symbolic derivations (sympy) behind the closed forms; tests compare them with numbers.

Scalar network (k = d = 1): f(x) = v b x. On a sample, L = 1/(2n) sum (v b x_i - y_i)^2
= (s/2) (v b - beta)^2 + const with s = mean(x^2) > 0 and beta = mean(x y) / s, so the
gradient flows depend on the data only through (s, beta).

    first:  db/dt = -s v (v b - beta)                      (v fixed)
    all:    dv/dt = -s b (v b - beta),  db/dt = -s v (v b - beta)

Every function returns sympy expressions in the module's symbols (t, s, beta, v0, b0,
theta) and derives them rather than stating them: by `dsolve`, by `integrate`, or by
substituting a solution into its differential equation.
"""
import functools

import sympy as sp

t = sp.Symbol("t", nonnegative=True)          # flow time
s = sp.Symbol("s", positive=True)             # mean(x^2) of the sample
beta = sp.Symbol("beta", real=True)           # least-squares slope mean(x y) / mean(x^2)
v0, b0 = sp.symbols("v0 b0", real=True)       # initial head and first-layer weight
theta = sp.Symbol("theta", nonnegative=True)  # angle between two projections, in [0, pi]


@functools.lru_cache(maxsize=None)
def scalar_first_flow():
    """b(t) under first-layer gradient flow (v = v0 fixed), solved by dsolve:
    b(t) = beta / v0 + (b0 - beta / v0) exp(-s v0^2 t)."""
    b = sp.Function("b")
    ode = sp.Eq(b(t).diff(t), -s * v0 * (v0 * b(t) - beta))
    return sp.simplify(sp.dsolve(ode, b(t), ics={b(0): b0}).rhs)


def _all_rhs(v, b):
    """(dv/dt, db/dt) of full fine-tuning, scalar case."""
    residual = v * b - beta
    return -s * b * residual, -s * v * residual


@functools.lru_cache(maxsize=None)
def scalar_all_invariant():
    """d/dt (v^2 - b^2) along full fine-tuning, simplified: 0 (balancedness)."""
    v, b = sp.symbols("v b", real=True)
    dv, db = _all_rhs(v, b)
    return sp.simplify(2 * v * dv - 2 * b * db)


@functools.lru_cache(maxsize=None)
def scalar_all_flow():
    """(v(t), b(t)) under full fine-tuning gradient flow, in closed form.

    Derivation. With p = v + b, q = v - b the invariant is delta = v^2 - b^2 = p q, and
    z = p^2 obeys the Riccati equation dz/dt = -(s/2)(z^2 - 4 beta z - delta^2) (checked
    below from the original system). Its roots are z_pm = 2 beta +- r, r = sqrt(4 beta^2
    + delta^2), and (z - z_+)/(z - z_-) decays like exp(-s r t). Then p = sign(p0) sqrt(z),
    q = delta / p, v = (p + q) / 2, b = (p - q) / 2. Valid when v0 + b0 != 0 (otherwise
    swap the roles of p and q). As t -> inf, z -> z_+ and v b -> beta.

    The function checks each step with sympy (raising AssertionError if one fails) and
    returns (v(t), b(t)).
    """
    v, b = sp.symbols("v b", real=True)
    dv, db = _all_rhs(v, b)
    delta_vb = v**2 - b**2
    # Step 1: d(p^2)/dt from the original system equals the Riccati right-hand side.
    riccati = lambda z, delta: -s / 2 * (z**2 - 4 * beta * z - delta**2)
    assert sp.expand(2 * (v + b) * (dv + db) - riccati((v + b)**2, delta_vb)) == 0

    # Step 2: the explicit Riccati solution satisfies its equation and initial condition.
    delta = v0**2 - b0**2
    root = sp.sqrt(4 * beta**2 + delta**2)
    z_plus, z_minus = 2 * beta + root, 2 * beta - root
    z_start = (v0 + b0)**2
    ratio = (z_start - z_plus) / (z_start - z_minus) * sp.exp(-s * root * t)
    z = (z_plus - z_minus * ratio) / (1 - ratio)
    assert sp.simplify(z.diff(t) - riccati(z, delta)) == 0
    assert sp.simplify(z.subs(t, 0) - z_start) == 0

    p = sp.sign(v0 + b0) * sp.sqrt(z)
    q = delta / p
    return (p + q) / 2, (p - q) / 2


@functools.lru_cache(maxsize=None)
def arccos_kernel():
    """E[relu(a.x) relu(b.x)] for x ~ N(0, I_2), unit a, b at angle theta, by integrating
    in polar coordinates (a = e1, b = (cos theta, sin theta); both projections are positive
    for angles phi in [theta - pi/2, pi/2]):
    (sin theta + (pi - theta) cos theta) / (2 pi)."""
    r, phi = sp.symbols("r phi", nonnegative=True)
    radial = sp.integrate(r**3 * sp.exp(-r**2 / 2), (r, 0, sp.oo)) / (2 * sp.pi)
    angular = sp.integrate(sp.cos(phi) * sp.cos(phi - theta), (phi, theta - sp.pi / 2, sp.pi / 2))
    return sp.simplify(radial * angular)


@functools.lru_cache(maxsize=None)
def relu_linear_moment():
    """E[relu(a.x) (b.x)] for the same unit a, b: cos(theta) / 2 (= a.b / 2)."""
    r, phi = sp.symbols("r phi", nonnegative=True)
    radial = sp.integrate(r**3 * sp.exp(-r**2 / 2), (r, 0, sp.oo)) / (2 * sp.pi)
    angular = sp.integrate(sp.cos(phi) * sp.cos(phi - theta), (phi, -sp.pi / 2, sp.pi / 2))
    return sp.simplify(radial * angular)


def _gaussian_integral(expression, x, lower=-sp.oo):
    """Integral of expression * standard normal density over [lower, inf)."""
    density = sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)
    return sp.simplify(sp.integrate(expression * density, (x, lower, sp.oo)))


@functools.lru_cache(maxsize=None)
def arccos_kernel_special_cases():
    """The kernel at theta = 0, pi/2, pi by direct one-dimensional Gaussian integrals
    (independent of `arccos_kernel`): {0: E relu(x)^2 = 1/2, pi/2: (E relu(x))^2 = 1/(2 pi),
    pi: E relu(x) relu(-x) = 0}."""
    x = sp.Symbol("x", real=True)
    return {sp.S(0): _gaussian_integral(x**2, x, 0),
            sp.pi / 2: _gaussian_integral(x, x, 0)**2,
            sp.pi: sp.S(0)}   # relu(x) relu(-x) = 0 for every x


@functools.lru_cache(maxsize=None)
def p1_best_last_layer_losses():
    """Best last-layer target loss E[y^2] - c^2 / G of the spec's P1 instances.

    After the swap the frozen feature is h = phi(x1) and the label y = phi(x2), with x1, x2
    independent N(0, 1): G = E[h^2], c = E[h] E[y], E[y^2] = G.
    Returns {"linear": 1, "relu": 1/2 - 1/(2 pi^2)}.
    """
    x = sp.Symbol("x", real=True)
    losses = {}
    for activation, lower in (("linear", -sp.oo), ("relu", 0)):
        second = _gaussian_integral(x**2, x, lower)    # E[phi(x)^2]
        first = _gaussian_integral(x, x, lower)        # E[phi(x)]
        G, c, y2 = second, first * first, second
        losses[activation] = sp.simplify(y2 - c**2 / G)
    return losses
