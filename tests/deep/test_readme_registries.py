"""The README's architecture and method tables name every registered architecture and
method: a newcomer reads those tables, not the registries, so a new entry missing there
is invisible (the registries: `deep.models.architecture_names`, `deep.methods.METHODS`)."""

from __future__ import annotations

from pathlib import Path

from deep.methods import GENERIC_METHODS
from deep.models import architecture_names

README = Path(__file__).resolve().parents[2] / "README.md"


def table(header: str) -> list[list[str]]:
    """The cells of each row of the README table whose header row is `header`."""
    lines = README.read_text().splitlines()
    start = lines.index(header) + 2  # past the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_every_architecture_has_a_row():
    """In its row's first two cells: `resnet26-w4` is named in `resnet26`'s "what"."""
    rows = table("| name | what | blocks |")
    missing = [a for a in architecture_names()
               if not any(f"`{a}`" in row[0] + row[1] for row in rows)]
    assert not missing, f"README's architecture table lacks {missing}"


def test_every_method_has_a_row():
    rows = table("| name | what is tuned |")
    missing = [m for m in GENERIC_METHODS if not any(f"`{m}`" in row[0] for row in rows)]
    assert not missing, f"README's methods table lacks {missing}"
