"""docs/claim-tests.md names, for each claim and each planted bug, the test that checks it:
every `file.py::test_name` it names must exist (a renamed test would leave the doc pointing
at nothing, and the claim unchecked as far as a reader can tell)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "claim-tests.md"
# `test_x.py::test_name`, `tests/deep/test_x.py::test_name[param]`, or `::test_name` after one
REFERENCE = re.compile(r"(?:((?:tests/[\w/]*)?test_\w+\.py))?::(test_\w+)")


def test_every_test_the_doc_names_exists():
    files = {p.name: p for p in (ROOT / "tests").rglob("test_*.py")}
    missing, current, named = [], None, 0
    for line in DOC.read_text().splitlines():
        current = None  # a bare `::name` refers to the last file named on its line
        for file, name in REFERENCE.findall(line):
            current = Path(file).name if file else current
            if current is None:
                continue
            named += 1
            path = files.get(current)
            if path is None or not re.search(rf"^\s*def {name}\(", path.read_text(), re.M):
                missing.append(f"{current}::{name}")
    assert named > 70, named    # the pattern still finds the doc's references
    assert not missing, missing
