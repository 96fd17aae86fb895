"""The three distribution shifts of the theory (claims P1, P2, T1) as ready-made problems.

A `ShiftProblem` holds everything one fine-tuning experiment needs: the source and target
input distributions (zero-mean Gaussian mixtures), the teachers that label them, and the
pretrained network. Construct one with

    input_perturbation(teacher, A)        P1: x_tgt = A x_src, labels unchanged
    label_perturbation(teacher, t)        P2: y_tgt = t * y_src
    new_directions(teacher, ds, p, ...)   T1: the target adds directions the source lacks

or draw a random one (`random_input_perturbation`, ...) with a numpy Generator, or take
the spec's fixed instances (`p1_instance`, `p2_instance`, `t1_instance`). Drawing costs a
few small numpy operations, so a batched simulator can draw thousands and stack the fields.
"""
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .gaussian import (GaussianMixture, as_mixture, check_count, check_probability, check_rng,
                       is_real, population_loss)
from .network import TwoLayer, as_array, check_activation

KINDS = ("input", "label", "new-directions")


@dataclass(frozen=True)
class ShiftProblem:
    """One source -> target shift with a pretrained network.

    Fields:
        kind: "input" (P1), "label" (P2) or "new-directions" (T1).
        source: `GaussianMixture` of source inputs (on R^d).
        target: `GaussianMixture` of target inputs. For "new-directions" it has two
            components: 0 = old inputs N(0, P_S) (weight p), 1 = new N(0, P_T) (1 - p).
        source_teacher: `TwoLayer`, y = source_teacher(x) on source inputs.
        target_teacher: `TwoLayer`, y = target_teacher(x) on target inputs.
        pretrained: `TwoLayer` fitting the source exactly (zero source population loss).
        params: the shift's parameters: {"A": (d, d) array} for "input", {"t": float} for
            "label", {"ds": int, "m": int, "p": float} for "new-directions" (S is spanned
            by the first ds coordinates, T by the last m = d - ds; random draws add
            "init_T_scale").
    Exact target population loss of any net: `problem.target_loss(net)`.
    """
    kind: str
    source: GaussianMixture
    target: GaussianMixture
    source_teacher: TwoLayer
    target_teacher: TwoLayer
    pretrained: TwoLayer
    params: dict = field(default_factory=dict)

    @property
    def d(self):
        return self.source.d

    def sample_source(self, n, rng):
        """n labelled source points: (X (n, d), y (n,)), drawn with Generator `rng`."""
        X, _ = self.source.sample(n, rng)
        return X, self.source_teacher(X)

    def sample_target(self, n, rng):
        """n labelled target points: (X (n, d), y (n,)), drawn with Generator `rng`.
        Same draws as `X, component = problem.target.sample(n, rng)`, y = target_teacher(X)."""
        X, _ = self.target.sample(n, rng)
        return X, self.target_teacher(X)

    def target_loss(self, net):
        """Exact E[(net(x) - y)^2] over the target distribution."""
        return population_loss(net, self.target_teacher, self.target)

    def source_loss(self, net):
        """Exact E[(net(x) - y)^2] over the source distribution."""
        return population_loss(net, self.source_teacher, self.source)


def _check_teacher(teacher, name="teacher"):
    if not isinstance(teacher, TwoLayer):
        raise ValueError(f"{name} must be a TwoLayer, got {type(teacher).__name__}")
    return teacher


def _check_pretrained(pretrained, teacher, source):
    """The pretrained net must have zero source loss (to rounding, relative to E[y^2])."""
    _check_teacher(pretrained, "pretrained")
    if pretrained.d != teacher.d:
        raise ValueError(f"pretrained has d = {pretrained.d} but teacher has d = {teacher.d}")
    scale = population_loss(TwoLayer(np.zeros(1), np.zeros((1, teacher.d))), teacher, source)
    loss = population_loss(pretrained, teacher, source)
    if loss > 1e-12 * max(scale, 1e-300):
        raise ValueError(f"pretrained must fit the source exactly; its source loss is "
                         f"{loss:.3g} (E[y^2] = {scale:.3g})")
    return pretrained


def input_perturbation(teacher, A, cov=None, pretrained=None):
    """P1: target inputs x_tgt = A x_src (A invertible), labels unchanged.

    Args:
        teacher: source teacher `TwoLayer` (d inputs).
        A: (d, d) invertible matrix.
        cov: source covariance (d, d), or a `GaussianMixture`; default identity.
        pretrained: a net with zero source loss; default: a copy of the teacher.
    The target teacher is x -> teacher(A^{-1} x), so B_src A^{-1} with v_src fits it exactly.
    The target distribution is that of A x_src: each component N(0, S_j) becomes
    N(0, A S_j A^T), with its weight.
    """
    teacher = _check_teacher(teacher)
    A = as_array(A, "A", 2, shape=(teacher.d, teacher.d))
    if np.linalg.cond(A) > 1e12:
        raise ValueError(f"A must be invertible; its condition number is {np.linalg.cond(A):.3g}")
    source = as_mixture(np.eye(teacher.d) if cov is None else cov, teacher.d)
    target = GaussianMixture(source.weights, A @ source.covs @ A.T)
    A_inv = np.linalg.inv(A)
    return ShiftProblem(
        "input", source, target, teacher, teacher.replace(B=teacher.B @ A_inv),
        _check_pretrained(teacher if pretrained is None else pretrained, teacher, source),
        {"A": A})


def label_perturbation(teacher, t, cov=None, pretrained=None):
    """P2: same inputs, target labels y_tgt = t * y_src.

    Args: teacher (`TwoLayer`), t (float), cov (default identity), pretrained (default:
    a copy of the teacher). The head t * v_src fits the target exactly.
    """
    teacher = _check_teacher(teacher)
    t = float(as_array([t], "t", 1)[0])
    source = as_mixture(np.eye(teacher.d) if cov is None else cov, teacher.d)
    return ShiftProblem(
        "label", source, source, teacher, teacher.replace(v=t * teacher.v),
        _check_pretrained(teacher if pretrained is None else pretrained, teacher, source),
        {"t": t})


def new_directions(teacher, ds, p, pretrained=None, blind_to_T=True):
    """T1: source x ~ N(0, P_S); target x ~ N(0, P_S) w.p. p, N(0, P_T) w.p. 1 - p.

    S = span(e_1..e_ds), T = its complement (m = d - ds >= 1 directions).
    Args:
        teacher: labels both domains (for the spec's T1, linear: TwoLayer([1], w*[None])).
        ds: dimension of S, 1 <= ds < d.
        p: probability of an old-direction target input, 0 <= p <= 1.
        pretrained: must fit the source exactly and, if `blind_to_T`, satisfy B_src P_T = 0
            (it knows nothing of T). Default: the teacher's first layer restricted to S, B P_S.
        blind_to_T: enforce B_src P_T = 0, as claim T1 assumes. With relu and exact zeros,
            gradient descent cannot leave B P_T = 0 (new-direction samples reach every unit
            with pre-activation 0, where relu' = 0); pass False to allow small T weights,
            which keep the source fit exact since source inputs have no T component.
    """
    teacher = _check_teacher(teacher)
    d = teacher.d
    if isinstance(ds, bool) or not isinstance(ds, (int, np.integer)) or not 1 <= ds < d:
        raise ValueError(f"ds must be an integer with 1 <= ds < d = {d}, got {ds!r}")
    p = check_probability(p)
    P_S = np.diag((np.arange(d) < ds).astype(float))
    P_T = np.eye(d) - P_S
    source = GaussianMixture.gaussian(P_S)
    if pretrained is None:
        pretrained = teacher.replace(B=teacher.B @ P_S)
    _check_pretrained(pretrained, teacher, source)
    if blind_to_T and np.any(pretrained.B[:, ds:] != 0):
        raise ValueError("pretrained must know nothing of T: its first layer needs "
                         "B_src P_T = 0 (zero columns ds..d-1), or pass blind_to_T=False")
    target = GaussianMixture([p, 1 - p], np.stack([P_S, P_T]))
    return ShiftProblem("new-directions", source, target, teacher, teacher, pretrained,
                        {"ds": int(ds), "m": d - int(ds), "p": p})


# ---- the spec's fixed instances --------------------------------------------------------

def p1_instance(activation="linear"):
    """P1 instance of the spec: d = 2, k = 1, B_src = e1^T, v_src = 1, y = phi(x1),
    x ~ N(0, I), A swaps the coordinates. Best last-layer target loss: 1 (linear),
    1/2 - 1/(2 pi^2) (relu)."""
    teacher = TwoLayer([1.0], [[1.0, 0.0]], check_activation(activation))
    return input_perturbation(teacher, [[0.0, 1.0], [1.0, 0.0]])


def p2_instance(activation="linear", t=-1.0):
    """P2 instance (the spec fixes none; this one reuses P1's network): d = 2, k = 1,
    y_src = phi(x1), x ~ N(0, I), y_tgt = t * y_src."""
    teacher = TwoLayer([1.0], [[1.0, 0.0]], check_activation(activation))
    return label_perturbation(teacher, t)


def t1_instance():
    """The spec's T1 instance: ds = 8, m = 2, k = 4, p = 0.5, linear; drawn once by
    `random_new_directions` with seed 0."""
    return random_new_directions(np.random.default_rng(0), ds=8, m=2, k=4, p=0.5)


# ---- random instances ------------------------------------------------------------------

def _random_teacher(rng, d, k, activation, nonnegative_head=False):
    """v_j ~ N(0, 1) (|N(0, 1)| if nonnegative_head), B_ij ~ N(0, 1/d)."""
    v = rng.standard_normal(k)
    B = rng.standard_normal((k, d)) / np.sqrt(d)
    return TwoLayer(np.abs(v) if nonnegative_head else v, B, check_activation(activation))


def _random_orthogonal(rng, d):
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


def random_input_perturbation(rng, d, k, activation="linear", max_stretch=2.0):
    """A random P1 problem: random teacher (= pretrained), x_src ~ N(0, I), and
    A = U diag(s) V^T with U, V uniformly random orthogonal and s log-uniform in
    [1 / max_stretch, max_stretch] (so A is invertible with cond(A) <= max_stretch^2)."""
    check_rng(rng), check_count(d, "d"), check_count(k, "k")
    if not (is_real(max_stretch) and 1 <= max_stretch < np.inf):
        raise ValueError(f"max_stretch must be a finite number >= 1, got {max_stretch!r}")
    teacher = _random_teacher(rng, d, k, activation)
    s = np.exp(rng.uniform(-np.log(max_stretch), np.log(max_stretch), d))
    A = _random_orthogonal(rng, d) @ np.diag(s) @ _random_orthogonal(rng, d).T
    return input_perturbation(teacher, A)


def random_label_perturbation(rng, d, k, activation="linear", t=-1.0):
    """A random P2 problem: random teacher (= pretrained), x ~ N(0, I), y_tgt = t y_src.
    For relu the teacher's head is nonnegative, so y_src >= 0 (the case of P2's bound)."""
    check_rng(rng), check_count(d, "d"), check_count(k, "k")
    teacher = _random_teacher(rng, d, k, activation, nonnegative_head=activation == "relu")
    return label_perturbation(teacher, t)


def random_new_directions(rng, ds, m, k, p, activation="linear", init_T_scale=0.0):
    """A random T1 problem on R^(ds + m).

    linear: teacher w* ~ N(0, I_d) (k = 1 teacher); pretrained with k hidden units,
        v_src ~ N(0, I_k) and B_src = v_src (P_S w*)^T / |v_src|^2 + (I - v_src v_src^T /
        |v_src|^2) R P_S with R_ij ~ N(0, 1), so B_src^T v_src = P_S w*, B_src P_T = 0.
    relu: teacher (v*, B*) random with k units and v* >= 0; pretrained = (v*, B* P_S).
    init_T_scale > 0 then sets the pretrained T columns to N(0, init_T_scale^2) entries
    (source fit still exact; see `new_directions(blind_to_T=False)`: needed for relu to
    learn T at all). It is recorded in params["init_T_scale"].
    """
    check_rng(rng), check_count(ds, "ds"), check_count(m, "m"), check_count(k, "k")
    if not is_real(init_T_scale) or not init_T_scale >= 0:
        raise ValueError(f"init_T_scale must be >= 0, got {init_T_scale!r}")
    d = ds + m
    P_S = np.diag((np.arange(d) < ds).astype(float))
    if activation == "relu":
        teacher = _random_teacher(rng, d, k, "relu", nonnegative_head=True)
        pretrained = teacher.replace(B=teacher.B @ P_S)
    else:
        check_activation(activation)
        w_star = rng.standard_normal(d)
        v = rng.standard_normal(k)
        head = np.outer(v, v) / (v @ v)
        B = (np.outer(v, P_S @ w_star) / (v @ v)
             + (np.eye(k) - head) @ rng.standard_normal((k, d)) @ P_S)
        teacher, pretrained = TwoLayer([1.0], w_star[None, :]), TwoLayer(v, B)
    if init_T_scale > 0:
        B = pretrained.B.copy()
        B[:, ds:] = init_T_scale * rng.standard_normal((pretrained.k, m))
        pretrained = pretrained.replace(B=B)
    problem = new_directions(teacher, ds, p, pretrained, blind_to_T=init_T_scale == 0)
    problem.params["init_T_scale"] = float(init_T_scale)
    return problem


# ---- the T1 event ----------------------------------------------------------------------

def t1_event_probability(ds, m, p, n):
    """P(n_T >= m and n - n_T < ds) for n_T ~ Binomial(n, 1 - p): the probability that n
    target samples contain enough new-direction samples to span T (n_T >= m) and too few
    old ones to span S (n_S < ds), the condition of claim T1."""
    for name, value in (("ds", ds), ("m", m), ("n", n)):
        check_count(value, name)
    p = check_probability(p)
    lowest = max(m, n - ds + 1)          # smallest n_T satisfying both conditions
    if lowest > n:
        return 0.0
    return float(stats.binom.sf(lowest - 1, n, 1.0 - p))


def t1_event(component, ds, m):
    """Whether a drawn target sample satisfies the T1 condition; `component` (n,) is the
    mixture index from `problem.target.sample` (1 = new direction)."""
    check_count(ds, "ds"), check_count(m, "m")
    component = np.asarray(component)
    if component.ndim != 1 or not np.isin(component, (0, 1)).all():
        raise ValueError(f"component must be a 1-d array of mixture indices 0 (old) and 1 (new "
                         f"direction), got {component.tolist()!r}")
    n_new = int(np.sum(component == 1))
    return n_new >= m and len(component) - n_new < ds
