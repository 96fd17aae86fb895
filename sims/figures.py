"""The figure pipeline: run the experiments, write their CSVs, draw PNG + PDF from the CSVs.

    make_figures(settings, out="figures", only=None, resume=False)

Every file is written atomically (a temporary file in the same folder, then a rename), so
an interrupted run never leaves a half-written CSV or image. `resume=True` skips the
experiments whose CSVs exist and were made with the same settings (recorded in
`<out>/sims_settings.json`), so a long `--draws` run that was interrupted picks up where it
stopped.
"""
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from . import experiments, plots

# Figure -> the experiment that makes its table.
SOURCES = {"f1_t1_curves": "t1_curves", "f2_loss_vs_n": "shifts", "f3_best_layer": "shifts",
           "f4_t1_event": "t1_event", "f5_forgetting": "forgetting", "f6_auto_rgn": "shifts"}
SETTINGS_FILE = "sims_settings.json"


def _atomic(path, write):
    """Call write(temporary path), then rename it onto `path`."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                         suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)     # mkstemp makes 0600; use the usual mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_csv(table, path):
    """A DataFrame as CSV (12 significant digits), atomically."""
    _atomic(path, lambda p: table.to_csv(p, index=False, float_format="%.12g"))


def save_figure(figure, paths):
    """A matplotlib figure to each path (PNG or PDF, by suffix), atomically; then closes it."""
    import matplotlib.pyplot as plt
    try:
        for path in paths:
            # No dates or versions in the metadata: the same data gives the same bytes.
            metadata = ({"CreationDate": None, "Producer": None} if str(path).endswith(".pdf")
                        else {"Software": None})
            _atomic(path, lambda p: figure.savefig(p, format=Path(path).suffix[1:],
                                                   bbox_inches="tight", metadata=metadata))
    finally:
        plt.close(figure)


def resolve_only(only):
    """Figure names from e.g. "f1,f4" or ["f2_loss_vs_n"]; None means all."""
    if only is None:
        return list(SOURCES)
    names = only.split(",") if isinstance(only, str) else list(only)
    chosen = []
    for name in names:
        matches = [f for f in SOURCES if f == name.strip() or f.split("_")[0] == name.strip()]
        if not matches:
            raise ValueError(f"unknown figure {name!r}; expected f1..f6 or one of "
                             f"{list(SOURCES)}")
        chosen += matches
    return list(dict.fromkeys(chosen))


def make_figures(settings, out="figures", only=None, resume=False, log=print, simulate=True):
    """Run the experiments behind the chosen figures and write CSV, PNG and PDF to `out`.

    Args:
        settings: `experiments.Settings`.
        out: output folder (created if missing).
        only: figures to make (see `resolve_only`); default all six.
        resume: reuse the CSVs of experiments already run with the same settings.
        log: where to print the summary line.
        simulate: False only redraws from the CSVs already in `out`.
    Returns: the list of paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = resolve_only(only)
    needed = list(dict.fromkeys(SOURCES[f] for f in figures))
    recorded_path = out / SETTINGS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.exists() else {}
    todo = [name for name in needed if simulate
            and not (resume and recorded.get(name) == settings.as_dict()
                     and all((out / f"{f}.csv").exists() for f in SOURCES if SOURCES[f] == name))]
    missing = [f for f in figures if not simulate and not (out / f"{f}.csv").exists()]
    if missing:
        raise FileNotFoundError(f"no CSV for {missing} in {out}/; run `python -m sims figures`")
    start, written = time.perf_counter(), []
    total = sum(experiments.units(name) for name in todo)
    with tqdm(total=total, desc="simulating", unit="batch", disable=total == 0) as progress:
        for name in todo:
            progress.set_description(f"simulating {name}")
            tables = experiments.EXPERIMENTS[name](settings, progress)
            # Forget the old settings before replacing any CSV: an interruption between two
            # of this experiment's CSVs must not let --resume keep a mix of old and new.
            if recorded.pop(name, None) is not None:
                _atomic(recorded_path,
                        lambda p: Path(p).write_text(json.dumps(recorded, indent=1, sort_keys=True)))
            for table_name, table in tables.items():
                write_csv(table, out / f"{table_name}.csv")
                written.append(out / f"{table_name}.csv")
            recorded[name] = settings.as_dict()
            _atomic(recorded_path, lambda p: Path(p).write_text(json.dumps(recorded, indent=1, sort_keys=True)))
    # An experiment makes the tables of several figures (F2, F3, F6 share one): redraw every
    # figure whose CSV was just rewritten, so no PNG is left beside a CSV it was not drawn from.
    figures += [f for f in SOURCES if SOURCES[f] in todo and f not in figures]
    for figure_name in tqdm(figures, desc="drawing", unit="figure"):
        tables = {t: pd.read_csv(out / f"{t}.csv") for t in plots.FIGURES[figure_name]}
        paths = [out / f"{figure_name}.png", out / f"{figure_name}.pdf"]
        save_figure(plots.draw(figure_name, tables), paths)
        written += paths
    device = settings.device if settings.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    what = (f"{settings.draws} draws, {settings.steps} steps, {settings.dtype}, {device}"
            if todo else "drawn from existing CSVs")
    log(f"wrote {len(written)} files to {out}/ in {time.perf_counter() - start:.0f} s ({what})")
    return written
