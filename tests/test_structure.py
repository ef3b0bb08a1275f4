"""The package's floors: each subpackage imports only from itself and the floors below it (README's module map)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import seqr

ROOT = Path(seqr.__file__).parent
# floor -> the floors its modules may import (anywhere in the module, lazy imports included)
ALLOWED = {
    "core": {"core"},
    "store": {"core", "store"},
    "hf": {"core", "store", "hf"},
    "silo": {"core", "store", "hf", "silo"},
    "eval": {"core", "store", "hf", "silo", "eval"},
    "vllm": {"core", "store", "hf", "vllm"},  # seqr inside vLLM: knows nothing of HTTP, training or evaluation
    "serve": {"core", "store", "hf", "vllm", "serve"},  # knows nothing of training or evaluation
    "bench": {"core", "store", "hf", "silo", "eval", "serve", "bench"},
}


def _imports(path: Path) -> set[str]:
    """Every seqr subpackage a module imports from."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; seqr uses absolute imports"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "seqr" and len(parts) > 1 and parts[1] in ALLOWED:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_each_floor_imports_only_downward(floor):
    modules = sorted((ROOT / floor).glob("*.py"))
    assert modules, f"no modules under seqr/{floor}"
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) - ALLOWED[floor]) for p in modules}
    assert not {k: v for k, v in bad.items() if v}


def test_no_flat_modules_left_and_files_stay_small():
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py"]
    big = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 520}
    assert not big
