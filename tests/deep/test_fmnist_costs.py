"""docs/fmnist.md quotes the suite's costs from `python scripts/fmnist_costs.py`: the doc's
numbers must be what the script prints from the committed rows."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script_output(capsys) -> str:
    spec = importlib.util.spec_from_file_location("fmnist_costs", ROOT / "scripts/fmnist_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    return capsys.readouterr().out


def test_the_costs_docs_fmnist_quotes_are_the_scripts(capsys):
    out = script_output(capsys)
    doc = " ".join((ROOT / "docs/fmnist.md").read_text().split())  # line breaks as spaces
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
