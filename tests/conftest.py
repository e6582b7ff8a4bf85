"""Shared helpers: the bundled example's spec and fixture, and ways to derive drifted copies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from parity.store.fixtures import MANIFEST, MANIFEST_DIGEST, manifest_digest, sha256_file

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = ROOT / "specs" / "clip_dnn.toml"
EXAMPLE_FIXTURES = ROOT / "fixtures" / "clip_dnn"
# The second bundled example: transformers CLIPVisionModel + MLP classifier.
CLASSIFIER_SPEC = ROOT / "specs" / "clip_mlp.toml"
CLASSIFIER_FIXTURES = ROOT / "fixtures" / "clip_mlp"


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


def write_spec(directory: Path, replacements: dict[str, str] | None = None, name: str = "candidate.toml") -> Path:
    """A copy of the example spec in ``directory`` with absolute paths and text replacements applied."""
    text = EXAMPLE_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    for old, new in (replacements or {}).items():
        assert old in text, f"{old!r} not in the example spec"
        text = text.replace(old, new)
    path = directory / name
    path.write_text(text)
    return path


def reseal(fixture_dir: Path, edit=None) -> None:
    """Recompute the manifest's checksums and its seal after a test edited a fixture on purpose.

    ``edit(manifest)``, if given, changes the manifest itself first.
    """
    manifest = json.loads((fixture_dir / MANIFEST).read_text())
    if edit is not None:
        edit(manifest)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for rel, entry in files.items():
        if isinstance(entry, dict) and isinstance(rel, str) and (fixture_dir / rel).is_file():
            entry["sha256"] = sha256_file(fixture_dir / rel)
            entry["bytes"] = (fixture_dir / rel).stat().st_size
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (fixture_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Path:
    """A private copy of the example fixture that a test may tamper with."""
    return Path(shutil.copytree(EXAMPLE_FIXTURES, tmp_path / "clip_dnn"))


@pytest.fixture(scope="session")
def example_spec():
    from parity.spec import load_spec

    return load_spec(EXAMPLE_SPEC)
