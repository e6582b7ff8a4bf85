"""Array comparison: assert_close-style element checks plus per-row cosine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from parity.results import Comparison, SampleError, Tolerance

__all__ = ["compare_arrays"]

WORST_SAMPLES = 3
_ULP_STEPS = 64


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
    )


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
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Two zero rows are identical; one zero row against a non-zero row shares no direction.
        cos = np.where(norms > 0, dot / norms, np.where((a == b).all(axis=1), 1.0, 0.0))
    return np.where(np.isfinite(cos), cos, -1.0)
