"""Report files: report.json, report.md, report.html, junit.xml; `parity report`; progress lines in logs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from parity.commands.check import STAGE_ORDER
from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.judge.arrays import compare_arrays
from parity.commands.diagnose import Cause, Change, Diagnosis
from parity.report.files import load_document, render_html, render_junit, render_markdown, write_reports
from parity.progress import Progress
from parity.results import Report, StageResult, Status, Tolerance
from parity.commands.matrix import Cell, CellResult, MatrixReport
from tests.support.paths import EXAMPLE_SPEC, ROOT
from tests.support.specs import write_spec

DRIFT = {'interpolation = "bicubic"': 'interpolation = "bilinear"'}
FIX = 'set [preprocess].interpolation = "bicubic"'
NETWORK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", re.I)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, Path, str]]:
    """`parity check --report` on the example and on a bilinear candidate, stderr in a file, as in CI."""
    root = tmp_path_factory.mktemp("reports")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARITY_PROGRESS_INTERVAL", "0")
        patch.setenv("GITHUB_STEP_SUMMARY", str(root / "summary.md"))
        for name, replacements in (("passing", None), ("drifted", DRIFT)):
            spec = write_spec(root, replacements, name=f"{name}.toml")
            log = root / f"{name}.stderr"
            with log.open("w") as stderr, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                code = main(["check", "--spec", str(spec), "--report", str(root / name)])
            results[name] = (code, root / name, log.read_text())
    return results


def _cases(path: Path) -> dict[str, ET.Element]:
    suite = ET.parse(path).getroot().find("testsuite")
    return {case.get("name"): case for case in suite.findall("testcase")}


def test_junit_has_one_testcase_per_stage_with_its_state(runs):
    code, directory, _ = runs["passing"]
    assert code == EXIT_PASS
    cases = _cases(directory / "junit.xml")
    assert list(cases) == list(STAGE_ORDER)
    assert all(case.find("failure") is None and case.find("skipped") is None for case in cases.values())

    code, directory, _ = runs["drifted"]
    assert code == EXIT_DRIFT
    cases = _cases(directory / "junit.xml")
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
    data = json.loads(json.dumps(_document(Report("s.toml", "f", "cpu", "float32", stages))))
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
    suite = ET.fromstring(render_junit(_document(report))).find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("0", "1")
    assert suite.find("testcase[@name='embedding']/skipped").get("message") == (
        'embedding: moved; accepted by [decisions].gate = "decisions" (no decision flipped)')


def test_markdown_names_verdict_first_drifting_stage_and_fix_in_five_lines(runs):
    _, directory, _ = runs["drifted"]
    text = (directory / "report.md").read_text()
    head = "\n".join(text.splitlines()[:5])
    assert "DRIFT" in head and "`pixels`" in head and FIX in head
    assert text.startswith("## ❌ DRIFT WITHOUT DECISION FLIPS")
    assert "<details>" in text and "| `preprocess.interpolation` | `'bicubic'` | `'bilinear'` |" in text
    assert len(text.encode()) < 60_000
    passing = (runs["passing"][1] / "report.md").read_text()
    assert passing.startswith("## ✅ PARITY: the candidate reproduces the reference.")


def test_markdown_is_appended_to_the_step_summary(runs):
    summary = (runs["passing"][1].parent / "summary.md").read_text()
    for name in ("passing", "drifted"):
        assert (runs[name][1] / "report.md").read_text() in summary


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


def _plots(html: str) -> dict[tuple[str, str], str]:
    found = re.findall(r'<figure class="plot" data-plot="([a-z]+)" data-subject="([a-z]+)">(.*?)</figure>', html, re.S)
    return {(kind, subject): body for kind, subject, body in found}


def test_html_has_an_inline_svg_per_plot_and_no_network_reference(runs):
    _, directory, _ = runs["drifted"]
    html = (directory / "report.html").read_text()
    plots = _plots(html)
    expected = {(kind, stage) for stage in ("pixels", "embedding", "head", "outputs") for kind in ("distribution", "sorted")}
    expected |= {("cosine", "embedding"), ("thumbnails", "pixels")}
    assert set(plots) == expected
    assert all(body.lstrip().startswith("<svg") and body.rstrip().endswith("</svg>") for body in plots.values())
    # The worst golden image's three thumbnails are images inside the SVG, as data, not links.
    assert plots["thumbnails", "pixels"].count('href="data:image/png;base64,') == 4  # and the colour bar
    assert NETWORK.search(html) is None
    assert "<script" not in html and "<link" not in html
    assert "<td>preprocess.interpolation</td><td>&#x27;bicubic&#x27;</td><td>&#x27;bilinear&#x27;</td>" in html


def test_html_renders_in_headless_chromium(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the HTML is checked statically above")
    from PIL import Image

    _, directory, _ = runs["drifted"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}", (directory / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1200)
    # The red verdict banner (#c62828) and the plots' blue bars (#1565c0) were drawn.
    for colour in ((0xC6, 0x28, 0x28), (0x15, 0x65, 0xC0)):
        assert (np.abs(image.astype(int) - colour).sum(axis=2) < 12).sum() > 500, colour


def test_progress_lines_are_printed_while_embedding_when_stderr_is_a_file(runs):
    log = runs["passing"][2]
    lines = log.splitlines()
    assert lines[0] == "parity: embedding images"
    # batch_size 8 over 17 images: two lines during the phase (interval 0 here), one at its end.
    assert re.fullmatch(r"parity: embedding images: 8/17 \([0-9.e+]+/s, ETA \d+ s\)", lines[1]), lines
    assert re.fullmatch(r"parity: embedding images: 16/17 \(.*\)", lines[2]), lines
    assert re.fullmatch(r"parity: embedding images: 17/17 done in \d+ s", lines[3]), lines
    assert "\x1b[" not in log  # no bar redraws, no colour codes in a log


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_at_most_once_per_interval():
    from rich.console import Console

    buffer, clock = io.StringIO(), _Clock()
    with Progress(Console(file=buffer, width=200), interval=10.0, clock=clock) as progress:
        progress.phase("matrix over images")
        for done in range(1, 61):
            clock.now = float(done)
            progress.update(done, 60)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "parity: matrix over images"
    assert lines[1] == "parity: matrix over images: 10/60 (1/s, ETA 50 s)"
    assert [line.split(": ")[2].split(" ")[0] for line in lines[1:-1]] == ["10/60", "20/60", "30/60", "40/60", "50/60"]
    assert lines[-1] == "parity: matrix over images: 60/60 done in 1 min 00 s"


def _document(result) -> dict:
    from parity.report.console import document

    return json.loads(json.dumps(document(result)))


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
    assert ("thumbnails", "pixels") in _plots(html) and ("cosine", "embedding") in _plots(html)


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
    data = _document(MatrixReport("m.toml", "f", tuple(cells), ("extract", "dtype")))
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
    heat = _plots(html)["matrix", "cells"]
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
    data = _document(diagnosis)
    text = render_markdown(data)
    assert text.splitlines()[0] == "## ❌ DRIFT first seen at the pixels stage; fix (confirmed): [preprocess].crop_pct = 0.875."
    # The fix is a block of its own, whatever its TOML form: the fixed wording is its label.
    assert "Fix (confirmed: parity check passes with it):\n\n```toml\n" in text
    assert data["fix_toml"][0] in text.split("```toml\n", 1)[1].split("```", 1)[0]
    cases = ET.fromstring(render_junit(data)).find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == ["load", "pixels", "cause 1: [preprocess].crop_pct = 0.875",
                                              'cause 2: [preprocess].interpolation = "bicubic"']
    assert cases[2].find("failure").get("message").endswith("Fix: [preprocess].crop_pct = 0.875")
    causes_plot = _plots(render_html(data))["causes", "diagnosis"]
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
    data = _document(calibration)
    assert data["kind"] == "calibration" and data["runs"] == ["batch 1, 1 thread(s)", "batch 8 shuffled, 4 thread(s)"]
    assert [c.get("name") for c in ET.fromstring(render_junit(data)).iter("testcase")] == ["embedding", "outputs"]
    assert "| `embedding` | 2.00e-07 | 0.99999999 |" in render_markdown(data)
    assert NETWORK.search(render_html(data)) is None
    change = Change("preprocess", (("interpolation", "bilinear"),))
    service = ServiceDiagnosis("service.jsonl", 12, False, ("embedding",), 0.06,
                               (Cause(change, "embedding", "max abs", 0.06, 0.0, True, 'interpolation = "bicubic"'),),
                               (change,), True)
    data = _document(service)
    text = render_markdown(data)
    assert text.splitlines()[:2] == ["## ❌ The service does NOT match the spec's pipeline (embedding max abs 0.06).",
                                     "**Reproduced by:** the spec with"]
    assert '```toml\n[preprocess]\ninterpolation = "bilinear"\n```' in text
    failures = [c.find("failure") for c in ET.fromstring(render_junit(data)).iter("testcase")]
    assert all(f is not None for f in failures) and len(failures) == 2
    assert ("causes", "diagnosis") in _plots(render_html(data))


def test_progress_on_a_terminal_is_rich_bar_not_lines():
    from rich.console import Console

    buffer = io.StringIO()
    with Progress(Console(file=buffer, force_terminal=True, width=100), interval=0.0) as progress:
        progress.phase("calibration runs")
        progress.update(1, 4)
        progress.phase("second phase")
        progress.update(4, 4)
    assert "parity: " not in buffer.getvalue()


def test_progress_keeps_a_log_alive_between_rare_updates():
    import time

    from rich.console import Console

    buffer = io.StringIO()
    with Progress(Console(file=buffer, width=200), interval=0.2) as progress:
        progress.phase("probing 22 changes on 4 samples")
        time.sleep(0.7)
        progress.update(0, 17)
        time.sleep(0.5)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "parity: probing 22 changes on 4 samples"
    assert "parity: probing 22 changes on 4 samples: working, 0 s so far" in lines
    assert any(re.fullmatch(r"parity: probing 22 changes on 4 samples: 0/17 \(0/s\)", line) for line in lines), lines
    # At most one line per interval: 1.2 s of work at 0.2 s gives the phase line and no more than 7 others.
    assert len(lines) <= 8


def test_an_unwritable_report_directory_is_a_report_error(tmp_path, monkeypatch):
    from parity.errors import ReportError

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    report = Report("s.toml", "f", "cpu", "float32", (StageResult("load", Status.PASS, "ok"),))
    with pytest.raises(ReportError, match="cannot write the reports: .*file.*pass a writable --report DIR"):
        write_reports(report, blocker / "out")
