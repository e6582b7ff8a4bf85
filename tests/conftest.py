"""Fixtures for the whole suite: a private hash cache, the example's spec and a fixture copy to tamper with.

Builders and paths shared by tests live in `tests.support`; this file holds fixtures and hooks only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC

pytest_plugins = ["pytester"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under `make test` the optional libraries are required, so their tests cannot skip unnoticed."""
    if not os.environ.get("PARITY_REQUIRE_EXTRAS"):
        return
    from parity.extras import EXTRAS

    missing = [f"{module} (pip install -e '.[{extra}]')" for module, extra in EXTRAS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError("PARITY_REQUIRE_EXTRAS is set but these are not installed: " + ", ".join(missing))


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory):
    """The suite's hash cache lives in a temporary directory, never in the user's ~/.cache/parity."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARITY_CACHE_DIR", str(tmp_path_factory.mktemp("parity-cache")))
        yield


@pytest.fixture(autouse=True, scope="module")
def _forget_user_packages(tmp_path_factory: pytest.TempPathFactory):
    """Modules the tests' user repositories defined (under the session's tmp folder), and those folders on
    ``sys.path`` (a spec's folder is appended to it), are forgotten after each test module: two repositories
    both holding ``mlcore/heads.py`` must not see each other's."""
    yield
    import sys

    base = str(tmp_path_factory.getbasetemp())
    sys.path[:] = [entry for entry in sys.path if not entry.startswith(base)]
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(base):
            del sys.modules[name]


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Path:
    """A private copy of the example fixture that a test may tamper with."""
    return Path(shutil.copytree(EXAMPLE_FIXTURES, tmp_path / "clip_dnn"))


@pytest.fixture(scope="session")
def example_spec():
    from parity.spec import load_spec

    return load_spec(EXAMPLE_SPEC)
