"""report.html: inline SVG plots and images, nothing fetched over the network; it renders in a browser."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from tests.support.reports import NETWORK, html_plots


def test_html_has_an_inline_svg_per_plot_and_no_network_reference(runs):
    _, directory, _ = runs["drifted"]
    html = (directory / "report.html").read_text()
    plots = html_plots(html)
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
