"""`parity choose --report DIR` and `parity report` on a choice: the Markdown for a pull request, the JUnit for CI
(one testcase per device: chosen, none passing, or skipped where the device is absent), and the HTML page."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import torch

from parity.cli import main
from tests.support.specs import write_spec

# One dtype, two batch sizes, on both of the spec's devices: the CUDA cells skip where CUDA is absent.
FLOAT32 = {'dtype = ["float32", "bfloat16"]': 'dtype = ["float32"]\nbatch_size = [1, 4]'}


def _cases(path) -> dict[str, ET.Element]:
    return {case.get("name"): case for case in ET.parse(path).getroot().iter("testcase")}


def test_choose_writes_every_report_and_parity_report_renders_them_again(tmp_path, capsys):
    spec = write_spec(tmp_path, FLOAT32)
    out = tmp_path / "reports"
    assert main(["choose", "--spec", str(spec), "--report", str(out)]) == 0
    assert "reports written to" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["kind"] == "choice" and data["passed"]
    chosen = data["chosen"]["cpu"]
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("## ✅ CHOSEN") and f"| `{chosen}` |" in markdown and "| chosen |" in markdown
    assert "flip bound" in markdown and "p95 ms" in markdown
    cases = _cases(out / "junit.xml")
    assert cases["choose on cpu"].find("system-out").text.startswith(f"chosen {chosen}: ")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in cases["choose on cuda"].find("skipped").get("message")
    assert "<svg" in (out / "report.html").read_text()
    # rendered again from report.json alone, byte for byte
    again = tmp_path / "again.md"
    assert main(["report", str(out / "report.json"), "--md", str(again)]) == 0
    assert again.read_text() == markdown


def test_a_device_with_no_cell_within_the_budget_fails_its_testcase(tmp_path):
    spec = write_spec(tmp_path, FLOAT32)
    out = tmp_path / "reports"
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--budget-ms", "1e-6", "--report", str(out)]) == 1
    failure = _cases(out / "junit.xml")["choose on cpu"].find("failure")
    assert failure is not None and failure.get("message").startswith("no cpu cell passes within 1e-06 ms per image")
    assert (out / "report.md").read_text().startswith("## ❌")
