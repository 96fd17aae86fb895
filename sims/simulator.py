"""Many independent fine-tuning runs of f(x) = v^T phi(B x), advanced together in torch.

A `Batch` stacks R runs (each: a pretrained net, a target sample, a tune mode, a step size)
into tensors; `simulate(batch, steps)` runs full-batch gradient descent on all of them at
once, with exactly the semantics of `theory.finetune`:

    L = 1/(2n) sum_i (f(x_i) - y_i)^2,  tune "first" (B), "last" (v), "all" (both,
    simultaneous), "lp-ft" (v for `steps` steps, then both for `steps` more),

and records the exact population loss on each run's target distribution (`moments.Target`)
along the way. Four implementation choices make this fast (README "Simulations" has the
measurements):

1. Sample coordinates. Every gradient step adds to B a matrix whose rows lie in the row
   span of X, so when n <= d a run is carried in n-dimensional coordinates: a linear net
   by Z = X B^T and K = X X^T (4 n k + n^2 multiply-adds a step instead of the 2 n d k of
   the textbook step), a relu net by B = B_src + C X (n^2 k instead of 2 n d k). When
   n > d, linear nets use G = X^T X instead (3 d k + d^2).
2. Exact solutions. Where the dynamics are linear in the parameters ("last" with any phi;
   "first" with linear phi; the probing phase of "lp-ft"), gradient descent is
   x_s = x_0 - U diag((1 - (1 - lr lam)^s) / lam) U^T g_0 with M = U diag(lam) U^T the
   (constant) Hessian and g_0 the starting gradient: any step count costs one
   eigendecomposition, and these runs are never stepped (`exact=False` steps them instead).
3. Batching: every operation acts on all R runs; runs with fewer samples are padded with
   zero rows (a zero row has zero features and zero residual, since the net has no bias,
   so it contributes exactly nothing), and each run keeps its own 1/n. Runs with fewer
   hidden units are padded with zero units, which stay exactly zero.
4. Layout. Linear runs keep the run index last, so each matrix-vector product is one
   elementwise product and one reduction vectorized over the runs; `compile=True` fuses
   16 steps at a time with torch.compile.
"""
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import theory
from theory.finetune import DIVERGENCE_FACTOR, check_sample, check_tune
from theory.gaussian import as_mixture

from .moments import Target

TUNES = theory.TUNES
ACTIVATIONS = theory.ACTIVATIONS


def resolve_device(device="auto"):
    """torch.device for "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ..."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; "
                         "use device='auto' or 'cpu' (on the command line: --device auto or cpu)")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return resolved


def resolve_dtype(dtype="float64"):
    """torch.float64 or torch.float32 from a name or a torch dtype."""
    named = {"float64": torch.float64, "float32": torch.float32}
    if dtype in named.values():
        return dtype
    if dtype not in named:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return named[dtype]


@dataclass(frozen=True)
class Batch:
    """R independent fine-tuning runs as stacked tensors (build with `Batch.build`).

    Fields:
        v: (R, k) pretrained heads.  B: (R, k, d) pretrained first layers.
        X: (R, n, d) target samples, zero rows past each run's own size.  y: (R, n).
        n: (R,) int64, each run's sample size.  lr: (R,) step sizes.
        tune: R names from TUNES.  activation: "linear" or "relu" (one per batch).
        targets: {name: Target}, the distributions whose exact losses are recorded.
    """
    v: torch.Tensor
    B: torch.Tensor
    X: torch.Tensor
    y: torch.Tensor
    n: torch.Tensor
    lr: torch.Tensor
    tune: tuple
    activation: str
    targets: dict = field(default_factory=dict)

    def __len__(self):
        return self.v.shape[0]

    @property
    def device(self):
        return self.v.device

    @property
    def dtype(self):
        return self.v.dtype

    def select(self, index):
        """The runs `index` (1-d int64 tensor) as a new Batch."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        tunes = tuple(self.tune[i] for i in index.tolist())
        return Batch(self.v[index], self.B[index], self.X[index], self.y[index],
                     self.n[index], self.lr[index], tunes, self.activation,
                     {name: target.select(index) for name, target in self.targets.items()})

    @classmethod
    def build(cls, nets, samples, tune, lr, targets=None, dtype="float64", device="auto"):
        """Stack runs given as theory objects.

        Args:
            nets: R `theory.TwoLayer` pretrained nets (same activation and d; k may differ).
            samples: R pairs (X (n_r, d), y (n_r,)); n_r may differ.
            tune: one name from TUNES, or R of them.
            lr: one positive step size, or R of them.
            targets: {name: R pairs (teacher TwoLayer, cov (d, d) or GaussianMixture)};
                their exact population losses are recorded. Teachers may differ in k and
                in activation only across names, not within one name.
            dtype: "float64" (default) or "float32".  device: "auto", "cpu", "cuda".
        """
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        nets, samples = list(nets), list(samples)
        R = len(nets)
        if R == 0:
            raise ValueError("nets is empty: a batch needs at least one run")
        if len(samples) != R:
            raise ValueError(f"samples has {len(samples)} entries; nets has {R}")
        for i, net in enumerate(nets):
            if not isinstance(net, theory.TwoLayer):
                raise ValueError(f"nets[{i}] must be a theory.TwoLayer, got {type(net).__name__}")
        activation, d = nets[0].activation, nets[0].d
        for i, net in enumerate(nets):
            if net.activation != activation or net.d != d:
                raise ValueError(f"nets[{i}] is {net!r}; every net in a batch needs "
                                 f"activation={activation!r} and d={d} (build one batch each)")
        tunes = _per_run(tune, R, "tune")
        for t in tunes:
            check_tune(t)
        rates = _per_run(lr, R, "lr")
        if not all(isinstance(r, (int, float, np.integer, np.floating))
                   and not isinstance(r, bool) for r in rates):
            bad = next(r for r in rates if isinstance(r, bool)
                       or not isinstance(r, (int, float, np.integer, np.floating)))
            raise ValueError(f"lr must be one positive number or one per run, got {bad!r} "
                             f"among {len(rates)}")
        rates = np.array(rates, dtype=np.float64)
        bad = ~(np.isfinite(rates) & (rates > 0))
        if bad.any():
            raise ValueError(f"lr must be positive and finite, got {rates[bad][:3]}...")
        checked = [check_sample(net, X, y)
                   for net, (X, y) in zip(nets, samples)]
        k, n_max = max(net.k for net in nets), max(X.shape[0] for X, _ in checked)
        v, B = np.zeros((R, k)), np.zeros((R, k, d))
        X, y = np.zeros((R, n_max, d)), np.zeros((R, n_max))
        for i, (net, (Xi, yi)) in enumerate(zip(nets, checked)):
            v[i, :net.k], B[i, :net.k] = net.v, net.B
            X[i, :len(Xi)], y[i, :len(yi)] = Xi, yi
        sizes = [len(Xi) for Xi, _ in checked]
        as_tensor = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        if targets is not None and not isinstance(targets, dict):
            raise ValueError("targets must be a dict {name: R (teacher, cov or GaussianMixture) "
                             f"pairs}}, got {type(targets).__name__}")
        stacked = {name: _stack_target(pairs, R, d, name, dtype, device)
                   for name, pairs in (targets or {}).items()}
        return cls(as_tensor(v), as_tensor(B), as_tensor(X), as_tensor(y),
                   torch.as_tensor(sizes, dtype=torch.int64, device=device), as_tensor(rates),
                   tunes, activation, stacked)

    @classmethod
    def from_problems(cls, problems, samples, tune, lr, dtype="float64", device="auto"):
        """Runs on `theory.ShiftProblem`s: pretrained nets, target samples, and the exact
        target loss recorded under the name "target"."""
        problems = list(problems)
        return cls.build([p.pretrained for p in problems], samples, tune, lr,
                         {"target": [(p.target_teacher, p.target) for p in problems]},
                         dtype, device)


def _per_run(value, R, name):
    """`value` repeated R times, or checked to have R entries."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        # numbers, not 0-d arrays (`start_curvature` returns a tensor of learning rates)
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, (str, int, float, np.floating, np.integer)):
        return [value] * R
    values = list(value)
    if len(values) != R:
        raise ValueError(f"{name} has {len(values)} entries; the batch has {R} runs")
    return values


def _stack_target(pairs, R, d, name, dtype, device):
    """R (teacher, distribution) pairs as one `Target`, padded to common kt and J."""
    pairs = list(pairs) if isinstance(pairs, (list, tuple)) else None
    if pairs is None or not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise ValueError(f"targets[{name!r}] must be a list of R (teacher, cov or "
                         "GaussianMixture) pairs, one per run")
    if len(pairs) != R:
        raise ValueError(f"targets[{name!r}] has {len(pairs)} entries; the batch has {R} runs")
    teachers = [teacher for teacher, _ in pairs]
    for i, teacher in enumerate(teachers):
        if not isinstance(teacher, theory.TwoLayer) or teacher.d != d:
            raise ValueError(f"targets[{name!r}][{i}] needs a theory.TwoLayer teacher on "
                             f"R^{d}, got {teacher!r}")
        if teacher.activation != teachers[0].activation:
            raise ValueError(f"targets[{name!r}] mixes teacher activations; use one per name")
    mixtures = [as_mixture(dist, d, f"targets[{name!r}][{i}] distribution")
                for i, (_, dist) in enumerate(pairs)]
    kt, J = max(t.k for t in teachers), max(len(m.weights) for m in mixtures)
    tv, tB = np.zeros((R, kt)), np.zeros((R, kt, d))
    weights, covs = np.zeros((R, J)), np.zeros((R, J, d, d))
    for i, (teacher, mixture) in enumerate(zip(teachers, mixtures)):
        tv[i, :teacher.k], tB[i, :teacher.k] = teacher.v, teacher.B
        weights[i, :len(mixture.weights)], covs[i, :len(mixture.weights)] = (
            mixture.weights, mixture.covs)
    as_tensor = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    return Target(as_tensor(tv), as_tensor(tB), teachers[0].activation, as_tensor(weights),
                  as_tensor(covs))


@dataclass
class Result:
    """What `simulate` measured. R runs, T record points (global step numbers).

    Fields:
        step: (T,) int64, the record points (steps taken before the record).
        train_loss: (R, T) L on the run's sample; NaN where step > the run's total steps.
        loss: {name: (R, T)} exact population losses on the batch's targets (same NaNs).
        final_train_loss: (R,), final_loss: {name: (R,)} after each run's last step.
        v: (R, k), B: (R, k, d) final parameters.
        total_steps: (R,) int64, steps each run took ("lp-ft": twice `steps`).
        diverged: (R,) bool; with on_divergence="nan" these runs' losses are NaN from the
            first record that caught the divergence on.
        path_v: (R, T, k), path_B: (R, T, k, d) with `keep_path=True`, else None.
    """
    step: torch.Tensor
    train_loss: torch.Tensor
    loss: dict
    final_train_loss: torch.Tensor
    final_loss: dict
    v: torch.Tensor
    B: torch.Tensor
    total_steps: torch.Tensor
    diverged: torch.Tensor
    path_v: torch.Tensor = None
    path_B: torch.Tensor = None

    def update(self, index, other):
        """Overwrite runs `index` (1-d int64 tensor) with the R' runs of `other`, a Result
        of a batch.select(index) simulated with the same record points."""
        if not torch.equal(self.step, other.step):
            raise ValueError("other has different record points; simulate it with the same "
                             "record argument")
        for name in ("train_loss", "final_train_loss", "v", "B", "total_steps", "diverged",
                     "path_v", "path_B"):
            mine = getattr(self, name)
            if mine is not None:
                mine[index] = getattr(other, name)
        for table, other_table in ((self.loss, other.loss), (self.final_loss, other.final_loss)):
            for name in table:
                table[name][index] = other_table[name]


def simulate(batch, steps, record=None, exact=True, keep_path=False, on_divergence="raise",
             compile=False):
    """Gradient descent on every run of `batch` at once, as `theory.finetune` would.

    Args:
        batch: a `Batch`.
        steps: gradient steps per run, one int or R of them ("lp-ft" takes 2 * steps).
        record: where to record losses: None (start and end), an int `every` (0, every,
            2 every, ..., and the largest total), or a sequence of global step numbers.
        exact: solve the modes that are linear in the parameters in closed form (exact
            gradient descent, see the module docstring) instead of stepping them.
        keep_path: also record v and B at every record point.
        on_divergence: "raise" (as theory: ValueError naming the runs and their lr) or
            "nan" (flag them in `Result.diverged` and record NaN for them; the other runs
            are unaffected, since no operation mixes runs).
        compile: run the stepped linear runs through torch.compile (fused kernels; pays off
            for long runs of many steps: compiling takes seconds; needs a C++ compiler on
            CPU). relu runs always run eagerly.
    Divergence: a train loss that is non-finite or above DIVERGENCE_FACTOR times
    max(its start, |y|^2 / (2n)), checked at the record points and the end.
    Returns: a `Result`.
    """
    if not isinstance(batch, Batch):
        raise ValueError(f"batch must be a sims.Batch, got {type(batch).__name__}")
    R, device = len(batch), batch.device
    steps = np.array(_per_run(steps, R, "steps"))
    if steps.shape != (R,) or steps.dtype.kind not in "iu" or np.any(steps < 0):
        raise ValueError(f"steps must be nonnegative integers (one, or one per run), "
                         f"got {steps[:5]}...")
    steps = steps.astype(np.int64)             # 2 * steps below must not wrap (uint8: 200)
    lp_ft = np.array([t == "lp-ft" for t in batch.tune])
    totals = np.where(lp_ft, 2 * steps, steps)
    grid = _record_grid(record, int(totals.max()))
    if on_divergence not in ("raise", "nan"):
        raise ValueError(f"on_divergence must be 'raise' or 'nan', got {on_divergence!r}")
    recorder = _Recorder(batch, grid, totals, keep_path, on_divergence == "raise")

    # Which runs take which path. Exact runs: the whole run ("last", linear "first") or
    # the probing phase ("lp-ft"), after which the lp-ft run joins the stepped ones.
    linear = batch.activation == "linear"
    closed = [exact and (t == "last" or (t == "first" and linear)) for t in batch.tune]
    probe = [exact and t == "lp-ft" for t in batch.tune]
    v, B = batch.v.clone(), batch.B.clone()
    for kind, chosen in (("last", [c and t != "first" for c, t in zip(closed, batch.tune)]),
                         ("first", [c and t == "first" for c, t in zip(closed, batch.tune)]),
                         ("last", probe)):
        index = np.flatnonzero(chosen)
        if len(index):
            v[index], B[index] = _exact(batch.select(index), kind, steps[index], grid,
                                        recorder, index)
    stepped = np.flatnonzero(~np.array(closed))
    if len(stepped):
        # (update v, update B) before and after each run's phase boundary.
        flags = {"first": ((0, 1), (0, 1)), "last": ((1, 0), (1, 0)), "all": ((1, 1), (1, 1)),
                 "lp-ft": ((1, 0), (1, 1))}
        tunes = [batch.tune[i] for i in stepped]
        offset = np.where(np.array(probe)[stepped], steps[stepped], 0)
        length = totals[stepped] - offset
        boundary = np.where(lp_ft[stepped], steps[stepped] - offset, length)
        before = torch.tensor([flags[t][0] for t in tunes], device=device)
        after = torch.tensor([flags[t][1] for t in tunes], device=device)
        v[stepped], B[stepped] = _stepped(batch.select(stepped), v[stepped], B[stepped],
                                          offset, length, boundary, before, after, recorder,
                                          stepped, compile)
    return recorder.result(v, B)


def _record_grid(record, largest):
    if record is None:
        grid = [0, largest]
    elif isinstance(record, (int, np.integer)) and not isinstance(record, bool):
        if record < 1:
            raise ValueError(f"record must be a positive interval, got {record}")
        grid = list(range(0, largest + 1, int(record))) + [largest]
    else:
        grid = np.asarray(record)
        if grid.ndim != 1 or grid.dtype.kind not in "iu" or np.any(grid < 0):
            raise ValueError("record must be None, a positive int, or a 1-d sequence of "
                             f"nonnegative step numbers; got {record!r}")
        grid = list(grid) + [0]
    return np.unique(np.array(grid, dtype=np.int64))


def train_losses(batch, v, B):
    """L = 1/(2n) sum_i (f(x_i) - y_i)^2 per run, shape (R,), for v (R, k), B (R, k, d)."""
    r = _features(batch.X @ B.transpose(1, 2), batch.activation) @ v[..., None]
    r = r[..., 0] - batch.y
    return (r * r).sum(1) / (2 * batch.n)


def _features(Z, activation):
    return Z if activation == "linear" else Z.clamp(min=0)


class _Recorder:
    """Collects losses (and optionally parameters) at the record points of every run."""

    def __init__(self, batch, grid, totals, keep_path, raise_on_divergence):
        R, T, dtype, device = len(batch), len(grid), batch.dtype, batch.device
        self.batch, self.grid, self.totals = batch, grid, totals
        self._subsets = {}
        self.raise_on_divergence = raise_on_divergence
        self.diverged = torch.zeros(R, dtype=torch.bool, device=device)
        nan = lambda *shape: torch.full(shape, math.nan, dtype=dtype, device=device)  # noqa
        self.train = nan(R, T)
        self.loss = {name: nan(R, T) for name in batch.targets}
        k, d = batch.B.shape[1:]
        self.path_v = nan(R, T, k) if keep_path else None
        self.path_B = nan(R, T, k, d) if keep_path else None
        # Divergence scale per run, as theory: max(L at the start, |y|^2 / (2n)).
        y_scale = (batch.y * batch.y).sum(1) / (2 * batch.n)
        self.scale = torch.maximum(train_losses(batch, batch.v, batch.B), y_scale)

    def points(self, offset, length):
        """{local step j: (positions in the runs given, record index t)} for runs whose
        local step j is global step offset + j, recorded for 0 <= j <= length."""
        table = {}
        for i, (start, count) in enumerate(zip(offset, length)):
            inside = (self.grid >= start) & (self.grid <= start + count)
            for t in np.flatnonzero(inside):
                table.setdefault(int(self.grid[t] - start), []).append((i, int(t)))
        return {j: (np.array([i for i, _ in pairs]), np.array([t for _, t in pairs]))
                for j, pairs in sorted(table.items())}

    def write(self, runs, t, v, B):
        """Record runs (indices into the batch) at record indices t; v (r, k), B (r, k, d)."""
        sub = self._subset(runs)
        train = train_losses(sub, v, B)
        gone = self._check(runs, train)[:, None]
        nan = lambda x: x.masked_fill(gone.view(-1, *[1] * (x.dim() - 1)), math.nan)  # noqa
        self.train[runs, t] = nan(train)
        for name, target in sub.targets.items():
            self.loss[name][runs, t] = nan(target.loss(v, B, sub.activation))
        if self.path_v is not None:
            self.path_v[runs, t], self.path_B[runs, t] = nan(v), nan(B)

    def _subset(self, runs):
        """batch.select(runs), memoized: the same few run sets record again and again."""
        key = np.asarray(runs).tobytes()
        if key not in self._subsets:
            self._subsets[key] = self.batch.select(torch.as_tensor(runs, device=self.batch.device))
        return self._subsets[key]

    def _check(self, runs, train):
        """Flag (or raise on) diverged runs; returns which of `runs` have diverged by now."""
        runs_t = torch.as_tensor(runs, device=self.batch.device)
        bad = ~torch.isfinite(train) | (train > DIVERGENCE_FACTOR * self.scale[runs_t])
        if bool(bad.any()) and self.raise_on_divergence:
            bad_runs = np.asarray(runs)[bad.cpu().numpy()]
            lrs = self.batch.lr[torch.as_tensor(bad_runs, device=self.batch.device)]
            raise ValueError(
                f"{len(bad_runs)} run(s) diverged (train loss non-finite or above "
                f"{DIVERGENCE_FACTOR:.0e} x its start): runs {bad_runs[:5].tolist()} with "
                f"lr {lrs[:5].tolist()}, tune {[self.batch.tune[i] for i in bad_runs[:5]]}; "
                "use a smaller lr")
        self.diverged[runs_t] |= bad
        return self.diverged[runs_t]

    def result(self, v, B):
        everyone = np.arange(len(self.batch))
        final_train = train_losses(self.batch, v, B)
        gone = self._check(everyone, final_train)
        final = {name: target.loss(v, B, self.batch.activation).masked_fill(gone, math.nan)
                 for name, target in self.batch.targets.items()}
        return Result(torch.as_tensor(self.grid), self.train, self.loss,
                      final_train.masked_fill(gone, math.nan), final, v, B,
                      torch.as_tensor(self.totals), self.diverged, self.path_v, self.path_B)


def _decayed_step(lam, lr, s):
    """(1 - (1 - lr lam)^s) / lam, elementwise (lr s where lam <= 0): the factor that maps
    the starting gradient to the displacement after s exact gradient steps."""
    a = lr * lam.clamp(min=0)
    small = a < 1          # expm1/log1p keep 1 - (1 - a)^s accurate when a is tiny
    covered = torch.where(small, -torch.expm1(s * torch.log1p(-torch.where(small, a, 0 * a))),
                          1 - (1 - a) ** s)
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    return torch.where(lam > 0, covered / safe, lr * s)


def _exact(batch, kind, steps, grid, recorder, runs):
    """Exact gradient descent for the modes linear in the parameters.

    kind "last": v moves, features H = phi(X B^T) fixed; Hessian H^T H / n (k x k).
    kind "first" (linear): w = B^T v moves with Hessian |v|^2 X^T X / n (d x d) and
        B(s) = B + v (w(s) - w)^T / |v|^2.
    Records each run at the grid points up to its `steps`; returns the state at `steps`.
    """
    X, y, v0, B0 = batch.X, batch.y, batch.v, batch.B
    n = batch.n.to(X.dtype)[:, None]
    if kind == "last":
        H = _features(X @ B0.transpose(1, 2), batch.activation)
        hessian = H.transpose(1, 2) @ H / n[..., None]
        start = v0
        gradient = (H.transpose(1, 2) @ ((H @ v0[..., None])[..., 0] - y)[..., None])[..., 0] / n
    else:
        norm2 = (v0 * v0).sum(1, keepdim=True)
        start = (B0.transpose(1, 2) @ v0[..., None])[..., 0]
        residual = (X @ start[..., None])[..., 0] - y
        hessian = norm2[..., None] * (X.transpose(1, 2) @ X) / n[..., None]
        gradient = norm2 * (X.transpose(1, 2) @ residual[..., None])[..., 0] / n
        safe_norm2 = torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
    lam, U = torch.linalg.eigh(hessian)
    projected = (U.transpose(1, 2) @ gradient[..., None])[..., 0]
    lr = batch.lr[:, None]

    def state(s):
        """(v, B) after s[r] steps, s an (r,) tensor."""
        moved = start - (U @ (_decayed_step(lam, lr, s[:, None]) * projected)[..., None])[..., 0]
        if kind == "last":
            return moved, B0
        return v0, B0 + v0[..., None] * ((moved - start) / safe_norm2)[:, None, :]

    for t, g in enumerate(grid):
        positions = np.flatnonzero(steps >= g)
        if len(positions):
            v_s, B_s = state(torch.full((len(batch),), float(g), dtype=X.dtype, device=X.device))
            recorder.write(runs[positions], t, v_s[positions], B_s[positions])
    return state(torch.as_tensor(steps, dtype=X.dtype, device=X.device))


def _linear_sample_step(F, C, v, K, y, rate_v, rate_B):
    """One step on the sample side (see _LinearEngine), in place on F = Z and C; returns
    the new v. F (n, k, R), C (k, n, R), v (k, R), K (n, n, R), y (n, R), rate_* (R,)."""
    r = (F * v).sum(1) - y                                                    # (n, R)
    gv = (F * r[:, None]).sum(0)                                              # Z^T r: (k, R)
    Kr = (K * r).sum(1)                                                       # (n, R)
    F.addcmul_((rate_B * Kr)[:, None], v[None], value=-1)
    C.addcmul_((rate_B * v)[:, None], r[None], value=-1)
    return v - rate_v * gv


def _linear_input_step(F, v, G, b, rate_v, rate_B):
    """One step on the input side, in place on F = B^T; returns the new v.
    F (d, k, R), v (k, R), G (d, d, R), b (d, R), rate_* (R,)."""
    w = (F * v).sum(1)                                                        # B^T v: (d, R)
    u = (G * w).sum(1) - b                                                    # X^T r: (d, R)
    gv = (F * u[:, None]).sum(0)                                              # B u: (k, R)
    F.addcmul_((rate_B * u)[:, None], v[None], value=-1)
    return v - rate_v * gv


# torch.compile fuses STEPS_PER_CALL steps into a few loops over the runs, which read and
# write each state tensor about once a step instead of ~3 times (README: "Simulations").
STEPS_PER_CALL = 16


def _sample_steps(F, C, v, K, y, rate_v, rate_B):
    for _ in range(STEPS_PER_CALL):
        v = _linear_sample_step(F, C, v, K, y, rate_v, rate_B)
    return v


def _input_steps(F, v, G, b, rate_v, rate_B):
    for _ in range(STEPS_PER_CALL):
        v = _linear_input_step(F, v, G, b, rate_v, rate_B)
    return v


@functools.cache
def _compiled(function):
    return torch.compile(function, dynamic=False, fullgraph=True)


class _LinearEngine:
    """Gradient steps of the linear net f = v^T B x, in the cheaper of two exact forms.

    With r = X B^T v - y, a step is v -= lr/n B X^T r and B -= lr/n v r^T X. When n <= d
    it is carried on the sample side: Z = X B^T (n x k) and K = X X^T (n x n),

        r = Z v - y,   v -= lr/n Z^T r,   Z -= lr/n (K r) v^T,   C -= lr/n v r^T,

    with B = B_start + C X recovered when asked; otherwise on the input side, with
    G = X^T X and b = X^T y (d x d, d),

        u = G B^T v - b (= X^T r),   v -= lr/n B u,   B -= lr/n v u^T.

    Either way a step is a few matrix-vector products per run (4 n k + n^2 or 3 d k + d^2
    multiply-adds). Tensors keep the run index last, (..., R), so each product is one
    elementwise multiply and one reduction vectorized over the runs, which is much faster
    on a CPU than R tiny matrix calls (`torch.bmm` with a vector operand).
    `compile=True` runs the steps through torch.compile, STEPS_PER_CALL at a time.
    """

    def __init__(self, v, B, X, y, compile=False):
        self.on_samples = X.shape[1] <= X.shape[2]
        self.B_start, self.X, self.compile = B, X, compile
        last = lambda a: a.permute(*range(1, a.dim()), 0).contiguous()   # noqa: E731
        self.v = last(v)                                                      # (k, R)
        if self.on_samples:
            self.F = last(X @ B.transpose(1, 2))                             # Z: (n, k, R)
            self.C = self.F.new_zeros(B.shape[1], X.shape[1], B.shape[0])    # (k, n, R)
            self.data = (last(X @ X.transpose(1, 2)), last(y))               # K, y
        else:
            self.F = last(B.transpose(1, 2))                                  # B^T: (d, k, R)
            self.data = (last(X.transpose(1, 2) @ X),                        # G: (d, d, R)
                         last((X.transpose(1, 2) @ y[..., None])[..., 0]))   # b: (d, R)

    def advance(self, count, rate_v, rate_B):
        """`count` simultaneous steps; rate_* (R,) = lr / n per run, 0 where frozen."""
        state = (self.F, self.C) if self.on_samples else (self.F,)
        if self.compile and count >= STEPS_PER_CALL:
            many = _compiled(_sample_steps if self.on_samples else _input_steps)
            for _ in range(count // STEPS_PER_CALL):
                self.v = many(*state, self.v, *self.data, rate_v, rate_B)
            count %= STEPS_PER_CALL
        step = _linear_sample_step if self.on_samples else _linear_input_step
        for _ in range(count):
            self.v = step(*state, self.v, *self.data, rate_v, rate_B)

    def params(self):
        """(v (R, k), B (R, k, d)) now."""
        v = self.v.T
        if self.on_samples:
            return v, self.B_start + self.C.permute(2, 0, 1) @ self.X
        return v, self.F.permute(2, 1, 0)


class _ReluEngine:
    """Gradient steps of f = v^T relu(B x) (relu'(0) = 0, as in theory), batched (R, ...).

    B = B_start + C P with P = X (C is k x n) when n <= d, else P = I (C = B - B_start).
    Every step adds to B a matrix E^T X / n whose rows lie in the row span of X, so C
    absorbs it exactly (C -= lr/n E^T, or E^T X), and the pre-activations are
    Z = Z0 + M C^T with Z0 = X B_start^T and M = X P^T: about n^2 k multiply-adds a step
    instead of the textbook 2 n d k when n <= d.
    """

    def __init__(self, v, B, X, y, compile=False):
        self.on_samples = X.shape[1] <= X.shape[2]
        self.v, self.B_start, self.X, self.y = v, B, X, y
        self.Z0 = X @ B.transpose(1, 2)                                       # (R, n, k)
        self.M = X @ X.transpose(1, 2) if self.on_samples else X              # (R, n, p)
        self.C = B.new_zeros(B.shape[0], B.shape[1], self.M.shape[2])         # (R, k, p)

    def advance(self, count, rate_v, rate_B):
        for _ in range(count):
            self.step(rate_v, rate_B)

    def step(self, rate_v, rate_B):
        v = self.v
        Z = torch.baddbmm(self.Z0, self.M, self.C.transpose(1, 2))            # (R, n, k)
        H = Z.clamp(min=0)
        r = (H * v[:, None, :]).sum(2) - self.y                               # (R, n)
        gv = (H * r[..., None]).sum(1)                                        # H^T r: (R, k)
        # relu'(z) = 1{z > 0} = sign(relu(z)) (relu'(0) = 0, as in theory); a multiply is
        # several times faster than masked_fill_ here.
        E = (r[..., None] * v[:, None, :]).mul_(H.sign())
        E_T = E.transpose(1, 2)                                               # (R, k, n)
        self.C = self.C - rate_B[:, None, None] * (E_T if self.on_samples else E_T @ self.X)
        self.v = v - rate_v[:, None] * gv

    def params(self):
        return self.v, self.B_start + (self.C @ self.X if self.on_samples else self.C)


def _stepped(batch, v, B, offset, length, boundary, before, after, recorder, runs,
             compile=False):
    """Step-by-step gradient descent from (v, B) for runs of possibly different lengths.

    Run i takes length[i] steps; its local step j is global step offset[i] + j; it updates
    (v, B) as flagged by before[i] for j < boundary[i] and by after[i] from then on.
    Records at the grid points its segment covers. Returns the final (v, B).
    """
    engine = (_LinearEngine if batch.activation == "linear" else _ReluEngine)(
        v, B, batch.X, batch.y, compile)
    rate = batch.lr / batch.n.to(batch.lr.dtype)
    points = recorder.points(offset, length)
    length_t = torch.as_tensor(length, device=v.device)
    boundary_t = torch.as_tensor(boundary, device=v.device)
    # Between two events (a record, a phase boundary, a run's end) every step is alike.
    last = int(length.max())
    events = sorted(set(points) | set(boundary.tolist()) | set(length.tolist()) | {0, last})
    for j, following in zip(events, events[1:] + [None]):
        if j in points:
            positions, t = points[j]
            v_j, B_j = engine.params()
            recorder.write(runs[positions], t, v_j[positions], B_j[positions])
        if following is None or j >= last:
            break
        flags = torch.where((j < boundary_t)[:, None], before, after)
        flags = flags * (j < length_t)[:, None]
        engine.advance(following - j, rate * flags[:, 0], rate * flags[:, 1])
    return engine.params()


def gradients(batch, v=None, B=None):
    """dL/dv (R, k) and dL/dB (R, k, d) of every run's sample loss at (v, B), by default
    at the pretrained point (what Auto-RGN looks at)."""
    if not isinstance(batch, Batch):
        raise ValueError(f"batch must be a sims.Batch, got {type(batch).__name__}")
    v = batch.v if v is None else v
    B = batch.B if B is None else B
    Z = batch.X @ B.transpose(1, 2)                                          # (R, n, k)
    H = _features(Z, batch.activation)
    n = batch.n.to(v.dtype)
    r = (H @ v[..., None])[..., 0] - batch.y                                 # (R, n)
    grad_v = (H.transpose(1, 2) @ r[..., None])[..., 0] / n[:, None]
    E = r[..., None] * v[:, None, :]
    if batch.activation == "relu":
        E = E * (Z > 0)
    return grad_v, E.transpose(1, 2) @ batch.X / n[:, None, None]


def start_curvature(batch, v=None):
    """Per run, the largest curvature of the first- and last-layer losses at (v, B_src)
    (v defaults to the pretrained head): max(|v|^2 lam_max(X^T X / n), lam_max(H^T H / n)),
    shape (R,). Gradient descent on either layer alone is stable for lr < 2 / this (for
    relu it bounds the Gauss-Newton part)."""
    v = batch.v if v is None else v
    n = batch.n.to(batch.dtype)[:, None, None]
    H = _features(batch.X @ batch.B.transpose(1, 2), batch.activation)
    first = (v * v).sum(1) * torch.linalg.eigvalsh(batch.X.transpose(1, 2) @ batch.X / n)[:, -1]
    last = torch.linalg.eigvalsh(H.transpose(1, 2) @ H / n)[:, -1]
    return torch.maximum(first, last)
