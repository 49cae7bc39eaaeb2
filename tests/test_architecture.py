"""The layer rule of docs/ARCHITECTURE.md, checked by import-linter's contracts in pyproject.toml.

The contracts must hold on the tree, and must fail when a module imports upward, when two
modules import each other, or when the framework imports the reference code. Each failure is
made in a temporary copy of the package, never in the tree.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
#: The sizes a reader can hold in their head (docs/ARCHITECTURE.md): lines per module, class and function.
MODULE_MAX, CLASS_MAX, FUNCTION_MAX = 600, 300, 60


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the package and contracts under ``root``, with that ``pipeline`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, line: str) -> None:
    """Append an import to ``module`` (a file of the copy)."""
    module.write_text(module.read_text() + f"\n{line}\n")


def test_the_tree_keeps_its_contracts() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers(copy: Path) -> None:
    # Given records (layer 2) importing the CLI (the top)
    add_import(copy / "pipeline" / "records" / "codecs.py", "import pipeline.cli.main")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "pipeline's layers: each imports only those below it BROKEN" in result.stdout
    assert "pipeline.records is not allowed to import pipeline.cli" in result.stdout
    assert "pipeline.records.codecs -> pipeline.cli.main" in result.stdout


def test_a_lazy_upward_import_breaks_the_layers_too(copy: Path) -> None:
    # An import inside a function is still an import: the runtime may not reach into ops at call time.
    add_import(copy / "pipeline" / "runtime" / "keyed.py",
               "def _late():\n    from pipeline.ops import processes\n    return processes")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "pipeline.runtime is not allowed to import pipeline.ops" in result.stdout


def test_a_cycle_inside_a_package_breaks_the_acyclic_contract(copy: Path) -> None:
    # Given two modules of one layer importing each other (allowed by the layers, not by the cycle rule)
    add_import(copy / "pipeline" / "records" / "envelope.py", "from pipeline.records import partition")
    add_import(copy / "pipeline" / "records" / "partition.py", "from pipeline.records import envelope")
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "no import cycle between the modules of any package in pipeline BROKEN" in result.stdout
    assert "No cycles are allowed in pipeline.records." in result.stdout


def test_the_framework_may_not_import_the_reference_code(copy: Path) -> None:
    add_import(copy / "pipeline" / "cli" / "main.py", "import consumers.primes")
    shutil.copytree(ROOT / "consumers", copy / "consumers", ignore=shutil.ignore_patterns("__pycache__"))
    result = lint_imports(copy)
    assert result.returncode == 1
    assert "pipeline is not allowed to import consumers" in result.stdout


def oversized(package: Path) -> list[str]:
    """Every module, class and function under ``package`` longer than its limit, as ``path:line name (lines)``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        shown = path.relative_to(package.parent)
        if (lines := len(text.splitlines())) > MODULE_MAX:
            found.append(f"{shown} ({lines} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                limit = CLASS_MAX if isinstance(node, ast.ClassDef) else FUNCTION_MAX
                if (lines := node.end_lineno - node.lineno + 1) > limit:
                    found.append(f"{shown}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_module_class_or_function_is_too_long() -> None:
    assert oversized(ROOT / "pipeline") == []


def test_a_long_function_is_found(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_MAX))
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "long.py").write_text(f"def f():\n{body}")
    assert oversized(tmp_path / "pipeline") == [f"pipeline/long.py:1 f ({FUNCTION_MAX + 1} lines)"]
