"""junit.xml: one test case per stage, failures with their whole message; stages that did not run, and drift a
decisions gate accepts, are marked skipped."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from parity.cli import EXIT_DRIFT, EXIT_PASS
from parity.commands.check import STAGE_ORDER
from parity.report.files import render_junit
from parity.results import Report, StageResult, Status
from tests.support.reports import FIX, junit_cases, plain_document


def test_junit_has_one_testcase_per_stage_with_its_state(runs):
    code, directory, _ = runs["passing"]
    assert code == EXIT_PASS
    cases = junit_cases(directory / "junit.xml")
    assert list(cases) == list(STAGE_ORDER)
    assert all(case.find("failure") is None and case.find("skipped") is None for case in cases.values())

    code, directory, _ = runs["drifted"]
    assert code == EXIT_DRIFT
    cases = junit_cases(directory / "junit.xml")
    assert list(cases) == list(STAGE_ORDER)
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert failed == {"pixels", "embedding", "outputs"}
    statuses = {s["stage"]: s["status"] for s in json.loads((directory / "report.json").read_text())["stages"]}
    assert failed == {name for name, status in statuses.items() if status == "FAIL"}
    message = cases["pixels"].find("failure").get("message")
    # Headline, evidence and fix, whole: nothing cut the way pytest's "[+4 more lines]" does.
    assert message.startswith("pixels: drifted beyond tolerance (")
    assert message.endswith(f'Fix: {FIX} (the fixture was made with it; the candidate has "bilinear")')
    suite = ET.parse(directory / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("8", "3")


def test_junit_skips_stages_that_did_not_run():
    stages = (StageResult("load", Status.FAIL, "weights do not load with strict=True", notes=("Fix: load it",)),
              *(StageResult(s, Status.SKIP, "not run: weights did not load") for s in STAGE_ORDER[1:]))
    data = json.loads(json.dumps(plain_document(Report("s.toml", "f", "cpu", "float32", stages))))
    suite = ET.fromstring(render_junit(data)).find("testsuite")
    states = {c.get("name"): ("failure" if c.find("failure") is not None else
                              "skipped" if c.find("skipped") is not None else "pass") for c in suite.findall("testcase")}
    assert states == {"load": "failure", **{s: "skipped" for s in STAGE_ORDER[1:]}}
    assert suite.find("testcase/failure").get("message") == "load: weights do not load with strict=True. Fix: load it"


def test_junit_marks_drift_a_decisions_gate_accepts_as_skipped():
    from parity.results import DecisionFlips

    stages = (StageResult("load", Status.PASS, "ok"), StageResult("embedding", Status.FAIL, "moved"),
              StageResult("decisions", Status.PASS, "no flips", decisions=(DecisionFlips("argmax", None, 0.01, 40),)))
    report = Report("s.toml", "f", "cpu", "float16", stages, gate="decisions")
    assert report.passed
    suite = ET.fromstring(render_junit(plain_document(report))).find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("0", "1")
    assert suite.find("testcase[@name='embedding']/skipped").get("message") == (
        'embedding: moved; accepted by [decisions].gate = "decisions" (no decision flipped)')
