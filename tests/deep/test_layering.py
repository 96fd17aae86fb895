"""deep/ imports flow one way (the layering stated in deep/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DEEP = Path(__file__).resolve().parents[2] / "deep"
# Rank of each top-level module or package of deep/: a module may import only from
# strictly lower ranks, or from inside its own package. Modules not listed are tools
# at the top (speed, calibrate, gallery, ...).
RANKS = {
    "errors": 0, "allocator": 0,
    "files": 1, "stats": 1,  # stats: mean, se and t intervals over seeds for every table
    "models": 2, "results": 2,
    "data": 3,
    "blocks": 4, "checkpoints": 4, "normalization": 4,
    "methods": 5, "prefix_cache": 5, "augment_memo": 5,
    "train": 6,
    "pretrain": 7,
    "protocol": 8, "flags": 8,  # flags: argparse helpers every command's parser uses
    "sweep": 9, "convergence": 9,  # convergence: issue #15 (curves.csv, summaries)
    "adapt": 9.5,  # online adaptation: reuses the sweep's checkpoint resolution; report reads its CSV
    "two_stage": 9.7,  # issue #15; report reads a two-stage CSV as its suite does
    "report": 10, "ray_backend": 10,
    "bench": 11,
    "__main__": 12,
}
TOOLS = 11
# The tools themselves (commands at the top, each imported by nothing below): named, so that
# a new module is placed on purpose (a module in neither list would go unchecked).
TOOL_MODULES = {"__init__", "calibrate", "clip", "examples", "gallery", "onednn_check", "speed",
                "vit_cost"}
# Known exceptions, each with its reason; the lead decides when they go.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def rank(module: str) -> int:
    return RANKS.get(module, TOOLS)


def owner(path: Path) -> str:
    """The top-level deep module or package a file belongs to."""
    return path.relative_to(DEEP).with_suffix("").parts[0]


def deep_imports(text: str, package: tuple[str, ...]) -> list[tuple[str, int]]:
    """(top-level deep module imported, line) for every import in `text`, a file inside
    deep/<package...>; imports under `if TYPE_CHECKING:` are left out (never run)."""
    tree = ast.parse(text)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:  # absolute: `from deep.x import y` or `from deep import x, y`
                module = (node.module or "").split(".")
                if module[0] != "deep":
                    continue
                base = []
            else:
                base = list(package[:len(package) - (node.level - 1)])
                module = node.module.split(".") if node.module else []
            path = [*base, *module[1:]] if node.level == 0 else [*base, *module]
            if path:  # `from deep.x import ...` or `from .x import ...`: module x
                out.append((path[0], node.lineno))
            else:  # `from deep import x, y` or `from . import x, y`: every name a module
                out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno) for a in node.names
                    if a.name.startswith("deep.")]
    return out


def upward_imports(path: Path) -> list[tuple[str, int]]:
    me = owner(path)
    package = path.relative_to(DEEP).parts[:-1]
    return [(target, line) for target, line in deep_imports(path.read_text(), package)
            if target != me and rank(target) >= rank(me) and (me, target) not in EXCEPTIONS]


@pytest.mark.parametrize("path", sorted(p for p in DEEP.rglob("*.py") if owner(p) in RANKS),
                         ids=lambda p: str(p.relative_to(DEEP)))
def test_imports_flow_down(path):
    bad = upward_imports(path)
    unranked = sorted({target for target, _ in bad if target not in RANKS})
    hint = (f"; {unranked} not in RANKS here, so ranked as tools at the top: give a new "
            "module its layer in RANKS (deep/__init__.py states the layers)" if unranked else
            "; import from a lower layer, or move the code down (deep/__init__.py states the layers)")
    assert not bad, f"{path.relative_to(DEEP)} imports a layer at or above its own: {bad}{hint}"


def test_every_module_has_a_layer_or_is_a_named_tool():
    """A module in neither list had its own imports checked by nothing."""
    placed = set(RANKS) | TOOL_MODULES
    stray = sorted({owner(p) for p in DEEP.rglob("*.py")} - placed)
    assert not stray, (f"{', '.join(stray)} (deep/) in no layer: add each to RANKS here (its layer; "
                       "deep/__init__.py states them) or to TOOL_MODULES (a command at the top)")


def test_data_loaders_never_import_the_engine():
    for path in sorted((DEEP / "data").glob("*.py")):
        imported = {t for t, _ in deep_imports(path.read_text(), ("data",))}
        assert imported <= {"data", "errors", "files", "models"}, (path.name, imported)


def test_an_upward_import_is_found():
    """Planted: the engine importing the sweep, in a function or at the top."""
    text = "def f():\n    from .sweep import run_sweep\n"
    assert deep_imports(text, ()) == [("sweep", 2)]
    assert rank("sweep") > rank("train")
    assert deep_imports("from ..train import fit\n", ("data",)) == [("train", 1)]
    assert deep_imports("from deep import sweep\n", ()) == [("sweep", 1)]
    assert deep_imports("from .. import files, sweep\n", ("data",)) == [("files", 1),
                                                                         ("sweep", 1)]
    assert deep_imports("from . import base, fmnist\n", ("data",)) == [("data", 1)]
    assert deep_imports("import deep.sweep\nfrom deep.train import fit\n", ()) == [
        ("sweep", 1), ("train", 2)]
    assert deep_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from .train import TrainConfig\n", ()) == []


def private_imports(text: str) -> list[tuple[str, int]]:
    """(name, line) of every `_private` name imported from a deep module: a module's
    private names are its own (make a name public before another module uses it)."""
    return [(a.name, node.lineno) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.ImportFrom)
            and (node.level > 0 or (node.module or "").startswith("deep"))
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


@pytest.mark.parametrize("path", sorted([*DEEP.rglob("*.py"), *(DEEP.parent / "scripts").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(DEEP.parent)))
def test_no_module_imports_another_modules_private_names(path):
    assert not private_imports(path.read_text()), private_imports(path.read_text())


def test_a_private_import_is_found():
    """Planted: the Ray backend reaching into the sweep's private helpers (as it did)."""
    assert private_imports("from .sweep import _groups, run_group\n") == [("_groups", 1)]
    assert private_imports("from deep.convergence import read_curves, _curves_text\n") == [("_curves_text", 1)]
    assert private_imports("from os import _exit\nfrom .sweep import __all__\n") == []
