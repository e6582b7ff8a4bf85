"""What every detector reads: the run, the fixture, the budgets, and images decoded once per call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.numerics.emulate import gate_tolerance
from parity.store.fixtures import Fixture
from parity.results import CandidateRun, StageResult, Status, Tolerance
from parity.spec import Spec
from parity.store.images import decode_image

__all__ = ["Evidence", "Fit", "fit", "number", "dtype_name"]


@dataclass(frozen=True)
class Fit:
    """How close a transform of the reference came to what the candidate produced."""

    passed: bool
    max_abs: float
    mean_abs: float


def fit(observed: Any, expected: Any, tolerance: Tolerance, *, cosine: bool = False) -> Fit:
    """Whether ``observed`` is within ``tolerance`` of ``expected`` (the comparator's element criterion:
    ``|a - b| <= atol + rtol * |b|``, ``b`` the transformed reference; with ``cosine`` also the row cosine floor)."""
    a, b = np.asarray(observed), np.asarray(expected)
    # float32 pixels are compared in float32 (a rounding far below any budget, and 4x less memory
    # traffic for the pixel search); anything else in float64, as the comparator does.
    dtype = np.float32 if a.dtype == np.float32 and b.dtype == np.float32 else np.float64
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if a.shape != b.shape or not a.size:
        return Fit(False, float("inf"), float("inf"))
    diff = np.abs(a - b)
    if not np.isfinite(diff).all():
        return Fit(False, float("inf"), float("inf"))
    passed = bool((diff <= tolerance.atol + tolerance.rtol * np.abs(b)).all())
    if passed and cosine and tolerance.min_cosine is not None:
        rows_a, rows_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(norms > 0, (rows_a * rows_b).sum(axis=1) / norms, 1.0)
        passed = bool((cos >= tolerance.min_cosine).all())
    return Fit(passed, float(diff.max()), float(diff.mean()))


def number(value: float) -> str:
    """A residual as the reports print it: ``2.4e-07``, ``0``."""
    return "0" if value == 0 else f"{value:.2g}"


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` / ``float16`` / a numpy dtype, as ``float16``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Evidence:
    """One explanation pass over a judged run: what the detectors share, computed at most once."""

    run: CandidateRun
    fixture: Fixture
    spec: Spec
    stages: Mapping[str, StageResult]
    _tolerances: dict[str, Tolerance] = field(default_factory=dict)
    _images: dict[tuple[str, bool], Any] = field(default_factory=dict)
    _modes: dict[str, tuple[str, int] | None] = field(default_factory=dict)

    def failing(self, stage: str) -> bool:
        result = self.stages.get(stage)
        return result is not None and result.status is Status.FAIL

    def tolerance(self, stage: str) -> Tolerance:
        if stage not in self._tolerances:
            self._tolerances[stage] = gate_tolerance(self.spec, self.fixture, stage)
        return self._tolerances[stage]

    def where(self, *parts: str) -> str:
        """The first call site the hooks saw among ``parts`` (``app.py:31 in predict``), or ``""``."""
        return next((self.run.call_sites[p] for p in parts if self.run.call_sites.get(p)), "")

    def at(self, *parts: str) -> str:
        """`where` as a clause for a fix: `` (at app.py:31 in predict)`` or ``""``."""
        site = self.where(*parts)
        return f" (at {site})" if site else ""

    def image_path(self, name: str) -> Path | None:
        row = next((r for r in self.fixture.rows if r.name == name), None)
        return None if row is None else row.image

    def image(self, name: str, *, exif_transpose: bool = True):
        """The fixture image ``name`` decoded to RGB by the shared loader (cached), or ``None``."""
        key = (name, exif_transpose)
        if key not in self._images:
            path = self.image_path(name)
            try:
                self._images[key] = None if path is None else decode_image(path, exif_transpose=exif_transpose)[0]
            except Exception:  # an unreadable image only means this check cannot run
                self._images[key] = None
        return self._images[key]

    def raw(self, name: str, *, exif_transpose: bool = True):
        """The fixture image ``name`` as stored (its own mode, alpha kept), EXIF-oriented if asked; cached."""
        key = (f"raw:{name}", exif_transpose)
        if key not in self._images:
            from PIL import Image, ImageOps

            path = self.image_path(name)
            try:
                with Image.open(path) as image:
                    image.load()
                    self._images[key] = ImageOps.exif_transpose(image) if exif_transpose else image.copy()
            except Exception:
                self._images[key] = None
        return self._images[key]

    def mode(self, name: str) -> tuple[str, int] | None:
        """(PIL mode, EXIF orientation) of the fixture image ``name`` as stored, before any conversion."""
        if name not in self._modes:
            from PIL import Image

            path = self.image_path(name)
            try:
                with Image.open(path) as image:
                    self._modes[name] = (image.mode, int(image.getexif().get(0x0112, 1) or 1))
            except Exception:
                self._modes[name] = None
        return self._modes[name]
