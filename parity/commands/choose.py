"""`parity choose`: run the deployment matrix and name, per device, the fastest configuration that passes.

The deployment matrix varies only what changes how the model computes (device, dtype, batch size
and, when the spec's ``[matrix]`` lists them, TF32, the attention kernel and quantization), never the
preprocessing or extraction: those are the spec's. Every cell is judged exactly as `parity matrix`
judges it (its precision's budget, plus batch dependence), then cells are ranked by their measured
per-image p50 latency (`parity.results.CellCost`); timing picks among passing cells, it never makes
one pass. The Pareto front weighs latency against the decisions' flip-rate bound and the max abs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from parity.commands.matrix import run_matrix
from parity.commands.repair import INT8, REPAIRABLE, repair_precision
from parity.errors import SpecError
from parity.model.quantize import DYNAMIC_INT8
from parity.results import CellResult, Choice, MatrixReport, Status
from parity.spec import Spec

__all__ = ["DEPLOYMENT_AXES", "deployment_axes", "choose", "pareto_front"]

# The axes a deployment chooses; the others (preprocessing, extraction) are the spec's.
DEPLOYMENT_AXES = ("device", "dtype", "batch_size", "tf32", "sdpa", "runtime", "quantize", "threads")


def deployment_axes(spec: Spec, device: str | None = None) -> dict[str, dict[str, tuple]]:
    """Per device, the axes its cells vary: the spec's ``[matrix]`` deployment axes, else float32 and
    bfloat16 (float16 too on CUDA) at batch sizes 1 and 8."""
    if device is not None:
        devices: Sequence[str] = ("cuda" if device.startswith("cuda") else "cpu",)
    else:
        devices = spec.matrix.get("device", ("cuda" if spec.runtime.device.startswith("cuda") else "cpu",))
    axes = {}
    for name in devices:
        own = {a: tuple(v) for a, v in spec.matrix.items() if a in DEPLOYMENT_AXES and a != "device"}
        own.setdefault("dtype", ("float32", "bfloat16", "float16") if name == "cuda" else ("float32", "bfloat16"))
        own.setdefault("batch_size", (1, 8))
        axes[name] = {**own, "device": (name,)}
    return axes


def choose(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None,
           budget_ms: float | None = None, repeat: int = 1, repair: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Choice:
    """Run the deployment matrix and pick, per device, the passing cell with the lowest per-image p50 latency.

    Args:
        budget_ms: when given, only cells whose per-image p50 latency is at most this many ms are chosen.
        repeat: timed passes per cell (`run_matrix`).
        repair: for each CPU float16/bfloat16 (or dynamic_int8, or onnxruntime's static int8) cell that drifts
            from the reference (not from its batch-mates), search the modules to keep in float32 (or unquantized)
            (`parity.commands.repair`), confirmed by re-running the cell.

    Raises:
        SpecError: a negative budget, or a spec the matrix cannot run.
    """
    if budget_ms is not None and not budget_ms > 0:
        raise SpecError(f"--budget-ms must be a positive number of milliseconds, got {budget_ms!r}")
    reports = [run_matrix(spec, fixtures=fixtures, axes=axes, device=name, repeat=repeat, progress=progress)
               for name, axes in deployment_axes(spec, device).items()]
    report = _merged(reports)
    chosen: dict[str, str | None] = {}
    for result in report.cells:
        name = result.cell["device"]
        chosen.setdefault(name, None)
        if not _eligible(result, budget_ms):
            continue
        best = chosen[name]
        if best is None or result.cost.latency_p50_ms < report.cell(best).cost.latency_p50_ms:
            chosen[name] = result.cell.id
    repairs = []
    if repair:
        # eager and compiled cells share the eager repair; a static int8 cell is repaired on onnxruntime
        failing = {(r.cell["dtype"], r.cell["quantize"], r.cell["batch_size"],
                    "onnxruntime" if r.cell["quantize"] == INT8 else "eager") for r in report.cells
                   if r.status is Status.FAIL and r.cell["device"] == "cpu" and _repairable(r)}
        repairs = [repair_precision(spec, dtype=dtype, fixtures=fixtures, batch_size=size, quantize=quantize,
                                    runtime=runtime)
                   for dtype, quantize, size, runtime in sorted(failing)]
    return Choice(report=report, chosen=chosen, pareto=pareto_front(report.cells), budget_ms=budget_ms,
                  repairs=tuple(repairs))


def _repairable(result: CellResult) -> bool:
    """A cell that drifts from the reference at reduced precision or quantized (torch's dynamic int8, or
    onnxruntime's static int8), not from its batch-mates."""
    cell = result.cell
    reduced = (cell["dtype"] in REPAIRABLE and cell["quantize"] == "none"
               or cell["quantize"] == DYNAMIC_INT8 and cell["dtype"] == "float32"
               or cell["quantize"] == INT8 and cell["runtime"] == "onnxruntime" and cell["dtype"] == "float32")
    batched = all(c is None or c for c in (result.batch_comparison, result.batch_outputs))
    return reduced and batched and result.comparison is not None


def _eligible(result: CellResult, budget_ms: float | None) -> bool:
    return (result.status is Status.PASS and result.cost is not None
            and (budget_ms is None or result.cost.latency_p50_ms <= budget_ms))


def pareto_front(cells: Sequence[CellResult]) -> tuple[str, ...]:
    """Ids of the cells that ran and that no other cell beats on all of p50 latency, flip-rate bound and max abs
    (ties kept). A cell without a flip-rate bound (no [decisions], no head outputs) counts as 0 on it."""
    ran = [r for r in cells if r.cost is not None and r.comparison is not None and r.comparison.shapes_match]

    def point(r: CellResult) -> tuple[float, float, float]:
        return r.cost.latency_p50_ms, r.flip_bound or 0.0, r.comparison.max_abs

    front = []
    for r in ran:
        p = point(r)
        if not any(all(a <= b for a, b in zip(point(o), p)) and point(o) != p for o in ran):
            front.append(r.cell.id)
    return tuple(front)


def _merged(reports: Sequence[MatrixReport]) -> MatrixReport:
    """One report of several devices' runs (each run its own device's dtypes)."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    cells = tuple(c for r in reports for c in r.cells)
    axes = tuple(dict.fromkeys(a for r in reports for a in r.axes)) + (("device",) if "device" not in first.axes else ())
    return MatrixReport(spec=first.spec, fixtures=first.fixtures, cells=cells, axes=axes,
                        equivalent_modes=tuple(dict.fromkeys(m for r in reports for m in r.equivalent_modes)),
                        reference_dtype=first.reference_dtype)
