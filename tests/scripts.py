"""scripts/<name>.py as a module, for the tests that call a script's functions (scripts/ is
no package, so `import scripts.x` does not work)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, monkeypatch=None) -> ModuleType:
    """A fresh module of scripts/<name>.py. With pytest's `monkeypatch`, it is in
    sys.modules while the test runs: a script's dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
