"""report.md: GitHub-flavoured Markdown for a pull request comment or a job summary.

The verdict comes first, then the first drifting stage and the fix, then the stage table,
provenance differences, and the per-stage details folded in ``<details>``. The whole stays
under `LIMIT` bytes: details that do not fit are left out with a count.

Every string from the document is shown as written, never interpreted: sample names, paths,
messages and values come from users' files and code (an image named
``<img src=x onerror=...>.png`` must not become HTML in a pull request comment). Text goes
through `_text`, code spans through `_code`, fenced blocks through `_fenced`, raw HTML
elements through `_html`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.report.common import (COST_COLUMNS, cause_rows, cost_cells, evidence, first_failure, fixes, flip_bound_text,
                                  head_cells, number, stage_headline, worst_samples)

__all__ = ["render_markdown", "LIMIT"]

# GitHub refuses comments over 65,536 characters; stay well below with room for a job summary's other steps.
LIMIT = 60_000
# One stage's folded text is cut beyond this many characters.
_DETAIL_CHARS = 8_000
_ICON = {"PASS": "✅", "FAIL": "❌", "DRIFT": "❌", "SKIP": "⏭️"}
_FENCE = "```"


def _one_line(value: Any) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


def _text(value: Any) -> str:
    """User-supplied text as plain Markdown text: never HTML, a link, an image, a code span or emphasis.

    ``<``, ``>`` and ``&`` become entities; backslashes, backticks, ``*`` and ``~`` are
    backslash-escaped, ``]`` where it would close a link's text, ``_`` where it could start or
    end emphasis (at a word's edge: ``crop_pct`` stays as written).
    """
    text = html.escape(_one_line(value), quote=False)
    text = re.sub(r"([\\`*~])", r"\\\1", text)
    text = re.sub(r"\](?=[(\[:])", r"\\]", text)
    return re.sub(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])", r"\\_", text)


def _code(value: Any) -> str:
    """A code span showing ``value`` as written: its fence is longer than any run of backticks in it."""
    text = _one_line(value)
    if not text.strip():
        return _text(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] == "`" or text[-1] == "`" else ""  # CommonMark strips one space on each side
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(lines: list[Any]) -> list[str]:
    """Lines for inside a fenced code block: none of them may close it."""
    return [str(line).replace(_FENCE, "'''") for line in lines]


def _html(value: Any) -> str:
    """Text inside a raw HTML element (``<summary>``), where Markdown escapes do not apply."""
    return html.escape(_one_line(value), quote=True)


def _cell(value: Any) -> str:
    """One table cell of escaped text: no newline, pipes escaped (also inside code spans, as GFM needs)."""
    return _one_line(value).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _details(summary: str, text: str) -> list[str]:
    if len(text) > _DETAIL_CHARS:
        text = text[:_DETAIL_CHARS] + f"\n... ({len(text) - _DETAIL_CHARS} more characters in report.json)"
    return ["<details>", f"<summary>{summary}</summary>", "", _FENCE + "text", *_fenced([text]), _FENCE, "",
            "</details>", ""]


def _verdict(data: dict[str, Any]) -> str:
    return f"## {'✅' if data['passed'] else '❌'} {_text(data['headline'])}"


def _stage_table(check: dict[str, Any]) -> list[str]:
    rows = [(_code(s["stage"]), _text(s["summary"]["metric"]), _text(s["summary"]["value"]),
             _text(s["summary"]["tolerance"]), f"{_ICON[s['status']]} {s['status']}") for s in check["stages"]]
    return _table(("stage", "metric", "value", "tolerance", "verdict"), rows)


def _provenance(diffs: list[dict[str, Any]], title: str = "Provenance: what differs from the fixture's record") -> list[str]:
    if not diffs:
        return []
    rows = [(_code(d["field"]), _code(repr(d["reference"])), _code(repr(d["candidate"]))) for d in diffs]
    return [f"### {title}", ""] + _table(("field", "reference", "candidate"), rows)


def _stage_details(check: dict[str, Any]) -> list[list[str]]:
    """One folded block per stage that did not pass, plus its worst samples."""
    blocks = []
    for stage in check["stages"]:
        if stage["status"] != "FAIL":
            continue
        block = _details(f"<b>{_html(stage['stage'])}</b>: {_html(stage_headline(stage))}", str(stage["text"]))
        comparison = stage.get("comparison")
        if comparison and comparison.get("samples"):
            shown, total = worst_samples(comparison)
            rows = [(_text(s["name"]), number(s["max_abs"]), "-" if s["cosine"] is None else f"{s['cosine']:.6f}")
                    for s in shown]
            block = block[:-2] + [f"Worst samples of {_code(stage['stage'])} ({len(shown)} of {total} shown):", ""] \
                + _table(("sample", "max abs", "cosine"), rows) + block[-2:]
        blocks.append(block)
    return blocks


def _check_head(check: dict[str, Any]) -> list[str]:
    """Verdict, first drifting stage with its evidence, and the fix: the first lines a reviewer reads."""
    lines = [_verdict(check)]
    first = first_failure(check)
    if first is not None:
        clause = evidence(first)
        # A trailing backslash is a hard line break in GitHub Markdown: the fix stays on its own line.
        lines.append(f"**First drifting stage:** {_code(first['stage'])}: {_text(stage_headline(first))}"
                     + (f" ({_text(clause)})" if clause else "") + "\\")
        cause = check.get("cause")
        if cause:  # cause, then fix, in the shipped code's terms
            where = f" ({_code(cause['where'])})" if cause.get("where") else ""
            lines.append(f"**Cause:** {_text(cause['cause'].rstrip('.'))}{where}: {_text(cause['evidence'])}\\")
        found = [_text(fix) for fix in fixes(check)]
        lines.append("**Fix:** " + ("; ".join(found) if found else "no spec field explains it; see the stage details below"))
    lines += ["", f"{_code(Path(check['spec']).name)} on {_text(check['device'])}/{_text(check['dtype'])}, gate "
                  f"{_code(check['gate'])}, fixtures {_code(check['fixtures'])}", ""]
    return lines


def _check(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    lines = _check_head(data) + _stage_table(data)
    if data["tolerances"]:
        lines += [f"Tolerances: {'; '.join(_text(t) for t in data['tolerances'])}", ""]
    return lines + _provenance(data["config_diffs"]), _stage_details(data)


def _matrix(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    lines = [_verdict(data), "", f"{_code(Path(data['spec']).name)}: {len(data['cells'])} cells over "
             f"{', '.join(_text(axis) for axis in data['axes'])}", ""]
    rows = []
    for cell in data["cells"]:
        c = cell.get("comparison")
        if c is None:
            metrics = ("-", "-")
        elif c["candidate_shape"] != c["reference_shape"]:
            metrics = (_text(f"shape {c['candidate_shape'][1:]}"), "-")
        else:
            metrics = (number(c["max_abs"]), "-" if c["min_cosine"] is None else f"{c['min_cosine']:.6f}")
        rows.append((_code(cell["cell"]["id"]), _text(cell["role"]), *metrics, *head_cells(cell),
                     f"{_ICON[cell['verdict']]} {cell['verdict']}", *cost_cells(cell.get("cost")),
                     _text(cell.get("reason") or "")))
    lines += _table(("cell", "role", "max abs", "min cos", "out max abs", "flip bound", "verdict", *COST_COLUMNS,
                     "reason"), rows)
    if data.get("cost_note"):
        lines += [f"- {_text(data['cost_note'])}"]
    lines += [f"- tolerance for {_text(dtype)} cells: {_text(text)}" for dtype, text in data["tolerances"].items()]
    lines += [f"- {_code(axis)} reproduces the reference with: {', '.join(_code(v) for v in values) or 'none'}"
              for axis, values in data["reproducing"].items()]
    lines += [f"- extraction modes {', '.join(_text(mode) for mode in group)} gave bit-identical embeddings"
              for group in data["equivalent_modes"]]
    return lines + [""], []


def _choice(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """`parity choose`: the verdict, the table fastest first per device, skipped cells, failures, repairs."""
    matrix = data["matrix"]
    lines = [_verdict(data), "", f"{_code(Path(matrix['spec']).name)}: {len(matrix['cells'])} deployment cells over "
             f"{', '.join(_text(axis) for axis in matrix['axes'])}", ""]
    rows = [(_code(r["cell"]), f"{r['p50_ms']:.3g}", f"{r['p95_ms']:.3g}", f"{r['throughput']:.4g}",
             "-" if r["max_abs"] is None else number(r["max_abs"]), flip_bound_text(r.get("flip_bound"), r.get("flips")),
             f"{_ICON[r['verdict']]} {r['verdict']}", "*" if r["pareto"] else "", "chosen" if r["chosen"] else "",
             _text(r.get("reason") or "")) for r in data["rows"]]
    lines += _table(("cell", *COST_COLUMNS, "max abs", "flip bound", "verdict", "pareto", "chosen", "reason"), rows)
    if matrix.get("cost_note"):
        lines += [f"- {_text(matrix['cost_note'])}"]
    lines += [f"- skipped cells: {_text(reason)}"
              for reason in sorted({c["reason"] for c in matrix["cells"] if c["verdict"] == "SKIP"})]
    blocks = [_details(f"repair {r['cell']}", r["text"]) for r in data["repairs"]]
    return lines + [""], blocks


def _causes(causes: list[dict[str, Any]]) -> list[str]:
    if not causes:
        return []
    rows = [(i, _code(change), _text(current), _text(metric), before, after, verdict)
            for i, (change, current, metric, before, after, verdict) in enumerate(cause_rows(causes), start=1)]
    return ["### Ranked causes", ""] + _table(("#", "change", "spec has", "measured", "before", "after", "verdict"), rows)


def _diagnosis(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    check = data["report"]
    lines = [_verdict(data)]
    if data["drift"]:
        first = first_failure(check)
        clause = evidence(first) if first else ""
        lines.append(f"**First drifting stage:** {_code(first['stage'] if first else '?')}: "
                     f"{_text(stage_headline(first)) if first else ''}" + (f" ({_text(clause)})" if clause else "")
                     + "\\")
        lead = data.get("lead") or {}
        if lead.get("cause"):
            lines += [f"**Cause:** {_text(lead['cause'])}\\", f"**Fix:** {_text(lead['fix'])}"]
        elif not data["fix_toml"]:
            lines.append("**Fix:** no single spec change reproduces the "
                         + ("shipped code" if data.get("candidate") else "reference"))
        if data["fix_toml"]:
            lines += ["", f"{_text(lead.get('toml_role', 'Fix'))}:", "", _FENCE + "toml", *_fenced(data["fix_toml"]),
                      _FENCE]
    lines += [""] + _causes(data["causes"])
    if data.get("layer"):
        layer = data["layer"]
        lines += [f"First divergent backbone module on identical pixels: {_code(layer['module'])} (module "
                  f"{layer['index'] + 1} of {layer['total']} in execution order, max abs {number(layer['max_abs'])})", ""]
    if data["affected"]:
        shown = data["affected"][:50]
        more = f" and {len(data['affected']) - len(shown)} more" if len(data["affected"]) > len(shown) else ""
        lines += [f"Drifting samples ({len(data['affected'])} of {_text(data['total'])}): "
                  f"{', '.join(_text(name) for name in shown)}{more}", ""]
    if data["pattern"]:
        lines += [f"Per-sample cause: {_text(data['pattern'])}", ""]
    if data["notes"]:
        lines += [_FENCE + "text", *_fenced(data["notes"]), _FENCE, ""]
    lines += ["### The parity check", ""] + _stage_table(check) + _provenance(check["config_diffs"])
    return lines, _stage_details(check)


def _service(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    lines = [_verdict(data)]
    if not data["matches"]:
        lines.append("**Reproduced by:** " + ("the spec with" if data["reproduced_by_toml"] else "no variant of the spec"))
        if data["reproduced_by_toml"]:
            lines += ["", _FENCE + "toml", *_fenced(data["reproduced_by_toml"]), _FENCE]
    lines += ["", f"{_code(data['log'])}: {_text(data['samples'])} logged samples; compared: "
                  f"{', '.join(_text(stage) for stage in data['compared'])}", ""]
    return lines + _causes(data["causes"]), []


def _calibration(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [(_code(stage), number(noise["max_abs"]), "-" if noise.get("min_cosine") is None else f"{noise['min_cosine']:.8f}",
             _text(data["budgets"][stage])) for stage, noise in data["noise"].items()]
    lines = [_verdict(data), ""] + _table(("stage", "max abs noise", "min cosine", "budget"), rows)
    return lines + [f"- run: {_text(run)}" for run in data["runs"]] + [""], []


_KINDS: dict[str, Callable[[dict[str, Any]], tuple[list[str], list[list[str]]]]] = {
    "check": _check, "matrix": _matrix, "choice": _choice, "diagnosis": _diagnosis, "service": _service,
    "calibration": _calibration}


def render_markdown(data: dict[str, Any]) -> str:
    """The Markdown for a report document (see `parity.report.console.document`)."""
    lines, blocks = _KINDS[data["kind"]](data)
    text = "\n".join(lines) + "\n"
    if blocks:
        text += "### Details\n\n"
    omitted = 0
    for block in blocks:
        chunk = "\n".join(block) + "\n"
        # Encoded size: GitHub counts characters, but emoji and names may be multi-byte.
        if omitted or len((text + chunk).encode()) > LIMIT - 200:
            omitted += 1
            continue
        text += chunk
    if omitted:
        text += f"_{omitted} more stage detail(s) left out to stay under {LIMIT // 1000} KB; see report.html or report.json._\n"
    return text
