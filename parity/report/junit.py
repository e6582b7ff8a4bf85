"""junit.xml: one testcase per stage (check), per cell (matrix), per stage and ranked cause (diagnosis).

A failing testcase's ``message`` is the stage headline plus the fix, whole: CI front ends show
the message first and often cut the body.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from parity.report.common import evidence, fixes, number, stage_headline

__all__ = ["render_junit"]


def _case(suite: ET.Element, classname: str, name: str, *, failure: str | None = None, skipped: str | None = None,
          body: str = "", out: str = "") -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failure is not None:
        ET.SubElement(case, "failure", message=failure, type="parity.drift").text = body or failure
    elif skipped is not None:
        ET.SubElement(case, "skipped", message=skipped)
    if out:
        ET.SubElement(case, "system-out").text = out


def _stage_cases(suite: ET.Element, check: dict[str, Any], classname: str) -> None:
    found = fixes(check)
    for stage in check["stages"]:
        headline = f"{stage['stage']}: {stage_headline(stage)}"
        if stage["status"] == "FAIL" and check["passed"]:
            # Drift the spec's decisions gate accepts: not a failure, as the pytest plugin's xfail.
            _case(suite, classname, stage["stage"], body="",
                  skipped=f'{headline}; accepted by [decisions].gate = "decisions" (no decision flipped)',
                  out=stage["text"])
        elif stage["status"] == "FAIL":
            own = [f.removeprefix("Fix:").strip() for f in stage.get("fixes", [])] or \
                (found if stage["stage"] == check.get("first_failure") else [])
            clause = evidence(stage)
            said = "".join(f". Cause: {f['cause']}" for f in stage.get("findings", [])[:1])
            message = headline + (f" ({clause})" if clause else "") + said + "".join(f". Fix: {fix}" for fix in own)
            _case(suite, classname, stage["stage"], failure=message, body=stage["text"])
        elif stage["status"] == "SKIP":
            _case(suite, classname, stage["stage"], skipped=headline)
        else:
            _case(suite, classname, stage["stage"], out=stage["text"])


def _check(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    _stage_cases(suite, data, classname)


def _matrix(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    for cell in data["cells"]:
        c = cell.get("comparison")
        measured = "" if c is None else (f"max abs {number(c['max_abs'])}" + (
            f", min cos {c['min_cosine']:.6f}" if c.get("min_cosine") is not None else "")
            + f" (tolerance {c['tolerance']['text']})")
        name = cell["cell"]["id"]
        if cell["verdict"] == "SKIP":
            _case(suite, classname, name, skipped=cell.get("reason") or "skipped")
        elif cell["verdict"] == "DRIFT" and cell["role"] == "deploy":
            _case(suite, classname, name, failure=f"deployment cell {name} drifts: {measured}. "
                  "Fix: deploy a configuration whose cell reproduces the reference (see the matrix report)")
        elif cell["verdict"] == "DRIFT":
            # A probe is expected to be able to drift; the gate (and so JUnit) fails only on deployment cells.
            _case(suite, classname, name, out=f"probe cell drifts (not deployed): {measured}")
        else:
            _case(suite, classname, name, out=f"reproduces the reference: {measured}")


def _choice(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    """One testcase per device: its chosen cell, or why none could be chosen (a failure; skipped when none ran)."""
    cells = data["matrix"]["cells"]
    for device, chosen in data["chosen"].items():
        name = f"choose on {device}"
        mine = [c for c in cells if dict(c["cell"]["values"])["device"] == device]
        if chosen is not None:
            row = next(r for r in data["rows"] if r["cell"] == chosen)
            _case(suite, classname, name, out=f"chosen {chosen}: {row['p50_ms']:.3g} ms per image p50, "
                                              f"max abs {number(row['max_abs'])}")
        elif mine and all(c["verdict"] == "SKIP" for c in mine):
            _case(suite, classname, name, skipped="; ".join(sorted({c.get("reason") or "skipped" for c in mine})))
        else:
            budget = data.get("budget_ms")
            why = "; ".join(f"{c['cell']['id']}: {c.get('reason') or c['verdict']}" for c in mine
                            if c["verdict"] != "PASS")
            _case(suite, classname, name,
                  failure=f"no {device} cell passes" + (f" within {budget:g} ms per image" if budget else "")
                  + (f": {why}" if why else "") + ". Fix: deploy a configuration that passes, or repair one "
                  "(parity choose --repair)")


def _causes(suite: ET.Element, causes: list[dict[str, Any]], classname: str) -> None:
    for i, cause in enumerate(causes, start=1):
        verdict = "reproduces the reference" if cause["reproduces"] else "moves towards the reference"
        _case(suite, classname, f"cause {i}: {cause['toml']}",
              failure=f"cause {i}: the spec has {cause['current']}; {cause['stage']} {cause['metric']} "
                      f"{cause['before']:.2e} -> {cause['after']:.2e} with the change ({verdict}). "
                      f"Fix: {cause['toml']}", body=cause["words"])


def _diagnosis(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    _stage_cases(suite, data["report"], classname)
    _causes(suite, data["causes"], classname + ".causes")


def _service(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    if data["matches"]:
        _case(suite, classname, "service", out=data["headline"])
    else:
        fix = "; ".join(data["reproduced_by_toml"]) or "no variant of the spec reproduces the logged values"
        _case(suite, classname, "service", failure=f"{data['headline']} Reproduced by: {fix}")
    _causes(suite, data["causes"], classname + ".causes")


def _calibration(suite: ET.Element, data: dict[str, Any], classname: str) -> None:
    for stage, noise in data["noise"].items():
        _case(suite, classname, stage, out=f"max abs noise {number(noise['max_abs'])}; budget {data['budgets'][stage]}")


_KINDS = {"check": _check, "matrix": _matrix, "choice": _choice, "diagnosis": _diagnosis, "service": _service,
          "calibration": _calibration}


def render_junit(data: dict[str, Any]) -> str:
    """The JUnit XML for a report document: one testsuite, named after the command and the spec or log."""
    subject = Path(data.get("spec") or (data.get("report") or data.get("matrix") or {}).get("spec") or data.get("log")
                   or "parity").stem
    classname = f"parity.{data['kind']}.{subject}"
    suite = ET.Element("testsuite", name=f"parity {data['kind']}: {subject}")
    _KINDS[data["kind"]](suite, data, classname)
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
