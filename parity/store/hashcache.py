"""A local cache of hashes of large files, keyed by the file's identity on disk.

Hashing a 1.2 GB checkpoint (its sha256, its per-tensor fingerprints) costs as much as a forward
pass; the file rarely changes between two runs. A value is reused only while the file keeps its
resolved path, size, mtime, ctime, inode and device: any rewrite or ``touch`` changes one of them
and the file is hashed again. The cache lives in ``$PARITY_CACHE_DIR``, else ``$XDG_CACHE_HOME/parity``,
else ``~/.cache/parity``; ``PARITY_HASH_CACHE=0`` turns it off. It is an optimisation only: a
missing, corrupt, unreadable or unwritable cache is ignored, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["CACHE_FILE", "MAX_ENTRIES", "cache_dir", "cached", "enabled"]

CACHE_FILE = "hashes.json"
MAX_ENTRIES = 64  # the oldest entries go first; one ViT-L fingerprint entry is about 40 KB
_MAX_BYTES = 32 << 20  # a larger cache file is not ours (or damaged): ignored, then replaced
_FORMAT = 1
# A file modified this recently may still be changed again within the same mtime tick (the
# filesystem's clock is coarse), which its identity could not tell apart: such hashes are not stored.
_SETTLE_SECONDS = 2.0

T = TypeVar("T")


def enabled() -> bool:
    """Whether the cache is in use: ``PARITY_HASH_CACHE=0`` (or ``false``, ``no``, ``off``) turns it off."""
    return os.environ.get("PARITY_HASH_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where the cache file lives: ``$PARITY_CACHE_DIR``, ``$XDG_CACHE_HOME/parity`` or ``~/.cache/parity``."""
    if os.environ.get("PARITY_CACHE_DIR"):
        return Path(os.environ["PARITY_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "parity"
    return Path.home() / ".cache" / "parity"


def _identity(path: Path) -> tuple[str, os.stat_result] | None:
    try:
        resolved = path.resolve()
        return str(resolved), resolved.stat()
    except (OSError, RuntimeError):
        return None


def _key(kind: str, resolved: str, st: os.stat_result, settings: Any) -> str:
    ident = [kind, resolved, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, settings]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=repr).encode()).hexdigest()


def _read(file: Path) -> dict[str, Any]:
    try:
        if file.stat().st_size > _MAX_BYTES:
            return {}
        data = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON (nor UTF-8), nested past the parser
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and "value" in v}


def _write(file: Path, entries: dict[str, Any]) -> None:
    """Replace the cache file atomically; a reader sees the old file or the new one, never half of one."""
    kept = dict(sorted(entries.items(), key=lambda kv: _stored(kv[1]), reverse=True)[:MAX_ENTRIES])
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".hashes.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "entries": kept}, f)
        os.replace(tmp, file)
        tmp = None
    except (OSError, TypeError, ValueError, RecursionError):
        pass  # a read-only home, a full disk, an entry read back that cannot be written: the next run hashes again
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cached(path: str | Path, kind: str, compute: Callable[[], T], *, settings: Any = None,
           valid: Callable[[Any], bool] = lambda value: True) -> T:
    """``compute()``, or the value it gave for the same file (and ``kind``, ``settings``) in an earlier run.

    ``compute`` must be a pure function of the file's bytes and ``settings`` (a JSON-able value naming
    everything else the result depends on); its result must be JSON-able. A stored value that fails
    ``valid`` (a damaged cache) is computed again.
    """
    ident = _identity(Path(path)) if enabled() else None
    if ident is None:
        return compute()
    resolved, before = ident
    key = _key(kind, resolved, before, settings)
    file = cache_dir() / CACHE_FILE
    entries = _read(file)
    if key in entries and _valid(valid, entries[key]["value"]):
        return entries[key]["value"]
    value = compute()
    after = _identity(Path(path))
    # Store only if the file did not change while it was read, and has settled (see _SETTLE_SECONDS).
    unchanged = after is not None and _key(kind, after[0], after[1], settings) == key
    if unchanged and time.time() - before.st_mtime_ns / 1e9 > _SETTLE_SECONDS:
        entries = _read(file)  # another process may have written since
        entries[key] = {"value": value, "stored": time.time()}
        _write(file, entries)
    return value


def _valid(valid: Callable[[Any], bool], value: Any) -> bool:
    """Whether a stored value may be used: a check that fails on what a damaged cache holds says no."""
    try:
        return bool(valid(value))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError):
        return False


def _stored(entry: dict[str, Any]) -> float:
    stored = entry.get("stored")
    try:
        when = float(stored) if isinstance(stored, (int, float)) and not isinstance(stored, bool) else 0.0
    except OverflowError:  # an integer beyond float: not a time this cache wrote
        return 0.0
    return when if when == when else 0.0  # NaN sorts nowhere
