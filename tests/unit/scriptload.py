"""Import one of scripts/ (Python files without a .py suffix) as a module, for its tests."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(f"{name}_script", str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    if spec is None:
        raise ImportError(f"cannot load scripts/{name}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod
