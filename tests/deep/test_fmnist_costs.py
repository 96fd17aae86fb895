"""docs/fmnist.md quotes the suite's costs from `python scripts/fmnist_costs.py`: the doc's
numbers must be what the script prints from the committed rows."""

from __future__ import annotations

import re
from pathlib import Path

from tests.doc_text import doc_text
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def script_output(capsys) -> str:
    assert load_script("fmnist_costs").main([]) == 0
    return capsys.readouterr().out


def test_the_costs_docs_fmnist_quotes_are_the_scripts(capsys):
    out = script_output(capsys)
    doc = doc_text("docs/fmnist.md")
    per_epoch = dict(re.findall(r"^  (\S+) +(\d+\.\d\d)  \(", out, re.M))
    # the budget estimate's per-method seconds per epoch, and the cheapest/dearest extra methods
    for method in ("all", "first", "second", "third", "last", "lp-ft", "auto-rgn"):
        assert f"`{method}` {per_epoch[method]}" in doc, method
    extra = [float(per_epoch[m]) for m in ("gradual-first-last", "gradual-last-first", "l1sp", "auto-snr")]
    assert f"cost {min(extra):.2f}-{max(extra):.2f} s per epoch" in doc
    fmnist_c = re.search(r"^  fmnist-c +([\d,]+)$", out, re.M).group(1)
    total = re.search(r"^  total +([\d,]+)$", out, re.M).group(1)
    assert f"fmnist-c is {fmnist_c} of its {total} worker-seconds" in doc
    scaled, hours = re.search(r"instead of 6: ([\d,]+) worker-seconds.* = ([\d.]+) hours", out).groups()
    assert f"about {hours} hours of wall time" in doc
    assert f"15 corruptions: about {scaled})" in doc


def test_the_fmnist_c_protocol_notes_quote_the_committed_rows(capsys):
    """`python -m deep protocols --show fmnist-c` estimated the whole protocol from a mean of
    11 s per run and the suite at 85 min, numbers from before the flip rerun and LP-FT's and
    Auto-RGN's seeds 1-4 (the rows now give 14 s; the suite's wall time 124.6 min)."""
    import csv
    from deep.protocol import load_protocol
    notes = " ".join(load_protocol("fmnist-c").notes.split())
    with open(ROOT / "figures/fmnist-v2/results.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r["benchmark"] == "fmnist-c"]
    mean = round(sum(seconds) / len(seconds))
    runs = int(re.search(r"= ([\d,]+) runs", notes).group(1).replace(",", ""))
    assert f"({runs:,} x {mean} s / 2, where {mean} s is the mean `seconds`" in notes
    assert f"about {round(runs * mean / 2 / 3600)} hours with --workers 2" in notes
    wall = re.search(r"wall time ([\d.]+) min", script_output(capsys)).group(1)
    assert f"the whole suite: about {round(float(wall))} min" in notes


def test_the_readme_quotes_the_scripts_wall_time_and_15_corruption_estimate(capsys):
    """README's suite paragraph: '125 minutes on 2 cores, all 15 corruptions would take 3.4
    hours (`python scripts/fmnist_costs.py`)'."""
    out = script_output(capsys)
    readme = doc_text("README.md")
    wall, hours = re.search(r"wall time ([\d.]+) min x [\d.]+ = ([\d.]+) hours", out).groups()
    assert (f"the suite takes {round(float(wall))} minutes on 2 cores, all 15 corruptions would "
            f"take {hours} hours (`python scripts/fmnist_costs.py`)") in readme
