"""The package's structure: one-way layers (import-linter contracts in .importlinter) and no import of a
dfine module inside a function (the usual way to hide an import cycle)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]


def _package_files():
    for path in sorted((REPO / "dfine").rglob("*.py")):
        yield path
    for path in sorted((REPO / "kernels").glob("*.py")):
        yield path


def _dfine_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dfine" or alias.name.startswith("dfine."):
                    yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "dfine"
                                                                    or node.module.startswith("dfine.")):
            yield node, node.module


def test_no_dfine_import_inside_functions():
    found = []
    for path in _package_files():
        tree = ast.parse(path.read_text(), str(path))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node, name in _dfine_imports(func):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name} inside {func.name}()")
    assert not found, "\n".join(found)


def test_package_modules_import_layers_not_the_root():
    """`import dfine` inside the package would reach every layer through the root's re-exports."""
    found = []
    for path in _package_files():
        if path.name in ("__init__.py", "__main__.py") and path.parent == REPO / "dfine":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node, name in _dfine_imports(tree):
            if name == "dfine" and not (isinstance(node, ast.ImportFrom) and all(a.name == "ops" for a in node.names)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, "modules that import the dfine root package: " + ", ".join(found)


def test_layer_contracts_hold():
    beside = Path(sys.executable).parent / "lint-imports"  # where pip put it for this interpreter
    exe = str(beside) if beside.exists() else shutil.which("lint-imports")
    if exe is None:
        if IN_CI:
            pytest.fail("lint-imports (import-linter) is not installed: pip install -r requirements.txt")
        pytest.skip("import-linter is not installed")
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout
