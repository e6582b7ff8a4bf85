"""Rendering of reports: console (rich), plain text and JSON. No math happens here."""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.judge.tolerance import calibrated_tolerance
from parity.report.common import COST_COLUMNS, cost_cells, flip_bound_text
from parity.store.checkpoints import explain_key_diff
from parity.store.forensics import describe_layers, module_source
from parity.preprocess.diff import PreprocessExplanation, format_field_value
from parity.results import (REPORT_SCHEMA_VERSION, Calibration, Choice, PrecisionRepair, Change, CheckpointSummary, Comparison, Diagnosis,
                            Finding, KeyDiff, MatrixReport, Referee, Report, ServiceDiagnosis, StageResult, Status,
                            Verdict)

__all__ = ["render_report", "render_referee", "render_text", "render_inspection", "render_config_diffs",
           "render_matrix", "render_choice", "choice_line", "choice_rows", "render_diagnosis", "format_stage", "to_json", "write_json", "document", "SCHEMA_VERSION"]

# Version of the JSON layout that `document` writes and the file renderers (parity.report.files) read.
SCHEMA_VERSION = REPORT_SCHEMA_VERSION

_SHOWN_TENSORS = 12
_STYLE = {Status.PASS: "bold green", Status.FAIL: "bold red", Status.SKIP: "yellow"}


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _metric(result: StageResult) -> tuple[str, str, str]:
    """(metric name, value, tolerance) for the summary table."""
    c = result.comparison
    if c is None:
        if result.status is Status.SKIP and result.headline.startswith("not observable"):
            return "-", result.headline, "-"  # never a bare "-" that reads like "nothing to check"
        if result.stage == "load":
            if result.status is Status.PASS or result.key_diffs:
                return "strict keys", "all match" if result.status is Status.PASS else "mismatch", "strict=True"
            return "strict keys", result.headline, "strict=True"  # not observable, or the candidate did not start
        if result.stage == "weights" and result.status is not Status.SKIP:
            return "sha256 per tensor", result.headline, "bit-identical"
        if result.stage == "decisions" and result.decisions:
            value = "; ".join(f"{d.kind} {len(d.flips)} / {len(d.near_ties)} of {d.total}" for d in result.decisions)
            bounds = "; ".join(f"{d.kind} {d.threshold:g}" if d.threshold is not None else d.kind
                               for d in result.decisions)
            return "flips / near-ties", value, bounds
        if result.stage == "decode":
            return "readable samples", result.headline.split(";")[0], "all"
        return "-", "-", "-"
    if not c.shapes_match:
        return "shape", f"{list(c.candidate_shape)} vs {list(c.reference_shape)}", "equal shapes"
    value = f"max abs {_num(c.max_abs)}"
    if c.min_cosine is not None:
        value += f", min cos {c.min_cosine:.6f}"
    return "max abs" + (", cosine" if c.min_cosine is not None else ""), value, c.tolerance.describe()


def _comparison_lines(c: Comparison) -> list[str]:
    if not c.shapes_match:
        return [f"Shapes differ: candidate {list(c.candidate_shape)}, reference {list(c.reference_shape)}"]
    lines = [
        f"Number of differences: {c.mismatched} / {c.total} "
        f"({100 * c.mismatched / max(c.total, 1):.1f}%) outside {c.tolerance.describe()} [{c.tolerance.origin}]",
        f"max abs {_num(c.max_abs)}, mean abs {_num(c.mean_abs)}, max rel {_num(c.max_rel)}"
        + (f", min cosine {c.min_cosine:.6f}" if c.min_cosine is not None else ""),
    ]
    if c.nonfinite:
        lines.append(f"{c.nonfinite} non-finite value(s) (NaN/Inf) in the candidate")
    if c.mismatched:
        lines.append(f"Would pass with atol >= {_num(c.required_atol)} at rtol {c.tolerance.rtol:.1e}")
    if c.worst:
        worst = ", ".join(
            f"{s.name} ({_num(s.max_abs)}" + (f", cos {s.cosine:.6f}" if s.cosine is not None else "") + ")"
            for s in c.worst
        )
        lines.append(f"Worst samples: {worst}")
    return lines


def format_stage(result: StageResult) -> str:
    """Plain-text account of one stage: headline, then evidence, then notes and fixes."""
    headline = result.headline or (
        "within tolerance" if result.status is Status.PASS else "drifted beyond tolerance"
    )
    lines = [f"{result.stage}: {result.status.value} - {headline}"]
    if result.comparison is not None and result.status is Status.FAIL:
        lines += [f"  {line}" for line in _comparison_lines(result.comparison)]
    for diff in result.key_diffs:
        lines += [f"  {line}" for line in explain_key_diff(diff).splitlines()]
    for d in result.decisions:
        if d.flips:
            lines.append(f"  {d.kind} flips: {', '.join(d.flips[:12])}" + (" ..." if len(d.flips) > 12 else ""))
        if d.near_ties:
            lines.append(f"  {d.kind} near-ties (the reference is within {d.band:.2g} of the boundary): "
                         f"{', '.join(d.near_ties[:12])}")
        if d.max_probability_error is not None:
            lines.append(f"  {d.kind}: largest softmax probability change {_num(d.max_probability_error)}")
    for name, reason in result.sample_errors:
        lines.append(f"  {name}: {reason}")
    for finding in result.findings:
        lines += [f"  {line}" for line in finding_lines(finding)]
    for t in result.tensor_diffs[:_SHOWN_TENSORS]:
        lines.append(f"  {t.part}.{t.name}: " + (f"max abs {_num(t.max_abs)}" if t.max_abs is not None else t.reason))
    if len(result.tensor_diffs) > _SHOWN_TENSORS:
        lines.append(f"  ... and {len(result.tensor_diffs) - _SHOWN_TENSORS} more")
    lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines)


def finding_lines(finding: Finding) -> list[str]:
    """A finding as the console and report.md say it: cause with where it was seen, the evidence, the fix."""
    where = f" ({finding.where})" if finding.where else ""
    lines = [f"Cause: {finding.cause.rstrip('.')}{where}", f"  Evidence: {finding.evidence}", f"Fix: {finding.fix}"]
    if finding.spec_fix:
        lines.append("  Or, if the shipped code is right, rebuild the fixture with this in the spec:")
        lines += [f"    {line}" for line in finding.spec_fix.splitlines()]
    return lines


def render_report(report: Report, console: Console) -> None:
    """Print the summary table, the failing stages' evidence and the configuration diff."""
    # Provenance first: a drift is read next to the change that likely caused it.
    render_config_diffs(report.config_diffs, console)
    table = Table(title=f"parity check: {Path(report.spec).name} on {report.device}/{report.dtype}",
                  title_justify="left")
    for column in ("stage", "metric", "value", "tolerance", "verdict"):
        table.add_column(column, no_wrap=column in ("stage", "verdict"))
    for result in report.stages:
        metric, value, tolerance = _metric(result)
        table.add_row(result.stage, metric, value, tolerance, Text(result.status.value, style=_STYLE[result.status]))
    console.print(table)
    origins = dict.fromkeys(r.comparison.tolerance.origin for r in report.stages if r.comparison is not None)
    if origins:  # a failed load compares nothing: no budget to name
        console.print(f"tolerances: {'; '.join(origins)}", highlight=False, soft_wrap=True)
    for result in report.stages:  # a failing stage prints its notes below; a passing one states its bound here
        if result.stage == "decisions" and result.status is Status.PASS:
            for note in result.notes:
                console.print(f"decisions: {note}", highlight=False, soft_wrap=True)
    for result in report.stages:
        if result.status is Status.FAIL:
            console.print(Text(format_stage(result), style="red" if result is report.first_failure else ""),
                          highlight=False, soft_wrap=True)
    console.print(Text(verdict_line(report), style=_VERDICT_STYLE[report.passed, report.verdict is Verdict.PARITY]))
    cause = report.cause
    if cause is not None:  # the verdict's last words: what the shipped code does, then what to change
        console.print(Text(f"Cause: {cause.cause.rstrip('.')}" + (f" ({cause.where})" if cause.where else ""), style="bold"),
                      highlight=False, soft_wrap=True)
        console.print(Text(f"Fix: {cause.fix}", style="bold"), highlight=False, soft_wrap=True)


_VERDICT_STYLE = {(True, True): "bold green", (True, False): "bold yellow", (False, False): "bold red",
                  (False, True): "bold red"}


def verdict_line(report: Report) -> str:
    """One sentence: parity, drift that flips no decision, decision flips, drift, or no verdict
    (of one shard's samples, for a partial report)."""
    return _shard_prefix(report.shard) + _verdict_sentence(report)


def _verdict_sentence(report: Report) -> str:
    first = report.first_failure
    verdict = report.verdict
    if verdict is Verdict.PARITY:
        return "PARITY: the candidate reproduces the reference."
    if verdict is Verdict.NO_VERDICT:
        return "NO VERDICT: no stage was compared."
    decisions = next((s.decisions for s in report.stages if s.stage == "decisions"), ())
    counted = ", ".join(f"{len(d.flips)} of {d.total} {d.kind}" for d in decisions)
    if verdict is Verdict.DECISION_FLIPS:
        return f"DECISION FLIPS: {counted} decisions flipped; first drifted stage: {first.stage}."
    if verdict is Verdict.DRIFT_NO_FLIPS:
        # Only numeric drift can be accepted by the decisions gate; a sample that did not decode never can.
        blocking = [s.stage for s in report.stages if s.status is Status.FAIL
                    and s.stage not in ("pixels", "embedding", "head", "outputs", "decisions")]
        accepted = (" Accepted: [decisions].gate = \"decisions\"." if report.passed
                    else f" The gate fails on it: the {', '.join(blocking)} stage failed, which no gate accepts."
                    if blocking else " The gate fails on it." if report.cause is not None  # a named change is no noise
                    else " The gate fails on it ([decisions].gate = \"decisions\" would accept it).")
        return (f"DRIFT WITHOUT DECISION FLIPS: the numbers moved beyond tolerance (first at {first.stage}) "
                f"but no decision flipped ({counted}).{accepted}")
    if first.stage == "load" and first.key_diffs:
        return "DRIFT: first drifted stage: load (the weights do not load with strict=True; no later stage ran)."
    if first.stage == "load":  # the candidate itself did not start (its import raised, exited or hung)
        return "DRIFT: first drifted stage: load (the candidate did not start; no later stage ran)."
    return f"DRIFT: first drifted stage: {first.stage}."


def render_referee(referee: Referee, console: Console) -> None:
    """The float64 referee: per stage, the reference's RMSE against float64 next to each rounded run's, and the call."""
    console.print(f"referee (float64, {len(referee.samples)} samples: {', '.join(referee.samples)}; "
                  f"{referee.hypotheses}):", highlight=False, soft_wrap=True)
    for s in referee.stages:
        if s.reason:
            console.print(f"  {s.stage}: {s.reason}", highlight=False, soft_wrap=True)
            continue
        rounded = ", ".join(f"{label} {_num(e)}" for label, e in s.rounding)
        call = (f"within {s.explained_by} (x{s.multiplier:g} + tol/10)" if s.explained_by
                else f"beyond every rounding (x{s.multiplier:g} + tol/10)")
        console.print(f"  {s.stage}: reference RMSE {_num(s.reference_error)} vs float64; rounded runs: {rounded}; "
                      f"{call}", highlight=False, soft_wrap=True)
    if referee.explained:
        console.print(Text("REFEREE: the difference is explained by rounding"
                           + (f" (the reference's {referee.reduced_precision})" if referee.reduced_precision else "")
                           + ", not by a change of computation.", style="bold yellow"))
    else:
        console.print(Text("REFEREE: a change of computation: rounding does not explain the difference.",
                           style="bold red"))


def render_preprocess_explanation(explanation: PreprocessExplanation, console: Console) -> None:
    """The differing fields with their effect, then the measured pixels per image."""
    a, b = explanation.a, explanation.b
    console.print(f"A: {a.source} ({a.library})\nB: {b.source} ({b.library})", highlight=False)
    if explanation.differences:
        table = Table(title="Fields that differ", title_justify="left")
        for column in ("field", "A", "B", "effect"):
            table.add_column(column, no_wrap=column != "effect")
        for d in explanation.differences:
            table.add_row(d.field, format_field_value(d.a), format_field_value(d.b), d.effect)
        console.print(table)
    if explanation.images:
        table = Table(title="Measured on images (normalized pixels; [0, 1] gap before mean/std)", title_justify="left")
        for column in ("image", "size (h, w)", "max abs", "max abs [0, 1]", "crop shift (dy, dx)"):
            table.add_column(column, no_wrap=True)
        for image in explanation.images:
            shift = "-" if image.shift is None or image.shift == (0, 0) else str(image.shift)
            if image.shapes[0] != image.shapes[1]:
                gap = gap_unit = f"shapes {list(image.shapes[0])} vs {list(image.shapes[1])}"
            else:
                gap, gap_unit = _num(image.max_abs), _num(image.max_abs_unit)
            table.add_row(image.name, str(image.size), gap, gap_unit, shift)
        console.print(table)
    differing = sum(not image.identical for image in explanation.images)
    measured = f"; {differing} of {len(explanation.images)} images differ" if explanation.images else ""
    if explanation:
        console.print(Text(f"IDENTICAL: no field differs{measured}.", style="bold green"))
    else:
        console.print(Text(f"DIFFERENT: {len(explanation.differences)} field(s) differ{measured}.", style="bold red"))


def render_config_diffs(diffs, console: Console, *,
                        title: str = "Provenance: what differs from what the fixture recorded (reference -> candidate):") -> None:
    if diffs:
        console.print(title, style="bold")
    for diff in diffs:
        console.print(f"  {diff.field}: {diff.reference!r} -> {diff.candidate!r}", highlight=False, markup=False,
                      soft_wrap=True)


def render_text(report: Report | MatrixReport, *, width: int = 120) -> str:
    """The console rendering as plain text (for pytest summaries and logs)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, no_color=True, emoji=False, highlight=False)
    (render_matrix if isinstance(report, MatrixReport) else render_report)(report, console)
    return buffer.getvalue()


def render_inspection(summary: CheckpointSummary, console: Console, *, key_diff: KeyDiff | None = None) -> None:
    """`parity inspect`: nesting, tensors grouped by module, inferred architecture, and any key diff."""
    if summary.nested:
        console.print(f"nested checkpoint: state_dicts under {list(summary.nested)}; showing {summary.selected!r}"
                      + (f"; other entries {list(summary.other_entries)}" if summary.other_entries else ""),
                      highlight=False, soft_wrap=True)
    table = Table(title=f"{summary.path}: {len(summary.tensors)} tensors, {summary.total_params:,} parameters",
                  title_justify="left")
    for column in ("module", "inferred layer", "tensor", "shape", "dtype"):
        table.add_column(column)
    dtypes = {name: dtype for name, _, dtype in summary.tensors}
    for layer in summary.layers:
        for i, (leaf, shape) in enumerate(layer.tensors):
            name = f"{layer.path}.{leaf}" if layer.path else leaf
            table.add_row(layer.path if i == 0 else "", layer.call if i == 0 and layer.kind != "Tensors" else "",
                          leaf, str(list(shape)), dtypes.get(name, ""))
    console.print(table)
    for line in describe_layers(summary.layers):
        console.print(f"- {line}", highlight=False, soft_wrap=True)
    console.print("A module that loads these tensors with strict=True (structure only; forward is not recorded):")
    console.print(module_source(summary.layers), markup=False, highlight=False, soft_wrap=True)
    if key_diff is not None:
        if key_diff.loads:
            console.print(Text(f"{key_diff.source} loads into {key_diff.target} with strict=True.", style="bold green"),
                          soft_wrap=True)
            for name, module_dtype, ckpt_dtype in key_diff.dtype_mismatches:
                console.print(f"  note: {name} is {ckpt_dtype} in the checkpoint, {module_dtype} in the module (cast on load)",
                              highlight=False, soft_wrap=True)
        else:
            console.print(Text(explain_key_diff(key_diff), style="red"), highlight=False, soft_wrap=True)


def render_matrix(report: MatrixReport, console: Console) -> None:
    """The sensitivity table: one row per cell, then which axis values reproduce the reference."""
    table = Table(title=f"parity matrix: {Path(report.spec).name}, {len(report.cells)} cells", title_justify="left")
    for column in ("cell", "role", "max abs", "min cos", "out max abs", "flip bound", "verdict", *COST_COLUMNS):
        table.add_column(column, no_wrap=True, justify="right" if column in COST_COLUMNS else "left")
    tolerances: dict[str, str] = {}
    for result in report.cells:
        c = result.comparison
        if c is None:
            metrics = ("-", "-")
        else:
            tolerances.setdefault(str(result.cell["dtype"]), c.tolerance.describe())
            metrics = ((_num(c.max_abs), f"{c.min_cosine:.6f}") if c.shapes_match
                       else (f"shape {list(c.candidate_shape[1:])}", "-"))
        verdict = {Status.PASS: "PASS", Status.FAIL: "DRIFT", Status.SKIP: "SKIP"}[result.status]
        outputs = "-" if result.outputs is None else _num(result.outputs.max_abs)
        table.add_row(result.cell.id, "deploy" if result.cell.deployment else "probe", *metrics, outputs,
                      flip_bound_text(result.flip_bound, result.flips), Text(verdict, style=_STYLE[result.status]), *cost_cells(_plain(result.cost)))
    console.print(table)
    note = cost_note(report)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
    for result in report.cells:
        if result.reason and result.status is Status.FAIL:
            console.print(f"{result.cell.id}: {result.reason}", style="red", highlight=False, soft_wrap=True)
    for dtype, tolerance in tolerances.items():
        console.print(f"tolerance for {dtype} cells: {tolerance}", highlight=False)
    skipped = {r.reason for r in report.cells if r.status is Status.SKIP}
    for reason in sorted(skipped):
        console.print(f"skipped cells: {reason}", style="yellow", highlight=False)
    for axis in report.axes:
        values = list(dict.fromkeys(r.cell[axis] for r in report.cells if r.status is not Status.SKIP))
        good = report.reproducing(axis)
        if len(values) > 1:
            bad = [v for v in values if v not in good]
            console.print(f"{axis}: reproduces the reference with {', '.join(map(str, good)) or 'none'}"
                          + (f"; drifts with {', '.join(map(str, bad))}" if bad else ""), highlight=False, soft_wrap=True)
    for group in report.equivalent_modes:
        console.print(f"extraction modes {', '.join(group)} gave bit-identical embeddings for this model",
                      highlight=False, soft_wrap=True)
    console.print(Text(matrix_line(report), style="bold green" if report.passed else "bold red"))


def choice_rows(choice: Choice) -> list[dict[str, Any]]:
    """The Pareto table's rows, fastest first: cell, cost, max abs, verdict, on the front, chosen."""
    rows = []
    chosen = set(choice.chosen.values())
    for r in choice.report.cells:
        if r.cost is None:
            continue
        rows.append({"cell": r.cell.id, "device": r.cell["device"], "dtype": r.cell["dtype"],
                     "batch_size": r.cell["batch_size"], "p50_ms": r.cost.latency_p50_ms,
                     "p95_ms": r.cost.latency_p95_ms, "throughput": r.cost.throughput,
                     "max_abs": r.comparison.max_abs if r.comparison is not None else None,
                     "flip_bound": r.flip_bound, "flips": r.flips,
                     "verdict": {Status.PASS: "PASS", Status.FAIL: "DRIFT", Status.SKIP: "SKIP"}[r.status],
                     "pareto": r.cell.id in choice.pareto, "chosen": r.cell.id in chosen, "reason": r.reason})
    return sorted(rows, key=lambda row: (row["device"], row["p50_ms"]))


def render_choice(choice: Choice, console: Console) -> None:
    """The Pareto table of `parity choose` (latency p50 vs max abs vs verdict), then the chosen cell per device."""
    report = choice.report
    table = Table(title=f"parity choose: {Path(report.spec).name}, {len(report.cells)} deployment cells",
                  title_justify="left")
    for column in ("cell", "p50 ms", "p95 ms", "img/s", "max abs", "flip bound", "verdict", "pareto", "chosen"):
        table.add_column(column, no_wrap=True, justify="right" if column in COST_COLUMNS else "left")
    for row in choice_rows(choice):
        status = {"PASS": Status.PASS, "DRIFT": Status.FAIL, "SKIP": Status.SKIP}[row["verdict"]]
        table.add_row(row["cell"], f"{row['p50_ms']:.3g}", f"{row['p95_ms']:.3g}", f"{row['throughput']:.4g}",
                      _num(row["max_abs"]) if row["max_abs"] is not None else "-", flip_bound_text(row["flip_bound"], row["flips"]),
                      Text(row["verdict"], style=_STYLE[status]), "*" if row["pareto"] else "",
                      Text("<- chosen", style="bold green") if row["chosen"] else "")
    console.print(table)
    note = cost_note(report)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
    for reason in sorted({r.reason for r in report.cells if r.status is Status.SKIP}):
        console.print(f"skipped cells: {reason}", style="yellow", highlight=False, soft_wrap=True)
    for result in report.cells:
        if result.reason and result.status is Status.FAIL:
            console.print(f"{result.cell.id}: {result.reason}", style="red", highlight=False, soft_wrap=True)
    for repair in choice.repairs:
        console.print(repair_line(repair), style="green" if repair.confirmed else "red", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(Text(choice_line(choice), style="bold green" if choice.passed else "bold red"), soft_wrap=True)


def repair_line(repair: PrecisionRepair) -> str:
    """A precision repair in one sentence, with its code, or why none was found."""
    before = f"max abs {_num(repair.before.max_abs)}" + (f"; {repair.reason_before}" if repair.reason_before else "")
    kept = "unquantized (float32)" if repair.quantize != "none" else "in float32"
    if not repair.keep and repair.confirmed:
        return f"repair {repair.cell}: none needed ({before})"
    if not repair.confirmed and repair.keep:
        after = f"max abs {_num(repair.after.max_abs)}" + (f"; {repair.reason_after}" if repair.reason_after else "")
        names = ", ".join(f"`{n}`" for n in repair.keep)
        return (f"repair {repair.cell}: no module set confirmed ({before}); keeping {names} {kept} passed on the "
                f"samples searched, not on every sample ({after}): search on more samples")
    if not repair.confirmed:
        return (f"repair {repair.cell}: no module set found ({before}); even every module group {kept} does "
                f"not pass, so the drift is in what stays outside them (position embeddings, tokens)")
    names = ", ".join(f"`{n}`" for n in repair.keep)
    return (f"repair {repair.cell} ({before}): keep {names} {kept}, confirmed by re-running the cell (max abs "
            f"{_num(repair.after.max_abs)}, {repair.tried} trials). Change the shipped code: {repair.code()}")


def choice_line(choice: Choice) -> str:
    """The verdict of `parity choose`: the chosen cell per device, or why none was."""
    within = f" within {choice.budget_ms:g} ms per image" if choice.budget_ms is not None else ""
    parts = []
    for device, cell_id in choice.chosen.items():
        skipped = {r.reason for r in choice.report.cells if r.cell["device"] == device and r.status is Status.SKIP}
        ran = any(r.cell["device"] == device and r.status is not Status.SKIP for r in choice.report.cells)
        if cell_id is None and not ran:
            parts.append(f"{device}: skipped ({'; '.join(sorted(skipped))})")
        elif cell_id is None:
            parts.append(f"{device}: no cell passes{within}")
        else:
            cost = choice.report.cell(cell_id).cost
            parts.append(f"{device}: {cell_id} ({cost.latency_p50_ms:.3g} ms per image p50, "
                         f"{cost.throughput:.4g} images/s on {cost.device_name})")
    head = "CHOSEN" if choice.passed else "NONE PASSES"
    return f"{head}: the fastest passing configuration{within}, per device: " + "; ".join(parts) + "."


def cost_note(report: MatrixReport) -> str:
    """How the cells' costs were measured, in one sentence (empty when no cell ran)."""
    costs = [r.cost for r in report.cells if r.cost is not None]
    if not costs:
        return ""
    devices = ", ".join(dict.fromkeys(c.device_name for c in costs))
    loads = ", ".join(dict.fromkeys(f"{c.load_s:.2f} s" for c in costs))
    cuda = [c.cuda_peak_mb for c in costs if c.cuda_peak_mb is not None]
    return (f"cost: latency per image at the cell's batch size after a warm-up batch, {costs[0].repeat} timed pass(es) "
            f"on {devices}; cells of one configuration share its backbone pass and its cost; model load/convert "
            f"{loads}; peak RSS {max(c.peak_rss_mb for c in costs):.0f} MB"
            + (f"; CUDA peak allocated {max(cuda):.0f} MB" if cuda else "") + ". Timing never changes a verdict.")


def matrix_line(report: MatrixReport) -> str:
    line = ("MATRIX: every deployment cell reproduces the reference." if report.passed
            else "MATRIX: a deployment cell drifted (or none ran).")
    return _shard_prefix(report.shard) + line


def _shard_prefix(shard) -> str:
    if shard is None:
        return ""
    return (f"SHARD {shard.index}/{shard.count} ({len(shard.rows)} of {shard.of} samples; merge every shard's "
            f"report with `parity merge` for the whole verdict): ")


def render_service(diagnosis: ServiceDiagnosis, console: Console) -> None:
    """Whether a service's logged values come from the spec's pipeline, and which variant reproduces them."""
    if diagnosis.report is not None:
        render_report(diagnosis.report, console)
    console.print(f"{diagnosis.log}: {diagnosis.samples} logged samples; compared: {', '.join(diagnosis.compared)}",
                  highlight=False, soft_wrap=True)
    for d in diagnosis.decisions:
        console.print(f"decisions: {d.kind}: {len(d.flips)} flip(s), {len(d.near_ties)} near-tie(s) of {d.total}"
                      + (f"; flips: {', '.join(d.flips[:12])}" + (" ..." if len(d.flips) > 12 else "") if d.flips else ""),
                      highlight=False, markup=False, soft_wrap=True)
    if diagnosis.matches:
        console.print(Text("The service MATCHES the spec's pipeline.", style="bold green"))
        return
    metric = "outputs" if diagnosis.stage == "head" else diagnosis.compared[0]
    console.print(Text(f"The service does NOT match the spec's pipeline ({metric} max abs "
                       f"{_num(diagnosis.before)}).", style="bold red"))
    if diagnosis.passed:
        console.print(Text('No decision flips: the service passes the spec\'s gate (gate = "decisions").',
                           style="bold green"))
    for note in diagnosis.notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    for finding in diagnosis.findings:
        console.print("\n".join(finding_lines(finding)), highlight=False, markup=False, soft_wrap=True)
    if not diagnosis.reproduced_by and diagnosis.findings:
        return
    if not diagnosis.reproduced_by:
        if diagnosis.stage == "head":
            console.print("No change to the spec's preprocessing or backbone is needed: the head stage differs.",
                          style="bold yellow")
        else:
            console.print("No variant of the spec reproduces the logged values.", style="bold yellow")
        return
    state = "on every logged sample" if diagnosis.reproduced else "on the probe samples only"
    console.print(f"The logged values are reproduced ({state}) by the spec with:")
    for cause in diagnosis.causes:
        console.print(f"    {cause.words}", highlight=False, markup=False, soft_wrap=True)
    for line in diagnosis.shipped_fix:
        console.print(textwrap.indent(line, "    ") if "\n" in line else line, highlight=False, markup=False,
                      soft_wrap=True)


def diagnosis_lead(diagnosis: Diagnosis) -> tuple[str, str, str]:
    """(cause, fix, what the spec TOML is) a diagnosis leads with, in the direction that applies.

    A detector's finding speaks first (it reproduced the candidate's own numbers). For shipped code a
    spec change found by search describes what the shipped code does: the fix goes into the shipped
    code, and the TOML is the alternative of rebuilding the fixture. For a spec candidate the TOML is the fix.
    """
    finding = diagnosis.report.cause or next(iter(diagnosis.findings), None)
    toml_role = ("If the shipped code is right, rebuild the fixture with this in the spec" if diagnosis.candidate
                 else "Fix (confirmed: parity check passes with it)" if diagnosis.confirmed
                 else "Fix (NOT confirmed on every sample)")
    if finding is not None:
        where = f" ({finding.where})" if finding.where else ""
        return f"{finding.cause.rstrip('.')}{where}: {finding.evidence}", finding.fix, toml_role
    if diagnosis.candidate and diagnosis.shipped_fix:  # not reproduced: what the search moved, said as partial
        said = [line for line in diagnosis.shipped_fix if not line.startswith(("If ", "and "))]
        return said[0], " ".join(said[1:]), toml_role
    return "", "", toml_role  # a spec candidate: the TOML below is the fix, in the spec's own terms


def render_diagnosis(diagnosis: Diagnosis | ServiceDiagnosis, console: Console) -> None:
    """Ranked causes with their evidence, the confirmed fix, the divergent layer and per-sample patterns."""
    if isinstance(diagnosis, ServiceDiagnosis):
        render_service(diagnosis, console)
        return
    report = diagnosis.report
    first = report.first_failure
    if not diagnosis.drift:
        console.print(Text("NO DRIFT: every stage reproduces the reference; no cause to report.", style="bold green"))
        return
    console.print(Text(f"DRIFT first seen at the {first.stage if first is not None else '?'} stage "
                       f"({', '.join(s.stage for s in report.stages if s.status is Status.FAIL)} drifted)",
                       style="bold red"))
    cause, fix, _ = diagnosis_lead(diagnosis)
    if cause:
        console.print(Text(f"Cause: {cause}", style="bold"), highlight=False, soft_wrap=True)
        console.print(Text(f"Fix: {fix}", style="bold"), highlight=False, soft_wrap=True)
    for i, cause in enumerate(diagnosis.causes, start=1):
        goal = "the shipped code" if diagnosis.candidate else "the reference"
        verdict = f"reproduces {goal} on the probe samples" if cause.reproduces else "moves towards it"
        console.print(f"{i}. {cause.words} [{cause.change.origin}; {verdict}]", highlight=False, markup=False,
                      soft_wrap=True)
    if diagnosis.candidate and diagnosis.shipped_fix:
        for line in diagnosis.shipped_fix:
            console.print(textwrap.indent(line, "    ") if "\n" in line else line, highlight=False, markup=False,
                          soft_wrap=True)
    elif diagnosis.candidate:
        console.print(Text("No single spec change reproduces the shipped code's numbers.", style="bold yellow"))
    elif diagnosis.fix:
        state = "confirmed: parity check passes with it" if diagnosis.confirmed else "NOT confirmed on every sample"
        console.print(Text(f"Fix ({state}):", style="bold green" if diagnosis.confirmed else "bold yellow"))
        console.print(textwrap.indent(Change.merged_toml(diagnosis.fix), "    "), highlight=False, markup=False,
                      soft_wrap=True)
        for removal in Change.merged_removals(diagnosis.fix):
            console.print(f"    and {removal} from the spec", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(Text("No single spec change reproduces the reference.", style="bold yellow"))
    if diagnosis.layer is not None:
        layer = diagnosis.layer
        console.print(f"First divergent backbone module on identical pixels: {layer.module} (module {layer.index + 1} "
                      f"of {layer.total} in execution order, max abs {_num(layer.max_abs)})", highlight=False,
                      soft_wrap=True)
    if diagnosis.affected and len(diagnosis.affected) == diagnosis.total:
        console.print(f"Every sample drifts ({diagnosis.total}).", highlight=False)
    elif diagnosis.affected:
        console.print(f"Drifting samples ({len(diagnosis.affected)} of {diagnosis.total}): "
                      f"{', '.join(diagnosis.affected)}", highlight=False, soft_wrap=True)
    if diagnosis.pattern:
        console.print(f"Per-sample cause: {diagnosis.pattern}", highlight=False, soft_wrap=True)
    for note in diagnosis.notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    render_config_diffs(report.config_diffs, console)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def to_json(report: Report | MatrixReport | Diagnosis | ServiceDiagnosis | PreprocessExplanation) -> dict[str, Any]:
    data = _plain(report)
    if isinstance(report, PreprocessExplanation):
        data["identical"] = bool(report)
        return data
    if isinstance(report, Referee):
        data.update(explained=report.explained, verdict=report.verdict)
        return data
    if isinstance(report, ServiceDiagnosis):
        # One TOML snippet a user pastes (tomllib parses it); removals, which are no TOML, apart.
        data["reproduced_by_toml"] = [text for text in (Change.merged_toml(report.reproduced_by),) if text]
        data["reproduced_by_remove"] = list(Change.merged_removals(report.reproduced_by))
        data["passed"] = report.passed
        data["report"] = to_json(report.report) if report.report is not None else None
        return data
    if isinstance(report, Diagnosis):
        data["drift"] = report.drift
        data["fix_toml"] = [text for text in (Change.merged_toml(report.fix),) if text]
        data["fix_remove"] = list(Change.merged_removals(report.fix))
        data["report"] = to_json(report.report)
        return data
    if isinstance(report, MatrixReport):
        data["passed"] = report.passed
        data["reproducing"] = {axis: report.reproducing(axis) for axis in report.axes}
        return data
    data["passed"] = report.passed
    data["verdict"] = report.verdict.value
    data["cause"] = _plain(report.cause) if report.cause is not None else None
    first = report.first_failure
    data["first_failure"] = first.stage if first is not None else None
    for stage, result in zip(data["stages"], report.stages):
        stage["passed"] = bool(result)
        stage["text"] = format_stage(result)
    return data


def _check_extras(data: dict[str, Any], report: Report) -> dict[str, Any]:
    """What the file renderers show that is not a field: verdict sentence, table cells, tolerance words, fixes."""
    data["headline"] = verdict_line(report)
    data["tolerances"] = list(dict.fromkeys(r.comparison.tolerance.origin for r in report.stages
                                            if r.comparison is not None))
    for stage, result in zip(data["stages"], report.stages):
        stage["summary"] = dict(zip(("metric", "value", "tolerance"), _metric(result)))
        stage["fixes"] = [f"Fix: {f.fix}" for f in result.findings] + [note for note in result.notes
                                                                       if note.startswith("Fix:")]
        if result.comparison is not None:
            stage["comparison"]["tolerance"]["text"] = result.comparison.tolerance.describe()
    return data


def _cause_extras(data: list[dict[str, Any]], causes) -> None:
    for entry, cause in zip(data, causes):
        entry["words"] = cause.words
        entry["toml"] = cause.change.toml()


def document(result: Any) -> dict[str, Any]:
    """The self-describing JSON of any result: ``schema_version``, ``kind`` and everything a renderer shows.

    Renderers of report.md, report.html and junit.xml read only this, so a saved report.json
    re-renders to the same files.
    """
    if isinstance(result, Calibration):
        data = _plain(result)
        manifest = {"calibration": result.to_manifest()}
        data["runs"] = [run.describe() for run in result.runs]
        data["budgets"] = {stage: calibrated_tolerance(manifest, stage, result.dtype).describe() for stage in result.noise}
        data["passed"] = True
        data["headline"] = (f"CALIBRATED: {len(result.noise)} stage budgets from {len(result.runs)} runs on "
                            f"{result.device}/{result.dtype}, x{result.margin:g} margin.")
        kind = "calibration"
    elif isinstance(result, Report):
        data, kind = _check_extras(to_json(result), result), "check"
    elif isinstance(result, MatrixReport):
        data, kind = to_json(result), "matrix"
        tolerances: dict[str, str] = {}
        for entry, cell in zip(data["cells"], result.cells):
            entry["verdict"] = {Status.PASS: "PASS", Status.FAIL: "DRIFT", Status.SKIP: "SKIP"}[cell.status]
            entry["role"] = "deploy" if cell.cell.deployment else "probe"
            if cell.comparison is not None:
                entry["comparison"]["tolerance"]["text"] = cell.comparison.tolerance.describe()
                tolerances.setdefault(str(cell.cell["dtype"]), cell.comparison.tolerance.describe())
        data["tolerances"] = tolerances
        data["cost_note"] = cost_note(result)
        data["headline"] = matrix_line(result)
    elif isinstance(result, Choice):
        kind = "choice"
        data = {"matrix": document(result.report), "chosen": dict(result.chosen), "pareto": list(result.pareto),
                "budget_ms": result.budget_ms, "rows": _plain(choice_rows(result)), "passed": result.passed,
                "repairs": [dict(_plain(r), code=r.code(), text=repair_line(r)) for r in result.repairs],
                "headline": choice_line(result)}
    elif isinstance(result, ServiceDiagnosis):
        data, kind = to_json(result), "service"
        _cause_extras(data["causes"], result.causes)
        data["passed"] = result.matches
        data["headline"] = ("The service MATCHES the spec's pipeline." if result.matches else
                            f"The service does NOT match the spec's pipeline ({result.compared[0]} max abs "
                            f"{_num(result.before)}).")
    elif isinstance(result, Diagnosis):
        data, kind = to_json(result), "diagnosis"
        data["report"] = _check_extras(data["report"], result.report)
        _cause_extras(data["causes"], result.causes)
        data["passed"] = not result.drift
        first = result.report.first_failure
        cause, fix, toml_role = diagnosis_lead(result)
        data["lead"] = {"cause": cause, "fix": fix, "toml_role": toml_role}
        data["headline"] = ("NO DRIFT: every stage reproduces the reference; no cause to report." if not result.drift
                            else f"DRIFT first seen at the {first.stage if first is not None else '?'} stage; "
                                 + (f"cause: {cause}" if cause else
                                    f"fix ({'confirmed' if result.confirmed else 'NOT confirmed'}): "
                                    + "; ".join(c.toml() for c in result.fix) if result.fix else
                                    "no single spec change reproduces the "
                                    + ("shipped code" if result.candidate else "reference")) + ".")
    elif isinstance(result, PreprocessExplanation):
        data, kind = to_json(result), "preprocess"
    else:
        raise TypeError(f"no report document for {type(result).__name__}")
    return {"schema_version": SCHEMA_VERSION, "kind": kind, **data}


def write_json(report: Report | MatrixReport | Diagnosis | ServiceDiagnosis | PreprocessExplanation, path: str | Path) -> None:
    Path(path).write_text(json.dumps(document(report), indent=2) + "\n", encoding="utf-8")
