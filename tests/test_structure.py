"""The layout rules of CONTRIBUTING.md that code can check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparse_moe"
FORBIDDEN = ("torch.distributed", "deepspeed")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("package", ["moe", "models"])
def test_the_math_imports_no_process_groups(package):
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    found = {f"{path.relative_to(SRC)}: {name}" for path in files for name in _imports(path)
             if name == "torch.distributed" or name.startswith(FORBIDDEN)}
    assert not found, f"{package}/ must not import {FORBIDDEN}: {sorted(found)}"


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nfrom deepspeed.moe import layer\n")
    assert {"torch.distributed", "deepspeed.moe"} <= set(_imports(bad))
