"""Report files: report.json, then report.md, report.html and junit.xml rendered from it alone.

`write_reports` turns a result (check, matrix, diagnosis, calibration) into its JSON document and
renders the other three from that document as read back from JSON, so ``parity report`` on a
saved report.json gives the same files byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from parity.errors import ParityError, ReportError
from parity.report.console import SCHEMA_VERSION, document
from parity.report.html import render_html
from parity.report.junit import render_junit
from parity.report.markdown import render_markdown

__all__ = ["write_reports", "write_html", "load_document", "render_saved", "render_markdown", "render_html", "render_junit",
           "FILES", "KINDS"]

FILES = {"json": "report.json", "md": "report.md", "html": "report.html", "junit": "junit.xml"}
KINDS = ("check", "matrix", "choice", "diagnosis", "service", "calibration")


def _check_document(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ReportError(f"{source} is not a parity report: no schema_version (expected a report.json written by "
                          "`parity ... --report DIR`); rerun the command with --report to get one")
    if data["schema_version"] != SCHEMA_VERSION or data.get("kind") not in KINDS:
        raise ReportError(f"{source}: schema_version {data['schema_version']!r}, kind {data.get('kind')!r}; this "
                          f"parity renders schema_version {SCHEMA_VERSION} of kinds {', '.join(KINDS)}. Render it with "
                          "the parity version that wrote it")
    return data


def read_json(path: str | Path, error: type[ParityError], *, expected: str) -> Any:
    """A JSON file's content, or ``error`` saying why it is not one (``expected`` names what should be there).

    Raises:
        error: the file cannot be read, is not JSON or UTF-8, or nests too deeply to parse.
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    except RecursionError as e:
        raise error(f"{path} nests too deeply to be {expected}") from e
    except ValueError as e:  # not JSON, not UTF-8, an integer past Python's digit limit
        raise error(f"{path} is not a JSON report ({str(e)[:200]}); expected {expected}") from e


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a saved report.json and check that this version can render it.

    Raises:
        ReportError: the file is not JSON, not a parity report, or of another schema version.
    """
    data = read_json(path, ReportError, expected="a report.json written by --report")
    return _check_document(data, str(path))


def render_saved(data: dict[str, Any], fmt: str, *, source: str) -> str:
    """A saved document (`load_document`) rendered as ``fmt`` (``md``, ``html`` or ``junit``).

    The document's header says its kind; a body that does not have that kind's fields (an edited
    or truncated file, another tool's JSON with a parity header) cannot be rendered.

    Raises:
        ReportError: the body does not match its ``kind``: the field the renderer missed or could not read.
    """
    render = {"md": render_markdown, "html": render_html, "junit": render_junit}[fmt]
    kind = data.get("kind")
    try:
        return render(data)
    except KeyError as e:
        problem = f"it has no {str(e.args[0] if e.args else e)[:80]!r} where a {kind} report has one"
    except (TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        problem = f"a field has the wrong type or value ({type(e).__name__}: {str(e)[:160]})"
    except RecursionError:
        problem = "it nests too deeply"
    raise ReportError(f"{source}: its body does not match its kind {kind!r}: {problem}. Render the report.json "
                      "that `parity ... --report DIR` wrote, unedited, with the parity version that wrote it")


def write_reports(result: Any, directory: str | Path, *, summary: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, report.html and junit.xml for ``result`` into ``directory``.

    With ``summary`` and ``GITHUB_STEP_SUMMARY`` set, report.md is also appended to that file.
    Returns the path of each file by format (``json``, ``md``, ``html``, ``junit``).

    Raises:
        ReportError: the directory or the step summary cannot be written.
    """
    directory = Path(directory)
    # Compact: json's C encoder only runs without indent, and per-sample lists make the file large.
    text = json.dumps(document(result), separators=(",", ":")) + "\n"
    # Render from what a later `parity report` will read, not from the in-memory objects.
    data = json.loads(text)
    paths = {kind: directory / name for kind, name in FILES.items()}
    markdown = render_markdown(data)
    rendered = {"json": text, "md": markdown, "html": render_html(data), "junit": render_junit(data)}
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY") if summary else None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for kind, path in paths.items():
            path.write_text(rendered[kind], encoding="utf-8")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as handle:
                handle.write(markdown + "\n")
    except OSError as e:
        raise ReportError(f"cannot write the reports: {e.filename or directory}: {e.strerror}; pass a writable "
                          "--report DIR (and a writable GITHUB_STEP_SUMMARY file)") from e
    return paths


def write_html(result: Any, path: str | Path) -> Path:
    """Write ``result``'s HTML page alone to ``path`` (`parity choose --html`), rendered from its JSON document
    as read back, like `write_reports`; the directory is made when missing.

    Raises:
        ReportError: the file cannot be written.
    """
    path = Path(path)
    data = json.loads(json.dumps(document(result), separators=(",", ":")))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(data), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}; pass a writable --html path") from e
    return path
