"""Fixture directories: frozen reference data, a manifest with checksums, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.errors import FixtureChangedError, FixtureError, SpecError
from parity.store.hashcache import cached
from parity.store.images import decode_image

if TYPE_CHECKING:
    from parity.spec import Spec

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "EMBEDDINGS",
    "METADATA",
    "OUTPUTS",
    "PIXELS",
    "FixtureRow",
    "Fixture",
    "Staging",
    "sha256_file",
    "cached_sha256",
    "environment",
    "stage_fixture",
    "load_fixture",
    "load_logged_samples",
    "update_manifest",
    "verify_referenced_checkpoints",
    "regeneration_lock",
    "recover_fixture",
    "manifest_digest",
    "fixture_version",
    "data_version",
    "files_version",
    "FixturePath",
    "check_replaceable",
    "npy_layout",
    "verify_pinned_checkpoint",
    "check_head_inputs",
    "check_fixture_inputs",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# In a fixture and beside it: git ignores what a write leaves for a moment (or a dead writer leaves
# for the next command to recover); never listed in the manifest.
GITIGNORE = ".gitignore"
MANIFEST_DIGEST = "manifest_sha256"  # the manifest's seal, over its canonical form
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


def cached_sha256(path: Path) -> str:
    """`sha256_file`, reused from the hash cache while the file keeps its identity (`parity.store.hashcache`)."""
    return cached(path, "sha256", lambda: sha256_file(path), valid=_is_sha256)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def environment() -> dict[str, str]:
    """Library versions and platform, as recorded in manifests and compared at check time."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


class FixturePath(type(Path())):
    """A fixture image's path that also carries the sha256 the manifest records for it.

    `parity.store.images.decode_image` checks the bytes it decodes against it, so an image replaced
    after the fixture was loaded (a regeneration, an edit) is refused instead of mixed in.
    """

    def __new__(cls, *parts: Any, sha256: str = "") -> FixturePath:
        path = super().__new__(cls, *parts)
        path.sha256 = sha256
        return path


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

    def subset(self, indices: Sequence[int]) -> Fixture:
        """The fixture restricted to the rows at ``indices`` (in that order), golden pixels included."""
        indices = list(indices)
        kept = {self.rows[i].name for i in indices}
        return replace(self, rows=tuple(self.rows[i] for i in indices), embeddings=self.embeddings[indices],
                       outputs=self.outputs[indices],
                       golden_pixels={name: p for name, p in self.golden_pixels.items() if name in kept})

    def biases(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """``input_biases`` of the given rows (all by default) as an (n, K) int64 array."""
        rows = self.rows if indices is None else [self.rows[i] for i in indices]
        return np.array([row.input_biases for row in rows], dtype=np.int64).reshape(len(rows), -1)


@dataclass
class Staging:
    """A temporary directory being filled with fixture files, plus the manifest to write."""

    path: Path
    manifest: dict[str, Any]


_LOCK_WAIT_S = 120.0  # how long a manifest update waits for another writer before giving up
_SWAP_WAIT_S = 10.0  # how long a reader waits for a regeneration's swap to finish
_READ_ATTEMPTS = 5  # a reader retries this often when a regeneration replaced the fixture mid-read
MAX_JSON_BYTES = 64 << 20  # manifest and metadata: far above any real one, small enough to parse safely
_held: dict[Path, int] = {}  # lock depth per fixture in this process: a capture may hold it around stage_fixture


def _fault(step: str) -> None:
    """Fault injection for the crash-consistency tests: die at a named step of a write.

    ``PARITY_FAULT_AT=<step>`` makes the process exit abruptly there, as a kill would.
    """
    if os.environ.get("PARITY_FAULT_AT") == step:
        os._exit(99)


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


@contextlib.contextmanager
def regeneration_lock(dest: str | Path, *, wait: float = 0.0) -> Iterator[None]:
    """Exclusive right to write ``dest`` (regenerate it, update its manifest, recover it), across processes.

    Re-entrant within one process. With ``wait`` 0 a held lock is refused at once; otherwise
    it is awaited for up to ``wait`` seconds.

    Raises:
        FixtureError: another process holds the lock.
    """
    import fcntl

    dest = Path(dest).absolute()
    if _held.get(dest):
        _held[dest] += 1
        try:
            yield
        finally:
            _held[dest] -= 1
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(dest), "a") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() >= deadline:
                    raise FixtureError(
                        f"another process is regenerating or updating {dest} (lock {handle.name}); "
                        "try again when it ends"
                    ) from e
                time.sleep(0.05)
        _held[dest] = 1
        try:
            _recover(dest)
            yield
        finally:
            _held.pop(dest, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is: without this a power loss can undo it.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The sha256 that seals a manifest: over its canonical JSON form, without the seal itself."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Seal and write ``manifest.json`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    sealed = {**{k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}}
    try:
        sealed[MANIFEST_DIGEST] = manifest_digest(sealed)
    except ValueError as e:  # allow_nan=False: a NaN or inf would not survive a JSON round trip
        raise FixtureError(f"refusing to write a manifest with a non-finite number: {e}") from e
    handle, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(json.dumps(sealed, indent=2, sort_keys=True) + "\n")
            _fault("manifest-written")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def stage_fixture(dest: str | Path, *, force: bool = False) -> Iterator[Staging]:
    """Build a fixture in a temporary sibling directory, then swap it into place.

    On success every file gets a sha256 in ``manifest.json``, the manifest is sealed with its
    own digest, the fixture is read back with the loader every command uses, everything is fsynced,
    and the previous version is kept as ``.<name>.previous``. With ``force`` only a fixture parity
    wrote is replaced (`check_replaceable`).
    On any error the staging directory is removed and ``dest`` is untouched; if the process
    dies, the next reader or writer recovers (see `recover_fixture`). The regeneration lock is
    held throughout: a concurrent regeneration or manifest update is refused, never interleaved.

    Raises:
        FixtureError: ``dest`` exists and ``force`` is false, or is not a fixture parity wrote; the staged
            fixture does not load; another process holds the lock.
    """
    dest = Path(dest)
    with regeneration_lock(dest):
        if (dest.exists() or dest.is_symlink()) and not force:
            raise FixtureError(
                f"{dest} already exists; refusing to overwrite frozen fixtures.\n"
                "Note: rebuild on purpose with `make fixtures FORCE=1` (or --force)."
            )
        check_replaceable(dest)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        try:
            stage = Staging(staging, {"schema_version": SCHEMA_VERSION})
            yield stage
            _fault("staged")
            (staging / GITIGNORE).write_text(f"# parity: a manifest being written\n.{MANIFEST}.*\n", encoding="utf-8")
            # One mode for every file and folder, as the umask gives new files: mkdtemp makes the folder
            # private, and some writers (safetensors) make their files private too.
            for p in [staging, *staging.rglob("*")]:
                if not p.is_symlink():
                    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST
                           and p.relative_to(staging).as_posix() != GITIGNORE)
            for p in files:
                _fsync_file(p)
            for d in sorted({p.parent for p in files}, key=lambda d: -len(d.parts)):
                _fsync_dir(d)
            stage.manifest["files"] = {
                p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in files
            }
            _write_manifest(staging, stage.manifest)
            _loads(staging, dest)
            _fault("sealed")
            _swap_into_place(staging, dest)
            _ignore_leftovers(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _ignore_leftovers(dest: Path) -> None:
    """Add to the ``.gitignore`` beside ``dest`` (made if absent) what a regeneration keeps or leaves there:
    the previous version, the lock file and staging directories, so that ``git add -A`` commits none."""
    wanted = [f"/{_previous(dest).name}/", f"/{_lock_path(dest).name}", f"/.{dest.name}.tmp-*/"]
    path = dest.parent / GITIGNORE
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        missing = [line for line in wanted if line not in text.splitlines()]
        if missing:
            lead = "" if not text or text.endswith("\n") else "\n"
            with path.open("a", encoding="utf-8") as f:
                f.write(f"{lead}# parity: fixture {dest.name}'s previous version, lock and staging\n"
                        + "".join(f"{line}\n" for line in missing))
    except (OSError, UnicodeDecodeError):
        pass  # a convenience: the fixture itself is written and sealed


def _loads(staging: Path, dest: Path) -> None:
    """Read the staged fixture back with the reader every command uses, before it replaces anything:
    a fixture that ``check`` would refuse is never written. (A staged tree without the fixture's data
    files is no fixture to read: what the regeneration mechanics alone are tested with.)"""
    if not (staging / METADATA).is_file():
        return
    try:
        _load(staging, _read_manifest(staging))
    except FixtureError as e:
        detail = str(e).replace(str(staging), str(dest)).split("\nNote:")[0]
        raise FixtureError(f"refusing to write {dest}: the fixture would not load ({detail}).\n"
                           f"Nothing was written; {dest} is as it was.") from e


def _made_by_parity(directory: Path) -> bool:
    """Whether ``directory`` holds a manifest parity wrote: a JSON object with parity's schema version,
    seal and file list (the seal need not verify: a damaged fixture is still parity's to rebuild)."""
    path = directory / MANIFEST
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_JSON_BYTES:
            return False
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("schema_version"), int) \
        and isinstance(manifest.get(MANIFEST_DIGEST), str) and isinstance(manifest.get("files"), dict)


def _unlisted(directory: Path) -> list[str]:
    """Files under a fixture that its manifest does not list (someone else's), parity's own temporary files aside."""
    listed = json.loads((directory / MANIFEST).read_bytes().decode("utf-8"))["files"]
    found = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in (MANIFEST, GITIGNORE) and rel not in listed \
                and not p.name.startswith(f".{MANIFEST}."):
            found.append(rel)
    return found


def check_replaceable(dest: str | Path, *, inputs: Sequence[tuple[str, Path | None]] = ()) -> None:
    """Refuse to replace ``dest`` unless it is absent or a fixture parity wrote, holding only what its manifest
    lists and none of ``inputs`` (``(what, path)``: what the writer reads). A regeneration moves the old
    fixture aside and the next one deletes it, so anything else there would be lost.

    Raises:
        FixtureError: what ``dest`` is, and that nothing was changed.
    """
    dest = Path(dest)
    untouched = "Nothing was changed; choose another output directory, or move it away yourself if you mean to."
    for what, path in inputs:
        if path is None:
            continue
        target, read = dest.resolve(), Path(path).resolve()
        if read == target or target in read.parents:
            where = "is" if read == target else "holds"
            raise FixtureError(f"{dest} {where} {what} ({path}): a fixture is written over its whole directory, "
                               f"which must not hold what the fixture is made from.\n{untouched}")
    if dest.is_symlink():
        raise FixtureError(f"{dest} is a symbolic link (to {os.readlink(dest)}); a fixture replaces only a "
                           f"directory parity wrote, never a link.\n{untouched}")
    previous = _previous(dest)
    if (previous.exists() or previous.is_symlink()) and not (previous.is_dir() and not previous.is_symlink()
                                                             and _made_by_parity(previous)):
        raise FixtureError(f"{previous} exists and is not a fixture parity kept; a regeneration moves the old "
                           f"fixture there.\n{untouched}")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise FixtureError(f"{dest} is a file, not a fixture directory; --force replaces only a fixture parity "
                           f"wrote.\n{untouched}")
    if not _made_by_parity(dest):
        raise FixtureError(f"{dest} is not a fixture parity wrote (it has no {MANIFEST} with parity's schema, seal "
                           f"and file list); --force replaces only such a directory.\n{untouched}")
    unlisted = _unlisted(dest)
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise FixtureError(f"{dest} holds files its {MANIFEST} does not list ({shown}): parity did not write "
                           f"them, and replacing the fixture would remove them.\n{untouched}")


def _previous(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.previous"


def _swap_into_place(staging: Path, dest: Path) -> None:
    # Each rename is atomic on one filesystem. Between the two `dest` is briefly absent; a process
    # killed there leaves the complete new version in staging and the old one in `.previous`, and
    # `_recover` finishes the swap.
    if dest.exists():
        previous = _previous(dest)
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(dest, previous)
        _fault("between-renames")
    os.replace(staging, dest)
    _fsync_dir(dest.parent)
    _fault("swapped")


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds a sealed manifest whose every file verifies."""
    try:
        manifest = _read_manifest(directory)
        for rel, entry in manifest["files"].items():
            _read_verified(directory, rel, entry)
    except FixtureError:
        return False
    return True


def _recover(dest: Path) -> None:
    """Finish or undo an interrupted regeneration, and remove what dead writers left; lock held."""
    stagings = sorted((p for p in dest.parent.glob(f".{dest.name}.tmp-*") if p.is_dir()),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    if not dest.exists():
        # Killed between the renames: roll forward to the sealed new version, else back to the old one.
        done = next((p for p in stagings if _complete(p)), None)
        if done is not None:
            os.replace(done, dest)
        elif _previous(dest).is_dir() and _complete(_previous(dest)):
            os.replace(_previous(dest), dest)
        if dest.exists():
            _fsync_dir(dest.parent)
    for leftover in stagings:  # the lock is ours, so every staging directory belongs to a dead writer
        shutil.rmtree(leftover, ignore_errors=True)
    if dest.is_dir() and _made_by_parity(dest):  # never another's files, whatever their names
        for tmp in dest.glob(f".{MANIFEST}.*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def recover_fixture(dest: str | Path) -> None:
    """Recover ``dest`` after a writer died: finish or undo its swap, clean its temporary files.

    Readers and writers call this themselves when they find the fixture missing or leftovers.

    Raises:
        FixtureError: a live writer holds the lock for longer than a swap takes.
    """
    with regeneration_lock(dest, wait=_SWAP_WAIT_S):
        pass


def _needs_recovery(dest: Path) -> bool:
    if dest.parent.is_dir() and any(dest.parent.glob(f".{dest.name}.tmp-*")):
        return True
    if not dest.exists() and _previous(dest).exists():
        return True
    return dest.is_dir() and any(dest.glob(f".{MANIFEST}.*"))


def fixture_version(root: str | Path) -> str:
    """An identifier of the fixture's current contents (its manifest's seal); changes with every write."""
    return _read_manifest(Path(root))[MANIFEST_DIGEST]


def update_manifest(root: str | Path, key: str, value: Any, *, merge: bool = False,
                    version: str | None = None) -> None:
    """Set one top-level manifest entry (e.g. ``calibration``) atomically, under the regeneration lock.

    The read, the change and the write all happen under the lock, so concurrent updates all
    survive. ``merge`` updates a mapping entry key by key instead of replacing it. ``version``
    (from `fixture_version`) refuses the update when the fixture's data changed since it was
    read: a value measured on one version must not be stored in another.

    Raises:
        FixtureError: the fixture is missing or tampered, changed since ``version``, or the lock is busy.
    """
    root = Path(root)
    with regeneration_lock(root, wait=_LOCK_WAIT_S):
        manifest = _read_manifest(root)
        if version is not None and files_version(manifest) != version:
            raise FixtureChangedError(
                f"{root} was regenerated while this measurement ran; nothing was written.\n"
                "Note: run it again on the new fixture."
            )
        if merge:
            current = manifest.get(key, {})
            if not isinstance(current, dict) or not isinstance(value, Mapping):
                raise FixtureError(f"{root / MANIFEST}: '{key}' must be a JSON object to merge into")
            value = {**current, **value}
        manifest[key] = value
        _write_manifest(root, manifest)


def files_version(manifest: Mapping[str, Any]) -> str:
    """The identity of a fixture's data (its file checksums), unchanged by manifest-only updates."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def data_version(root: str | Path) -> str:
    """An identifier of the fixture's data files; manifest updates such as calibration keep it."""
    return files_version(_read_manifest(Path(root)))


def _parse_json(path: Path, data: bytes) -> Any:
    if len(data) > MAX_JSON_BYTES:
        raise FixtureError(f"{path} is {len(data)} bytes; at most {MAX_JSON_BYTES} are read")
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FixtureError(f"{path} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise FixtureError(f"{path} nests too deeply to be a parity file") from e


# The manifest sections parity reads, and the JSON type of each field it reads: a type or a tuple of
# types; a dict of fields (fields not named are free); ``{str: T}``, an object whose every value is a T
# (keys the writer chose: weight parts, tensor and module names); ``[T]``, a list of T. Top-level keys
# not named here are the writer's own notes (`parity.commands.capture.Capture.note`) and are not read.
@dataclass(frozen=True)
class _Valued:
    """A field whose value (not only its type) must pass ``test``; described as ``words``."""

    words: str
    test: Callable[[Any], bool]


def _side(value: Any) -> bool:
    return type(value) is int and 0 < value <= 1 << 16


_NUMBER = (int, float)
_TEXT = (str, type(None))
# An image processor's size as transformers reads it: 224, {"height": 224, "width": 224}, [224, 224].
_SIZE = _Valued("a positive integer, an object of them, or [height, width]",
                lambda v: v is None or _side(v) or isinstance(v, dict) and all(x is None or _side(x) for x in v.values())
                or isinstance(v, list) and len(v) == 2 and all(map(_side, v)))
_RESAMPLE = _Valued("a PIL resampling filter (0 to 5)", lambda v: type(v) is int and 0 <= v <= 5)
_SCHEMA: dict[str, Any] = {
    "name": str,
    "pipeline": {
        # What an adapter cannot tell of its model (a registered library's embedding width) is recorded as null.
        "backbone": {"library": str, "model": _TEXT, "extract": str, "normalize": str, "kwargs": dict,
                     "activation": [str], "structure": {str: str}, "embedding_dim": (int, type(None)),
                     "hidden_act": _TEXT, "attn_implementation": _TEXT},
        "preprocess": {"library": str, "processor": str, "interpolation": str, "crop_pct": _NUMBER,
                       "crop_mode": str, "input_size": [int], "mean": [_NUMBER], "std": [_NUMBER],
                       "resize_backend": str, "channel_order": str, "value_scale": str, "exif_transpose": bool,
                       "crop_size": _SIZE, "size": _SIZE, "resample": _RESAMPLE, "rescale_factor": _NUMBER,
                       "image_mean": [_NUMBER], "image_std": [_NUMBER], "do_resize": bool, "do_center_crop": bool,
                       "do_rescale": bool, "do_normalize": bool, "do_convert_rgb": bool},
        "head": {"class": str, "kwargs": dict, "input_biases_order": ([int], type(None)), "structure": {str: str}},
        "runtime": {"device": str, "dtype": str},
    },
    "weights": {str: {"file": str, "sha256": str, "bytes": int, "referenced": bool, "tensors": {str: str}}},
    "producer": {"script": _TEXT, "git_revision": _TEXT, "transform": _TEXT, "spec": _TEXT, "versions": {str: str},
                 "golden": [str], "artifacts": {str: dict},
                 "numerics": {"device": str, "device_name": _TEXT, "compute_capability": _TEXT,
                              "autocast_dtype": _TEXT, "float32_matmul_precision": _TEXT, "declared": _TEXT,
                              "cudnn_allow_tf32": bool, "matmul_allow_tf32": bool,
                              "batch_size": (int, type(None)), "threads": (int, type(None))}},
    "calibration": {str: dict},
    "golden_pixels": [str],
}


def _type_words(kind: Any) -> str:
    if isinstance(kind, _Valued):
        return kind.words
    if isinstance(kind, tuple):
        return " or ".join(_type_words(k) for k in kind)
    if isinstance(kind, list):
        return f"a list of {_type_words(kind[0])}"
    if isinstance(kind, dict):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
            list: "a list", type(None): "null"}[kind]


def _conforms(value: Any, kind: Any) -> bool:
    """Whether ``value`` has the JSON type ``kind`` names at its own level (containers are entered by the caller)."""
    if isinstance(kind, _Valued):
        return kind.test(value)
    if isinstance(kind, tuple):
        return any(_conforms(value, k) for k in kind)
    if isinstance(kind, (list, dict)):
        kind = type(kind)
    if kind is int or kind is float:  # true is not a number; an integer is a float's value too
        return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    return isinstance(value, kind)


def _check_types(value: Any, kind: Any, where: str, path: Path) -> None:
    """Raise a FixtureError naming the first field of ``value`` that is not of the type ``kind`` names."""
    if not _conforms(value, kind):
        raise FixtureError(
            f"{path}: '{where}' must be {_type_words(kind)}, got {type(value).__name__} {json.dumps(value)[:80]}.\n"
            "Note: the manifest was edited by hand or written by another tool, then sealed again; restore it from "
            "version control, or rebuild the fixture on purpose with `make fixtures FORCE=1` (or freeze --force)."
        )
    inner = next((k for k in (kind if isinstance(kind, tuple) else (kind,)) if _conforms(value, k)), kind)
    if isinstance(inner, list):
        for i, item in enumerate(value):
            _check_types(item, inner[0], f"{where}[{i}]", path)
    elif isinstance(inner, dict) and list(inner) == [str]:
        for key, item in value.items():
            _check_types(item, inner[str], f"{where}.{key}", path)
    elif isinstance(inner, dict):
        for key, field_kind in inner.items():
            if key in value:
                _check_types(value[key], field_kind, f"{where}.{key}" if where else key, path)



def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise FixtureError(f"fixture directory not found: {root}")
    if not path.is_file():
        raise FixtureError(
            f"{root} has no {MANIFEST}: not a parity fixture directory.\n"
            "Note: fixtures are built by the reference side, e.g. `make fixtures`."
        )
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    manifest = _parse_json(path, data)
    if not isinstance(manifest, dict):
        raise FixtureError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    sealed = manifest.get(MANIFEST_DIGEST)
    try:
        actual = manifest_digest(manifest)
    except ValueError as e:
        raise FixtureError(f"{path} holds a non-finite number: {e}") from e
    if sealed != actual:
        raise FixtureError(
            f"{path} fails its own checksum: '{MANIFEST_DIGEST}' records {sealed!r}, its contents hash to {actual}.\n"
            "Note: the manifest was edited or written by an older parity. Restore it from version control, "
            "or rebuild the fixtures on purpose with `make fixtures FORCE=1`."
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise FixtureError(
            f"{path}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this parity reads {SCHEMA_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise FixtureError(f"{path} lists no files")
    base = root.resolve()
    for rel, entry in files.items():
        if not (base / rel).resolve().is_relative_to(base):
            raise FixtureError(f"{path}: file entry {rel!r} points outside the fixture directory")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or type(entry.get("bytes")) is not int or entry["bytes"] < 0):
            raise FixtureError(f"{path}: file entry {rel!r} must be an object with a 'sha256' string and "
                               f"a non-negative integer 'bytes', got {str(entry)[:200]}")
    _check_types(manifest, _SCHEMA, "", path)
    return manifest


def _listed_file(root: Path, rel: str, entry: Mapping[str, Any]) -> Path:
    """The path of one file the manifest lists, inside the fixture, present and of the recorded size."""
    base = root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise FixtureError(f"{root / MANIFEST}: file entry {rel!r} points outside the fixture directory")
    if not path.is_file():
        raise FixtureError(f"{root / rel} is listed in {MANIFEST} but missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise FixtureError(
            f"size mismatch for {root / rel}: {MANIFEST} records {entry['bytes']} bytes, the file has {size}.\n"
            "Note: the file was modified or partly written. Restore it from version control, "
            "or rebuild the fixtures on purpose with `make fixtures FORCE=1`."
        )
    return path


def _check_sha256(root: Path, rel: str, entry: Mapping[str, Any], actual: str) -> None:
    if actual != entry["sha256"]:
        raise FixtureError(
            f"checksum mismatch for {root / rel}: {MANIFEST} records sha256 {entry['sha256']}, "
            f"the file has {actual}.\n"
            "Note: the file was modified or partly written. Restore it from version control, "
            "or rebuild the fixtures on purpose with `make fixtures FORCE=1`."
        )


def _read_verified(root: Path, rel: str, entry: Mapping[str, Any]) -> bytes:
    """The bytes of one listed file, read once and checked against its size and sha256."""
    path = _listed_file(root, rel, entry)
    with open(path, "rb") as f:
        data = f.read(entry["bytes"] + 1)
    _check_sha256(root, rel, entry, hashlib.sha256(data).hexdigest())
    return data


def _verify_files(root: Path, files: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
    for rel, entry in files.items():
        if rel not in skip:
            _check_sha256(root, rel, entry, sha256_file(_listed_file(root, rel, entry)))


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise FixtureError(f"{where}: 'input_biases' must be a list of integers, got {str(value)[:120]}")
    return tuple(value)


def _rows(root: Path, meta_path: Path, data: bytes, files: Mapping[str, Any]) -> tuple[FixtureRow, ...]:
    meta = _parse_json(meta_path, data)
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list):
        raise FixtureError(f"{meta_path}: expected a JSON object with a 'rows' list")
    rows, seen, widths = [], set(), set()
    base = root.resolve()
    for i, entry in enumerate(meta["rows"]):
        where = f"{meta_path}: row {i}"
        if not isinstance(entry, dict):
            raise FixtureError(f"{where} must be a JSON object, got {type(entry).__name__}")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise FixtureError(f"{where} has no 'image' path (a string)")
        if "input_biases" not in entry:
            raise FixtureError(f"{where} has no 'input_biases' (write [] for a head without them)")
        biases = _int_list(entry["input_biases"], where)
        widths.add(len(biases))
        if len(widths) > 1:
            raise FixtureError(f"{where} has {len(biases)} input_biases; earlier rows have "
                               f"{min(widths - {len(biases)})}: every row needs the same number")
        labels = entry.get("labels", [])
        if not isinstance(labels, list) or not all(type(v) in (int, float) and math.isfinite(v) for v in labels):
            raise FixtureError(f"{where}: 'labels' must be a list of finite numbers")
        if entry.get("row", i) != i:
            raise FixtureError(f"{meta_path}: entry {i} claims row {entry['row']!r}; rows must be in order")
        name = Path(image).name
        if name in seen:
            raise FixtureError(f"{where} repeats image name {name!r}")
        seen.add(name)
        path = (base / image).resolve()
        if not path.is_relative_to(base):
            raise FixtureError(f"{meta_path}: image {root / image} is outside the fixture directory "
                               f"and has no checksum in {MANIFEST}")
        rel = path.relative_to(base).as_posix()
        if rel not in files:
            raise FixtureError(f"{meta_path}: image {rel} has no checksum in {MANIFEST}")
        rows.append(FixtureRow(name=name, image=FixturePath(root / image, sha256=files[rel]["sha256"]),
                               input_biases=biases, labels=tuple(float(v) for v in labels)))
    return tuple(rows)


def _npy_header(path: Path, data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of an .npy file, checked against its size before anything is allocated."""
    return _parse_npy_header(path, io.BytesIO(data), len(data))


def _parse_npy_header(path: Path, buffer: Any, size: int) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(buffer)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _fortran, dtype = reader[version](buffer, max_header_size=10000)
    except (ValueError, OSError, SyntaxError, TypeError, EOFError) as e:
        raise FixtureError(f"cannot read {path}: not a valid .npy file ({e or type(e).__name__})") from e
    if dtype.hasobject:
        raise FixtureError(f"{path}: object arrays are refused (they need pickle)")
    expected = math.prod(shape) * dtype.itemsize
    if expected != size - buffer.tell():
        raise FixtureError(f"{path}: its header declares shape {shape} of {dtype} ({expected} bytes) but the file "
                           f"holds {size - buffer.tell()} bytes of data")
    return shape, dtype, buffer.tell()


def npy_layout(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy file's header declares, checked against the file's size; nothing else is read.

    Raises:
        FixtureError: not an .npy file (empty, truncated, another format), an object array, or a header
            that declares more (or fewer) bytes than the file holds.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            shape, dtype, _ = _parse_npy_header(path, f, os.fstat(f.fileno()).st_size)
    except FixtureError:
        raise
    except OSError as e:
        raise FixtureError(f"cannot read {path}: {e.strerror or e}") from e
    return shape, dtype


def _array(path: Path, data: bytes, rows: int, what: str) -> np.ndarray:
    _npy_header(path, data)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
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


def _golden(path: Path, data: bytes, names: set[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load as load_safetensors

    try:
        golden = load_safetensors(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed header
        raise FixtureError(f"cannot read {path}: not a valid safetensors file ({type(e).__name__}: {e})") from e
    unknown = sorted(set(golden) - names)
    if unknown:
        raise FixtureError(f"{path} has pixels for images not in {METADATA}: {unknown}")
    for name, pixels in golden.items():
        if not np.issubdtype(pixels.dtype, np.floating) or pixels.ndim != 3:
            raise FixtureError(f"{path}: pixels of {name} must be a floating point (C, H, W) array, "
                               f"got {pixels.dtype} {pixels.shape}")
        if not np.isfinite(pixels).all():
            raise FixtureError(f"{path}: pixels of {name} hold NaN or infinite values; a reference must be finite")
    return golden


def load_fixture(root: str | Path) -> Fixture:
    """Verify the manifest's seal and every checksum, then load the fixture's arrays and metadata.

    Every file is read once, and checked and parsed from those same bytes; images carry their
    checksum and are checked again when decoded. If a regeneration replaces the fixture while it
    is read, the read starts over on the new version, so a reader never mixes two versions.

    Raises:
        FixtureError: missing, unlisted or tampered files, inconsistent row counts, bad metadata.
    """
    root = Path(root)
    if _needs_recovery(root):
        try:
            # Missing: a swap is in progress or a writer died in one; wait for it or finish it. Present:
            # only clean up, and only if no writer is busy (a read-only checkout just reads).
            with regeneration_lock(root, wait=0.0 if root.is_dir() else _SWAP_WAIT_S):
                pass
        except OSError:
            if not root.is_dir():
                raise
    for attempt in range(_READ_ATTEMPTS):
        manifest = _read_manifest(root)
        try:
            fixture = _load(root, manifest)
            _pin_checkpoints(fixture)
            return fixture
        except FixtureError:
            # A checksum that stops matching because a regeneration swapped the tree is not tampering.
            if not _changed(root, manifest):
                raise
            if attempt + 1 == _READ_ATTEMPTS:
                raise FixtureChangedError(f"{root} was regenerated {_READ_ATTEMPTS} times while it was being read; "
                                          "run again when the regeneration is done") from None
    raise AssertionError("unreachable")


# The checkpoints of the fixture loaded last, by resolved path: (sha256, part, fixture root, manifest seal).
# `parity.store.checkpoints.read_checkpoint` checks what it reads against them, as `parity.store.images.decode_image`
# checks a fixture image: weights replaced after the fixture was verified are never compared with it.
_pinned: dict[Path, tuple[str, str, Path, str]] = {}


def _pin_checkpoints(fixture: Fixture) -> None:
    pins = {}
    for part, entry in fixture.manifest.get("weights", {}).items():
        if isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
            pins[(fixture.root / entry["file"]).resolve()] = (entry["sha256"], part, fixture.root,
                                                              fixture.manifest[MANIFEST_DIGEST])
    _pinned.clear()
    _pinned.update(pins)


def verify_pinned_checkpoint(path: str | Path) -> None:
    """Check a checkpoint just read against the sha256 the fixture loaded last records for that file, if any.

    Called after the read, so that a file replaced before or during it is seen.

    Raises:
        FixtureChangedError: the file holds other bytes: the fixture was regenerated while this ran, or the
            file changed after the fixture was verified.
    """
    resolved = Path(path).resolve()
    pin = _pinned.get(resolved)
    if pin is None:
        return
    sha256, part, root, seal = pin
    actual = cached_sha256(resolved)
    if actual == sha256:
        return
    try:
        regenerated = _read_manifest(root)[MANIFEST_DIGEST] != seal
    except FixtureError:
        regenerated = True  # gone or half-swapped: a regeneration is under way
    why = (f"{root} was regenerated while this ran" if regenerated
           else f"it changed after the fixture {root} was verified")
    raise FixtureChangedError(
        f"the {part} checkpoint {resolved} holds other weights than the fixture records (sha256 {actual}, the "
        f"manifest {sha256}): {why}; nothing was compared.\n"
        "Note: run it again" + ("." if regenerated else "; if the file was replaced on purpose, freeze (or capture) "
                                "the fixture again from it."))


def _changed(root: Path, manifest: Mapping[str, Any]) -> bool:
    deadline = time.monotonic() + _SWAP_WAIT_S
    while not (root / MANIFEST).is_file() and time.monotonic() < deadline:
        time.sleep(0.02)  # inside a swap, between the two renames
    try:
        return _read_manifest(root)[MANIFEST_DIGEST] != manifest[MANIFEST_DIGEST]
    except FixtureError:
        return False


def _load(root: Path, manifest: dict[str, Any]) -> Fixture:
    files = manifest["files"]
    required = [METADATA, EMBEDDINGS, OUTPUTS] + ([PIXELS] if (root / PIXELS).exists() else [])
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise FixtureError(
            f"{root / MANIFEST} does not list {', '.join(unlisted)}, which the fixture holds or needs: "
            "an unlisted file has no checksum and is refused.\n"
            "Note: restore the manifest from version control, or rebuild the fixtures with `make fixtures FORCE=1`."
        )
    data = {name: _read_verified(root, name, files[name]) for name in required}
    rows = _rows(root, root / METADATA, data[METADATA], files)
    _verify_files(root, files, skip=required)
    embeddings = _array(root / EMBEDDINGS, data[EMBEDDINGS], len(rows), "embeddings")
    outputs = _array(root / OUTPUTS, data[OUTPUTS], len(rows), "outputs")
    golden = _golden(root / PIXELS, data[PIXELS], {row.name for row in rows}) if PIXELS in data else {}
    return Fixture(root=root, manifest=manifest, rows=rows, embeddings=embeddings,
                   outputs=outputs, golden_pixels=golden)


def load_logged_samples(path: str | Path) -> Fixture:
    """Samples a service logged, as a `Fixture` whose targets are what the service produced.

    JSONL: one object per line with ``image`` (relative to the log file), ``input_biases``
    (required when any line has them), and ``embedding`` and/or ``outputs`` lists. CSV: the
    same columns, list values written as JSON arrays. A target nobody logged is an (N, 0) array.
    The file is read line by line (never whole), and every image is decoded once to prove it
    readable; a bad line is named by its line number.

    Raises:
        FixtureError: unreadable file, a malformed line, missing columns, ragged or non-finite
            values, missing or unreadable images.
    """
    path = Path(path)
    if not path.is_file():
        raise FixtureError(f"logged samples not found: {path}")
    rows: list[FixtureRow] = []
    targets: dict[str, list[np.ndarray]] = {"embedding": [], "outputs": []}
    widths: dict[str, int | None] = {}
    checked: dict[str, Path] = {}
    lines: list[int] = []  # the line number of each sample, for messages
    first_line = 0
    for line, entry in _log_entries(path):
        where = f"{path}: line {line}"
        first_line = first_line or line
        if not isinstance(entry, dict):
            raise FixtureError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        image = entry.get("image")
        if not isinstance(image, str) or not image or "\0" in image:
            raise FixtureError(f"{where}: 'image' must be a non-empty path string, got {str(image)[:80]!r}")
        resolved = checked.get(image)
        if resolved is None:
            if len(checked) > 4096:
                checked.clear()  # bounded: the cache only saves re-resolving and re-decoding repeated images
            resolved = checked[image] = (path.parent / image).resolve()
            _readable(resolved, where)
        biases = entry.get("input_biases")
        if biases is None or biases == "":
            biases = []
            present = False
        else:
            present = True
        if "biases" not in widths:
            widths["biases"] = len(biases) if present else None
            widths["biases_present"] = present  # type: ignore[assignment]
        if present != widths["biases_present"]:
            raise FixtureError(f"{where}: 'input_biases' is {'present' if present else 'missing'} here but "
                               f"{'missing' if present else 'present'} on line {first_line}; "
                               "log it for every sample or for none")
        values = _int_list(biases, where)
        if present and len(values) != widths["biases"]:
            raise FixtureError(f"{where}: {len(values)} input_biases, but earlier lines have {widths['biases']}")
        rows.append(FixtureRow(name=resolved.name, image=resolved, input_biases=values))
        lines.append(line)
        for key, collected in targets.items():
            value = entry.get(key)
            logged = value is not None and value != ""
            if key not in widths:
                widths[key] = _width(value, where, key) if logged else None
            elif logged != (widths[key] is not None):
                raise FixtureError(f"{where}: '{key}' is {'logged' if logged else 'missing'} here but "
                                   f"{'missing' if logged else 'logged'} on line {first_line}; "
                                   "log it for every sample or for none")
            if logged:
                collected.append(_vector(value, widths[key], where, key))
    if not rows:
        raise FixtureError(f"{path} holds no samples")
    arrays = {}
    for key, values in targets.items():
        with np.errstate(over="ignore"):
            arrays[key] = np.stack(values).astype(np.float32) if values else np.zeros((len(rows), 0), np.float32)
        bad = np.flatnonzero(~np.isfinite(arrays[key]).all(axis=1))
        if bad.size:
            raise FixtureError(f"{path}: line {lines[bad[0]]}: '{key}' holds NaN, infinite or "
                               "out-of-float32-range values")
    if not arrays["embedding"].size and not arrays["outputs"].size:
        raise FixtureError(f"{path}: log 'embedding' and/or 'outputs' for each sample")
    return Fixture(root=path.parent, manifest={}, rows=tuple(rows), embeddings=arrays["embedding"],
                   outputs=arrays["outputs"])


def _log_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSONL or CSV log, one at a time."""
    import csv

    kind = "CSV" if path.suffix == ".csv" else "JSONL"
    with open(path, encoding="utf-8", newline="" if kind == "CSV" else None) as f:
        line = 0
        try:
            if kind == "CSV":
                reader = csv.DictReader(f)
                for record in reader:
                    line = reader.line_num
                    entry = {}
                    for key, value in record.items():
                        if key is None or value is None:
                            raise FixtureError(f"{path}: line {line}: wrong number of columns")
                        entry[key] = json.loads(value) if key in ("input_biases", "embedding", "outputs") and value \
                            else value
                    yield line, entry
            else:
                for line, text in enumerate(f, start=1):
                    if text.strip():
                        if len(text) > MAX_JSON_BYTES:
                            raise FixtureError(f"{path}: line {line} is longer than {MAX_JSON_BYTES} characters")
                        yield line, json.loads(text)
        except (json.JSONDecodeError, csv.Error) as e:
            raise FixtureError(f"{path}: line {line + (kind == 'CSV')}: not valid {kind}: {e}") from e
        except UnicodeDecodeError as e:
            raise FixtureError(f"{path}: not UTF-8 text after line {line} ({e})") from e
        except RecursionError as e:
            raise FixtureError(f"{path}: line {line}: nests too deeply") from e


def _readable(image: Path, where: str) -> str:
    if not image.is_file():
        raise FixtureError(f"{where}: image {image} not found")
    try:
        decode_image(image)
    except FixtureError as e:
        raise FixtureError(f"{where}: {e}") from e
    return ""


def _width(value: Any, where: str, key: str) -> int:
    if not isinstance(value, list) or not value:
        raise FixtureError(f"{where}: '{key}' must be a non-empty list of numbers, got {str(value)[:80]}")
    return len(value)


def _vector(value: Any, width: int | None, where: str, key: str) -> np.ndarray:
    try:
        # numpy types the list in C: ints and floats give 'i'/'f'; bools, strings, None or nesting give others.
        parsed = np.array(value) if isinstance(value, list) else None
    except (ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.ndim != 1 or parsed.dtype.kind not in "if":
        raise FixtureError(f"{where}: '{key}' must be a list of numbers, got {str(value)[:80]}")
    if len(value) != width:
        raise FixtureError(f"{where}: '{key}' has {len(value)} values, but the first line has {width}")
    return parsed  # checked for finite float32 values once, over the whole column


def check_head_inputs(spec: Spec, width: int, *, where: str, fix: str) -> None:
    """Rows of ``width`` ``input_biases`` fit the spec's [head] as configured, before any head call.

    Args:
        where: whose rows these are, for the message (e.g. the fixture's metadata file).
        fix: what to change when the rows carry none and the head needs them.

    Raises:
        SpecError: ``[head].input_biases_order`` does not reorder ``width`` columns.
        FixtureError: the rows carry no ``input_biases`` but the head's ``forward`` requires them.
    """
    order = spec.head.input_biases_order
    if order is not None and len(order) != width:
        change = (f"list a permutation of 0..{width - 1} (the column each of the head's inputs takes), or remove "
                  "it to keep the rows' order" if width else "remove it")
        raise SpecError(f"{spec.path}: [head].input_biases_order = {list(order)} reorders {len(order)} columns, but "
                        f"{where} carry {width} input_biases per row.\nFix: {change}.")
    if width == 0 and _requires_biases(spec.head.class_path):
        raise FixtureError(f"{where} carry no input_biases (every row has []), but the spec's head "
                           f"{spec.head.class_path} takes them: forward(embedding, input_biases).\nFix: {fix}")


def check_fixture_inputs(spec: Spec, fixture: Fixture) -> None:
    """`check_head_inputs` for a fixture's rows, before the spec's pipeline runs on them.

    Raises:
        SpecError, FixtureError: see `check_head_inputs`.
    """
    check_head_inputs(spec, fixture.biases().shape[1], where=f"the rows of {fixture.root / METADATA}",
                      fix="freeze the fixture again with each row's input_biases (--map input_biases=FIELD,...), "
                          "or point [head] at a head that takes none")


def _requires_biases(class_path: str) -> bool:
    """Whether the head class's ``forward`` requires a second positional argument (the input_biases)."""
    import importlib
    import inspect

    module, _, name = class_path.partition(":")
    try:
        head = importlib.import_module(module)
        for part in name.split("."):
            head = getattr(head, part)
        parameters = list(inspect.signature(head.forward).parameters.values())[1:]  # after self
    except Exception:  # noqa: BLE001  (user code: building the head names what is wrong with it)
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len([p for p in parameters if p.kind in positional and p.default is p.empty]) >= 2


def verify_referenced_checkpoints(fixture: Fixture) -> None:
    """Check that every checkpoint a fixture references (not copies) is still there, bit for bit.

    Raises:
        FixtureError: a referenced checkpoint is missing, or its size or sha256 differs from the record.
    """
    for part, entry in fixture.manifest.get("weights", {}).items():
        if not entry.get("referenced"):
            continue
        path = fixture.root / entry["file"]
        if not path.is_file():
            raise FixtureError(
                f"{fixture.root}: the {part} checkpoint this fixture references is missing: {path} "
                f"(recorded sha256 {entry.get('sha256')}).\n"
                "Note: the fixture was frozen with the checkpoint referenced, not copied; restore the file at "
                "that path, or freeze again with --copy-checkpoints to keep a copy inside the fixture.")
        size = path.stat().st_size
        actual = cached_sha256(path) if size == entry.get("bytes", size) else None
        if actual is None or actual != entry.get("sha256"):
            got = f"sha256 {actual}" if actual else f"{size} bytes"
            raise FixtureError(
                f"{fixture.root}: the {part} checkpoint this fixture references has changed since it was frozen: "
                f"{path} has {got}, the manifest records sha256 {entry.get('sha256')} ({entry.get('bytes')} bytes).\n"
                "Note: the fixture's reference data came from the recorded weights; restore that file, or freeze "
                "again from the new checkpoint on purpose (--force).")
