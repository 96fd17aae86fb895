"""The repository's pages as the tests that check their quoted numbers read them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_text(name: str) -> str:
    """The file `name` (relative to the repository root) with its line breaks as spaces, so
    a number or phrase the page wraps over two lines still matches."""
    return " ".join((ROOT / name).read_text().split())
