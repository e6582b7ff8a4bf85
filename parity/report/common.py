"""What the Markdown, HTML and JUnit renderers share: number words, stage wording, fixes, caps."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["COST_COLUMNS", "cost_cells", "head_cells", "number", "stage_headline", "fixes", "evidence", "first_failure", "cause_rows", "worst_samples", "SHOWN_SAMPLES"]

# Per-sample tables show at most this many rows (the worst), with the count of the rest.
SHOWN_SAMPLES = 20


def number(value: float | None) -> str:
    """Three significant digits, scientific below 1e-3; ``-`` for a missing value (JSON null)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def stage_headline(stage: dict[str, Any]) -> str:
    """The stage's own headline, or the wording the console uses when it has none."""
    if stage.get("headline"):
        return stage["headline"]
    return "within tolerance" if stage["status"] == "PASS" else "drifted beyond tolerance"


def evidence(stage: dict[str, Any]) -> str:
    """A short clause with the comparison's counts, e.g. ``12 of 4096 values outside atol 1e-05, rtol 0``."""
    c = stage.get("comparison")
    if not c or stage["status"] != "FAIL":
        return ""
    if c["candidate_shape"] != c["reference_shape"]:
        return f"shapes differ: candidate {c['candidate_shape']}, reference {c['reference_shape']}"
    text = f"{c['mismatched']} of {c['total']} values outside {c['tolerance']['text']}; max abs {number(c['max_abs'])}"
    if c.get("min_cosine") is not None:
        text += f", min cosine {c['min_cosine']:.6f}"
    return text


def fixes(check: dict[str, Any]) -> list[str]:
    """Every distinct fix line of a check document, the first failing stage's first, without the ``Fix:`` prefix."""
    first = first_failure(check)
    ordered = ([first] if first is not None else []) + [s for s in check["stages"] if s is not first]
    found = [fix.removeprefix("Fix:").strip() for stage in ordered for fix in stage.get("fixes", [])]
    return list(dict.fromkeys(found))


def first_failure(check: dict[str, Any]) -> dict[str, Any] | None:
    name = check.get("first_failure")
    return next((s for s in check["stages"] if s["stage"] == name), None)


def cause_rows(causes: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    """(change, spec has, stage metric, before, after, verdict) per ranked cause."""
    return [(cause["toml"], cause["current"], f"{cause['stage']} {cause['metric']}", f"{cause['before']:.2e}",
             f"{cause['after']:.2e}", "reproduces the reference" if cause["reproduces"] else "moves towards it")
            for cause in causes]


def worst_samples(comparison: dict[str, Any], limit: int = SHOWN_SAMPLES) -> tuple[list[dict[str, Any]], int]:
    """The ``limit`` samples with the largest max abs error (descending) and how many samples there are."""
    samples = comparison.get("samples") or []
    ranked = sorted(samples, key=lambda s: -(s["max_abs"] if s["max_abs"] is not None else math.inf))
    total = comparison["candidate_shape"][0] if comparison.get("candidate_shape") else len(samples)
    return ranked[:limit], max(total, len(samples))


# A matrix cell's cost columns (parity.results.CellCost), beside its verdict in every report.
COST_COLUMNS = ("p50 ms", "p95 ms", "img/s")


def cost_cells(cost: dict[str, Any] | None) -> tuple[str, str, str]:
    """A cell's cost (its JSON form) as the tables show it: per-image p50 and p95 latency in ms, images/s."""
    if not cost:
        return ("-", "-", "-")
    return (f"{cost['latency_p50_ms']:.3g}", f"{cost['latency_p95_ms']:.3g}", f"{cost['throughput']:.4g}")


def head_cells(cell: dict[str, Any]) -> tuple[str, str]:
    """A matrix cell's head columns (its JSON form): the outputs' max abs, and the flip-rate bound with the
    changed decisions in brackets; ``-`` where the cell did not run the head or has no decisions."""
    outputs = cell.get("outputs")
    bound = cell.get("flip_bound")
    return ("-" if not outputs else number(outputs["max_abs"]), flip_bound_text(bound, cell.get("flips")))


def flip_bound_text(bound: float | None, flips: int | None) -> str:
    """A cell's flip-rate bound and changed decisions, e.g. ``4.3 % (0)``; ``-`` without decisions."""
    return "-" if bound is None else f"{100 * bound:.3g} % ({flips})"
