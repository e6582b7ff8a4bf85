"""Report files: every kind of document (check, matrix, diagnosis, calibration, service) written and rendered in
every format, `parity report` re-rendering a saved report, and the refusals."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from parity.commands.check import STAGE_ORDER
from parity.cli import EXIT_PASS, EXIT_USAGE, main
from parity.judge.arrays import compare_arrays
from parity.commands.diagnose import Cause, Change, Diagnosis
from parity.report.files import load_document, render_html, render_junit, render_markdown, write_reports
from parity.results import Report, StageResult, Status, Tolerance
from parity.commands.matrix import Cell, CellResult, MatrixReport
from tests.support.paths import EXAMPLE_SPEC, ROOT
from tests.support.reports import NETWORK, html_plots, plain_document


def test_report_command_rerenders_byte_for_byte(runs, tmp_path, capsys):
    _, directory, _ = runs["drifted"]
    out = {"md": tmp_path / "r.md", "html": tmp_path / "r.html", "junit": tmp_path / "j.xml"}
    assert main(["report", str(directory / "report.json"), "--md", str(out["md"]), "--html", str(out["html"]),
                 "--junit", str(out["junit"])]) == EXIT_PASS
    assert out["md"].read_bytes() == (directory / "report.md").read_bytes()
    assert out["junit"].read_bytes() == (directory / "junit.xml").read_bytes()
    assert out["html"].read_bytes() == (directory / "report.html").read_bytes()
    capsys.readouterr()
    assert main(["report", str(directory / "report.json")]) == EXIT_PASS
    assert capsys.readouterr().out == (directory / "report.md").read_text()


def test_report_command_refuses_what_is_not_a_report(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text('{"passed": true}')
    assert main(["report", str(path), "--md", str(tmp_path / "x.md")]) == EXIT_USAGE
    assert "is not a parity report: no schema_version" in capsys.readouterr().err
    path.write_text('{"schema_version": 99, "kind": "check"}')
    assert main(["report", str(path)]) == EXIT_USAGE
    assert "schema_version 99" in capsys.readouterr().err


def _synthetic_check(samples: int, seed: int = 0) -> Report:
    """A check report on random arrays (no model): pixels, embedding with cosine, and outputs that drift."""
    rng = np.random.default_rng(seed)
    names = [f"img_{i:05d}.jpg" for i in range(samples)]
    tol = Tolerance(atol=1e-5, rtol=1.3e-6, min_cosine=0.99999)
    embedding = rng.normal(size=(samples, 64))
    outputs = rng.normal(size=(samples, 5))
    pixels = rng.normal(size=(4, 3, 112, 112))
    moved = pixels.copy()
    moved[2, :, 40:60, 40:60] += 0.3
    stages = (
        StageResult("load", Status.PASS, "strict"),
        StageResult("pixels", Status.FAIL, "", comparison=compare_arrays(moved, pixels, tolerance=tol, names=names[:4]),
                    notes=("Fix: set [preprocess].crop_pct = 0.9",)),
        StageResult("embedding", Status.FAIL, "", comparison=compare_arrays(
            embedding + rng.normal(scale=1e-3, size=embedding.shape), embedding, tolerance=tol, names=names, cosine=True)),
        StageResult("outputs", Status.FAIL, "", comparison=compare_arrays(
            outputs + rng.normal(scale=1e-4, size=outputs.shape), outputs, tolerance=tol, names=names)),
    )
    return Report("synthetic.toml", "fixtures/synthetic", "cpu", "float32", stages)


def test_large_report_stays_small_with_capped_tables(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    paths = write_reports(_synthetic_check(3000), tmp_path)
    html = paths["html"].read_text()
    assert paths["html"].stat().st_size < 5_000_000
    assert paths["md"].stat().st_size < 60_000
    assert "Worst samples: 20 of 3000 shown." in html
    assert "Worst samples of `embedding` (20 of 3000 shown):" in paths["md"].read_text()
    # Per-sample errors are all in the JSON, so the plots summarise every sample.
    data = json.loads(paths["json"].read_text())
    assert len(data["stages"][2]["comparison"]["samples"]) == 3000
    assert ("thumbnails", "pixels") in html_plots(html) and ("cosine", "embedding") in html_plots(html)


def test_matrix_report_has_a_heat_map_and_one_testcase_per_cell():
    tol = Tolerance(atol=1e-5, rtol=0.0, min_cosine=0.99999)
    reference = np.eye(3)
    cells = []
    for i, (mode, deployed, delta) in enumerate((("pre_logits", True, 0.0), ("forward", False, 0.1),
                                                 ("pooler", True, 0.02))):
        cell = Cell(values=(("extract", mode), ("dtype", "float32")), id=f"{mode}-float32", deployment=deployed)
        comparison = compare_arrays(reference + delta * np.arange(3), reference, tolerance=tol, cosine=True)
        cells.append(CellResult(cell, Status.PASS if comparison else Status.FAIL, comparison))
    cells.append(CellResult(Cell((("extract", "tokens"), ("dtype", "float32")), "tokens-float32", False),
                            Status.SKIP, reason="this model has no token output"))
    data = plain_document(MatrixReport("m.toml", "f", tuple(cells), ("extract", "dtype")))
    assert data["schema_version"] == 1 and data["kind"] == "matrix" and data["passed"] is False
    suite = ET.fromstring(render_junit(data)).find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["pre_logits-float32", "forward-float32", "pooler-float32", "tokens-float32"]
    # The gate fails on deployment cells only: a drifting probe is reported, not failed.
    assert cases["pooler-float32"].find("failure") is not None
    assert cases["forward-float32"].find("failure") is None
    assert "probe cell drifts" in cases["forward-float32"].find("system-out").text
    assert cases["tokens-float32"].find("skipped").get("message") == "this model has no token output"
    html = render_html(data)
    heat = html_plots(html)["matrix", "cells"]
    assert "<svg" in heat and "pooler-float32 (deploy)" in heat and "DRIFT" in heat
    assert render_markdown(data).startswith("## ❌ MATRIX: a deployment cell drifted")


def test_diagnosis_report_plots_each_cause_and_fails_one_testcase_per_cause():
    stages = (StageResult("load", Status.PASS, "ok"), StageResult("pixels", Status.FAIL, "moved"))
    change = Change("preprocess", (("crop_pct", 0.875),), origin="recorded")
    other = Change("preprocess", (("interpolation", "bicubic"),))
    causes = (Cause(change, "pixels", "max abs", 0.3, 0.0, True, "crop_pct = 1.0"),
              Cause(other, "pixels", "max abs", 0.3, 0.1, False, 'interpolation = "bilinear"'))
    diagnosis = Diagnosis(Report("d.toml", "f", "cpu", "float32", stages), causes, (change,), True,
                          affected=("a.png",), total=3)
    data = plain_document(diagnosis)
    text = render_markdown(data)
    assert text.splitlines()[0] == "## ❌ DRIFT first seen at the pixels stage; fix (confirmed): [preprocess].crop_pct = 0.875."
    # The fix is a block of its own, whatever its TOML form: the fixed wording is its label.
    assert "Fix (confirmed: parity check passes with it):\n\n```toml\n" in text
    assert data["fix_toml"][0] in text.split("```toml\n", 1)[1].split("```", 1)[0]
    cases = ET.fromstring(render_junit(data)).find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == ["load", "pixels", "cause 1: [preprocess].crop_pct = 0.875",
                                              'cause 2: [preprocess].interpolation = "bicubic"']
    assert cases[2].find("failure").get("message").endswith("Fix: [preprocess].crop_pct = 0.875")
    causes_plot = html_plots(render_html(data))["causes", "diagnosis"]
    assert "<svg" in causes_plot and "before (the spec as is)" in causes_plot


def test_plugin_writes_the_report_files(runs, pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    from parity.report import plots

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)  # a CI job's own summary is not for this test

    # `runs` imported what the gate imports lazily; the inline session must not drop and re-import torch or
    # matplotlib, so draw once here too.
    plots.error_distribution("x", {"samples": [{"max_abs": 1.0}], "tolerance": {"atol": 1e-5}})
    pytester.makepyfile(test_gate=(ROOT / "tests" / "parity" / "test_gate.py").read_text())
    out = tmp_path / "parity-report"
    result = pytester.runpytest("--parity-spec", str(EXAMPLE_SPEC), "--parity-report", str(out))
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines(["*parity report files: *report.json*junit.xml"])
    assert load_document(out / "report.json")["passed"] is True
    assert [c.get("name") for c in ET.parse(out / "junit.xml").getroot().iter("testcase")] == list(STAGE_ORDER)
    assert (out / "report.md").read_text().startswith("## ✅ PARITY")


def test_calibration_and_service_documents_render_in_every_format():
    from parity.commands.calibrate import Calibration, Run
    from parity.commands.diagnose import ServiceDiagnosis

    calibration = Calibration("cpu", "float32", (Run(1, 1), Run(8, 4, shuffled=True)), 4.0,
                              {"embedding": {"max_abs": 2e-7, "min_cosine": 0.99999999}, "outputs": {"max_abs": 0.0}})
    data = plain_document(calibration)
    assert data["kind"] == "calibration" and data["runs"] == ["batch 1, 1 thread(s)", "batch 8 shuffled, 4 thread(s)"]
    assert [c.get("name") for c in ET.fromstring(render_junit(data)).iter("testcase")] == ["embedding", "outputs"]
    assert "| `embedding` | 2.00e-07 | 0.99999999 |" in render_markdown(data)
    assert NETWORK.search(render_html(data)) is None
    change = Change("preprocess", (("interpolation", "bilinear"),))
    service = ServiceDiagnosis("service.jsonl", 12, False, ("embedding",), 0.06,
                               (Cause(change, "embedding", "max abs", 0.06, 0.0, True, 'interpolation = "bicubic"'),),
                               (change,), True)
    data = plain_document(service)
    text = render_markdown(data)
    assert text.splitlines()[:2] == ["## ❌ The service does NOT match the spec's pipeline (embedding max abs 0.06).",
                                     "**Reproduced by:** the spec with"]
    assert '```toml\n[preprocess]\ninterpolation = "bilinear"\n```' in text
    failures = [c.find("failure") for c in ET.fromstring(render_junit(data)).iter("testcase")]
    assert all(f is not None for f in failures) and len(failures) == 2
    assert ("causes", "diagnosis") in html_plots(render_html(data))


def test_an_unwritable_report_directory_is_a_report_error(tmp_path, monkeypatch):
    from parity.errors import ReportError

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    report = Report("s.toml", "f", "cpu", "float32", (StageResult("load", Status.PASS, "ok"),))
    with pytest.raises(ReportError, match="cannot write the reports: .*file.*pass a writable --report DIR"):
        write_reports(report, blocker / "out")
