"""Fixture directories: frozen reference data, a manifest with checksums, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from parity.errors import FixtureError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "EMBEDDINGS",
    "METADATA",
    "OUTPUTS",
    "PIXELS",
    "FixtureRow",
    "Fixture",
    "Staging",
    "sha256_file",
    "environment",
    "stage_fixture",
    "load_fixture",
    "load_logged_samples",
    "update_manifest",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "clip.npy"
METADATA = "clip_metadata.json"
OUTPUTS = "outputs.npy"
PIXELS = "pixels.safetensors"
_VERSIONED = ("torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "transformers", "open_clip_torch")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment() -> dict[str, str]:
    """Library versions and platform, as recorded in manifests and compared at check time."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


@dataclass(frozen=True)
class FixtureRow:
    """One training sample: its image and the head's other inputs."""

    name: str
    image: Path
    input_biases: tuple[int, ...]
    labels: tuple[float, ...] = ()


@dataclass(frozen=True)
class Fixture:
    """A verified fixture directory, loaded."""

    root: Path
    manifest: Mapping[str, Any]
    rows: tuple[FixtureRow, ...]
    embeddings: np.ndarray  # (N, D) float32; stored as (N, 1, D) like the training artifact
    outputs: np.ndarray  # (N, L)
    golden_pixels: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [row.name for row in self.rows]

    @property
    def pipeline(self) -> Mapping[str, Any]:
        return self.manifest.get("pipeline", {})

    def biases(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """``input_biases`` of the given rows (all by default) as an (n, K) int64 array."""
        rows = self.rows if indices is None else [self.rows[i] for i in indices]
        return np.array([row.input_biases for row in rows], dtype=np.int64).reshape(len(rows), -1)


@dataclass
class Staging:
    """A temporary directory being filled with fixture files, plus the manifest to write."""

    path: Path
    manifest: dict[str, Any]


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """One regeneration of ``dest`` at a time, across processes (an advisory lock file beside it)."""
    import fcntl

    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise FixtureError(f"another process is regenerating {dest} (lock {handle.name}); try again when it ends") from e
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_fixture(dest: str | Path, *, force: bool = False) -> Iterator[Staging]:
    """Build a fixture in a temporary sibling directory, then swap it into place.

    On success every file gets a sha256 in ``manifest.json`` and the previous version is
    kept as ``.<name>.previous``; on any error, or if the process dies, the staging
    directory is abandoned and ``dest`` is untouched. Concurrent regenerations of the
    same ``dest`` are refused, never interleaved.

    Raises:
        FixtureError: ``dest`` exists and ``force`` is false, or another regeneration holds the lock.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        if dest.exists() and not force:
            raise FixtureError(
                f"{dest} already exists; refusing to overwrite frozen fixtures.\n"
                "Note: rebuild on purpose with `make fixtures FORCE=1` (or --force)."
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the fixture is not
        try:
            stage = Staging(staging, {"schema_version": SCHEMA_VERSION})
            yield stage
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
            stage.manifest["files"] = {
                p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in files
            }
            (staging / MANIFEST).write_text(json.dumps(stage.manifest, indent=2, sort_keys=True) + "\n")
            _swap_into_place(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, dest: Path) -> None:
    # Each rename is atomic on one filesystem: readers see the old tree or the new one, never
    # a half-written one (between the two renames `dest` is briefly absent, never partial).
    if dest.exists():
        previous = dest.parent / f".{dest.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(dest, previous)
    os.replace(staging, dest)


def update_manifest(root: str | Path, key: str, value: Any) -> None:
    """Set one top-level manifest entry (e.g. ``calibration``) atomically, under the regeneration lock.

    The manifest lists the other files' checksums and is not itself in that list, so no
    checksum changes; the data files are never touched.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    manifest[key] = value
    with _exclusive(root):
        handle, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=root)
        with os.fdopen(handle, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MANIFEST)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise FixtureError(f"fixture directory not found: {root}")
    if not path.is_file():
        raise FixtureError(
            f"{root} has no {MANIFEST}: not a parity fixture directory.\n"
            "Note: fixtures are built by the reference side, e.g. `make fixtures`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FixtureError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise FixtureError(
            f"{path}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this parity reads {SCHEMA_VERSION})"
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise FixtureError(f"{path} lists no files")
    return manifest


def _verify_files(root: Path, files: Mapping[str, Any]) -> None:
    base = root.resolve()
    for rel, entry in files.items():
        path = (base / rel).resolve()
        if not path.is_relative_to(base):
            raise FixtureError(f"{root / MANIFEST}: file entry {rel!r} points outside the fixture directory")
        if not path.is_file():
            raise FixtureError(f"{root / rel} is listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            raise FixtureError(
                f"checksum mismatch for {root / rel}: {MANIFEST} records sha256 {entry.get('sha256')}, "
                f"the file has {actual}.\n"
                "Note: the file was modified or partly written. Restore it from version control, "
                "or rebuild the fixtures on purpose with `make fixtures FORCE=1`."
            )


def _rows(root: Path, meta_path: Path) -> tuple[FixtureRow, ...]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = meta["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FixtureError(f"{meta_path}: expected a JSON object with a 'rows' list ({e})") from e
    rows, seen = [], set()
    for i, entry in enumerate(entries):
        try:
            image = str(entry["image"])
            biases = tuple(int(b) for b in entry.get("input_biases", ()))
            labels = tuple(float(v) for v in entry.get("labels", ()))
        except (KeyError, TypeError, ValueError) as e:
            raise FixtureError(f"{meta_path}: row {i} is malformed ({type(e).__name__}: {e})") from e
        if entry.get("row", i) != i:
            raise FixtureError(f"{meta_path}: entry {i} claims row {entry['row']}; rows must be in order")
        name = Path(image).name
        if name in seen:
            raise FixtureError(f"{meta_path}: row {i} repeats image name {name!r}")
        seen.add(name)
        rows.append(FixtureRow(name=name, image=root / image, input_biases=biases, labels=labels))
    return tuple(rows)


def _array(path: Path, rows: int, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise FixtureError(f"cannot read {path}: {e}") from e
    if not np.issubdtype(array.dtype, np.floating):
        raise FixtureError(f"{path}: {what} must be floating point, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0, :]  # the training artifact's (N, 1, D) layout, squeezed explicitly
    if array.ndim != 2:
        raise FixtureError(f"{path}: {what} must be (N, 1, D) or (N, D), got shape {array.shape}")
    if array.shape[0] != rows:
        raise FixtureError(
            f"{path} has {array.shape[0]} rows but {METADATA} lists {rows} samples.\n"
            "Note: every row of the array must map to one metadata entry; rebuild the fixtures "
            "or fix the metadata."
        )
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        raise FixtureError(f"{path}: {what} has non-finite values (first at row {bad[0][0]})")
    return array.astype(np.float32, copy=False)


def load_fixture(root: str | Path) -> Fixture:
    """Verify every checksum in the manifest, then load the fixture's arrays and metadata.

    Raises:
        FixtureError: missing or tampered files, inconsistent row counts, bad metadata.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    _verify_files(root, manifest["files"])
    rows = _rows(root, root / METADATA)
    embeddings = _array(root / EMBEDDINGS, len(rows), "embeddings")
    outputs = _array(root / OUTPUTS, len(rows), "outputs")
    for row in rows:
        if not row.image.resolve().is_relative_to(root.resolve()):
            raise FixtureError(f"{root / METADATA}: image {row.image} is outside the fixture directory "
                               f"and has no checksum in {MANIFEST}")
        rel = row.image.resolve().relative_to(root.resolve()).as_posix()
        if rel not in manifest["files"]:
            raise FixtureError(f"{root / METADATA}: image {rel} has no checksum in {MANIFEST}")
    golden: dict[str, np.ndarray] = {}
    if (root / PIXELS).is_file():
        from safetensors.numpy import load_file

        golden = load_file(str(root / PIXELS))
        unknown = sorted(set(golden) - {row.name for row in rows})
        if unknown:
            raise FixtureError(f"{root / PIXELS} has pixels for images not in {METADATA}: {unknown}")
    return Fixture(root=root, manifest=manifest, rows=rows, embeddings=embeddings,
                   outputs=outputs, golden_pixels=golden)


def load_logged_samples(path: str | Path) -> Fixture:
    """Samples a service logged, as a `Fixture` whose targets are what the service produced.

    JSONL: one object per line with ``image`` (relative to the log file), optional
    ``input_biases``, and ``embedding`` and/or ``outputs`` lists. CSV: the same columns,
    list values written as JSON arrays. A target nobody logged is an (N, 0) array.

    Raises:
        FixtureError: unreadable file, missing columns, ragged or non-finite values, missing images.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise FixtureError(f"logged samples not found: {path}")
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                entries = [{k: json.loads(v) if k in ("input_biases", "embedding", "outputs") and v else v
                            for k, v in row.items()} for row in csv.DictReader(f)]
        else:
            entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise FixtureError(f"{path}: not valid {'CSV' if path.suffix == '.csv' else 'JSONL'}: {e}") from e
    if not entries:
        raise FixtureError(f"{path} holds no samples")
    rows, targets = [], {"embedding": [], "outputs": []}
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not entry.get("image"):
            raise FixtureError(f"{path}: sample {i} has no 'image'")
        image = (path.parent / entry["image"]).resolve()
        if not image.is_file():
            raise FixtureError(f"{path}: sample {i}: image {image} not found")
        rows.append(FixtureRow(name=image.name, image=image,
                               input_biases=tuple(int(b) for b in entry.get("input_biases") or ())))
        for key in targets:
            targets[key].append(entry.get(key))
    arrays = {}
    for key, values in targets.items():
        present = [v is not None and v != "" for v in values]
        if any(present) and not all(present):
            raise FixtureError(f"{path}: '{key}' is logged for some samples and not others (first missing: "
                               f"sample {present.index(False) + 1})")
        try:
            arrays[key] = np.asarray(values, dtype=np.float32) if all(present) else np.zeros((len(rows), 0), np.float32)
        except ValueError as e:
            raise FixtureError(f"{path}: '{key}' rows have different lengths ({e})") from e
        if arrays[key].ndim != 2 or not np.isfinite(arrays[key]).all():
            raise FixtureError(f"{path}: '{key}' must be finite numbers, one list per sample")
    if not arrays["embedding"].size and not arrays["outputs"].size:
        raise FixtureError(f"{path}: log 'embedding' and/or 'outputs' for each sample")
    return Fixture(root=path.parent, manifest={}, rows=tuple(rows), embeddings=arrays["embedding"],
                   outputs=arrays["outputs"])
