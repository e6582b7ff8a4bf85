"""Freeze what training already produced: existing embeddings, metadata and checkpoints become a fixture.

    result = freeze(load_spec("specs/training.toml"), embeddings="clip.npy", metadata="clip_metadata.json",
                    images="data/images", out="fixtures/run42",
                    field_map=parse_field_map(["image=file", "input_biases=site"]))

The embeddings are never recomputed (they took hours); the claim that the spec's pipeline made
them is checked first, on a few golden images. When the claim fails nothing is written, and the
search over single spec changes (`parity.commands.diagnose`) names the one that reproduces the stored
embeddings. Checkpoints are referenced by path, sha256 and per-tensor fingerprints, not copied;
`parity.store.fixtures.verify_referenced_checkpoints` is the check-time guard that they are still there and unchanged.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.commands.diagnose import (Cause, _current_words, _Editor, _is_current, _Prober, _properties, _resolved,
                                      _search_changes)
from parity.errors import FixtureError, SpecError
from parity.judge.arrays import compare_arrays
from parity.libraries import backbone_weights
from parity.model.numerics import describe_reduced
from parity.model.pipeline import build_pipeline
from parity.numerics.emulate import (MARGIN, budget_from_spread, describe_emulation, emulated_runs, measure_spread,
                                     reference_emulation)
from parity.spec import REFERENCE_NUMERICS, Spec, default_tolerance
from parity.store.fixtures import (MAX_JSON_BYTES, Fixture, FixtureRow, check_head_inputs, check_replaceable, environment,
                             npy_layout, sha256_file)
from parity.model.batches import embed_pixels
from parity.results import Comparison
from parity.commands.capture import capture, git_revision
from parity.store.images import decode_image

__all__ = ["FieldMap", "SourceRow", "FreezeResult", "parse_field_map", "read_metadata", "read_rows_array",
           "select_golden", "declared_numerics", "check_input_biases", "freeze"]

Progress = Callable[[str], None]
_MAPPABLE = ("image", "input_biases", "labels")
_HEAD_BATCH = 4096  # head outputs for every stored embedding, this many rows at a time
_MAX_INDEX = 2 ** 31  # a category index at or above this indexes no embedding table


@dataclass(frozen=True)
class FieldMap:
    """Which of the user's metadata fields hold the image path, the ``input_biases`` and the labels.

    ``None`` for ``input_biases`` or ``labels`` means: the field of that very name when the rows
    have it (parity's own layout), else none.
    """

    image: str = "image"
    input_biases: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        return {"image": self.image, "input_biases": list(self.input_biases or ()), "labels": list(self.labels or ())}


@dataclass(frozen=True)
class SourceRow:
    """One metadata entry, mapped: its image file, head inputs, labels and the user's other fields."""

    image: Path
    input_biases: tuple[int, ...] = ()
    labels: tuple[float, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FreezeResult:
    """What ``freeze`` verified and wrote; false when the claim did not hold and nothing was written.

    ``causes`` (refusals only): single spec changes probed against the stored embeddings, those
    that reproduce them first; empty when none moves them closer.
    """

    out: Path
    samples: int
    golden: tuple[str, ...]
    embedding: Comparison
    written: bool
    causes: tuple[Cause, ...] = ()
    head: Comparison | None = None
    outputs: str = ""
    checkpoints: tuple[tuple[str, str], ...] = ()
    git_revision: str | None = None
    # The reference numerics declared (`declared_numerics`), and on a refusal without one the numerics
    # whose emulated spread covers the residual (the embeddings look made in reduced precision).
    numerics: str | None = None
    numerics_signature: str | None = None

    def __bool__(self) -> bool:
        return self.written

    @property
    def reproducing(self) -> tuple[Cause, ...]:
        return tuple(c for c in self.causes if c.reproduces)


def parse_field_map(items: Sequence[str]) -> FieldMap:
    """``--map`` values (``image=FIELD``, ``input_biases=F1,F2``, ``labels=F1,...``) as a `FieldMap`.

    Raises:
        SpecError: an unknown key, an empty field list, or more than one image field.
    """
    mapped: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        fields = tuple(f.strip() for f in value.split(",") if f.strip())
        if not sep or key not in _MAPPABLE:
            raise SpecError(f"--map {item!r}: expected one of {', '.join(k + '=FIELD' for k in _MAPPABLE)} "
                            "(input_biases and labels take a comma-separated list of fields)")
        if not fields:
            raise SpecError(f"--map {item!r}: no field named after '='")
        if key == "image" and len(fields) != 1:
            raise SpecError(f"--map {item!r}: the image path is one field, got {len(fields)}")
        mapped[key] = fields
    return FieldMap(image=mapped["image"][0] if "image" in mapped else "image",
                    input_biases=mapped.get("input_biases"), labels=mapped.get("labels"))


def _entries(path: Path) -> list[Mapping[str, Any]]:
    """The metadata's rows as mappings: a JSON list of objects (or an object holding one such list), or CSV."""
    if not path.is_file():
        raise FixtureError(f"metadata not found: {path}")
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                entries: Any = list(csv.DictReader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise FixtureError(f"{path}: not valid CSV: {e}") from e
    else:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FixtureError(f"{path}: not valid JSON ({e}); metadata is a JSON list of objects, an object "
                               "holding one such list, or a .csv file with a header row") from e
        except RecursionError as e:
            raise FixtureError(f"{path}: nests too deeply to be metadata (a list of row objects)") from e
        if isinstance(entries, dict):
            lists = [k for k, v in entries.items() if isinstance(v, list) and v and all(isinstance(e, dict) for e in v)]
            if len(lists) != 1:
                raise FixtureError(f"{path}: expected a JSON object holding exactly one list of row objects, found "
                                   f"{len(lists)} ({lists or 'keys ' + str(sorted(entries))})")
            entries = entries[lists[0]]
    if not isinstance(entries, list) or not entries:
        raise FixtureError(f"{path}: holds no rows (expected a list of objects, one per row of the embeddings)")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FixtureError(f"{path}: row {i} is a {type(entry).__name__}, not an object with named fields")
    return entries


def _integers(values: list[Any], *, what: str, where: str) -> tuple[int, ...]:
    out = []
    for value in values:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or not number.is_integer():
            raise FixtureError(f"{where}: {what} must be integers (category indices), got {str(value)[:40]!r}")
        if abs(number) >= _MAX_INDEX:  # negative ones are named with the column by `check_input_biases`
            raise FixtureError(f"{where}: {what} holds {str(value)[:40]}, which is no category index (they are "
                               f"below 2^31).\nNote: map the fields that hold the head's category indices.")
        out.append(int(number))
    return tuple(out)


def _floats(values: list[Any], *, what: str, where: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in values)  # a boolean label is 0.0 or 1.0
    except (TypeError, ValueError, OverflowError) as e:
        raise FixtureError(f"{where}: {what} must be numbers, got {str(values)[:120]}") from e
    bad = [v for v, n in zip(values, numbers) if not math.isfinite(n)]
    if bad:  # a fixture's labels are finite (the loader refuses others): 1e400 reads as inf, "nan" as NaN
        raise FixtureError(f"{where}: {what} must be finite numbers, got {str(bad[0])[:40]!r}")
    return numbers


def _take(entry: Mapping[str, Any], fields: Sequence[str], *, flag: str, where: str) -> list[Any]:
    values: list[Any] = []
    for name in fields:
        if name not in entry:
            raise SpecError(f"{where} has no field {name!r} (--map {flag}={','.join(fields)}); its fields: "
                            f"{sorted(entry)}.\nNote: map each role to one of the row's own fields.")
        value = entry[name]
        if isinstance(value, str) and value.strip().startswith("["):  # a list written into one CSV cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        values += value if isinstance(value, list) else [value]
    return values


def read_metadata(path: str | Path, images: str | Path, field_map: FieldMap = FieldMap()) -> list[SourceRow]:
    """The user's metadata, mapped: one `SourceRow` per entry, in order, image paths under ``images``.

    Fields not mapped to the image, ``input_biases`` or labels are kept as they came (JSON types;
    CSV cells are strings).

    Raises:
        FixtureError: unreadable metadata, no rows, non-integer ``input_biases``, missing image files.
        SpecError: a mapped (or default ``image``) field absent from a row.
    """
    path, images = Path(path), Path(images)
    entries = _entries(path)
    first = entries[0]
    biases = field_map.input_biases if field_map.input_biases is not None else (
        ("input_biases",) if "input_biases" in first else ())
    labels = field_map.labels if field_map.labels is not None else (("labels",) if "labels" in first else ())
    if field_map.image not in first:
        raise SpecError(f"{path}: row 0 has no field {field_map.image!r} for the image path; its fields: "
                        f"{sorted(first)}.\nFix: name the field with --map image=FIELD.")
    used = {field_map.image, *biases, *labels}
    rows = []
    for i, entry in enumerate(entries):
        where = f"{path}: row {i}"
        image_value = _take(entry, (field_map.image,), flag="image", where=where)
        if len(image_value) != 1 or not isinstance(image_value[0], str) or not image_value[0]:
            raise FixtureError(f"{where}: field {field_map.image!r} must be an image path, got {image_value!r}")
        image = images / image_value[0]
        if not image.is_file():
            raise FixtureError(f"{where}: image {image} not found (field {field_map.image!r} = "
                               f"{image_value[0]!r}, relative to --images {images})")
        rows.append(SourceRow(
            image=image,
            input_biases=_integers(_take(entry, biases, flag="input_biases", where=where),
                                   what=f"input_biases ({', '.join(biases)})", where=where),
            labels=_floats(_take(entry, labels, flag="labels", where=where), what=f"labels ({', '.join(labels)})",
                           where=where),
            fields={k: v for k, v in entry.items() if k not in used},
        ))
    widths = {len(r.input_biases) for r in rows}
    if len(widths) > 1:
        raise FixtureError(f"{path}: rows have different numbers of input_biases ({sorted(widths)})")
    return rows


def read_rows_array(path: str | Path, *, what: str, rows: int, metadata: str | Path) -> np.ndarray:
    """An (N, 1, D) or (N, D) float array with one row per metadata entry, as (N, D) float32.

    Raises:
        FixtureError: unreadable (pickled arrays are refused), not floating point, wrong layout,
            a row count that differs from the metadata's, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FixtureError(f"{what} not found: {path}")
    try:  # the header, before anything is allocated: an empty file, another format, a false size
        shape, _dtype = npy_layout(path)
    except FixtureError as e:
        raise FixtureError(f"cannot read {what} {path}: {str(e).removeprefix(f'cannot read {path}: ')}") from e
    if not shape or shape[0] != rows:
        raise FixtureError(
            f"{path} has {shape[0] if shape else 'no'} rows but {metadata} lists {rows} "
            f"({'more' if shape and shape[0] > rows else 'fewer'} {what} than metadata rows).\n"
            f"Note: row i of the {what} must be metadata entry i; rows cannot be matched by guessing, so remove "
            "the extra rows (or add the missing entries) and freeze again.")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FixtureError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise FixtureError(f"{path}: {what} must be a floating-point .npy array, got "
                           f"{getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0, :]
    if array.ndim != 2:
        raise FixtureError(f"{path}: {what} must be (N, 1, D) or (N, D), got shape {array.shape}")
    if array.shape[0] != rows:
        extra = "more" if array.shape[0] > rows else "fewer"
        raise FixtureError(
            f"{path} has {array.shape[0]} rows but {metadata} lists {rows} ({extra} {what} than metadata rows).\n"
            f"Note: row i of the {what} must be metadata entry i; rows cannot be matched by guessing, so remove "
            "the extra rows (or add the missing entries) and freeze again.")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        raise FixtureError(f"{path}: {what} has non-finite values (first at row {bad[0][0]})")
    return np.ascontiguousarray(array, dtype=np.float32)


def select_golden(images: Sequence[Path], k: int) -> list[int]:
    """``k`` rows whose images cover what preprocessing most often gets wrong, when present.

    One image each with an EXIF orientation tag, an alpha channel or palette, a single channel,
    and a non-square shape (in that order), then the first others; returned in row order.
    """
    k = min(k, len(images))
    properties = [_properties(path) for path in images]
    chosen: list[int] = []
    for name in properties[0] if properties else ():
        if any(properties[i][name] for i in chosen):
            continue  # already covered (an EXIF-rotated photo is often non-square too)
        having = next((i for i, p in enumerate(properties) if p[name] and i not in chosen), None)
        if having is not None and len(chosen) < k:
            chosen.append(having)
    chosen += [i for i in range(len(images)) if i not in chosen][:k - len(chosen)]
    return sorted(chosen)


# What each `parity.spec.REFERENCE_NUMERICS` value records as ``producer.numerics`` (the fields of
# `parity.model.numerics.probe_numerics`), so that `parity.model.numerics.reduced_precision` reads it back: a GPU of
# unknown compute capability is taken at its flags' word.
_GPU = {"device": "cuda", "compute_capability": None, "cudnn_allow_tf32": False, "matmul_allow_tf32": False,
        "float32_matmul_precision": "highest", "autocast_dtype": None}
_DECLARED: dict[str, dict[str, Any]] = {
    "float32": {"cudnn_allow_tf32": False, "matmul_allow_tf32": False, "float32_matmul_precision": "highest",
                "autocast_dtype": None},
    "tf32": {**_GPU, "cudnn_allow_tf32": True, "matmul_allow_tf32": True, "float32_matmul_precision": "high"},
    "tf32_conv": {**_GPU, "cudnn_allow_tf32": True},
    "autocast_float16": {**_GPU, "autocast_dtype": "float16"},
    "autocast_bfloat16": {**_GPU, "autocast_dtype": "bfloat16"},
}
# A residual beyond this share of the embeddings' scale is no TF32 rounding (which gives ~1e-4).
_ROUNDING_SCALE = 2e-3
_ROUNDING_COSINE = 0.9999


def declared_numerics(name: str) -> dict[str, Any]:
    """The ``producer.numerics`` fields recording reference numerics declared as ``name`` (``--numerics``).

    Raises:
        SpecError: ``name`` is not one of `parity.spec.REFERENCE_NUMERICS`.
    """
    if name not in _DECLARED:
        raise SpecError(f"--numerics {name!r} is not accepted. Accepted values: {', '.join(REFERENCE_NUMERICS)}")
    fields = dict(_DECLARED[name], declared=name)
    if fields.get("device") == "cuda":
        fields["device_name"] = f"a GPU (declared: numerics {name})"
    return fields


def check_input_biases(head: Any, rows: Sequence[SourceRow], field_map: FieldMap, *,
                       order: Sequence[int] | None = None) -> None:
    """Each ``input_biases`` column within the size of the head's embedding table it indexes.

    Column ``j`` (after ``order``, ``[head].input_biases_order``) indexes the head's ``j``-th
    ``nn.Embedding`` in declaration order when the head declares one per column; otherwise only
    negative values are refused here (the head's own call names the rest).

    Raises:
        SpecError: a column with values outside its table: which column (its field), its value range,
            the table's size, and the column order that fits when there is one.
    """
    import itertools

    from torch import nn

    biases = np.array([row.input_biases for row in rows], dtype=np.int64).reshape(len(rows), -1)
    columns = biases.shape[1]
    if not columns:
        return
    fields = field_map.input_biases or ()
    names = [f"column {i} ({fields[i]})" if len(fields) == columns else f"column {i}" for i in range(columns)]
    low, high = biases.min(axis=0), biases.max(axis=0)
    flag = f"--map input_biases={','.join(fields)}" if fields else "the input_biases"
    negative = [i for i in range(columns) if low[i] < 0]
    if negative:
        i = negative[0]
        raise SpecError(f"{flag}: {names[i]} holds {low[i]}..{high[i]}; category indices are never negative.\n"
                        "Note: map the columns that hold the head's category indices.")
    sizes = [m.num_embeddings for m in head.modules() if isinstance(m, nn.Embedding)]
    if len(sizes) != columns:
        return
    taken = list(order) if order is not None and len(order) == columns else list(range(columns))
    bad = [j for j, column in enumerate(taken) if high[column] >= sizes[j]]
    if not bad:
        return
    j = bad[0]
    column = taken[j]
    message = (f"{flag}: {names[column]} holds {low[column]}..{high[column]}, but the head's embedding table it "
               f"indexes (table {j} of {columns}, in the order the head declares them) has {sizes[j]} rows "
               f"(indices 0..{sizes[j] - 1}).")
    fits = next((p for p in itertools.permutations(range(columns)) if columns <= 6
                 and all(high[c] < sizes[k] for k, c in enumerate(p))), None)
    if fits is not None and len(fields) == columns and order is None:
        message += f"\nFix: the columns look swapped: --map input_biases={','.join(fields[c] for c in fits)}"
    elif fits is not None:
        message += f"\nFix: the columns fit the tables in the order {list(fits)}; map them in that order."
    else:
        message += "\nNote: no order of the columns fits the head's tables: map the fields the head was trained on."
    raise SpecError(message)


def _golden_fixture(rows: Sequence[SourceRow], stored: np.ndarray, golden: Sequence[int],
                    numerics: Mapping[str, Any] | None = None) -> Fixture:
    """The golden rows as an in-memory fixture (for the probes and the numerics emulation)."""
    picked = [rows[i] for i in golden]
    producer = {"numerics": dict(numerics)} if numerics else {}
    return Fixture(root=picked[0].image.parent, manifest={"pipeline": {}, "producer": producer},
                   rows=tuple(FixtureRow(r.image.name, r.image, r.input_biases, r.labels) for r in picked),
                   embeddings=stored[list(golden)], outputs=np.zeros((len(picked), 0), np.float32))


def _emulated_budget(spec: Spec, pipeline: Any, fixture: Fixture) -> Any:
    """The embedding budget of a reference made with ``fixture``'s recorded numerics, measured as the gate
    measures it (`parity.numerics.emulate`): the spread of emulating them on the golden images, x the margin."""
    reduced = reference_emulation(fixture, spec)
    if not reduced or spec.runtime.dtype != "float32":
        return None
    numerics = fixture.manifest["producer"]["numerics"]
    spread = measure_spread(*emulated_runs(pipeline, fixture, range(len(fixture.rows)), numerics), fixture.names)
    origin = (f"{describe_reduced(reduced, numerics)}; budget from {describe_emulation(reduced)} on "
              f"{len(fixture.rows)} golden images, x{MARGIN:g} margin")
    return budget_from_spread(spread["embedding"], default_tolerance("embedding", "float32"), margin=MARGIN,
                              origin=origin)


def _numerics_signature(spec: Spec, pipeline: Any, fixture: Fixture, again: np.ndarray,
                        embedding: Comparison) -> str | None:
    """The reduced precision whose emulated spread covers the golden images' residual, when the residual has
    rounding's signature (small everywhere, direction kept, no rescaling or shift in it): ``tf32``, else ``None``."""
    scale = float(np.abs(fixture.embeddings).max(initial=0.0))
    if not embedding.shapes_match or not scale or embedding.max_abs > _ROUNDING_SCALE * scale or \
            embedding.min_cosine is None or embedding.min_cosine < _ROUNDING_COSINE or \
            _systematic_share(again, fixture.embeddings) > 0.5:
        return None
    for name in ("tf32",):
        budget = _emulated_budget(spec, pipeline, _with_numerics(fixture, declared_numerics(name)))
        if budget is not None and compare_arrays(again, fixture.embeddings, tolerance=budget, cosine=True):
            return name
    return None


def _systematic_share(computed: np.ndarray, stored: np.ndarray) -> float:
    """The share of the residual's energy that a per-row scale and offset of ``computed`` explain: near 0 for
    rounding noise, near 1 for a rescaling (a norm, a temperature) or a shift, which no precision makes."""
    residual = (stored - computed).astype(np.float64)
    total = float((residual ** 2).sum())
    if not total:
        return 0.0
    explained = 0.0
    for row, r in zip(computed.astype(np.float64), residual):
        basis = np.stack([row, np.ones_like(row)], axis=1)
        fit, *_ = np.linalg.lstsq(basis, r, rcond=None)
        explained += float(((basis @ fit) ** 2).sum())
    return explained / total


def _with_numerics(fixture: Fixture, numerics: Mapping[str, Any]) -> Fixture:
    from dataclasses import replace

    return replace(fixture, manifest={**fixture.manifest, "producer": {"numerics": dict(numerics)}})


def _search(spec: Spec, rows: Sequence[SourceRow], embeddings: np.ndarray, golden: Sequence[int],
            embedding: Comparison, device: str) -> tuple[Cause, ...]:
    """Single spec changes that reproduce the stored embeddings of the golden rows (else come closest).

    Every change is screened on the golden image that drifts most (reproducing it is necessary),
    and those that reproduce it are confirmed on every golden image. A change is applied as its
    printed TOML pasted into the spec; one the spec refuses, or that leaves it as it is, is none.
    """
    fixture = _golden_fixture(rows, embeddings, golden)
    picked = fixture.names
    worst = picked.index(embedding.worst[0].name) if embedding.worst else 0
    everyone, screen = _Prober(fixture, range(len(picked)), device), _Prober(fixture, [worst], device)
    for prober in (everyone, screen):
        prober.budgets["embedding"] = embedding.tolerance
    screen.backbones, screen.heads, screen.images = everyone.backbones, everyone.heads, everyone.images
    editor, resolved = _Editor(spec), _resolved(spec, everyone)
    base = embedding.max_abs
    scored = []
    for change in _search_changes(spec, len(fixture.rows[0].input_biases)):
        variant = editor.load([change])
        if variant is None or variant == spec or _is_current(spec, change, resolved):
            continue
        score = screen.score(variant)
        if score["ok"]:
            score = everyone.score(variant)
        scored.append((not score["ok"], score["embedding"], change))
    scored.sort(key=lambda t: (t[0], t[1]))
    found = [t for t in scored if not t[0]] or [t for t in scored if t[1] < 0.5 * base][:3]
    return tuple(Cause(change, "embedding", "max abs", base, error, not failing,
                       *_current_words(spec, change, everyone)) for failing, error, change in found)


def _check_writable(out: Path) -> None:
    """Refuse an ``out`` whose parent cannot take the fixture (the fixture is staged beside it), before any work."""
    import tempfile

    existing = out.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FixtureError(f"--out {out}: {existing} is not a directory")
    try:  # try it: permission bits do not tell (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".parity-write-test.")
    except OSError as e:
        raise FixtureError(f"--out {out}: {existing} is not writable ({e.strerror or e}); choose another "
                           "directory") from e
    os.close(fd)
    os.unlink(probe)


def _check_metadata_size(rows: Sequence[SourceRow], metadata: Path) -> None:
    """Refuse metadata whose fields would make the fixture's clip_metadata.json larger than any reader reads."""
    try:  # as the fixture writes them
        sizes = [len(json.dumps(dict(row.fields), indent=1, default=str)) for row in rows]
    except RecursionError as e:
        raise FixtureError(f"{metadata}: a row's fields nest too deeply to be written into a fixture") from e
    if sum(sizes) + 200 * len(rows) <= MAX_JSON_BYTES:
        return
    i = int(np.argmax(sizes))
    name, value = max(rows[i].fields.items(), key=lambda kv: len(json.dumps(kv[1], default=str)))
    raise FixtureError(
        f"{metadata}: the fields kept with the rows (those not mapped to image, input_biases or labels) come to "
        f"about {sum(sizes) / 2**20:.0f} MiB, more than the {MAX_JSON_BYTES // 2**20} MiB a fixture's metadata may "
        f"hold (check would refuse it); the largest is {name!r} of row {i} ({len(json.dumps(value, default=str))} "
        "bytes).\nFix: leave such fields out of the metadata given to freeze.")


def _reference(path: Path, out: Path) -> dict[str, Any]:
    """A checkpoint referenced, not copied: its path relative to the fixture (so the two move together)."""
    path = path.resolve()
    return {"file": Path(os.path.relpath(path, out.resolve())).as_posix(), "sha256": sha256_file(path),
            "bytes": path.stat().st_size, "referenced": True}


def freeze(spec: Spec, *, embeddings: str | Path, metadata: str | Path, images: str | Path, out: str | Path,
           field_map: FieldMap = FieldMap(), outputs: str | Path | None = None, golden: int = 4,
           copy_checkpoints: bool = False, force: bool = False, device: str | None = None,
           numerics: str | None = None, progress: Progress | None = None) -> FreezeResult:
    """Turn existing training artifacts into a fixture, after checking the spec's pipeline made them.

    Args:
        spec: the training-time pipeline (backbone, extraction, preprocessing, head).
        embeddings: ``clip.npy``, (N, 1, D) or (N, D); stored as it is, never recomputed.
        metadata: JSON or CSV, one entry per embedding row, mapped with ``field_map``; image paths
            are relative to ``images``.
        outputs: the head's outputs (N, L); default: the spec's head on ``embeddings`` in eval mode.
        golden: how many images are re-embedded to check the claim (their pixels are stored too).
        copy_checkpoints: copy the checkpoints into the fixture instead of referencing them.
        numerics: the numerics the embeddings were made with (`parity.spec.REFERENCE_NUMERICS`; default:
            the spec's ``[reference].numerics``, else as probed here). Recorded as ``producer.numerics``;
            with reduced precision the claim is checked at the budget its emulation measures, as the gate's.

    Returns:
        A `FreezeResult`; false (nothing written) when the golden images' embeddings are not
        reproduced, with the spec changes that do reproduce them.

    Raises:
        FixtureError: ``out`` exists without ``force``; unreadable artifacts; row counts that differ.
        SpecError: a mapped field is missing; ``golden`` < 1; an ``input_biases`` column outside the
            head's embedding table (`check_input_biases`); unknown ``numerics``.
        CheckpointError: a checkpoint is unreadable or does not load with ``strict=True``.
    """
    say = progress or (lambda _message: None)
    out, embeddings, metadata = Path(out), Path(embeddings), Path(metadata)
    if (out.exists() or out.is_symlink()) and not force:
        raise FixtureError(f"{out} already exists; refusing to overwrite a fixture.\n"
                           "Note: freeze into a new directory, or replace it on purpose with --force.")
    # Before any work: --force replaces only a fixture parity wrote, never what this freeze reads.
    checkpoints = () if copy_checkpoints else (("the head checkpoint", spec.head.weights),
                                               ("the backbone checkpoint", spec.backbone.checkpoint))
    check_replaceable(out, inputs=(("the --images folder", Path(images)), ("the embeddings", embeddings),
                                   ("the metadata", metadata), ("the outputs", outputs), ("the spec", spec.path),
                                   *checkpoints))
    _check_writable(out)
    if golden < 1:
        raise SpecError(f"--golden must be >= 1 (the claim is checked on golden images), got {golden}")
    numerics = numerics or spec.reference.numerics
    declared = declared_numerics(numerics) if numerics is not None else None
    say("reading the metadata and the arrays")
    rows = read_metadata(metadata, images, field_map)
    _check_metadata_size(rows, metadata)
    check_head_inputs(spec, len(rows[0].input_biases), where=f"the rows of {metadata}",
                      fix="map the fields that hold them: --map input_biases=FIELD[,FIELD...]")
    stored = read_rows_array(embeddings, what="embeddings", rows=len(rows), metadata=metadata.name)
    given = None if outputs is None else read_rows_array(outputs, what="outputs", rows=len(rows),
                                                         metadata=metadata.name)
    seen: dict[str, Path] = {}
    for row in rows:
        if row.image.name in seen:
            raise FixtureError(f"{metadata}: images {seen[row.image.name]} and {row.image} share the file name "
                               f"{row.image.name!r}; fixture images are named by file name, which must be unique")
        seen[row.image.name] = row.image
    say(f"decoding {len(rows)} images")
    for row in rows:
        decode_image(row.image, exif_transpose=spec.preprocess.exif_transpose)  # names the file it cannot read

    device = device or spec.runtime.device
    pipeline = build_pipeline(spec, device=device)
    # Before any head call: a column outside the head's table is a mapping error, not a defect.
    check_input_biases(pipeline.head, rows, field_map, order=spec.head.input_biases_order)
    picked = select_golden([row.image for row in rows], golden)
    names = [rows[i].image.name for i in picked]
    say(f"re-embedding {len(picked)} golden images")
    pixels = {i: pipeline.preprocess(rows[i].image) for i in picked}
    # Golden images of several shapes (a processor without a centre crop) are embedded one by one.
    size = spec.runtime.batch_size if len({tuple(p.shape) for p in pixels.values()}) == 1 else 1
    again = embed_pixels(pipeline, [pixels[i] for i in picked], batch_size=size)
    goldens = _golden_fixture(rows, stored, picked, declared)
    # The gate's own budget for the embedding stage: the spec's explicit one, else that of the declared
    # reduced precision's emulation, else the dtype's default.
    tolerance = spec.tolerances.get("embedding") or (_emulated_budget(spec, pipeline, goldens) if declared else None) \
        or default_tolerance("embedding", spec.runtime.dtype)
    embedding = compare_arrays(again, stored[picked], tolerance=tolerance, names=names, cosine=True)
    result = dict(out=out, samples=len(rows), golden=tuple(names), embedding=embedding, numerics=numerics)
    if not embedding:
        say("searching for the spec change that reproduces the stored embeddings")
        causes = _search(spec, rows, stored, picked, embedding, device)
        signature = None
        if not any(c.reproduces for c in causes) and declared is None and "embedding" not in spec.tolerances:
            say("emulating reduced-precision numerics on the golden images")
            signature = _numerics_signature(spec, pipeline, goldens, again, embedding)
        return FreezeResult(**result, written=False, causes=causes, numerics_signature=signature)

    biases = np.array([row.input_biases for row in rows], dtype=np.int64).reshape(len(rows), -1)
    try:
        computed = np.concatenate([pipeline.run_head(stored[s:s + _HEAD_BATCH], biases[s:s + _HEAD_BATCH]).numpy()
                                   for s in range(0, len(rows), _HEAD_BATCH)])
    except (IndexError, RuntimeError, ValueError, TypeError) as e:  # e.g. an index past an embedding table
        ranges = ", ".join(f"column {i}: {biases[:, i].min()}..{biases[:, i].max()}" for i in range(biases.shape[1]))
        raise SpecError(f"the spec's head cannot take the mapped input_biases ({type(e).__name__}: {e}); they hold "
                        f"{ranges or 'no columns'}.\nFix: map (--map input_biases=...) the fields the head was "
                        "trained on, in the order it takes them.") from e
    head = None
    if given is not None:
        head_tolerance = spec.tolerances.get("head") or default_tolerance("head", spec.runtime.dtype)
        head = compare_arrays(computed[picked], given[picked], tolerance=head_tolerance, names=names)
        if not head:
            return FreezeResult(**result, written=False, head=head)

    revision = git_revision(spec.path) or git_revision(embeddings)
    say("writing the fixture")
    with capture(out, model=pipeline.backbone, model_name=spec.backbone.model, library=spec.backbone.library,
                 model_kwargs=dict(spec.backbone.kwargs), extract=spec.backbone.extract, transform=pipeline.transform,
                 checkpoint=spec.backbone.checkpoint if copy_checkpoints else None, force=force,
                 numerics=declared) as cap:
        cap.manifest["pipeline"] = pipeline.describe()
        cap.manifest["producer"] = {
            "script": "parity freeze", "spec": str(spec.path), "git_revision": revision,
            "transform": repr(pipeline.transform), "versions": environment(),
            "artifacts": {name: {"path": str(p.resolve()), "sha256": sha256_file(p)}
                          for name, p in (("embeddings", embeddings), ("metadata", metadata),
                                          ("outputs", None if outputs is None else Path(outputs))) if p is not None},
            "golden": list(names),
            # Where the embeddings were made is unknown unless declared: this machine's numerics would be a guess.
            **({"numerics": cap.manifest["producer"]["numerics"]} if declared else {}),
        }
        for i, row in enumerate(rows):
            cap.add(row.image, embedding=stored[i], input_biases=row.input_biases, labels=row.labels,
                    pixels=pixels.get(i))
            if row.fields:
                cap.rows[-1]["fields"] = dict(row.fields)
        cap.set_outputs(computed if given is None else given)
        cap.attach_head(pipeline.head, class_path=spec.head.class_path, kwargs=dict(spec.head.kwargs),
                        checkpoint=spec.head.weights if copy_checkpoints else None)
        cap.note("metadata", {"source": metadata.name, "mapping": field_map.describe()})
        weights = cap.manifest["weights"]
        for part, prints in pipeline.fingerprints.items():
            weights[part]["tensors"] = prints  # taken at load, before any dtype cast, as the gate takes them
        if not copy_checkpoints:
            for part, path in (("backbone", backbone_weights(spec)), ("head", spec.head.weights)):
                if path is not None:
                    weights[part].update(_reference(path, out))
    held = tuple((part, ("copied " if copy_checkpoints else "referenced ") + str(entry.get("file")))
                 for part, entry in weights.items() if entry.get("file"))
    return FreezeResult(**result, written=True, head=head, checkpoints=held, git_revision=revision,
                        outputs=f"read from {outputs}" if given is not None else "computed by the spec's head "
                                                                                "(eval mode) on the embeddings")

