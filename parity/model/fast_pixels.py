"""The spec's pixels without torch, for a candidate that holds its own model (an ONNX graph with its backbone).

Resolving ``[preprocess]`` through a library (timm's pretrained_cfg, open_clip's model config)
imports torch and the library. The fixture records the preprocessing its reference resolved to;
when the spec pins nothing that differs from that record (same library and backbone model, every
field it sets equal to the recorded one), the spec resolves to the same record, and
`parity.preprocess.fast.numpy_preprocess` makes its pixels bit for bit without torch. Otherwise
`recorded_pixels` says why not, and the caller builds the library transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from parity.libraries import describe_record
from parity.model.pipeline import _resize_edge
from parity.preprocess.fast import NumpyPreprocess, TorchPreprocessOnly, numpy_preprocess
from parity.spec import Spec
from parity.store.fixtures import Fixture
from parity.store.images import check_resize

__all__ = ["NumpyPixels", "recorded_pixels"]


class NumpyPixels:
    """The spec's preprocessing as numpy pixels: the part of `parity.model.pipeline.Pipeline` the batch loop uses."""

    def __init__(self, spec: Spec, record: dict[str, Any], preprocess: NumpyPreprocess) -> None:
        self.spec, self.record, self.preprocess = spec, record, preprocess

    def pixels(self, rgb: Image.Image, *, name: str | Path = "image") -> np.ndarray:
        """Pixels (3, H, W) float32 for an RGB image, as the library transform makes them.

        Raises:
            FixtureError: its resize would be too large.
        """
        check_resize(rgb.size, _resize_edge(self.record), path=name)
        return self.preprocess(rgb)

    def staged(self, rgb: Image.Image, *, name: str | Path = "image") -> np.ndarray:
        """`pixels`: numpy starts no OpenMP team, so decode threads make them whole (see `Pipeline.staged`)."""
        return self.pixels(rgb, name=name)

    @staticmethod
    def finish_pixels(staged: np.ndarray) -> np.ndarray:
        """``staged`` itself: `pixels` made all of it."""
        return staged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def recorded_pixels(spec: Spec, fixture: Fixture) -> tuple[NumpyPixels | None, str]:
    """numpy pixels for ``spec`` from the fixture's recorded preprocessing, or ``(None, why not)``."""
    record = dict(fixture.pipeline.get("preprocess") or {})
    backbone = fixture.pipeline.get("backbone") or {}
    pp = spec.preprocess
    if not record:
        return None, "the fixture records no preprocessing"
    if record.get("library", "timm") != pp.library or pp.config is not None:
        return None, "the spec's preprocessing library or processor config is not the fixture's"
    if backbone.get("model") != spec.backbone.model or backbone.get("library", "timm") != spec.backbone.library:
        return None, "the spec's backbone is not the fixture's, so its preprocessing may resolve differently"
    pinned = dict(pp.overrides(), **pp.variant(), exif_transpose=pp.exif_transpose)
    for key, value in pinned.items():
        if key in record and not _same(record[key], value):
            return None, f"[preprocess].{key} differs from the fixture's recorded preprocessing"
        if key not in record and key in pp.overrides():
            return None, f"the fixture's recorded preprocessing has no {key!r} to compare [preprocess].{key} with"
    try:
        preprocess = numpy_preprocess(describe_record(record, source="the fixture's manifest"))
    except TorchPreprocessOnly as e:
        return None, str(e)
    return NumpyPixels(spec, record, preprocess), ""
