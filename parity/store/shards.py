"""Deterministic shards of a sample set (`parity check --shard I/N`).

A row belongs to shard ``int(sha256(content), 16) % N``, where the content is the sha256 of its
image file (the fixture's manifest records it; a logged image is hashed once). The assignment
depends on nothing but the row itself: adding a sample moves no other sample to another shard,
and the same fixture gives the same shards on every machine. `parity.commands.merge` puts the partial
reports back together; each part records what it was made from (`part_version`: the fixture's
data version and the sha256 of the spec file's bytes), and parts made from different inputs
do not merge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from parity.errors import SpecError
from parity.store.fixtures import Fixture, FixtureRow, sha256_file
from parity.results import ShardVectors

__all__ = ["parse_shard", "row_key", "shard_rows", "shard_fixture", "pack_vectors", "unpack_vectors", "part_version",
           "read_part_version"]

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) as ``(I, N)``.

    Raises:
        SpecError: not of that form, or I outside 1..N.
    """
    match = _SHARD.fullmatch(text or "")
    if not match:
        raise SpecError(f"--shard {text!r} is not I/N (e.g. --shard 2/4: the second of four shards)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise SpecError(f"--shard {text}: I must be between 1 and N (got {index} of {count})")
    return index, count


def row_key(row: FixtureRow, cache: dict[Path, str] | None = None) -> str:
    """The content digest a row is sharded by: its image's sha256 (from the manifest when it lists it)."""
    recorded = getattr(row.image, "sha256", "")
    if recorded:
        return recorded
    if cache is not None and row.image in cache:
        return cache[row.image]
    digest = sha256_file(Path(row.image))
    if cache is not None:
        cache[row.image] = digest
    return digest


def shard_rows(rows: Sequence[FixtureRow], index: int, count: int) -> list[int]:
    """The positions of the rows in shard ``index`` of ``count`` (1-based), in their order."""
    cache: dict[Path, str] = {}
    return [i for i, row in enumerate(rows) if int(row_key(row, cache), 16) % count == index - 1]


def shard_fixture(fixture: Fixture, index: int, count: int) -> tuple[Fixture, list[int]]:
    """The fixture restricted to one shard, and the shard's rows as positions in the whole fixture."""
    picked = shard_rows(fixture.rows, index, count)
    return fixture.subset(picked), picked


def _pack(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def pack_vectors(candidate: np.ndarray, reference: np.ndarray, names: Sequence[str]) -> ShardVectors:
    """Embeddings a merge needs to judge decisions over pairs that cross shards (verification)."""
    candidate, reference = np.asarray(candidate, np.float32), np.asarray(reference, np.float32)
    return ShardVectors(names=tuple(names), width=int(candidate.shape[1]) if candidate.ndim == 2 else 0,
                        candidate=_pack(candidate), reference=_pack(reference))


def unpack_vectors(vectors: ShardVectors) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate, reference)`` as (n, width) float32 arrays.

    Raises:
        SpecError: the stored bytes do not hold ``len(names)`` rows of ``width`` values.
    """
    out = []
    for text in (vectors.candidate, vectors.reference):
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as e:
            raise SpecError(f"a partial report's embeddings are not base64: {e}") from e
        if len(raw) != 4 * len(vectors.names) * vectors.width:
            raise SpecError(f"a partial report's embeddings hold {len(raw)} bytes, expected "
                            f"{len(vectors.names)} x {vectors.width} float32")
        out.append(np.frombuffer(raw, dtype="<f4").reshape(len(vectors.names), vectors.width).astype(np.float32))
    return out[0], out[1]



def part_version(fixture_version: str, spec_path: str | Path) -> str:
    """What a partial report was made from, as its ``Shard.version``: the fixture's data version and
    the sha256 of the spec file's bytes (empty when the spec has no file), as a small JSON object.

    A merge compares contents, not paths: the same spec file edited between two shards' runs is
    another spec, and the same bytes checked out at another path on another machine are the same.
    """
    try:
        spec = hashlib.sha256(Path(spec_path).read_bytes()).hexdigest()
    except OSError:
        spec = ""
    return json.dumps({"fixture": fixture_version, "spec": spec}, sort_keys=True)


def read_part_version(version: str) -> dict[str, str]:
    """``{"fixture": ..., "spec": ...}`` from a ``Shard.version`` (`part_version`); a version written
    before parts carried the spec's digest is the fixture's alone (``spec`` empty)."""
    try:
        data = json.loads(version) if version.startswith("{") else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("fixture", "spec")):
        return {"fixture": data["fixture"], "spec": data["spec"]}
    return {"fixture": version, "spec": ""}
