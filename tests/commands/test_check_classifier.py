"""The second bundled example: transformers CLIPVisionModel + MLP classifier, gated on its decisions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from parity.commands.check import run_check
from parity.errors import SpecError
from parity.store.fixtures import load_fixture
from parity.model.pipeline import build_pipeline
from parity.report.console import render_text, verdict_line
from parity.results import Status, Verdict
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, ROOT

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def spec():
    return load_spec(CLASSIFIER_SPEC)


def test_bundled_classifier_passes_the_gate(spec):
    report = run_check(spec)
    assert report.passed and report.verdict is Verdict.PARITY
    decisions = report.stage("decisions").decisions
    assert [d.kind for d in decisions] == ["argmax", "verification"]
    assert decisions[0].total == 18 and decisions[1].total == 18 * 17 // 2
    tensors = sum(len(part["tensors"]) for part in load_fixture(CLASSIFIER_FIXTURES).manifest["weights"].values())
    assert report.stage("weights").headline == f"{tensors} tensors bit-identical to the trained weights"


def test_slow_processor_moves_logits_but_flips_no_decision(spec):
    report = run_check(spec.replace(preprocess={"processor": "slow"}))
    assert report.stage("pixels").status is Status.FAIL
    assert report.stage("outputs").status is Status.FAIL
    assert 1e-4 < report.stage("outputs").comparison.max_abs < 0.1  # a real logit change, far from any boundary
    assert report.stage("decisions").status is Status.PASS
    assert report.verdict is Verdict.DRIFT_NO_FLIPS and not report.passed
    assert verdict_line(report).startswith("DRIFT WITHOUT DECISION FLIPS: the numbers moved beyond tolerance "
                                           "(first at pixels) but no decision flipped (0 of 18 argmax, 0 of 153 "
                                           "verification).")
    assert 'Fix: set [preprocess].processor = "fast"' in render_text(report)
    probability = report.stage("decisions").decisions[0].max_probability_error
    assert 0 < probability < 0.01


def test_a_decisions_gate_accepts_drift_that_flips_nothing(spec):
    report = run_check(spec.replace(preprocess={"processor": "slow"}, decisions={"gate": "decisions"}))
    assert report.verdict is Verdict.DRIFT_NO_FLIPS and report.passed
    assert verdict_line(report).endswith('Accepted: [decisions].gate = "decisions".')


def test_a_drift_that_flips_decisions_is_a_distinct_verdict(spec):
    # BGR pixels, as an OpenCV-decoded image reaches an RGB model.
    report = run_check(spec.replace(preprocess={"channel_order": "bgr"}, decisions={"gate": "decisions"}))
    assert report.verdict is Verdict.DECISION_FLIPS and not report.passed
    argmax, verification = report.stage("decisions").decisions
    assert argmax.flips or verification.flips
    assert verdict_line(report).startswith("DECISION FLIPS: ")


def test_flipped_argmax_names_sample_and_classes(spec):
    fixture = load_fixture(CLASSIFIER_FIXTURES)
    pipeline = build_pipeline(spec)
    swapped = pipeline.run_head(fixture.embeddings).numpy()[:, ::-1]
    from parity.judge.decisions import argmax_flips

    flips = argmax_flips(swapped, fixture.outputs, 1e-5, fixture.names)
    first = fixture.names[0]
    ref, got = fixture.outputs[0].argmax(), swapped[0].argmax()
    assert f"{first}: class {ref} -> {got}" in flips.flips
    assert flips.max_probability_error > 0.5


def test_verification_near_tie_is_reported_not_failed(spec):
    fixture = load_fixture(CLASSIFIER_FIXTURES)
    unit = fixture.embeddings / np.linalg.norm(fixture.embeddings, axis=1, keepdims=True)
    cosine = float(unit[0] @ unit[1])
    report = run_check(spec.replace(preprocess={"processor": "slow"},
                                    decisions={"verification_threshold": cosine + 1e-7, "argmax": False}))
    verification = report.stage("decisions").decisions[0]
    moved = [pair for pair in verification.flips + verification.near_ties if pair.startswith(
        f"{fixture.names[0]} ~ {fixture.names[1]}")]
    # The reference pair sits 1e-7 from the threshold: any crossing is within the embedding budget.
    assert all(pair in verification.near_ties for pair in moved)
    assert report.stage("decisions").status is Status.PASS


def test_cls_before_post_layernorm_moves_embeddings_without_flips(spec):
    # last_hidden_state[:, 0] is the CLS token before post_layernorm: same shape, other numbers.
    report = run_check(spec.replace(backbone={"extract": "cls"}))
    assert report.stage("pixels").status is Status.PASS
    assert report.stage("embedding").comparison.min_cosine < 0.999
    assert report.verdict is Verdict.DRIFT_NO_FLIPS
    assert 'Fix: set [backbone].extract = "pooler_output"' in render_text(report)


def test_gelu_for_quick_gelu_is_named_at_the_embedding_stage(spec):
    report = run_check(spec.replace(backbone={"kwargs": {"hidden_act": "gelu"}}))
    assert report.stage("load").status is Status.PASS and report.stage("pixels").status is Status.PASS
    embedding = report.stage("embedding")
    assert embedding.status is Status.FAIL
    assert any("QuickGELUActivation in the reference, GELUActivation in the candidate" in note
               for note in embedding.notes)


def test_image_embeds_needs_the_projection_class(spec):
    with pytest.raises(SpecError, match='set \\[backbone\\].model = "CLIPVisionModelWithProjection"'):
        build_pipeline(spec.replace(backbone={"extract": "image_embeds"}))


def test_a_missing_extra_is_named(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    with pytest.raises(SpecError, match=r"pip install 'parity\[hf\]'"):
        build_pipeline(spec)


def test_core_imports_without_the_extras():
    import subprocess

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['open_clip'] = None; "
            "import parity, parity.commands.check, parity.cli, parity.model.pipeline, parity.preprocess.config, parity.preprocess.diff; "
            "from parity.spec import load_spec; from parity.commands.check import run_check; "
            f"assert run_check(load_spec({str(ROOT / 'specs' / 'clip_dnn.toml')!r})).passed")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_diagnose_localises_a_transformers_activation_swap(spec):
    from parity.commands.diagnose import diagnose

    result = diagnose(spec.replace(backbone={"kwargs": {"hidden_act": "gelu"}}), samples=2)
    assert result.drift
    assert result.layer is not None and result.layer.module == "encoder.layers.0.mlp.activation_fn"
    assert [change.toml() for change in result.fix] == ["[backbone].kwargs = {  }"]


def test_calibration_measures_the_transformers_pipelines_own_noise(spec, tmp_path):
    import shutil

    from parity.commands.calibrate import calibrate, calibrated_tolerance

    fixture = shutil.copytree(CLASSIFIER_FIXTURES, tmp_path / "clip_mlp")
    result = calibrate(spec, fixtures=fixture)
    manifest = load_fixture(fixture).manifest
    budget = calibrated_tolerance(manifest, "outputs", "float32")
    assert budget is not None and budget.atol >= result.noise["outputs"]["max_abs"] * result.margin * (1 - 1e-9)
    report = run_check(spec, fixtures=fixture)
    assert report.passed and report.stage("outputs").comparison.tolerance.origin.startswith("calibrated")
    # The budget still separates real drift: BGR input flips decisions whatever the noise.
    assert run_check(spec.replace(preprocess={"channel_order": "bgr"}), fixtures=fixture).verdict is Verdict.DECISION_FLIPS
