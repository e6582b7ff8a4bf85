"""Decisions a service makes from a pipeline's numbers, and which of them flip against the reference.

Each function compares candidate and reference arrays and returns a `DecisionFlips`: the flips
outside a near-tie band fail a gate; flips where the reference sits within the band of the
decision boundary are near-ties, reported and not failed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from parity.judge.flip_rate import CONFIDENCE, describe_bound, flip_rate_bound, samples_for_rate
from parity.results import DecisionFlips

__all__ = ["threshold_flips", "argmax_flips", "pair_cosines", "verification_flips", "bound_flip_rates"]


def threshold_flips(threshold: float, got: np.ndarray, ref: np.ndarray, band: float, names: list[str]) -> DecisionFlips:
    """Multi-label decisions: output > threshold. A flip where the reference sits within ``band`` of it is a near-tie."""
    flipped = (got > threshold) != (ref > threshold)
    near = flipped & (np.abs(ref - threshold) <= band)
    return DecisionFlips("threshold", threshold, band, int(ref.size),
                         tuple(f"{names[i]}[{j}]" for i, j in zip(*np.nonzero(flipped & ~near))),
                         tuple(f"{names[i]}[{j}]" for i, j in zip(*np.nonzero(near))), unit="outputs")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def argmax_flips(got: np.ndarray, ref: np.ndarray, band: float, names: list[str]) -> DecisionFlips:
    """Top-1 classes; a near-tie is a reference whose top-2 logits are within two budgets of each other."""
    top_ref, top_got = ref.argmax(axis=1), got.argmax(axis=1)
    ordered = np.sort(ref, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    flipped = top_ref != top_got
    near = flipped & (margin <= 2 * band)  # each logit may move by the budget
    label = [f"{names[i]}: class {top_ref[i]} -> {top_got[i]}" for i in range(len(names))]
    prob = float(np.abs(_softmax(got.astype(np.float64)) - _softmax(ref.astype(np.float64))).max()) if ref.size else 0.0
    return DecisionFlips("argmax", None, 2 * band, len(names), tuple(label[i] for i in np.nonzero(flipped & ~near)[0]),
                         tuple(label[i] for i in np.nonzero(near)[0]), max_probability_error=prob)


def pair_cosines(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, cosine)`` for every pair of rows ``i < j``, computed in float64."""
    e = embeddings.astype(np.float64)
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(unit), k=1)
    return i, j, (unit @ unit.T)[i, j]


def verification_flips(threshold: float, got: np.ndarray, ref: np.ndarray, band: float,
                        names: list[str]) -> DecisionFlips:
    """Pairs of samples judged the same identity when their embeddings' cosine reaches ``threshold``."""
    i, j, c_ref = pair_cosines(ref)
    c_got = pair_cosines(got)[2]
    flipped = (c_got >= threshold) != (c_ref >= threshold)
    near = flipped & (np.abs(c_ref - threshold) <= band)
    label = [f"{names[a]} ~ {names[b]}: cos {r:.4f} -> {g:.4f}" for a, b, r, g in zip(i, j, c_ref, c_got)]
    return DecisionFlips("verification", threshold, band, len(label),
                         tuple(label[k] for k in np.nonzero(flipped & ~near)[0]),
                         tuple(label[k] for k in np.nonzero(near)[0]), unit="pairs")


def bound_flip_rates(found: list[DecisionFlips], max_flip_rate: float | None, *,
                     confidence: float = CONFIDENCE) -> tuple[list[DecisionFlips], list[str], list[str]]:
    """Each kind of decision with its flip-rate bound, the statements, and why ``max_flip_rate`` fails (if it does).

    A statement reads ``argmax: 0 flips in 300 samples: flip rate below 1.0 % at 95 % confidence``.
    """
    bounded, statements, exceeded = [], [], []
    for d in found:
        bound = flip_rate_bound(d.changed, d.total, confidence=confidence)
        d = replace(d, flip_rate_bound=bound, confidence=confidence)
        bounded.append(d)
        statements.append(f"{d.kind}: {describe_bound(d.changed, d.total, bound, unit=d.unit, confidence=confidence)}")
        if max_flip_rate is not None and bound > max_flip_rate:
            need = samples_for_rate(max_flip_rate, confidence=confidence)
            exceeded.append(
                f"{d.kind}: the flip-rate bound {100 * bound:.2f} % exceeds [decisions].max_flip_rate = "
                f"{100 * max_flip_rate:g} % ({d.changed} changed of {d.total} {d.unit}); "
                + (f"Fix: gate on at least {need} {d.unit} (with no flip) to state a rate below "
                   f"{100 * max_flip_rate:g} %, or remove the flips" if d.changed == 0 or need > d.total
                   else "Fix: remove the flips: the observed rate itself is too high"))
    return bounded, statements, exceeded
