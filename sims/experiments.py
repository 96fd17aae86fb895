"""The theory figures F1..F6 as data: what to simulate, how many draws, what to tabulate.

Every experiment draws random problems from `theory`'s shift constructions with a seeded
numpy Generator, simulates all of its runs at once with `sims.simulate`, and returns
pandas tables; `sims.plots` draws them, `sims.__main__` writes them as CSV. All losses are
exact target population losses divided by E[y^2] on the target (the loss of predicting
0), so draws of different scales average meaningfully. Step sizes are per run,
lr = LR_FRACTION / `start_curvature` (the largest curvature of the first- and last-layer
losses at the pretrained point), halved for the runs that diverge with it (column
`lr_halved` counts them).

    experiment   tables (CSV names)                          figures
    t1_curves    f1_t1_curves                                F1
    shifts       f2_loss_vs_n, f3_best_layer, f6_auto_rgn    F2, F3, F6
    t1_event     f4_t1_event                                 F4
    forgetting   f5_forgetting                               F5
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import theory

from .simulator import Batch, gradients, resolve_device, simulate, start_curvature

METHODS = ("first", "last", "all", "lp-ft")
ACTIVATIONS = ("linear", "relu")
LR_FRACTION = 0.5
MAX_HALVINGS = 10
# The problems: d = 10 inputs, k = 4 hidden units; T1 splits d into ds = 8 old and m = 2
# new directions, with an old-direction target input with probability p = 0.5.
D, K, DS, P = 10, 4, 8, 0.5
# relu T1 needs small pretrained weights on the new directions: with B_src P_T = 0
# exactly, relu'(0) = 0 keeps gradient descent from ever learning them.
INIT_T_SCALE = {"linear": 0.0, "relu": 0.1}
SHIFTS = {
    "input": lambda rng, act: theory.random_input_perturbation(rng, D, K, act),
    "input, k = d": lambda rng, act: theory.random_input_perturbation(rng, D, D, act),
    "label": lambda rng, act: theory.random_label_perturbation(rng, D, K, act, t=-1.0),
    "new directions": lambda rng, act: theory.random_new_directions(
        rng, DS, D - DS, K, P, act, init_T_scale=INIT_T_SCALE[act]),
}
N_GRID = (2, 4, 8, 16, 32)          # F2's sample sizes
N_BEST = 8                          # F3 and F6 look at n = 8 < d: the few-shot regime
N_T1 = 6                            # F1 and F5: the spec's instance size
N_EVENT = tuple(range(1, 21))       # F4's sample sizes
ZERO = 1e-8                         # F4: a loss below ZERO * E[y^2] counts as ~0
# Losses decay exponentially, so the curves of F1 and F5 also average log10(loss); an
# exact fit scores ~1e-32 in float64, and FLOOR keeps an exact 0 finite.
FLOOR = 1e-32
# F5's curves: the methods compared and the quantities tracked (the `quantity` column).
FORGETTING_METHODS = ("first", "all")
FORGETTING_QUANTITIES = ("head drift |v - v_src| / |v_src|", "error on unseen old directions",
                         "error on new directions", "target loss")


@dataclass(frozen=True)
class Settings:
    """What a `python -m sims figures` run uses (docs/api.md, "sims command line").

    draws: random draws (problem and sample) per curve point, >= 2.
    steps: gradient steps (per phase for lp-ft) of the shift runs (F2, F3, F6); F1 and
        F5 run 2 * steps in total for every method (lp-ft: steps + steps); F4 runs
        10 * steps (full fine-tuning) and 1000 * steps (first layer, exact).
    seed, dtype ("float64" | "float32"), device ("auto" | "cpu" | "cuda").
    """
    draws: int = 200
    steps: int = 2000
    seed: int = 0
    dtype: str = "float64"
    device: str = "auto"

    def __post_init__(self):
        for name in ("draws", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a nonnegative integer, got {self.seed!r}")
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        resolve_device(self.device)             # a bad device fails here, before any work

    def as_dict(self):
        return dataclasses.asdict(self)


def _rng(settings, *tags):
    """A Generator for one stream of draws, fixed by the seed and the stream's tags."""
    words = [settings.seed] + [sum(ord(c) * 31**i for i, c in enumerate(str(tag))) % 2**32
                               for tag in tags]
    return np.random.default_rng(words)


def _event_sample(problem, n, rng):
    """n target samples conditioned on claim T1's event (n_T >= m, n_S < ds); returns
    (X, y, component)."""
    ds, m = problem.params["ds"], problem.params["m"]
    if theory.t1_event_probability(ds, m, problem.params["p"], n) == 0:
        raise ValueError(f"the T1 event is impossible with n = {n}")
    while True:
        X, component = problem.target.sample(n, rng)
        if theory.t1_event(component, ds, m):
            return X, problem.target_teacher(X), component


def _batch(problems, samples, tunes, steps, settings, targets=None):
    """A Batch on the problems' targets (plus `targets`) with lr = LR_FRACTION / the
    curvature at the pretrained point, or for lp-ft at the larger of that and the curvature
    after its probing phase (probing can grow the head, and with it the first layer's
    curvature, past what the starting step size tolerates)."""
    all_targets = {"target": [(p.target_teacher, p.target) for p in problems],
                   **(targets or {})}
    batch = Batch.build([p.pretrained for p in problems], samples, tunes, 1.0, all_targets,
                        settings.dtype, settings.device)
    curvature = start_curvature(batch)
    lp_ft = [i for i, t in enumerate(tunes) if t == "lp-ft"]
    if lp_ft:
        index = torch.tensor(lp_ft, device=batch.device)
        probe = dataclasses.replace(batch.select(index), tune=("last",) * len(lp_ft),
                                    lr=LR_FRACTION / curvature[index], targets={})
        probed = simulate(probe, np.asarray(steps)[lp_ft] if np.ndim(steps) else steps)
        curvature[index] = torch.maximum(curvature[index], start_curvature(probe, probed.v))
    return dataclasses.replace(batch, lr=LR_FRACTION / curvature)


def _simulate(batch, steps, **options):
    """`simulate`, halving the lr of every run that diverges and running it again, until
    none does (at most MAX_HALVINGS times). A step size fixed at the pretrained point can be
    too large later in training (full fine-tuning grows |v| and |B x|).

    Returns (result, halved): halved (R,) counts the halvings of each run.
    """
    result = simulate(batch, steps, on_divergence="nan", **options)
    halved = np.zeros(len(batch), dtype=np.int64)
    for _ in range(MAX_HALVINGS):
        bad = torch.nonzero(result.diverged).flatten()
        if len(bad) == 0:
            return result, halved
        lr = batch.lr.clone()
        lr[bad] /= 2
        batch = dataclasses.replace(batch, lr=lr)
        halved[bad.cpu().numpy()] += 1
        retry_steps = np.asarray(steps)[bad.cpu().numpy()] if np.ndim(steps) else steps
        options["record"] = _numpy(result.step).astype(np.int64)
        result.update(bad, simulate(batch.select(bad), retry_steps, on_divergence="nan",
                                    **options))
    raise RuntimeError(f"{int(result.diverged.sum())} runs still diverge after "
                       f"{MAX_HALVINGS} halvings of their step size")


def _mean_se(values):
    """Mean and standard error over axis 0, ignoring NaN; also the count."""
    values = np.asarray(values, dtype=np.float64)
    count = np.sum(~np.isnan(values), axis=0)
    mean = np.nanmean(values, axis=0)
    se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(count)
    return mean, se, count


def _summary(values, **columns):
    """Rows of a curve table: for each record point (axis 1 of `values`, draws on axis 0),
    the mean and standard error of the values and of log10(max(values, FLOOR)), and the
    fraction of draws below ZERO (the geometric mean alone can hide draws that have not
    converged yet)."""
    mean, se, count = _mean_se(values)
    log_mean, log_se, _ = _mean_se(np.log10(np.maximum(values, FLOOR)))
    values = np.asarray(values, dtype=np.float64)
    fraction_zero = np.sum(values < ZERO, axis=0) / count
    steps = columns.pop("steps")
    return [dict(columns, step=int(step), mean=m, se=e, log10_mean=lm, log10_se=le,
                 fraction_zero=z, draws=int(c))
            for step, m, e, lm, le, z, c in zip(steps, mean, se, log_mean, log_se,
                                                fraction_zero, count)]


def _numpy(tensor):
    return tensor.detach().to("cpu", torch.float64).numpy()


def _log_grid(total, points=60):
    """Record points: 0 and ~`points` log-spaced steps up to `total`."""
    return np.unique(np.r_[0, np.round(np.geomspace(1, total, points)).astype(np.int64)])


def _repeat(items, times):
    """[a, b] -> [a, a, ..., b, b, ...] (each `times` times): one entry per method run."""
    return [item for item in items for _ in range(times)]


# ---- F1: claim T1 over training time ----------------------------------------------------

def t1_curves(settings, progress=None):
    """F1: target loss / E[y^2] against gradient steps on claim T1's problem (n = 6
    samples drawn conditioned on the T1 event), for each method, linear and relu.

    first, last and all take 2 * steps steps; lp-ft takes steps + steps.
    Returns {"f1_t1_curves": DataFrame(activation, method, step, mean, se, log10_mean,
    log10_se, fraction_zero, draws)}.
    """
    rows = []
    for activation in ACTIVATIONS:
        rng = _rng(settings, "t1_curves", activation)
        problems, samples = [], []
        for _ in range(settings.draws):
            problem = theory.random_new_directions(rng, DS, D - DS, K, P, activation,
                                                   init_T_scale=INIT_T_SCALE[activation])
            X, y, _ = _event_sample(problem, N_T1, rng)
            problems.append(problem)
            samples.append((X, y))
        tunes = [m for _ in problems for m in METHODS]
        steps = [settings.steps if t == "lp-ft" else 2 * settings.steps for t in tunes]
        batch = _batch(_repeat(problems, len(METHODS)), _repeat(samples, len(METHODS)),
                       tunes, steps, settings)
        result, halved = _simulate(batch, steps, record=_log_grid(2 * settings.steps))
        energy = batch.targets["target"].label_energy()
        loss = _numpy(result.loss["target"] / energy[:, None])
        for j, method in enumerate(METHODS):
            rows += _summary(loss[j::len(METHODS)], activation=activation, method=method,
                             steps=_numpy(result.step),
                             lr_halved=int(np.sum(halved[j::len(METHODS)] > 0)))
        _advance(progress)
    return {"f1_t1_curves": pd.DataFrame(rows)}


# ---- F2, F3, F6: the three shifts over n ------------------------------------------------

def shifts(settings, progress=None):
    """F2, F3, F6 from one simulation: for each activation, shift kind, draw and n in
    N_GRID, fine-tune with every method for `steps` steps; record final losses and the
    relative gradient norms at the pretrained point.

    Each draw is one problem and one sample of max(N_GRID) points; size n uses its first
    n points (so the curves over n share their randomness).
    Returns {"f2_loss_vs_n", "f3_best_layer", "f6_auto_rgn"} DataFrames.
    """
    runs, rgn = [], []
    for activation in ACTIVATIONS:
        draws = {kind: [] for kind in SHIFTS}
        for kind, make in SHIFTS.items():
            rng = _rng(settings, "shifts", activation, kind)
            for _ in range(settings.draws):
                problem = make(rng, activation)
                draws[kind].append((problem, problem.sample_target(max(N_GRID), rng)))
        # One batch per n and width k: a batch pads every net to its widest one.
        widths = {}
        for kind in SHIFTS:
            widths.setdefault(draws[kind][0][0].pretrained.k, []).append(kind)
        for n in N_GRID:
            for kinds in widths.values():
                runs_n, rgn_n = _shift_batch(settings, activation, n, kinds, draws)
                runs += runs_n
                rgn += rgn_n
                _advance(progress)
    # Rows in SHIFTS order (the batches grouped the kinds by width).
    order = {kind: i for i, kind in enumerate(SHIFTS)}
    runs, rgn = (pd.DataFrame(rows).sort_values(["activation", "kind", "draw", "n"],
                                                key=lambda c: c.map(order) if c.name == "kind"
                                                else c, kind="stable")
                 for rows in (runs, rgn))
    return {"f2_loss_vs_n": _loss_vs_n(runs), "f3_best_layer": _best_layer(runs),
            "f6_auto_rgn": _auto_rgn(runs, rgn)}


def _shift_batch(settings, activation, n, kinds, draws):
    """Simulate every method on the first n samples of each draw of `kinds`; returns rows
    for the runs table and the relative-gradient-norm table."""
    pairs = [(kind, i, problem, (X[:n], y[:n])) for kind in kinds
             for i, (problem, (X, y)) in enumerate(draws[kind])]
    problems = [problem for _, _, problem, _ in pairs]
    samples = [sample for _, _, _, sample in pairs]
    batch = _batch(_repeat(problems, len(METHODS)), _repeat(samples, len(METHODS)),
                   list(METHODS) * len(problems), settings.steps, settings)
    result, halved = _simulate(batch, settings.steps)
    energy = batch.targets["target"].label_energy()
    loss = _numpy(result.final_loss["target"] / energy)
    train = _numpy(2 * result.final_train_loss / energy)
    runs = [dict(activation=activation, kind=kind, draw=i, n=n, method=method,
                 loss=loss[r * len(METHODS) + j], train_loss=train[r * len(METHODS) + j],
                 lr_halved=halved[r * len(METHODS) + j] > 0)
            for r, (kind, i, _, _) in enumerate(pairs) for j, method in enumerate(METHODS)]
    start = batch.select(torch.arange(0, len(batch), len(METHODS), device=batch.device))
    grad_v, grad_B = gradients(start)
    ratio_v = _numpy(grad_v.norm(dim=1) / start.v.norm(dim=1))
    ratio_B = _numpy(grad_B.flatten(1).norm(dim=1) / start.B.flatten(1).norm(dim=1))
    rgn = [dict(activation=activation, kind=kind, draw=i, n=n, rgn_first=ratio_B[r],
                rgn_last=ratio_v[r]) for r, (kind, i, _, _) in enumerate(pairs)]
    return runs, rgn


def _loss_vs_n(runs):
    """F2 table: mean and standard error of the final loss per activation, kind, method, n;
    and of the final train loss (1/n sum (f - y)^2 / E[y^2]) to show convergence."""
    group = runs.groupby(["activation", "kind", "method", "n"], sort=False)
    table = group["loss"].agg(mean="mean", se="sem", draws="count").reset_index()
    table["train_mean"] = group["train_loss"].mean().to_numpy()
    table["lr_halved"] = group["lr_halved"].sum().to_numpy()
    return table


def _best_layer(runs):
    """F3 table at n = N_BEST: mean loss per method and its ratio to full fine-tuning's
    mean loss, with a delta-method standard error for the ratio (paired draws)."""
    rows = []
    at_n = runs[runs.n == N_BEST]
    for (activation, kind), group in at_n.groupby(["activation", "kind"], sort=False):
        full = group[group.method == "all"].sort_values("draw")["loss"].to_numpy()
        for method in METHODS:
            loss = group[group.method == method].sort_values("draw")["loss"].to_numpy()
            ratio = loss.mean() / full.mean()
            # Var(a/b) ~ (Var a - 2 r Cov(a, b) + r^2 Var b) / b^2 for the means a, b.
            cov = np.cov(loss, full) / len(loss)
            var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / full.mean()**2
            rows.append(dict(activation=activation, kind=kind, method=method, n=N_BEST,
                             mean=loss.mean(), se=loss.std(ddof=1) / np.sqrt(len(loss)),
                             relative_to_all=ratio, relative_se=np.sqrt(max(var, 0.0)),
                             draws=len(loss)))
    return pd.DataFrame(rows)


def _auto_rgn(runs, rgn):
    """F6 table at n = N_BEST, one row per draw: the relative gradient norms of B ("first")
    and v ("last") at the pretrained point, the final losses of tuning each alone, the
    layer Auto-RGN points at (larger relative gradient norm) and the layer that is best."""
    at_n = runs[runs.n == N_BEST]
    wide = at_n.pivot_table(index=["activation", "kind", "draw"], columns="method",
                            values="loss").reset_index()
    table = rgn[rgn.n == N_BEST].merge(wide, on=["activation", "kind", "draw"])
    table = table.rename(columns={"first": "loss_first", "last": "loss_last",
                                  "all": "loss_all", "lp-ft": "loss_lp_ft"})
    table["rgn_points_to"] = np.where(table.rgn_first > table.rgn_last, "first", "last")
    table["best_layer"] = np.where(table.loss_first < table.loss_last, "first", "last")
    table["agree"] = table.rgn_points_to == table.best_layer
    return table


# ---- F4: the probability of claim T1's event ---------------------------------------------

def t1_event(settings, progress=None):
    """F4: for each n in N_EVENT, the exact probability of the T1 event, the frequency of
    the event in the drawn samples, and the frequency, over `draws` random linear T1
    problems and samples, with which first-layer tuning reaches ~0 (< ZERO E[y^2]) while
    full fine-tuning stays above it.

    First-layer tuning is exact (closed form) and runs 1000 * steps steps, close to its
    limit; full fine-tuning is stepped for 10 * steps steps, and where the event fails
    because the sample spans everything (n_S >= ds, n_T >= m) it converges to 0 only
    slowly: `full_unconverged` is the fraction of draws where it is still above ZERO
    there, which is what lifts the outcome frequency above the exact curve.
    All sample sizes share one batch: samples are padded with zero rows to max(N_EVENT).
    Returns {"f4_t1_event": DataFrame(n, exact, event_frequency, frequency, se, draws,
    first_zero, full_positive, full_unconverged, lr_halved)}.
    """
    rng = _rng(settings, "t1_event")
    problems, samples, events, spans = [], [], [], []
    for n in N_EVENT:
        for _ in range(settings.draws):
            problem = theory.random_new_directions(rng, DS, D - DS, K, P)
            X, component = problem.target.sample(n, rng)
            problems.append(problem)
            samples.append((X, problem.target_teacher(X)))
            events.append(theory.t1_event(component, DS, D - DS))
            n_new = int(component.sum())
            spans.append(n_new >= D - DS and n - n_new >= DS)
    tunes = ["first", "all"] * len(problems)
    steps = [1000 * settings.steps, 10 * settings.steps] * len(problems)
    batch = _batch(_repeat(problems, 2), _repeat(samples, 2), tunes, steps, settings)
    result, halved = _simulate(batch, steps)
    loss = _numpy(result.final_loss["target"] / batch.targets["target"].label_energy())
    shape = (len(N_EVENT), settings.draws)
    first_zero = (loss[0::2] < ZERO).reshape(shape)
    full_positive = (loss[1::2] > ZERO).reshape(shape)
    frequency = (first_zero & full_positive).mean(axis=1)
    table = pd.DataFrame(dict(
        n=N_EVENT, exact=[theory.t1_event_probability(DS, D - DS, P, n) for n in N_EVENT],
        event_frequency=np.reshape(events, shape).mean(axis=1),
        frequency=frequency, se=np.sqrt(frequency * (1 - frequency) / settings.draws),
        draws=settings.draws, first_zero=first_zero.mean(axis=1),
        full_positive=full_positive.mean(axis=1),
        full_unconverged=(full_positive & np.reshape(spans, shape)).mean(axis=1),
        lr_halved=(halved[1::2] > 0).reshape(shape).sum(axis=1)))
    _advance(progress)
    return {"f4_t1_event": table}


# ---- F5: how full fine-tuning forgets ------------------------------------------------------

def _unseen_old_cov(X, component, ds):
    """Projector (d, d) onto U = the old directions S orthogonal to the old samples."""
    d = X.shape[1]
    old = X[component == 0, :ds]
    basis = np.linalg.svd(old)[2][:len(old)] if len(old) else np.zeros((0, ds))
    cov = np.zeros((d, d))
    cov[:ds, :ds] = np.eye(ds) - basis.T @ basis
    return cov


def forgetting(settings, progress=None):
    """F5: linear T1 problems (n = 6, conditioned on the event), first-layer vs full
    fine-tuning for 2 * steps steps: the head's drift |v(t) - v_src| / |v_src|, and the
    exact errors on U (old directions missed by the sample: E_{x ~ N(0, P_U)}, divided by
    the same E[y^2]) and on the new directions T, and the target loss.

    Returns {"f5_forgetting": DataFrame(method, quantity, step, mean, se, log10_mean,
    log10_se, fraction_zero, draws)}.
    """
    rng = _rng(settings, "forgetting")
    problems, samples, unseen, new = [], [], [], []
    for _ in range(settings.draws):
        problem = theory.random_new_directions(rng, DS, D - DS, K, P)
        X, y, component = _event_sample(problem, N_T1, rng)
        problems.append(problem)
        samples.append((X, y))
        unseen.append((problem.target_teacher, _unseen_old_cov(X, component, DS)))
        new.append((problem.target_teacher, problem.target.covs[1]))
    methods = FORGETTING_METHODS
    batch = _batch(_repeat(problems, 2), _repeat(samples, 2), list(methods) * len(problems),
                   2 * settings.steps, settings,
                   {"unseen old": _repeat(unseen, 2), "new": _repeat(new, 2)})
    result, halved = _simulate(batch, 2 * settings.steps, record=_log_grid(2 * settings.steps),
                               keep_path=True)
    energy = {name: target.label_energy()[:, None] for name, target in batch.targets.items()}
    quantities = dict(zip(FORGETTING_QUANTITIES, (
        (result.path_v - batch.v[:, None]).norm(dim=2) / batch.v.norm(dim=1)[:, None],
        result.loss["unseen old"] / energy["unseen old"],
        result.loss["new"] / energy["new"],
        result.loss["target"] / energy["target"])))
    rows = []
    for quantity, values in quantities.items():
        values = _numpy(values)
        for j, method in enumerate(methods):
            rows += _summary(values[j::2], method=method, quantity=quantity,
                             steps=_numpy(result.step), lr_halved=int(np.sum(halved[j::2] > 0)))
    _advance(progress)
    return {"f5_forgetting": pd.DataFrame(rows)}


EXPERIMENTS = {"t1_curves": t1_curves, "shifts": shifts, "t1_event": t1_event,
               "forgetting": forgetting}


def units(name):
    """How many progress-bar units experiment `name` advances (one per simulate call)."""
    widths = len({make(np.random.default_rng(0), "linear").pretrained.k
                  for make in SHIFTS.values()})
    return {"t1_curves": len(ACTIVATIONS), "shifts": len(ACTIVATIONS) * len(N_GRID) * widths,
            "t1_event": 1, "forgetting": 1}[name]


def _advance(progress):
    if progress is not None:
        progress.update(1)
