"""How sure a count of decision flips makes us: the one-sided upper Clopper–Pearson bound on the flip rate.

With ``k`` flips in ``n`` independent decisions, the exact (Clopper–Pearson) upper bound at
confidence ``c`` is the ``c`` quantile of ``Beta(k + 1, n - k)``; with no flip it reduces to
``1 - (1 - c) ** (1 / n)``, the "rule of three" (about 3/n at 95 %).
"""

from __future__ import annotations

import math

__all__ = ["CONFIDENCE", "flip_rate_bound", "samples_for_rate", "describe_bound"]

CONFIDENCE = 0.95


def flip_rate_bound(flips: int, total: int, *, confidence: float = CONFIDENCE) -> float:
    """The upper ``confidence`` Clopper–Pearson bound on the rate behind ``flips`` of ``total``.

    Raises:
        ValueError: ``flips`` outside ``0..total`` or ``confidence`` outside (0, 1).
    """
    if not 0 <= flips <= total:
        raise ValueError(f"flips must be within 0..total, got {flips} of {total}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if total == 0 or flips == total:
        return 1.0  # no evidence, or every decision flipped: nothing bounds the rate below 1
    if flips == 0:
        # Beta(1, n)'s quantile in closed form, 1 - (1 - c) ** (1 / n): the common case (parity) needs no scipy.
        return -math.expm1(math.log1p(-confidence) / total)
    # The Beta quantile itself (what scipy.stats.beta.ppf calls): scipy.special imports in a fraction
    # of the time scipy.stats takes, which every gate run would pay before its first forward.
    from scipy.special import betaincinv

    return float(betaincinv(flips + 1, total - flips, confidence))


def samples_for_rate(rate: float, *, confidence: float = CONFIDENCE) -> int:
    """How many decisions, none flipped, bound the flip rate below ``rate`` at ``confidence``."""
    if not 0.0 < rate < 1.0:
        return 1 if rate >= 1.0 else 0
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rate))


def describe_bound(flips: int, total: int, bound: float, *, unit: str = "samples",
                   confidence: float = CONFIDENCE) -> str:
    """``0 flips in 300 samples: flip rate below 1.0 % at 95 % confidence``."""
    return (f"{flips} flip{'' if flips == 1 else 's'} in {total} {unit}: flip rate below {100 * bound:.1f} % "
            f"at {100 * confidence:g} % confidence")
