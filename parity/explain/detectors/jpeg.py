"""JPEG re-encoding before the model, with its quality (and chroma subsampling) estimated.

A round trip through Pillow at the right quality reproduces what another Pillow did bit for bit.
Another encoder (a browser, OpenCV, a phone) never does, so its quality is named only when it is
clearly the closest explanation and within a stated loose budget, and the evidence says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parity.explain.detectors.evidence import Evidence, fit, number
from parity.explain.detectors.images import JPEG_QUALITIES, SHIPPED_IMAGE_TRANSFORMS, reencode_jpeg
from parity.explain.detectors.pixel_fit import Candidate, PixelFit, Target, Variant, finish

__all__ = ["LOOSE_LEVELS", "estimate_jpeg"]

_COARSE = (50, 60, 70, 75, 80, 85, 90, 95, 100)
# Pillow's default chroma subsampling (None) first; the others only when it does not reproduce.
_SUBSAMPLINGS = {"4:2:0": None, "4:4:4": 0, "4:2:2": 1}
# The loose budget for another encoder: a mean abs within this many 8-bit levels (in normalised units),
LOOSE_LEVELS = 1.0
_GAIN = 2.0  # at most 1/_GAIN of the residual without re-encoding,
_SHARP = 1.15  # and this much closer than at quality +-2 (the quality is identified, not a plateau).
_HINT = 0.8  # a round trip this much closer than none hints at JPEG: worth trying other subsamplings


def _round_trip(evidence: Evidence, transform: Any, exif: bool, key: tuple[int, int | None]
                ) -> Callable[[str], np.ndarray | None]:
    def produce(name: str) -> np.ndarray | None:
        image = evidence.image(name, exif_transpose=exif)
        if image is None:
            return None
        return np.asarray(transform.geometry(reencode_jpeg(image, key[0], subsampling=key[1])), np.float32)
    return produce


def estimate_jpeg(evidence: Evidence, target: Target, transform: Any, exif: bool,
                  variants: Sequence[Variant]) -> list[PixelFit]:
    """The JPEG round trip (with at most one of ``variants``' per-pixel changes) that reproduces the shipped
    pixels, exactly or within the loose budget; ``[]`` when none does."""
    screened = target.screened
    scores: dict[tuple[int, int | None], tuple[float, int, bool]] = {}  # key -> (mean abs, variant, fits)

    def score(key: tuple[int, int | None]) -> float:
        if key not in scores:
            scores[key] = (math.inf, 0, False)
            try:
                values = _round_trip(evidence, transform, exif, key)(screened)
            except Exception:
                values = None
            if values is not None:
                results = [fit(target.observed[screened], finish(values, v.how), target.tolerance) for v in variants]
                best = min(range(len(variants)), key=lambda i: results[i].mean_abs)
                scores[key] = (results[best].mean_abs, best, results[best].passed)
        return scores[key][0]

    baseline = fit(target.observed[screened], target.golden[screened], target.tolerance).mean_abs
    for subsampling in _SUBSAMPLINGS.values():
        for quality in _COARSE:
            score((quality, subsampling))
        best = min((k for k in scores if k[1] == subsampling), key=score)[0]
        for quality in range(max(1, best - 4), min(100, best + 4) + 1):
            score((quality, subsampling))
        if any(passed for _, _, passed in scores.values()) or min(map(score, scores)) > _HINT * baseline:
            break  # reproduced, or no quality comes near: the other subsamplings need not be tried
    key = min(scores, key=score)
    if not math.isfinite(scores[key][0]):
        return []
    quality, subsampling = key
    variant = variants[scores[key][1]]
    chroma = next(name for name, value in _SUBSAMPLINGS.items() if value == subsampling)
    at = f"quality {quality}" + (f" ({chroma} chroma)" if subsampling is not None else "")
    fix = SHIPPED_IMAGE_TRANSFORMS[f"jpeg_q{JPEG_QUALITIES[0]}"].fix.removeprefix("Change the shipped code: ")

    def candidate(approximate: str) -> Candidate:
        return Candidate(("jpeg",), f"JPEG re-encoding at {approximate}{at}",
                         (f"The shipped code (or its client) re-encodes each image as JPEG at {approximate}{at} "
                          "before the model.",), (fix,), _round_trip(evidence, transform, exif, key))

    exact = candidate("")
    reproduced = target.fits(exact, variant)
    if reproduced is not None:
        sides = [f"quality {q}: {number(scores[(q, subsampling)][0])}" for q in (quality - 1, quality + 1)
                 if (q, subsampling) in scores]
        return [PixelFit.of(exact, variant, reproduced.max_abs,
                            note=f"; mean abs at {', '.join(sides)}" if sides else "")]
    # The closest quality of another encoder: over every golden image, against no re-encoding at all.
    level = LOOSE_LEVELS / 255 / min(variant.how.std)
    residual, before, worst = [], [], 0.0
    for name in target.names:
        values, plain = exact.unit(name), evidence.image(name, exif_transpose=exif)
        if values is None or plain is None:
            return []
        result = fit(target.observed[name], finish(values, variant.how), target.tolerance)
        unchanged = fit(target.observed[name], finish(np.asarray(transform.geometry(plain), np.float32), variant.how),
                        target.tolerance)
        residual.append(result.mean_abs)
        before.append(unchanged.mean_abs)
        worst = max(worst, result.max_abs)
    mean, without = float(np.mean(residual)), float(np.mean(before))
    sides = [scores[(q, subsampling)][0] for q in (quality - 2, quality + 2) if (q, subsampling) in scores]
    sharp = bool(sides) and min(sides) >= _SHARP * scores[key][0]
    if not (mean <= level and mean * _GAIN <= without and sharp):
        return []
    return [PixelFit.of(candidate("about "), variant, worst, approximate=True, note=(
        f"; not within the pixel budget, as expected of another JPEG encoder than Pillow's: mean abs {number(mean)} "
        f"against {number(without)} without re-encoding (loose budget: mean abs within {LOOSE_LEVELS:g} 8-bit level "
        f"= {number(level)}, at most 1/{_GAIN:g} of it, and {_SHARP:g}x closer than at quality +-2)"))]
