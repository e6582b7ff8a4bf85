"""report.md: the verdict, the first drifting stage and its fix in the first lines; appended to a CI step summary."""

from __future__ import annotations

from tests.support.reports import FIX


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
