"""Fine-tuning a `TwoLayer` on a target sample: gradient descent and closed-form flows.

Loss on a sample X (n, d), y (n,):  L(v, B) = 1/(2n) * sum_i (f(x_i) - y_i)^2.
Gradients, with features H = phi(X B^T) (n, k) and residuals r = H v - y (n,):

    dL/dv = H^T r / n                               (k,)
    dL/dB = (v * phi'(X B^T) * r[:, None])^T X / n  (k, d); phi' = 1 or 1{z > 0}

(relu'(0) = 0, as in torch.)

`tune` names what moves: "first" (B), "last" (v), "all" (both, simultaneous updates),
"lp-ft" (v alone for `steps` steps, then both for another `steps` steps).
"""
from dataclasses import dataclass

import numpy as np

from .gaussian import is_real
from .network import TwoLayer, as_array

TUNES = ("first", "last", "all", "lp-ft")

# A train loss this many times its starting scale counts as divergence: gradient descent
# at a stable step size never gets there, an unstable one gets there in a few dozen steps.
DIVERGENCE_FACTOR = 1e10


def check_tune(tune):
    if tune not in TUNES:
        raise ValueError(f"tune must be one of {TUNES}, got {tune!r}")
    return tune


def check_sample(net, X, y):
    """X (n, d) and y (n,) as finite float64 arrays matching `net`."""
    if not isinstance(net, TwoLayer):
        raise ValueError(f"net must be a TwoLayer, got {type(net).__name__}")
    X = net.check_inputs(X)
    y = as_array(y, "y", 1, shape=(X.shape[0],))
    return X, y


def _schedule(tune, steps):
    """What moves at each step: a list of (update_v, update_B), one entry per step."""
    return {"first": [(False, True)] * steps, "last": [(True, False)] * steps,
            "all": [(True, True)] * steps,
            "lp-ft": [(True, False)] * steps + [(True, True)] * steps}[tune]


@dataclass(frozen=True)
class Trajectory:
    """Recorded states of one gradient-descent run.

    Fields (T records, taken every `every` steps and at the last step):
        step: (T,) int, number of gradient steps taken before the record (0 = start).
        v: (T, k) head weights.  B: (T, k, d) first-layer weights.
        train_loss: (T,) L = 1/(2n) sum (f(x_i) - y_i)^2 at each record.
        activation: the network's activation.
    For "lp-ft", steps 0..steps are the probing phase and the rest full tuning.
    """
    step: np.ndarray
    v: np.ndarray
    B: np.ndarray
    train_loss: np.ndarray
    activation: str

    def __len__(self):
        return len(self.step)

    def net(self, i):
        """The network at record i (negative i counts from the end)."""
        return TwoLayer(self.v[i], self.B[i], self.activation)


def finetune_path(net, X, y, tune, steps, lr, every=1):
    """Full-batch gradient descent from `net`, recording the state every `every` steps.

    Args:
        net: the starting (pretrained) `TwoLayer`; never modified.
        X: inputs (n, d).  y: labels (n,).
        tune: "first" | "last" | "all" | "lp-ft".
        steps: number of gradient steps (>= 0); "lp-ft" takes 2 * steps in total.
        lr: step size (> 0).
        every: record interval in steps (>= 1), or None to record only the start and the
            end; the start and the last step are always recorded.
    Returns: a `Trajectory`.
    Raises ValueError naming `lr` if the loss becomes non-finite or blows up.
    """
    X, y = check_sample(net, X, y)
    check_tune(tune)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a nonnegative integer, got {steps!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, np.integer))
                              or every < 1):
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if not (is_real(lr) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")

    n, relu = X.shape[0], net.activation == "relu"
    v, B = net.v.copy(), net.B.copy()
    schedule = _schedule(tune, steps)
    records, start_scale = [], None
    for step in range(len(schedule) + 1):
        Z = X @ B.T
        H = np.maximum(Z, 0.0) if relu else Z
        r = H @ v - y
        loss = r @ r / (2 * n)
        if start_scale is None:
            start_scale = max(loss, y @ y / (2 * n))
        if not np.isfinite(loss) or (start_scale > 0 and loss > DIVERGENCE_FACTOR * start_scale):
            raise ValueError(
                f"finetune diverged at step {step} (train loss {loss:.3g}, start scale "
                f"{start_scale:.3g}): lr={lr} is too large for this data and tune={tune!r}; "
                "use a smaller lr")
        if step == len(schedule) or (every is not None and step % every == 0) or step == 0:
            records.append((step, v.copy(), B.copy(), loss))
        if step == len(schedule):
            break
        update_v, update_B = schedule[step]
        grad_v = H.T @ r / n
        if update_B:
            # relu'(0) = 0, as in torch: a unit with zero pre-activation on x gets no
            # gradient from x.
            weight = r[:, None] * v[None, :] * ((Z > 0) if relu else 1.0)
            B = B - lr * (weight.T @ X / n)
        if update_v:
            v = v - lr * grad_v
    step_, vs, Bs, losses = zip(*records)
    return Trajectory(np.array(step_), np.array(vs), np.array(Bs), np.array(losses),
                      net.activation)


def finetune(net, X, y, tune, steps, lr):
    """Full-batch gradient descent on L = 1/(2n) sum (f(x_i) - y_i)^2, starting at `net`.

    Args: as `finetune_path` (net (k, d) network, X (n, d), y (n,), tune, steps, lr).
    Returns: a new `TwoLayer` after the last step; `net` is never modified.
    """
    return finetune_path(net, X, y, tune, steps, lr, every=None).net(-1)


def _flow(x0, M, x_limit, time):
    """x(t) for dx/dt = -M (x - x_limit), x(0) = x0, M symmetric PSD; x(inf) = x_limit
    (x0 - x_limit lies in the range of M for the flows below)."""
    if np.isinf(time):
        return x_limit
    eigenvalues, vectors = np.linalg.eigh(M)
    decay = np.exp(-time * np.maximum(eigenvalues, 0.0))
    return x_limit + vectors @ (decay * (vectors.T @ (x0 - x_limit)))


def gradient_flow(net, X, y, tune, time=np.inf):
    """The exact gradient-flow state at `time` (default: the limit t -> inf).

    Gradient descent with step lr for s steps approximates the flow at time lr * s.
    - "last" (any activation): the features H = phi(X B^T) are fixed, so
      v(inf) = v + H^+ (y - H v), the minimum-norm change that fits the sample best.
    - "first" (linear only): B(t) = B + v c(t)^T with c(t) in the row span of X and
      c(inf) = X^+ (y - X w) / |v|^2, w = B^T v. If v = 0, B never moves.
    Other modes have no closed form: use `finetune` with a small lr.
    Returns a new `TwoLayer`.
    """
    X, y = check_sample(net, X, y)
    check_tune(tune)
    if tune not in ("first", "last"):
        raise ValueError(f"tune={tune!r} has no closed-form gradient flow; "
                         "use tune='first' or 'last', or finetune() for the others")
    try:
        time = float(time)
    except (TypeError, ValueError):
        time = float("nan")                     # refused just below, naming `time`
    if not time >= 0:
        raise ValueError(f"time must be >= 0 (or inf), got {time!r}")
    n = X.shape[0]
    if tune == "last":
        H = net.features(X)
        v_limit = net.v + np.linalg.lstsq(H, y - H @ net.v, rcond=None)[0]
        return net.replace(v=_flow(net.v, H.T @ H / n, v_limit, time))
    if net.activation != "linear":
        raise ValueError("gradient_flow(tune='first') needs activation='linear'; "
                         "for relu use finetune()")
    v_norm2 = net.v @ net.v
    if v_norm2 == 0:
        return net.replace()
    w = net.effective_weights()
    w_limit = w + np.linalg.lstsq(X, y - X @ w, rcond=None)[0]
    w_t = _flow(w, v_norm2 * X.T @ X / n, w_limit, time)
    return net.replace(B=net.B + np.outer(net.v, (w_t - w) / v_norm2))
