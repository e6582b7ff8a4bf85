"""The gate on the bundled example: clean candidate passes; each drift fails at the right stage."""

from __future__ import annotations

import pytest

from parity.commands.check import STAGE_ORDER, diff_config, run_check
from parity.results import ConfigDiff, Status

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_clean_candidate_passes_every_stage(example_spec):
    report = run_check(example_spec)
    assert report.passed
    assert [s.stage for s in report.stages] == list(STAGE_ORDER)
    assert all(s.status is Status.PASS for s in report.stages)
    assert report.stage("embedding").comparison.min_cosine == pytest.approx(1.0)
    assert not [d for d in report.config_diffs if not d.field.startswith(("versions.", "provenance.git_revision"))]


@pytest.mark.parametrize(
    ("change", "stage", "note"),
    [
        pytest.param({"preprocess": {"interpolation": "bilinear"}}, "pixels",
                     'Fix: set [preprocess].interpolation = "bicubic" (the fixture was made with it; '
                     'the candidate has "bilinear")', id="bilinear"),
        pytest.param({"preprocess": IMAGENET}, "pixels",
                     "Fix: set [preprocess].mean = [0.48145466, 0.4578275, 0.40821073]", id="imagenet-mean-std"),
        pytest.param({"preprocess": {"crop_pct": 0.875}}, "pixels",
                     "Fix: set [preprocess].crop_pct = 1.0 (the fixture was made with it; the candidate has 0.875)",
                     id="crop_pct"),
        pytest.param({"backbone": {"model": "vit_large_patch14_clip_336.openai"}}, "embedding",
                     "weights loaded with strict=True and the pixels match, yet the embeddings moved: the backbone "
                     "computes differently (activation QuickGELU in the reference, GELU in the candidate; "
                     "identical keys, so strict loading cannot see it)", id="gelu-not-quickgelu"),
        pytest.param({"backbone": {"extract": "forward"}}, "embedding",
                     "the candidate embedding is (768,) per sample, the reference (64,)", id="forward-not-pre_logits"),
    ],
)
def test_drift_fails_at_the_stage_that_moved(example_spec, change, stage, note):
    report = run_check(example_spec.replace(**change))
    assert not report.passed
    assert report.first_failure.stage == stage
    assert report.stage("load").status is Status.PASS
    assert report.stage("head").status is Status.PASS, "the head alone still matches on reference embeddings"
    notes = report.first_failure.notes
    assert any(n.startswith(note) for n in notes), notes


def test_activation_swap_loads_strictly_yet_embeddings_move(example_spec):
    report = run_check(example_spec.replace(backbone={"model": "vit_large_patch14_clip_336.openai"}))
    assert report.stage("pixels").status is Status.PASS
    embedding = report.stage("embedding").comparison
    assert embedding.shapes_match and embedding.mismatched > 0
    assert ConfigDiff("backbone.activation", ["QuickGELU"], ["GELU"]) in report.config_diffs


def test_head_class_that_does_not_match_fails_at_strict_load(example_spec):
    spec = example_spec.replace(head={"class_path": "tests.support.heads:CustomDNN", "kwargs": {}})
    report = run_check(spec)
    load = report.stage("load")
    assert load.status is Status.FAIL and report.first_failure is load
    (diff,) = load.key_diffs
    assert diff.missing == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert diff.unexpected[:2] == ("bias_embeddings.0.weight", "bias_embeddings.1.weight")
    assert "mlp.0.weight" in diff.unexpected and "output.weight" in diff.unexpected
    assert all(s.status is Status.SKIP for s in report.stages[1:])


def test_diff_config_compares_common_fields_only():
    recorded = {"preprocess": {"mean": [0.5, 0.5, 0.5], "crop_pct": 1.0}, "backbone": {"kwargs": {"depth": 2}}}
    candidate = {"preprocess": {"mean": (0.5, 0.5, 0.5), "crop_pct": 0.9}, "backbone": {"kwargs": {"depth": 3}},
                 "extra": {"x": 1}}
    assert diff_config(recorded, candidate) == (
        ConfigDiff("preprocess.crop_pct", 1.0, 0.9),
        ConfigDiff("backbone.kwargs", {"depth": 2}, {"depth": 3}),
    )
