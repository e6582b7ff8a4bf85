"""Array comparison: assert_close-style element checks plus per-row cosine."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence

import numpy as np

from parity.results import Comparison, SampleError, Thumbnail, Tolerance

__all__ = ["compare_arrays", "merge_comparisons", "MAX_SAMPLES"]

WORST_SAMPLES = 3
_ULP_STEPS = 64
# Per-row errors kept for reports; beyond this the worst rows are kept (the row count is in the shape).
MAX_SAMPLES = 5000
# Longest side of a pixel thumbnail, in pixels.
THUMBNAIL_SIDE = 96


def compare_arrays(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    tolerance: Tolerance,
    names: Sequence[str] | None = None,
    cosine: bool = False,
) -> Comparison:
    """Compare ``candidate`` against ``reference`` row by row (first axis = samples).

    Args:
        candidate: values produced by the inference path under test.
        reference: the frozen training-time values; relative error is taken w.r.t. these.
        tolerance: element criterion ``|a - b| <= atol + rtol * |b|`` and optional cosine floor.
        names: one name per row, used to report the worst samples.
        cosine: also compute the per-row cosine similarity.
    """
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.shape != ref.shape:
        # Never broadcast: a (N, 1, D) vs (N, D) "match" would hide a layout bug.
        return Comparison(tuple(cand.shape), tuple(ref.shape), tolerance)
    if names is not None and len(names) != (ref.shape[0] if ref.ndim else 1):
        raise ValueError(f"names has {len(names)} entries for {ref.shape[0]} rows")

    diff = np.abs(cand - ref)
    allowed = tolerance.atol + tolerance.rtol * np.abs(ref)
    finite = np.isfinite(diff)
    ok = finite & (diff <= allowed)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(ref != 0, diff / np.abs(ref), np.where(diff == 0, 0.0, np.inf))
    finite_diff = np.where(finite, diff, 0.0)

    rows = cand.reshape(cand.shape[0], int(np.prod(cand.shape[1:]))) if cand.ndim else cand.reshape(1, 1)
    ref_rows = ref.reshape(rows.shape)
    row_abs = np.where(np.isfinite(rows - ref_rows), np.abs(rows - ref_rows), np.inf).max(axis=1, initial=0.0)
    row_cos = _row_cosine(rows, ref_rows) if cosine else None
    order = np.argsort(-row_abs, kind="stable")[:WORST_SAMPLES]
    labels = list(names) if names is not None else [f"row {i}" for i in range(rows.shape[0])]
    worst = tuple(
        SampleError(labels[i], float(row_abs[i]), None if row_cos is None else float(row_cos[i]))
        for i in order
        if row_abs[i] > 0
    )
    kept = range(rows.shape[0]) if rows.shape[0] <= MAX_SAMPLES else sorted(
        np.argsort(-row_abs, kind="stable")[:MAX_SAMPLES].tolist())
    samples = tuple(SampleError(labels[i], float(row_abs[i]), None if row_cos is None else float(row_cos[i]))
                    for i in kept)
    thumbnail = None
    if cand.ndim == 4 and cand.shape[1] in (1, 3) and cand.shape[0]:  # (N, C, H, W): preprocessed images
        worst_row = int(np.argmax(row_abs))
        thumbnail = _thumbnail(labels[worst_row], cand[worst_row], ref[worst_row])
    return Comparison(
        candidate_shape=tuple(cand.shape),
        reference_shape=tuple(ref.shape),
        tolerance=tolerance,
        max_abs=float(finite_diff.max(initial=0.0)),
        mean_abs=float(finite_diff.mean()) if finite_diff.size else 0.0,
        max_rel=float(np.where(finite, rel, 0.0).max(initial=0.0)),
        mismatched=int((~ok).sum()),
        total=int(diff.size),
        min_cosine=None if row_cos is None or not row_cos.size else float(row_cos.min()),
        nonfinite=int((~finite).sum()),
        required_atol=_required_atol(finite_diff, np.abs(ref), tolerance.rtol),
        worst=worst,
        samples=samples,
        thumbnail=thumbnail,
    )


def merge_comparisons(parts: Sequence[Comparison], position: Callable[[str], int]) -> Comparison:
    """One comparison of all rows from comparisons of disjoint sets of rows (shards, batches).

    Maxima and minima are those of the parts, counts add up, the mean is weighted by element
    count; the worst samples and the kept per-row errors are chosen from the union as
    `compare_arrays` chooses them (largest error first, ties by ``position``, the row's place in
    the whole set), and the thumbnail is the one of the part holding the worst row.
    """
    if not parts:
        raise ValueError("no comparisons to merge")
    first = parts[0]

    def rows_of(shape: tuple[int, ...]) -> int:
        return shape[0] if shape else 1

    tails = {c.candidate_shape[1:] for c in parts} | {c.reference_shape[1:] for c in parts}
    candidate_shape = (sum(rows_of(c.candidate_shape) for c in parts), *first.candidate_shape[1:])
    reference_shape = (sum(rows_of(c.reference_shape) for c in parts), *first.reference_shape[1:])
    if len(tails) > 1 or any(not c.shapes_match for c in parts):  # no numbers: as compare_arrays on a mismatch
        if candidate_shape == reference_shape:
            candidate_shape = (*candidate_shape, 0)  # never reported as matching
        return Comparison(candidate_shape, reference_shape, first.tolerance)
    total = sum(c.total for c in parts)
    worst_first = lambda e: (-e.max_abs, position(e.name))  # noqa: E731
    samples = [e for c in parts for e in c.samples]
    if len(samples) > MAX_SAMPLES:
        samples = sorted(samples, key=worst_first)[:MAX_SAMPLES]
    cosines = [c.min_cosine for c in parts if c.min_cosine is not None]
    worst = sorted((e for c in parts for e in c.worst), key=worst_first)[:WORST_SAMPLES]
    pictured = [c for c in parts if c.thumbnail is not None]
    thumbnail = None
    if pictured:
        thumbnail = min(pictured, key=lambda c: (-c.max_abs, position(c.thumbnail.name))).thumbnail
    return Comparison(
        candidate_shape=candidate_shape, reference_shape=reference_shape, tolerance=first.tolerance,
        max_abs=_largest(c.max_abs for c in parts),
        mean_abs=float(sum(c.mean_abs * c.total for c in parts if c.total) / total) if total else 0.0,
        max_rel=_largest(c.max_rel for c in parts),
        mismatched=sum(c.mismatched for c in parts), total=total,
        min_cosine=min(cosines) if cosines else None,
        nonfinite=sum(c.nonfinite for c in parts),
        required_atol=_largest(c.required_atol for c in parts),
        worst=tuple(worst), samples=tuple(sorted(samples, key=lambda e: position(e.name))), thumbnail=thumbnail)


def _largest(values) -> float:
    """The largest value that is not NaN (NaN stands for "not measured", as a saved report writes it)."""
    known = [v for v in values if not math.isnan(v)]
    return max(known) if known else math.nan


def _blocks(image: np.ndarray, factor: int, reduce) -> np.ndarray:
    """Reduce (H, W, ...) by ``factor`` in both directions, dropping the ragged edge."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    cut = image[:h, :w]
    return reduce(cut.reshape(h // factor, factor, w // factor, factor, *cut.shape[2:]), axis=(1, 3))


def _thumbnail(name: str, candidate: np.ndarray, reference: np.ndarray) -> Thumbnail:
    """Both images on the reference's own scale as 8-bit RGB, and the absolute difference as 8-bit levels."""
    cand = np.nan_to_num(np.moveaxis(candidate, 0, -1), nan=0.0, posinf=0.0, neginf=0.0)
    ref = np.moveaxis(reference, 0, -1)
    if ref.shape[-1] == 1:
        cand, ref = np.repeat(cand, 3, axis=-1), np.repeat(ref, 3, axis=-1)
    factor = max(1, math.ceil(max(ref.shape[:2]) / THUMBNAIL_SIDE))
    # Block maximum keeps a one-pixel difference visible after shrinking; means suit the images.
    diff = _blocks(np.abs(cand - ref).max(axis=-1), factor, np.max)
    low, high = float(ref.min()), float(ref.max())
    span = high - low if high > low else 1.0

    def rgb(image: np.ndarray) -> str:
        scaled = np.clip((_blocks(image, factor, np.mean) - low) / span * 255.0, 0, 255)
        return base64.b64encode(np.round(scaled).astype(np.uint8).tobytes()).decode("ascii")

    peak = float(diff.max(initial=0.0))
    levels = np.round(diff / peak * 255.0) if peak > 0 else np.zeros_like(diff)
    return Thumbnail(name=name, height=int(diff.shape[0]), width=int(diff.shape[1]), reference=rgb(ref),
                     candidate=rgb(cand), difference=base64.b64encode(levels.astype(np.uint8).tobytes()).decode("ascii"),
                     difference_max=peak)


def _required_atol(diff: np.ndarray, ref_abs: np.ndarray, rtol: float) -> float:
    """The smallest atol with ``diff <= atol + rtol * |ref|`` at every finite element, at float64 rounding.

    Non-finite elements are counted as mismatches elsewhere; no atol covers them, so they are left out.
    """
    slack = rtol * ref_abs
    keep = np.isfinite(diff) & np.isfinite(slack)
    diff, slack = diff[keep], slack[keep]
    atol = float(np.maximum(diff - slack, 0.0).max(initial=0.0))
    # The subtraction can round one ulp low; step up (a bounded number of times) until the criterion agrees.
    for _ in range(_ULP_STEPS):
        if (diff <= atol + slack).all():
            return atol
        atol = float(np.nextafter(atol, np.inf))
    return float(diff.max(initial=0.0))  # always sufficient, since slack >= 0


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # huge values: a non-finite cosine, below
        dot = (a * b).sum(axis=1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        # Two zero rows are identical; one zero row against a non-zero row shares no direction.
        cos = np.where(norms > 0, dot / norms, np.where((a == b).all(axis=1), 1.0, 0.0))
    return np.where(np.isfinite(cos), cos, -1.0)
