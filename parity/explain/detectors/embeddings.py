"""Embeddings that are the reference's up to a scale: an L2 norm added or left out, a batch-wide norm, a constant.

Each is a pure change of length (the cosine stays ~1), so it is tested as one: every row of the
shipped embeddings must be its reference row times a factor within the embedding budget, and the
pattern of the factors names the operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.explain.detectors.evidence import Evidence, fit, number
from parity.results import Finding, Tolerance

__all__ = ["ScaleFit", "fit_scale", "findings"]

_UNIT = 1e-3  # a row norm within this of 1 is unit-norm (float32 L2 normalisation lands far closer)
_SAME = 1e-4  # relative spread under which factors are one constant
_MAX_BATCH = 256  # batch sizes tried beyond the whole set


@dataclass(frozen=True)
class ScaleFit:
    """What scaled the embeddings.

    ``kind``: ``l2_added`` (the shipped code L2-normalises each row; the reference did not),
    ``l2_missing`` (the reference rows are unit-norm, the shipped ones are not), ``batch_norm``
    (one norm over each batch of ``batch`` rows, ``x / x.norm()``), ``scale`` (one constant
    ``factors[0]``) or ``row_scale`` (a factor per row that no norm explains).
    """

    kind: str
    factors: tuple[float, ...]
    max_abs: float
    batch: int = 0


def _batch(factors: np.ndarray, ref_sq: np.ndarray) -> int | None:
    """The batch size b >= 2 for which each row's factor is 1 / the norm of its batch of b rows, if any."""
    n = len(factors)
    cumulative = np.concatenate([[0.0], np.cumsum(ref_sq)])
    for b in sorted({*range(2, min(n, _MAX_BATCH) + 1), n}):
        starts = (np.arange(n) // b) * b
        norms = np.sqrt(cumulative[np.minimum(starts + b, n)] - cumulative[starts])
        if np.all(np.abs(factors * norms - 1) < _UNIT):
            return b
    return None


def fit_scale(observed: Any, reference: Any, tolerance: Tolerance) -> ScaleFit | None:
    """The per-row scale that takes ``reference`` to ``observed`` within ``tolerance``, named, or ``None``.

    ``None`` also when the factors are all 1 (the identity) or a row is all zeros.
    """
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if obs.shape != ref.shape or obs.ndim != 2 or not obs.size or not np.isfinite(obs).all():
        return None
    ref_sq = np.square(ref).sum(axis=1)
    if (ref_sq == 0).any():
        return None
    factors = (obs * ref).sum(axis=1) / ref_sq
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6) or (factors <= 0).any():
        return None
    result = fit(obs, ref * factors[:, None], tolerance, cosine=True)
    if not result.passed:
        return None
    kept = tuple(float(f) for f in factors)
    # A norm over a batch gives its rows one factor, 1 / the batch's norm (checked first: a batch
    # norm of unit rows also leaves rows that are not unit-norm).
    batch = _batch(factors, ref_sq) if len(obs) > 1 else None
    if batch is not None:
        return ScaleFit("batch_norm", kept, result.max_abs, batch=batch)
    # Unit rows on one side only name an L2 norm even when every row has the same length (a LayerNorm
    # output has norm sqrt(D) for every row, so its L2 normalisation is a constant factor).
    ref_unit = np.abs(np.sqrt(ref_sq) - 1) < _UNIT
    obs_unit = np.abs(np.linalg.norm(obs, axis=1) - 1) < _UNIT
    if obs_unit.all() and not ref_unit.all():
        return ScaleFit("l2_added", kept, result.max_abs)
    if ref_unit.all() and not obs_unit.all():
        return ScaleFit("l2_missing", kept, result.max_abs)
    if len(obs) > 1 and np.ptp(factors) <= _SAME * abs(factors.mean()):
        return ScaleFit("scale", (kept[0],), result.max_abs)
    return ScaleFit("row_scale", kept, result.max_abs)


def _words(found: ScaleFit, reference_unit: bool, at: str) -> tuple[str, str, str]:
    """(cause, what reproduces it, fix)."""
    factors = found.factors
    if found.kind == "l2_added":
        return ("the shipped code L2-normalises each embedding before the head; the head was trained on "
                "embeddings that are not normalised",
                "the reference embeddings divided by their L2 norms",
                f"Change the shipped code: pass the backbone's embedding to the head as it is, without the "
                f"normalisation{at}")
    if found.kind == "l2_missing":
        return ("the shipped code passes embeddings that are not L2-normalised; the reference normalised them "
                "(its rows have unit norm)",
                "the reference embeddings times the shipped embeddings' norms",
                f"Change the shipped code: normalise each embedding with `torch.nn.functional.normalize(x, dim=-1)` "
                f"before the head{at}")
    if found.kind == "batch_norm":
        rows = "the whole set of rows" if found.batch >= len(factors) else f"each batch of {found.batch} rows"
        per_row = ("normalise each row instead, `torch.nn.functional.normalize(x, dim=-1)`" if reference_unit
                   else "remove the normalisation")
        return ("the shipped code divides the embeddings by one norm over the whole batch (`x / x.norm()`), so "
                "each sample's embedding depends on the others in its batch",
                f"the reference embeddings divided by one L2 norm over {rows}",
                f"Change the shipped code: {per_row}{at}")
    if found.kind == "scale":
        return (f"the shipped code multiplies the embeddings by {factors[0]:.6g}",
                f"the reference embeddings times {factors[0]:.6g}",
                f"Change the shipped code: pass the embeddings to the head unscaled{at}")
    return (f"the shipped code rescales each embedding by a factor of its own ({min(factors):.4g} to "
            f"{max(factors):.4g}) that no L2 norm explains",
            "the reference embeddings each times a factor of their own",
            f"Change the shipped code: pass the backbone's embedding to the head unscaled{at}")


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """A change of scale that reproduces the failing embedding stage."""
    run, fixture = evidence.run, evidence.fixture
    rows: Sequence[int] = list(run.rows)
    if not evidence.failing("embedding") or run.embeddings is None or not rows:
        return {}
    reference = fixture.embeddings[rows]
    tolerance = evidence.tolerance("embedding")
    found = fit_scale(run.embeddings, reference, tolerance)
    if found is None:
        return {}
    reference_unit = bool((np.abs(np.linalg.norm(np.asarray(reference, np.float64), axis=1) - 1) < _UNIT).all())
    cause, how, fix = _words(found, reference_unit, evidence.at("head", "backbone"))
    return {"embedding": [Finding(
        detector=f"embeddings.{found.kind}", stage="embedding", cause=cause,
        evidence=(f"{how} reproduce the shipped embeddings of {len(rows)} samples: max abs {number(found.max_abs)}, "
                  f"cosine unchanged ({tolerance.describe()})"),
        fix=fix, where=evidence.where("head", "backbone"), max_abs=found.max_abs)]}
