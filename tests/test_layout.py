"""The suite's own layout: tests mirror parity's packages, and no test module is imported by another module.

Shared builders live in `tests.support` (and a folder's own helper modules, as in `tests/shipped`); a test module
or a conftest.py is only ever loaded by pytest, so moving or renaming one never breaks another.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support.paths import ROOT

TESTS = ROOT / "tests"
PACKAGE = ROOT / "parity"
# Code that the tests deploy or import as a user's project would: not part of the suite's layout.
USER_CODE = (TESTS / "shipped" / "project",)


def _is_test_module(name: str) -> bool:
    """Whether the dotted module ``name`` is a test module or a conftest, by its last part."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_modules(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module ``source`` imports, relative imports resolved from ``module``.

    ``from package import name`` yields both ``package`` and ``package.name``: the name may be a module.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _suite_files() -> list[Path]:
    return sorted(path for path in TESTS.rglob("*.py")
                  if not any(path.is_relative_to(folder) for folder in USER_CODE) and "__pycache__" not in path.parts)


def test_the_import_scan_finds_a_test_module_however_it_is_imported():
    """The scan below is only as good as this: each way of importing a test module is seen, and nothing else."""
    sources = {
        "from tests.commands.test_diagnose import DRIFTS": "tests.commands.test_diagnose",
        "import tests.runners.test_http as http_tests": "tests.runners.test_http",
        "from tests.commands import test_freeze": "tests.commands.test_freeze",
        "from .test_outputs import judged": "tests.explain.detectors.test_outputs",
        "from . import conftest": "tests.explain.detectors.conftest",
        "def f():\n    from tests.conftest import reseal\n": "tests.conftest",
    }
    for source, expected in sources.items():
        found = [name for _, name in imported_modules(source, "tests.explain.detectors.test_images")
                 if _is_test_module(name)]
        assert found == [expected], (source, found)
    clean = "from tests.support.paths import ROOT\nfrom tests.shipped.findings import findings\nimport pytest\n"
    assert not [name for _, name in imported_modules(clean, "tests.x.test_y") if _is_test_module(name)]


def test_no_module_under_tests_imports_a_test_module_or_a_conftest():
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in _suite_files()
                for line, name in imported_modules(path.read_text(), _module_name(path))
                if name.startswith("tests.") and _is_test_module(name)]
    assert not offences, "move what they share into tests/support/:\n" + "\n".join(offences)


def test_every_folder_of_the_suite_is_a_package():
    """pytest imports tests as `tests.<folder>.<module>`: a folder without __init__.py would clash by file name."""
    holding = {path.parent for path in _suite_files() if path.name.startswith("test_") or path.name == "conftest.py"}
    folders = {folder for directory in holding
               for folder in (directory, *directory.parents) if folder.is_relative_to(TESTS)}
    missing = sorted(str(folder.relative_to(ROOT)) for folder in folders if not (folder / "__init__.py").is_file())
    assert not missing, f"no __init__.py in {missing}"


def test_each_package_of_parity_has_a_test_folder_of_its_own():
    packages = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    # The packages the renovation made: a package that disappears from parity/ should fail here too.
    assert {"store", "preprocess", "model", "runners", "judge", "explain", "numerics", "commands", "report",
            "libraries"} <= set(packages), packages
    untested = [name for name in packages if not any((TESTS / name).rglob("test_*.py"))]
    assert not untested, f"parity packages without a tests/<package>/ folder holding a test file: {untested}"
