"""report.html: one self-contained page (inline CSS and SVG, no network reference) with plots.

Sections follow the Markdown: verdict, first drifting stage and fix, stage table, provenance
differences, then per stage the plots of its per-sample errors, the worst samples (capped,
with the count) and the full text folded.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from parity.report import plots
from parity.report.common import (COST_COLUMNS, cause_rows, cost_cells, evidence, first_failure, fixes, flip_bound_text,
                                  head_cells, number, stage_headline, worst_samples)

__all__ = ["render_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:16px 24px;color:#1b1b1b;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.verdict{padding:12px 16px;border-radius:6px;color:#fff;font-weight:600;font-size:17px}
.pass{background:#2e7d32}.fail{background:#c62828}
.lead{margin:10px 0;padding:8px 12px;background:#fafafa;border-left:4px solid #c62828}
.meta{color:#555;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.PASS{color:#2e7d32;font-weight:600}td.FAIL,td.DRIFT{color:#c62828;font-weight:600}td.SKIP{color:#777}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;white-space:pre-wrap}
figure.plot{margin:8px 0;display:inline-block;vertical-align:top}figure.plot svg{max-width:100%;height:auto}
.note{color:#555;font-size:12px}
"""


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]], *, status_column: int | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            css = f' class="{escape(str(value).split()[-1])}"' if i == status_column and str(value) else ""
            cells.append(f"<td{css}>{escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(kind: str, subject: str, svg: str) -> str:
    return f'<figure class="plot" data-plot="{escape(kind)}" data-subject="{escape(subject)}">{svg}</figure>'


def _banner(data: dict[str, Any]) -> str:
    return f'<div class="verdict {"pass" if data["passed"] else "fail"}">{escape(data["headline"])}</div>'


def _provenance(diffs: list[dict[str, Any]]) -> str:
    if not diffs:
        return ""
    rows = [(d["field"], repr(d["reference"]), repr(d["candidate"])) for d in diffs]
    return "<h2>Provenance: what differs from the fixture's record</h2>" + _table(("field", "reference", "candidate"), rows)


def _stage_table(check: dict[str, Any]) -> str:
    rows = [(s["stage"], s["summary"]["metric"], s["summary"]["value"], s["summary"]["tolerance"], s["status"])
            for s in check["stages"]]
    return _table(("stage", "metric", "value", "tolerance", "verdict"), rows, status_column=4)


def _stage_sections(check: dict[str, Any]) -> str:
    """Per compared stage: distribution, sorted errors (and cosines), thumbnails, worst samples, text."""
    parts = []
    for stage in check["stages"]:
        c = stage.get("comparison")
        name = stage["stage"]
        if stage["status"] == "SKIP" or (not c and stage["status"] == "PASS"):
            continue
        parts.append(f"<h3>{escape(name)}: {escape(stage['status'])}: {escape(stage_headline(stage))}</h3>")
        if c and c.get("samples"):
            shown, total = worst_samples(c)
            parts.append(_figure("distribution", name, plots.error_distribution(name, c)))
            # The two small plots side by side, then the wide one.
            if any(s.get("cosine") is not None for s in c["samples"]):
                parts.append(_figure("cosine", name, plots.sorted_cosines(name, c)))
            parts.append(_figure("sorted", name, plots.sorted_errors(name, c, total)))
            if c.get("thumbnail"):
                parts.append(_figure("thumbnails", name, plots.pixel_thumbnails(c["thumbnail"])))
            rows = [(s["name"], number(s["max_abs"]), "-" if s.get("cosine") is None else f"{s['cosine']:.6f}")
                    for s in shown]
            parts.append(f'<p class="note">Worst samples: {len(shown)} of {total} shown.</p>'
                         + _table(("sample", "max abs", "cosine"), rows))
        parts.append(f"<details{' open' if stage['status'] == 'FAIL' else ''}><summary>full text</summary>"
                     f"<pre>{escape(stage['text'])}</pre></details>")
    return "<h2>Stages</h2>" + "".join(parts) if parts else ""


def _check_body(check: dict[str, Any]) -> str:
    parts = []
    first = first_failure(check)
    if first is not None:
        clause = evidence(first)
        found = fixes(check)
        cause = check.get("cause")
        said = (f"<b>Cause:</b> {escape(cause['cause'].rstrip('.'))}"
                + (f" (<code>{escape(cause['where'])}</code>)" if cause.get("where") else "")
                + f": {escape(cause['evidence'])}<br>") if cause else ""
        parts.append(f'<div class="lead"><b>First drifting stage:</b> <code>{escape(first["stage"])}</code>: '
                     f"{escape(stage_headline(first))}{escape(f' ({clause})') if clause else ''}<br>{said}"
                     "<b>Fix:</b> " + ("<br>".join(f"<code>{escape(f)}</code>" for f in found) if found
                                       else "no spec field explains it; see the stages below") + "</div>")
    parts.append(_stage_table(check))
    if check.get("tolerances"):
        parts.append(f'<p class="note">Tolerances: {escape("; ".join(check["tolerances"]))}</p>')
    parts.append(_provenance(check["config_diffs"]))
    parts.append(_stage_sections(check))
    return "".join(parts)


def _meta(check: dict[str, Any]) -> str:
    return (f'<p class="meta">{escape(Path(check["spec"]).name)} on {escape(check["device"])}/{escape(check["dtype"])}, '
            f'gate {escape(check["gate"])}; fixtures {escape(check["fixtures"])}</p>')


def _check(data: dict[str, Any]) -> str:
    return _meta(data) + _banner(data) + _check_body(data)


def _causes(causes: list[dict[str, Any]]) -> str:
    if not causes:
        return ""
    rows = [(i, *row) for i, row in enumerate(cause_rows(causes), start=1)]
    return ("<h2>Ranked causes</h2>" + _figure("causes", "diagnosis", plots.cause_effects(causes))
            + _table(("#", "change", "spec has", "measured", "before", "after", "verdict"), rows))


def _diagnosis(data: dict[str, Any]) -> str:
    check = data["report"]
    parts = [_meta(check), _banner(data)]
    lead = data.get("lead") or {}
    if lead.get("cause"):
        parts.append(f'<div class="lead"><b>Cause:</b> {escape(lead["cause"])}<br><b>Fix:</b> {escape(lead["fix"])}</div>')
    if data["fix_toml"]:
        parts.append(f'<div class="lead"><b>{escape(lead.get("toml_role", "Fix"))}:</b>'
                     f'<pre>{escape(chr(10).join(data["fix_toml"]))}</pre></div>')
    parts.append(_causes(data["causes"]))
    if data.get("layer"):
        layer = data["layer"]
        parts.append(f"<p>First divergent backbone module on identical pixels: <code>{escape(layer['module'])}</code> "
                     f"(module {layer['index'] + 1} of {layer['total']}, max abs {number(layer['max_abs'])})</p>")
    if data["affected"]:
        parts.append(f"<p>Drifting samples: {len(data['affected'])} of {data['total']}</p>")
    if data["pattern"]:
        parts.append(f"<p>Per-sample cause: {escape(data['pattern'])}</p>")
    if data["notes"]:
        parts.append(f"<pre>{escape(chr(10).join(data['notes']))}</pre>")
    parts.append("<h2>The parity check</h2>" + _check_body(check))
    return "".join(parts)


def _matrix(data: dict[str, Any]) -> str:
    rows = []
    for cell in data["cells"]:
        c = cell.get("comparison")
        max_abs = "-" if c is None else number(c["max_abs"])
        cosine = "-" if c is None or c.get("min_cosine") is None else f"{c['min_cosine']:.6f}"
        rows.append((cell["cell"]["id"], cell["role"], max_abs, cosine, *head_cells(cell), cell["verdict"],
                     *cost_cells(cell.get("cost")),
                     cell.get("reason") or ""))
    items = [f"<li>tolerance for {escape(d)} cells: {escape(t)}</li>" for d, t in data["tolerances"].items()]
    items += [f"<li>{escape(data['cost_note'])}</li>"] if data.get("cost_note") else []
    items += [f"<li>{escape(axis)} reproduces the reference with: {escape(', '.join(map(str, values)) or 'none')}</li>"
              for axis, values in data["reproducing"].items()]
    plot = _figure("matrix", "cells", plots.matrix_heatmap(data["cells"])) if data["cells"] else ""
    return (f'<p class="meta">{escape(Path(data["spec"]).name)}: {len(data["cells"])} cells over '
            f'{escape(", ".join(data["axes"]))}</p>' + _banner(data) + plot
            + _table(("cell", "role", "max abs", "min cos", "out max abs", "flip bound", "verdict", *COST_COLUMNS,
                      "reason"), rows, status_column=6)
            + f"<ul>{''.join(items)}</ul>")


def _choice(data: dict[str, Any]) -> str:
    """`parity choose`: the Pareto plot, the table fastest first per device, repairs, how cost was measured."""
    matrix = data["matrix"]
    rows = [(r["cell"], f"{r['p50_ms']:.3g}", f"{r['p95_ms']:.3g}", f"{r['throughput']:.4g}", number(r["max_abs"]),
             flip_bound_text(r.get("flip_bound"), r.get("flips")), r["verdict"], "*" if r["pareto"] else "",
             "chosen" if r["chosen"] else "", r.get("reason") or "") for r in data["rows"]]
    plot = (_figure("pareto", "cells", plots.choice_pareto(data["rows"], data["chosen"], data.get("budget_ms")))
            if data["rows"] else "")
    items = [f"<li>{escape(data['matrix']['cost_note'])}</li>"] if matrix.get("cost_note") else []
    items += [f"<li>skipped cells: {escape(reason)}</li>"
              for reason in sorted({c["reason"] for c in matrix["cells"] if c["verdict"] == "SKIP"})]
    items += [f"<li><code>{escape(r['text'])}</code></li>" for r in data["repairs"]]
    return (f'<p class="meta">{escape(Path(matrix["spec"]).name)}: {len(matrix["cells"])} deployment cells over '
            f'{escape(", ".join(matrix["axes"]))}</p>' + _banner(data) + plot
            + _table(("cell", *COST_COLUMNS, "max abs", "flip bound", "verdict", "pareto", "chosen", "reason"), rows,
                     status_column=6)
            + f"<ul>{''.join(items)}</ul>")


def _service(data: dict[str, Any]) -> str:
    reproduced = "; ".join(data["reproduced_by_toml"]) or "no variant of the spec"
    return (f'<p class="meta">{escape(data["log"])}: {data["samples"]} logged samples; compared: '
            f'{escape(", ".join(data["compared"]))}</p>' + _banner(data)
            + ("" if data["matches"] else f'<div class="lead"><b>Reproduced by:</b> <code>{escape(reproduced)}</code></div>')
            + _causes(data["causes"]))


def _calibration(data: dict[str, Any]) -> str:
    rows = [(stage, number(noise["max_abs"]), "-" if noise.get("min_cosine") is None else f"{noise['min_cosine']:.8f}",
             data["budgets"][stage]) for stage, noise in data["noise"].items()]
    runs = "".join(f"<li>{escape(run)}</li>" for run in data["runs"])
    return _banner(data) + _table(("stage", "max abs noise", "min cosine", "budget"), rows) + f"<ul>{runs}</ul>"


_KINDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "check": _check, "matrix": _matrix, "choice": _choice, "diagnosis": _diagnosis, "service": _service,
    "calibration": _calibration}


def render_html(data: dict[str, Any]) -> str:
    """The HTML page for a report document (see `parity.report.console.document`)."""
    title = f"parity {data['kind']}: {data['headline']}"
    body = _KINDS[data["kind"]](data)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>parity {escape(data['kind'])}</h1>{body}</body></html>\n")
