"""Rendering: text and JSON carry the verdict and the evidence; no NaN leaks into JSON."""

from __future__ import annotations

import json

import numpy as np

from parity.judge.arrays import compare_arrays
from parity.report.console import format_stage, render_text, to_json
from parity.results import KeyDiff, Report, StageResult, Status, Tolerance

TOL = Tolerance(atol=1e-5, rtol=0.0)


def _report(*stages: StageResult) -> Report:
    return Report(spec="s.toml", fixtures="f", device="cpu", dtype="float32", stages=stages)


def test_shape_mismatch_renders_without_nan_and_serialises():
    comparison = compare_arrays(np.zeros((2, 768)), np.zeros((2, 64)), tolerance=TOL)
    report = _report(StageResult("embedding", Status.FAIL, "", comparison=comparison))
    assert "Shapes differ: candidate [2, 768], reference [2, 64]" in format_stage(report.stages[0])
    data = json.loads(json.dumps(to_json(report)))
    assert data["passed"] is False and data["first_failure"] == "embedding"
    assert data["stages"][0]["comparison"]["max_abs"] is None


def test_failed_stage_text_has_counts_worst_samples_and_notes():
    ref = np.zeros((3, 4))
    cand = ref.copy()
    cand[1, 2] = 0.5
    comparison = compare_arrays(cand, ref, tolerance=TOL, names=["a.png", "b.png", "c.png"])
    text = format_stage(StageResult("outputs", Status.FAIL, "", comparison=comparison, notes=("Fix: do x",)))
    assert text.splitlines() == [
        "outputs: FAIL - drifted beyond tolerance",
        "  Number of differences: 1 / 12 (8.3%) outside atol 1e-05, rtol 0 [default]",
        "  max abs 0.5, mean abs 0.0417, max rel inf",
        "  Would pass with atol >= 0.5 at rtol 0.0e+00",
        "  Worst samples: b.png (0.5)",
        "  Fix: do x",
    ]


def test_key_diff_is_listed_with_the_fix():
    diff = KeyDiff(target="Head", source="head weights w.pth", missing=("fc.weight",), unexpected=("mlp.0.weight",))
    text = format_stage(StageResult("load", Status.FAIL, "weights do not load with strict=True", key_diffs=(diff,)))
    assert "Missing key(s): in the module, not in the checkpoint (1):\n      fc.weight" in text
    assert "Unexpected key(s): in the checkpoint, not in the module (1):\n      mlp.0.weight" in text
    assert "A non-strict load would leave these layers randomly initialised" in text


def test_console_verdict_lines():
    passing = _report(StageResult("load", Status.PASS, "ok"))
    assert "PARITY: the candidate reproduces the reference." in render_text(passing)
    failing = _report(StageResult("load", Status.PASS, "ok"), StageResult("head", Status.FAIL, "raised"))
    assert "DRIFT: first drifted stage: head." in render_text(failing)
    nothing = _report(StageResult("pixels", Status.SKIP, "no golden pixels"))
    assert not nothing.passed
    assert "NO VERDICT: no stage was compared." in render_text(nothing)


def test_a_load_failure_is_drift_without_an_empty_tolerances_line():
    from parity.results import Verdict

    diff = KeyDiff(target="Head", source="head weights w.pth", missing=("fc.weight",), unexpected=("mlp.0.weight",))
    failed = _report(StageResult("load", Status.FAIL, "weights do not load with strict=True", key_diffs=(diff,)),
                     *(StageResult(s, Status.SKIP, "not run: weights did not load") for s in ("weights", "outputs")))
    assert failed.verdict is Verdict.DRIFT and not failed.passed
    text = render_text(failed)
    assert "NO VERDICT" not in text
    assert text.rstrip().splitlines()[-1] == ("DRIFT: first drifted stage: load (the weights do not load with "
                                              "strict=True; no later stage ran).")
    assert "tolerances:" not in text


def test_a_load_cause_reads_as_words_not_nan():
    from parity.commands.diagnose import Cause, Change

    cause = Cause(Change("head", (("key_map", {"module.": ""}),), origin="checkpoint forensics"), "load", "keys",
                  float("nan"), float("nan"), True, "saved from nn.DataParallel / DistributedDataParallel")
    assert cause.words == ('[head].key_map = { "module." = "" } (saved from nn.DataParallel / '
                           "DistributedDataParallel); the checkpoint then loads with strict=True")
    assert "nan" not in cause.words and "the spec has" not in cause.words


def test_embedding_width_note_speaks_the_backbones_library():
    from parity.explain.fixes import _embedding_notes

    for library, own, foreign in (("transformers", "image_embeds", "timm"), ("open_clip", "encode_image", "timm"),
                                  ("timm", "forward_head", "pooler_output")):
        (note,) = _embedding_notes({}, (16,), (64,), (), library=library)
        assert own in note and foreign not in note, note
