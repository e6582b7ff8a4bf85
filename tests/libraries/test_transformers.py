"""Backbones from transformers directories: strict loading, whole-CLIP checkpoints, extraction points."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from parity.commands.check import run_check
from parity.store.checkpoints import StrictLoadError, read_state_dict
from parity.cli import EXIT_PASS, main
from parity.store.forensics import infer_layers, module_source
from parity.model.pipeline import build_pipeline
from parity.results import Status
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, ROOT

transformers = pytest.importorskip("transformers")

SPEC = CLASSIFIER_SPEC
BACKBONE = CLASSIFIER_FIXTURES / "backbone"
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 64, "patch_size": 32, "projection_dim": 16}


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


def test_strict_load_matches_from_pretrained(spec):
    pipeline = build_pipeline(spec)
    reference = transformers.CLIPVisionModel.from_pretrained(BACKBONE, local_files_only=True).eval()
    ours, theirs = pipeline.backbone.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pixels = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(pipeline.embed(pixels), reference(pixel_values=pixels).pooler_output)


def test_a_missing_tensor_fails_the_load_stage_instead_of_a_random_init(spec, tmp_path):
    from safetensors.torch import save_file

    broken = Path(shutil.copytree(BACKBONE, tmp_path / "backbone"))
    state = read_state_dict(broken / "model.safetensors")
    del state["post_layernorm.weight"]
    save_file(state, str(broken / "model.safetensors"))
    candidate = spec.replace(backbone={"checkpoint": broken})
    with pytest.raises(StrictLoadError, match="post_layernorm.weight"):
        build_pipeline(candidate)
    report = run_check(candidate)
    assert report.stage("load").status is Status.FAIL
    assert report.stage("load").key_diffs[0].missing == ("post_layernorm.weight",)


@pytest.fixture(scope="module")
def whole_clip(tmp_path_factory):
    """A save_pretrained directory of a whole CLIPModel (text tower included), and the model."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config=VISION, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    directory = tmp_path_factory.mktemp("whole") / "clip"
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize("cls, extract", [("CLIPVisionModel", "pooler_output"),
                                          ("CLIPVisionModelWithProjection", "image_embeds"),
                                          ("CLIPVisionModelWithProjection", "cls")])
def test_whole_clip_checkpoint_loads_its_vision_tower(spec, whole_clip, cls, extract):
    directory, model = whole_clip
    pipeline = build_pipeline(spec.replace(backbone={"checkpoint": directory, "model": cls, "extract": extract},
                                           preprocess={"config": BACKBONE / "preprocessor_config.json"}))
    pixels = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out = model.vision_model(pixel_values=pixels)
        expected = {"pooler_output": out.pooler_output, "cls": out.last_hidden_state[:, 0],
                    "image_embeds": model.visual_projection(out.pooler_output)}[extract]
        torch.testing.assert_close(pipeline.embed(pixels), expected, atol=1e-6, rtol=0)


def test_inspect_a_transformers_directory_against_its_spec(capsys):
    assert main(["inspect", str(BACKBONE), "--against", str(SPEC)]) == EXIT_PASS
    assert "loads into CLIPVisionModel with strict=True" in " ".join(capsys.readouterr().out.split())


def test_inferred_source_of_a_transformers_checkpoint_loads_strictly():
    state = read_state_dict(BACKBONE / "model.safetensors")
    namespace: dict = {}
    exec(module_source(infer_layers(state)), namespace)  # noqa: S102 - source generated from our own tensors
    namespace["InferredModule"]().load_state_dict(state, strict=True)


def test_an_impossible_conversion_names_the_accepted_formats(spec):
    from parity.libraries import checkpoint_converter
    from parity.errors import SpecError

    with pytest.raises(SpecError, match="a timm checkpoint cannot be converted for a open_clip backbone. "
                                        "Accepted checkpoint_format values: open_clip, transformers"):
        checkpoint_converter(spec.replace(backbone={"library": "open_clip", "checkpoint_format": "timm"}))


def test_spec_refuses_timm_fields_with_another_preprocessing_library(tmp_path):
    from parity.errors import SpecError

    text = SPEC.read_text().replace('processor = "fast"', 'processor = "fast"\ncrop_pct = 0.9')
    path = tmp_path / "bad.toml"
    path.write_text(text.replace('"../fixtures/', f'"{ROOT / "fixtures"}/'))
    with pytest.raises(SpecError, match=r"\[preprocess\].crop_pct is a timm data-config field; with "
                                        r"\[preprocess\].library = 'transformers'"):
        load_spec(path)


def test_the_same_tower_in_either_vision_class_has_identical_weights(spec, whole_clip, tmp_path):
    """CLIPVisionModelWithProjection holds the tower under `vision_model.`, CLIPVisionModel (transformers 5)
    is the tower: the weights stage compares fingerprints by the tower's names, not the class's."""
    from parity.store.fixtures import load_fixture
    from parity.commands.capture import capture_pipeline

    directory, _ = whole_clip
    transformers.CLIPImageProcessor(size={"shortest_edge": 64},
                                    crop_size={"height": 64, "width": 64}).save_pretrained(directory)
    reference = spec.replace(backbone={"checkpoint": directory, "model": "CLIPVisionModelWithProjection"})
    rows = load_fixture(CLASSIFIER_FIXTURES).rows[:4]
    fixture = capture_pipeline(build_pipeline(reference), [r.image for r in rows], tmp_path / "fixture")
    assert any(k.startswith("vision_model.") for k in load_fixture(fixture).manifest["weights"]["backbone"]["tensors"])

    report = run_check(reference.replace(backbone={"model": "CLIPVisionModel"}), fixtures=fixture)
    weights = report.stage("weights")
    assert weights.status is Status.PASS, weights.headline
    assert weights.headline.partition("not in the deployed module: ")[2].startswith("backbone.visual_projection.weight")
    structure = [d for d in report.config_diffs if d.field.startswith("backbone.structure.")]
    assert {d.field for d in structure} == {"backbone.structure.visual_projection",
                                            "backbone.structure.visual_projection.weight"}
    assert report.passed
