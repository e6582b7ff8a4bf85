"""The artifacts a repository holds, recognised by what they contain, not by their names: checkpoints (read
without running pickled code), metadata whose rows name image files, and arrays with one row per entry."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.store.forensics import diagnose_load
from parity.store.checkpoints import read_checkpoint
from parity.errors import ParityError
from parity.store.fixtures import MANIFEST, MANIFEST_DIGEST, npy_layout
from parity.store.forensics import summarize_checkpoint
from parity.results import KeyFix, LayerGuess

__all__ = ["Checkpoint", "Metadata", "RowArray", "CHECKPOINT_SUFFIXES", "IMAGE_SUFFIXES", "is_fixture_dir",
           "find_checkpoints", "find_metadata", "find_arrays", "strip_wrapper"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MAX_CHECKPOINT_BYTES = 8 << 30
_MAX_METADATA_BYTES = 64 << 20
# How many metadata rows are looked at to recognise its fields (all rows' images are checked by freeze).
_ROWS_LOOKED_AT = 200
_INTEGER = re.compile(r"-?\d+")
# Prefixes that training wrappers put before every key (nn.DataParallel, torch.compile, a Lightning module).
_WRAPPERS = ("module.", "_orig_mod.", "model.")


def is_fixture_dir(folder: Path) -> bool:
    """Whether ``folder`` is a parity fixture (a sealed manifest): what it holds parity made or copied."""
    manifest = folder / MANIFEST
    try:
        if not manifest.is_file() or manifest.stat().st_size > _MAX_METADATA_BYTES:
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and MANIFEST_DIGEST in data


def strip_wrapper(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], str]:
    """The shapes without a prefix that every key carries (``module.``, ``_orig_mod.``, ``model.``), and the prefix."""
    for prefix in _WRAPPERS:
        if shapes and all(k.startswith(prefix) for k in shapes):
            return {k[len(prefix):]: v for k, v in shapes.items()}, prefix
    return dict(shapes), ""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file: as read (possibly nested), and its main state_dict's tensor shapes and layers."""

    path: Path
    rel: str
    data: Mapping[str, Any] = field(repr=False)
    shapes: Mapping[str, tuple[int, ...]]
    selected: str | None
    layers: tuple[LayerGuess, ...]

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def layers_of(self, kind: str) -> list[LayerGuess]:
        return [layer for layer in self.layers if layer.kind == kind]

    def loads(self, module, *, section: str, target: str) -> tuple[bool, KeyFix | None]:
        """Whether the checkpoint loads into ``module`` with ``strict=True``: as it is (fix None), or with the
        explicit loading fields (``state_dict_key``, ``key_map``, ``drop_keys``) of a verified fix."""
        try:
            state, diff = diagnose_load(self.data, module, section=section, target=target, source=self.rel)
        except ParityError:
            return False, None
        if state is not None:
            return True, None
        if diff.fix is not None and diff.fix.verified:
            return True, diff.fix
        return False, None


def find_checkpoints(root: Path, files: Sequence[Path]) -> tuple[list[Checkpoint], list[str]]:
    """Every readable checkpoint among ``files``; a note for each that could not be read, and why."""
    found, notes = [], []
    for path in files:
        if path.suffix not in CHECKPOINT_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        try:
            if path.stat().st_size > _MAX_CHECKPOINT_BYTES:
                notes.append(f"skipped {rel}: larger than {_MAX_CHECKPOINT_BYTES >> 30} GiB")
                continue
            data = read_checkpoint(path)
            summary = summarize_checkpoint(data, path=rel)
        except (ParityError, OSError) as e:
            notes.append(f"skipped {rel}: {str(e).splitlines()[0]}")
            continue
        if not summary.tensors:
            continue
        found.append(Checkpoint(path, rel, data, {name: shape for name, shape, _ in summary.tensors},
                                summary.selected, summary.layers))
    return found, notes


@dataclass(frozen=True)
class Metadata:
    """A metadata file whose rows name image files: ``image_field`` holds paths relative to ``images``.

    ``integers``: fields holding whole numbers in every row looked at, with their (min, max);
    ``numbers``: fields holding other numbers.
    """

    path: Path
    rel: str
    rows: int
    image_field: str
    images: Path
    integers: Mapping[str, tuple[int, int]]
    numbers: tuple[str, ...]


def _rows(path: Path) -> list[Mapping[str, Any]] | None:
    """A JSON list of objects (or an object holding one such list), or a CSV file with a header; else None."""
    try:
        if path.stat().st_size > _MAX_METADATA_BYTES:
            return None
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows: Any = list(csv.DictReader(f))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error, RecursionError):
        return None
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list) and v and all(isinstance(e, dict) for e in v)]
        rows = lists[0] if len(lists) == 1 else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


def _number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def find_metadata(root: Path, files: Sequence[Path]) -> list[Metadata]:
    """Every JSON or CSV file among ``files`` whose rows name existing images, with the folder they are relative to."""
    found = []
    for path in files:
        if path.suffix.lower() not in (".json", ".csv") or path.name == MANIFEST:
            continue
        rows = _rows(path)
        if rows is None:
            continue
        looked = rows[:_ROWS_LOOKED_AT]
        fields = [k for k in looked[0] if all(k in r for r in looked)]
        for name in fields:
            values = [r[name] for r in looked]
            if not all(isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES) for v in values):
                continue
            # The folder the paths are relative to: the metadata's own, one of its parents, or the repository root.
            bases = [path.parent, *path.parent.parents]
            bases = [b for b in bases if b == root or root in b.parents] + [root]
            images = next((b for b in dict.fromkeys(bases) if all((b / v).is_file() for v in values)), None)
            if images is None:
                continue
            integers = {}
            for other in fields:
                numbers = [_integer(r[other]) for r in looked]
                if other != name and all(n is not None for n in numbers):
                    integers[other] = (min(numbers), max(numbers))
            floats = tuple(k for k in fields if k != name and k not in integers and all(_number(r[k]) for r in looked))
            found.append(Metadata(path, path.relative_to(root).as_posix(), len(rows), name, images, integers, floats))
            break
    return found


@dataclass(frozen=True)
class RowArray:
    """A floating-point ``.npy`` array: its shape as its header declares (nothing else is read)."""

    path: Path
    rel: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int | None:
        """The row width of an (N, D) or (N, 1, D) array, else None."""
        if len(self.shape) == 2:
            return self.shape[1]
        if len(self.shape) == 3 and self.shape[1] == 1:
            return self.shape[2]
        return None


def find_arrays(root: Path, files: Sequence[Path]) -> list[RowArray]:
    import numpy as np

    found = []
    for path in files:
        if path.suffix != ".npy":
            continue
        try:
            shape, dtype = npy_layout(path)
        except ParityError:
            continue
        if np.issubdtype(dtype, np.floating) and shape:
            found.append(RowArray(path, path.relative_to(root).as_posix(), tuple(shape)))
    return found
