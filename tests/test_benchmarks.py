"""Every benchmark script imports against the current package (a renamed verb fails here, not on a GPU box)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports(path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: its siblings import by name
    name = f"benchmark_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while being declared
    spec.loader.exec_module(module)  # the module level only: main() runs under __name__ == "__main__"
    assert callable(module.main)
