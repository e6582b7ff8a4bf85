"""`parity choose --html`: the page holds the Pareto plot (latency p50 vs max abs per cell) inline, names the
chosen cell per device, and renders in a browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from parity.cli import main
from parity.commands.choose import pareto_front
from parity.report.html import render_html
from parity.results import Cell, CellCost, CellResult, Choice, Comparison, MatrixReport, Status, Tolerance
from tests.support.reports import NETWORK, html_plots, plain_document
from tests.support.specs import write_spec

# A GPU deployment seen from a report: eight cells of another model (ids of another form than the
# example's), two devices, a bit-exact cell, a drifting float16 cell, a batch-dependent cell.
CELLS = (  # (device, dtype, batch size, p50 ms, max abs, status, reason)
    ("cuda", "float32", 1, 4.1, 5e-6, Status.PASS, ""),
    ("cuda", "float32", 32, 0.9, 4e-6, Status.PASS, ""),
    ("cuda", "bfloat16", 32, 0.5, 2e-2, Status.PASS, ""),
    ("cuda", "float16", 32, 0.4, 0.8, Status.FAIL, ""),
    ("cpu", "float32", 1, 60.0, 0.0, Status.PASS, ""),
    ("cpu", "float32", 16, 41.0, 1e-6, Status.FAIL, "batch dependence: at batch size 16 ..."),
    ("cpu", "bfloat16", 16, 150.0, 1e-2, Status.PASS, ""),
    ("cpu", "bfloat16", 1, 210.0, 1e-2, Status.PASS, ""),
)


def _choice() -> Choice:
    results = []
    for device, dtype, size, ms, error, status, reason in CELLS:
        values = (("model", "bn_head"), ("device", device), ("dtype", dtype), ("batch_size", size))
        comparison = Comparison((64, 32), (64, 32), Tolerance(1e-3, 0.0), max_abs=error, total=64 * 32,
                                min_cosine=1.0 - error)
        cost = CellCost(size, 64, 1, ms, ms * 1.2, 1e3 / ms, 0.5, 900.0, 800.0 if device == "cuda" else None,
                        "NVIDIA H100" if device == "cuda" else "x86_64")
        results.append(CellResult(Cell(values, f"bn_head-{device}-{dtype}-b{size}", True), status, comparison,
                                  reason=reason, cost=cost))
    report = MatrixReport(spec="/specs/bn_head.toml", fixtures="/fixtures/bn_head", cells=tuple(results),
                          axes=("device", "dtype", "batch_size"), equivalent_modes=(), reference_dtype="float32")
    chosen = {"cuda": "bn_head-cuda-bfloat16-b32", "cpu": "bn_head-cpu-float32-b1"}
    return Choice(report=report, chosen=chosen, pareto=pareto_front(results), budget_ms=None)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("choice") / "choice.html"
    path.write_text(render_html(plain_document(_choice())), encoding="utf-8")
    return path


def _svg_text(svg: str) -> list[str]:
    """The text the SVG shows (matplotlib writes it as text: svg.fonttype none)."""
    return [re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>", svg, re.S)]


def test_the_page_holds_the_pareto_plot_inline_and_names_the_chosen_cells(page):
    html = page.read_text()
    plots = html_plots(html)
    assert set(plots) == {("pareto", "cells")}
    svg = plots["pareto", "cells"]
    assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert NETWORK.search(html) is None and "<script" not in html
    shown = _svg_text(svg)
    # The parts every id shares (the model's name) are dropped from the labels; the winners are named, the
    # front's cells starred.
    assert "chosen on cuda: cuda-bfloat16-b32 *" in shown and "chosen on cpu: cpu-float32-b1 (exact) *" in shown
    assert {"passes", "fails", "Pareto front (*)", "chosen"} <= set(shown)
    assert {"cuda-float16-b32 *", "cpu-bfloat16-b1"} <= set(shown)  # a failing cell is plotted, not dropped
    # The table beside it: fastest first per device, chosen marked, the batch dependence's reason.
    assert html.index("bn_head-cpu-float32-b16") < html.index("bn_head-cpu-float32-b1<")
    assert html.count("<td>chosen</td>") == 2
    assert "batch dependence: at batch size 16" in html
    assert "CHOSEN: the fastest passing configuration" in html


def test_the_pareto_front_is_the_cells_no_other_beats(page):
    # Front (fastest first): cuda float16 (fails, but no cell beats it on latency), cuda bfloat16, cuda
    # float32 b32, cpu float32 b16, cpu float32 b1 (bit-exact). The others are beaten on both.
    front = set(_choice().pareto)
    assert front == {"bn_head-cuda-float16-b32", "bn_head-cuda-bfloat16-b32", "bn_head-cuda-float32-b32",
                     "bn_head-cpu-float32-b16", "bn_head-cpu-float32-b1"}
    # The front is one staircase line through its five points.
    svg = html_plots(page.read_text())["pareto", "cells"]
    assert svg.count('id="line2d_') >= 1


def test_choose_writes_the_html_page(tmp_path, capsys):
    spec = write_spec(tmp_path, {'dtype = ["float32", "bfloat16"]': 'dtype = ["float32"]\nbatch_size = [1, 4]'})
    out = tmp_path / "pages" / "choice.html"  # a missing directory is made
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--html", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    html = out.read_text()
    svg = html_plots(html)["pareto", "cells"]
    chosen = re.search(r"per device: cpu: (\S+) \(", html).group(1)
    label = chosen.split("-")[-1]  # the parts both cells share are dropped: bs1 or bs4
    assert any(text.startswith(f"chosen on cpu: {label}") for text in _svg_text(svg))
    # the bundled spec has [decisions]: each row shows its flip-rate bound with the changed decisions
    assert "<th>flip bound</th>" in html and re.search(r"<td>[0-9.]+ % \(0\)</td>", html)
    # A directory where the page goes is refused before any work, exit 2.
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--html", str(tmp_path)]) == 2
    assert "--html" in capsys.readouterr().err


def test_the_page_renders_in_headless_chromium(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the page is checked statically above")
    from PIL import Image

    shot = tmp_path / "choice.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,900", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (900, 1100)
    # Passing markers (#2e7d32), failing crosses and the banner's colour's absence (a green banner),
    # and the front's line (#1565c0) were drawn.
    for colour, least in (((0x2E, 0x7D, 0x32), 500), ((0xC6, 0x28, 0x28), 20), ((0x15, 0x65, 0xC0), 50)):
        assert (np.abs(image - colour).sum(axis=2) < 12).sum() > least, colour
