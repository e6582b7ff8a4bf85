"""Drifted copies of the bundled example: its spec with text replacements, a fixture resealed after an edit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.store.fixtures import MANIFEST, MANIFEST_DIGEST, manifest_digest, sha256_file
from tests.support.paths import EXAMPLE_SPEC, ROOT


def write_spec(directory: Path, replacements: dict[str, str] | None = None, name: str = "candidate.toml") -> Path:
    """A copy of the example spec in ``directory`` with absolute paths and text replacements applied."""
    text = EXAMPLE_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    for old, new in (replacements or {}).items():
        assert old in text, f"{old!r} not in the example spec"
        text = text.replace(old, new)
    path = directory / name
    path.write_text(text)
    return path


def reseal(fixture_dir: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> None:
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


def replace_reference(fixture_dir: Path, pipeline: Any, embeddings: Any) -> None:
    """Store ``embeddings`` as the fixture's reference and the pipeline's head outputs on them as its outputs
    (a deployment cell runs the head too), then reseal."""
    import numpy as np

    from parity.store.fixtures import load_fixture

    fixture = load_fixture(fixture_dir)
    np.save(fixture_dir / "clip.npy", np.asarray(embeddings, np.float32))
    np.save(fixture_dir / "outputs.npy", pipeline.run_head(embeddings, fixture.biases()).numpy().astype(np.float32))
    reseal(fixture_dir)
