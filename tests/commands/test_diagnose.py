"""Diagnosis on the bundled example: each injected drift's true cause ranks first and its fix restores parity."""

from __future__ import annotations

import pytest
import torch

from parity.commands.check import run_check
from parity.store.checkpoints import read_state_dict
from parity.commands.diagnose import diagnose, first_divergent_layer
from parity.model.pipeline import build_pipeline
from tests.support.drifts import DRIFTS
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.service_logs import log_service

HEAD = EXAMPLE_FIXTURES / "dnnV1_model_best.pth"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """The head from another training run: same architecture, slightly different weights."""
    state = read_state_dict(HEAD)
    state["output.bias"] = state["output.bias"] + 0.01
    path = tmp_path_factory.mktemp("other_run") / "dnnV1_model_best.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(("change", "fix"), DRIFTS.values(), ids=DRIFTS.keys())
def test_true_cause_ranks_first_and_its_fix_restores_parity(example_spec, change, fix):
    candidate = example_spec.replace(**change)
    assert not run_check(candidate).passed, "the injected drift must fail the gate"
    result = diagnose(candidate)
    assert result.causes[0].change.toml() == fix
    assert result.causes[0].reproduces and result.causes[0].after < result.causes[0].before
    assert [c.toml() for c in result.fix] == [fix] and result.confirmed
    assert run_check(result.fix[0].apply(candidate)).passed


def test_head_from_another_training_run(example_spec, other_run):
    result = diagnose(example_spec.replace(head={"weights": other_run}))
    assert result.causes[0].change.origin == "the trained weights' fingerprints"
    assert result.causes[0].change.toml() == f'[head].weights = "{HEAD}"'
    assert result.confirmed


def test_clean_candidate_has_no_drift_and_no_invented_causes(example_spec):
    result = diagnose(example_spec)
    assert not result.drift and result.causes == () and result.fix == ()


def test_exif_drift_is_reported_per_sample(example_spec):
    result = diagnose(example_spec.replace(preprocess={"exif_transpose": False}))
    assert result.affected == ("chelsea_exif_rotated.png",)
    assert result.pattern == "only images with an EXIF orientation tag drift (all of them)"


def test_activation_swap_is_localised_to_the_first_activation(example_spec):
    result = diagnose(example_spec.replace(backbone={"model": "vit_large_patch14_clip_336.openai"}))
    assert result.layer.module == "blocks.0.mlp.act"


def test_first_divergent_layer_is_none_for_identical_models(example_spec):
    pipeline = build_pipeline(example_spec)
    pixels = torch.stack([pipeline.preprocess(EXAMPLE_FIXTURES / "images" / "chelsea.png")])
    assert first_divergent_layer(pipeline.backbone, pipeline.backbone, pixels) is None


def test_strict_load_failure_is_diagnosed_with_the_key_fix(example_spec, tmp_path):
    from torch import nn

    from reference.build_fixtures import HEAD_KWARGS
    from reference.models import MultiLabelRegressionNN

    head = MultiLabelRegressionNN(**HEAD_KWARGS)
    head.load_state_dict(read_state_dict(HEAD))
    path = tmp_path / "dp.pth"
    torch.save(nn.DataParallel(head).state_dict(), path)
    result = diagnose(example_spec.replace(head={"weights": path}))
    assert result.fix[0].toml() == '[head].key_map = { "module." = "" }'
    assert result.confirmed


def test_diagnose_cli(tmp_path, capsys):
    from parity.cli import main
    from tests.support.specs import write_spec

    spec = write_spec(tmp_path, {'channel_order = "rgb"': 'channel_order = "bgr"'})
    assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "d.json")]) == 1
    out = capsys.readouterr().out
    assert '1. [preprocess].channel_order = "rgb" (the spec has "bgr")' in out
    assert "Fix (confirmed: parity check passes with it):" in out
    import json

    assert json.loads((tmp_path / "d.json").read_text())["fix_toml"] == ['[preprocess]\nchannel_order = "rgb"']


def test_service_log_from_the_spec_pipeline_matches(example_spec, tmp_path):
    from parity.commands.diagnose import diagnose_logged

    result = diagnose_logged(example_spec, log_service(example_spec, tmp_path / "service.jsonl"))
    assert result.matches and result.compared == ("embedding", "outputs")


@pytest.mark.parametrize(("change", "reproduced_by", "kind"), [
    ({"preprocess": {"interpolation": "bilinear"}}, '[preprocess].interpolation = "bilinear"', "jsonl"),
    ({"preprocess": {"channel_order": "bgr"}}, '[preprocess].channel_order = "bgr"', "csv-outputs-only"),
])
def test_service_log_names_the_configuration_the_service_runs(example_spec, tmp_path, change, reproduced_by, kind):
    from parity.commands.diagnose import diagnose_logged

    csv = kind.startswith("csv")
    log = log_service(example_spec.replace(**change), tmp_path / f"service.{'csv' if csv else 'jsonl'}",
                       embedding=not csv, csv=csv)
    result = diagnose_logged(example_spec, log)
    assert not result.matches
    assert [c.toml() for c in result.reproduced_by] == [reproduced_by] and result.reproduced


@pytest.mark.parametrize(("content", "message"), [
    ('{"image": "nope.png", "outputs": [1.0]}\n', "image"),
    ('{"image": "%s", "outputs": [1.0]}\n{"image": "%s", "outputs": [1.0, 2.0]}\n', "line 2: 'outputs' has 2 values, but the first line has 1"),
    ('{"image": "%s", "outputs": [1.0]}\n{"image": "%s"}\n', "line 2: 'outputs' is missing here but logged on line 1"),
    ('{"image": "%s", "outputs": [NaN]}\n', "line 1: 'outputs' holds NaN"),
    ('{"image": "%s"}\n', "log 'embedding' and/or 'outputs' for each sample"),
    ("not json\n", "line 1: not valid JSONL"),
])
def test_bad_service_logs_are_refused_with_the_reason(tmp_path, content, message):
    from parity.errors import FixtureError
    from parity.store.fixtures import load_logged_samples

    image = str((EXAMPLE_FIXTURES / "images" / "chelsea.png").resolve())
    path = tmp_path / "log.jsonl"
    path.write_text(content.replace("%s", image))
    with pytest.raises(FixtureError, match=message):
        load_logged_samples(path)


def test_diagnose_cli_with_a_service_log(example_spec, tmp_path, capsys):
    from parity.cli import main
    from tests.support.paths import EXAMPLE_SPEC

    log = log_service(example_spec.replace(preprocess={"interpolation": "bilinear"}), tmp_path / "s.jsonl")
    assert main(["diagnose", "--spec", str(EXAMPLE_SPEC), "--logged", str(log)]) == 1
    assert '[preprocess].interpolation = "bilinear" (the spec has "bicubic")' in capsys.readouterr().out


@pytest.fixture(scope="module")
def bilinear_without_pixels(example_spec, tmp_path_factory):
    """A fixture made with bilinear resizing and no golden pixels, and a candidate that leaves
    interpolation unset (so it resolves to bicubic from the model's pretrained_cfg)."""
    from parity.store.fixtures import load_fixture
    from parity.commands.capture import capture_pipeline
    from parity.spec import load_spec
    from tests.support.specs import write_spec

    folder = tmp_path_factory.mktemp("bilinear")
    rows = load_fixture(EXAMPLE_FIXTURES).rows[:6]
    reference = build_pipeline(example_spec.replace(preprocess={"interpolation": "bilinear"}))
    fixture = capture_pipeline(reference, [r.image for r in rows], folder / "fixture",
                               input_biases=[r.input_biases for r in rows])
    candidate = load_spec(write_spec(folder, {'interpolation = "bicubic"\n': ""}))
    assert candidate.preprocess.interpolation is None
    return candidate, fixture


def test_skipped_pixels_are_not_reported_as_matching(bilinear_without_pixels):
    candidate, fixture = bilinear_without_pixels
    report = run_check(candidate, fixtures=fixture)
    assert report.stage("pixels").status.value == "SKIP"
    notes = " ".join(report.stage("embedding").notes)
    assert "the pixels match" not in notes
    assert "pixels were not compared" in notes and "no golden pixels" in notes


def test_a_field_resolved_from_pretrained_cfg_is_named_with_its_value_and_origin(bilinear_without_pixels):
    candidate, fixture = bilinear_without_pixels
    result = diagnose(candidate, fixtures=fixture)
    first = result.causes[0]
    assert first.change.toml() == '[preprocess].interpolation = "bilinear"' and result.confirmed
    assert "the spec has None" not in first.words
    # The value the spec resolves to, and where it comes from.
    resolved = first.words.partition("the spec leaves it unset: ")[2]
    assert resolved.startswith('"bicubic"') and "pretrained_cfg" in resolved


def test_a_backbone_load_failure_is_diagnosed_in_the_backbone_section(tmp_path):
    """A transformers checkpoint missing a tensor: the cause names the backbone, and not the
    `vision_model.` prefix that the library's converter already handles."""
    pytest.importorskip("transformers")
    import shutil

    from safetensors.torch import save_file

    from parity.spec import load_spec
    from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC

    broken = shutil.copytree(CLASSIFIER_FIXTURES / "backbone", tmp_path / "backbone")
    state = {"vision_model." + k: v for k, v in read_state_dict(broken / "model.safetensors").items()}
    del state["vision_model.post_layernorm.weight"]
    save_file(state, str(broken / "model.safetensors"))
    result = diagnose(load_spec(CLASSIFIER_SPEC).replace(backbone={"checkpoint": broken}))
    text = " ".join(result.notes)
    assert "head class" not in text and "vision_model." not in text
    assert "[backbone].model and kwargs" in text and "backbone checkpoint" in text
    lacking = text.partition("layers in the module that the checkpoint lacks: ")[2]
    assert lacking.startswith("post_layernorm")


def test_a_preprocessing_library_swap_is_found_and_fixed():
    """Held-out case: open_clip-style timm preprocessing (224, bicubic, crop_pct 1, CLIP mean/std) for a head
    trained on transformers' image processor. Each library records only its own fields."""
    pytest.importorskip("transformers")
    from parity.spec import load_spec
    from tests.support.paths import CLASSIFIER_SPEC

    candidate = load_spec(CLASSIFIER_SPEC).replace(preprocess={
        "library": "timm", "input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
        "crop_mode": "center", "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)})
    result = diagnose(candidate)
    assert result.report.stage("pixels").status.value == "FAIL"
    first = result.causes[0]
    # The timm fields the transformers processor refuses go with the switch (removals, printed apart from the TOML).
    assert first.change.toml() == ('[preprocess].library = "transformers"; [preprocess].processor = "fast"; '
                                   + "; ".join(f"remove [preprocess].{k}" for k in
                                               ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")))
    assert first.change.origin == "recorded in the fixture" and first.reproduces
    assert result.confirmed and [c.toml() for c in result.fix] == [first.change.toml()]


def _edit_outputs(path, edit):
    """Rewrite a JSONL service log's outputs with ``edit(row_index, outputs) -> outputs``."""
    import json

    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, record in enumerate(records):
        record["outputs"] = edit(i, record["outputs"])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_service_log_with_matching_embeddings_names_the_head_stage(example_spec, other_run, tmp_path, capsys):
    from parity.commands.diagnose import diagnose_logged
    from parity.report.console import render_diagnosis
    from rich.console import Console

    log = log_service(example_spec.replace(head={"weights": other_run}), tmp_path / "service.jsonl")
    result = diagnose_logged(example_spec, log)
    assert not result.matches and result.stage == "head"
    assert "the service's head differs from the spec's (the head stage)" in result.notes[0]
    console = Console(record=True, width=200)
    render_diagnosis(result, console)
    text = console.export_text()
    assert "No variant of the spec reproduces" not in text
    assert "the head stage differs" in text


def test_service_log_is_judged_by_the_specs_decisions(example_spec, tmp_path, capsys):
    """[decisions] threshold = 0.0: outputs scaled by 1.001 drift but flip nothing; a sign change flips."""
    from parity.cli import main
    from parity.commands.diagnose import diagnose_logged
    from tests.support.specs import write_spec

    scaled = _edit_outputs(log_service(example_spec, tmp_path / "scaled.jsonl"),
                           lambda i, out: [v * 1.001 for v in out])
    result = diagnose_logged(example_spec, scaled)
    (threshold,) = result.decisions
    assert not result.matches and threshold.kind == "threshold" and threshold.total == 6 * 5
    assert threshold.flips == () and not result.passed  # gate = "outputs": drift fails
    gated = example_spec.replace(decisions={"gate": "decisions"})
    assert diagnose_logged(gated, scaled).passed
    spec = write_spec(tmp_path, {"threshold = 0.0": 'threshold = 0.0\ngate = "decisions"'})
    assert main(["diagnose", "--spec", str(spec), "--logged", str(scaled)]) == 0
    assert "threshold: 0 flip(s)" in capsys.readouterr().out

    flipped = _edit_outputs(log_service(example_spec, tmp_path / "flipped.jsonl"),
                            lambda i, out: [-out[0], *out[1:]] if i == 0 else out)
    result = diagnose_logged(gated, flipped)
    assert len(result.decisions[0].flips) == 1 and result.decisions[0].flips[0].endswith("[0]")
    assert not result.passed
    assert main(["diagnose", "--spec", str(spec), "--logged", str(flipped)]) == 1
