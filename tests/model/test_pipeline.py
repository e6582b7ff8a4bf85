"""The candidate pipeline built from a spec: the object a service imports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.store.checkpoints import StrictLoadError
from parity.errors import SpecError
from parity.store.fixtures import load_fixture
from parity.model.pipeline import build_pipeline, extract_embedding, import_object
from tests.support.paths import EXAMPLE_FIXTURES


@pytest.fixture(scope="module")
def pipeline(example_spec):
    return build_pipeline(example_spec)


def test_predict_reproduces_the_training_outputs(pipeline):
    fixture = load_fixture(EXAMPLE_FIXTURES)
    rows = fixture.rows[:3]
    outputs = pipeline.predict([row.image for row in rows], [row.input_biases for row in rows])
    np.testing.assert_allclose(outputs.numpy(), fixture.outputs[:3], rtol=0, atol=1e-5)


def test_models_are_in_eval_mode(pipeline):
    assert not pipeline.backbone.training and not pipeline.head.training


def test_describe_records_what_strict_loading_cannot_see(pipeline):
    described = pipeline.describe()
    assert described["backbone"]["activation"] == ["QuickGELU"]
    assert described["backbone"]["embedding_dim"] == 64
    assert described["preprocess"]["interpolation"] == "bicubic"


def test_extraction_modes(pipeline):
    x = torch.stack([pipeline.preprocess(load_fixture(EXAMPLE_FIXTURES).rows[0].image)])
    model = pipeline.backbone
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert extract_embedding(model, x, "forward").shape == (1, 768)
        torch.testing.assert_close(extract_embedding(model, x, "cls"), tokens[:, 0])
        torch.testing.assert_close(extract_embedding(model, x, "mean_tokens"), tokens[:, 1:].mean(1))
        assert extract_embedding(model, x, "pre_logits").shape == (1, 64)


def test_backbone_checkpoint_for_another_architecture_fails_strictly(example_spec):
    spec = example_spec.replace(backbone={"kwargs": {"embed_dim": 64, "depth": 3, "num_heads": 2}})
    with pytest.raises(StrictLoadError) as exc:
        build_pipeline(spec)
    assert exc.value.key_diff.missing[0].startswith("blocks.2.")
    assert not exc.value.key_diff.unexpected


def test_unknown_model_name_is_a_spec_error(example_spec):
    with pytest.raises(SpecError, match="timm cannot create \\[backbone\\].model 'vit_nonexistent'"):
        build_pipeline(example_spec.replace(backbone={"model": "vit_nonexistent"}))


def test_head_kwargs_that_do_not_fit_are_a_spec_error(example_spec):
    with pytest.raises(SpecError, match=r"\[head\].kwargs do not fit reference.models:MultiLabelRegressionNN"):
        build_pipeline(example_spec.replace(head={"kwargs": {"width": 3}}))


@pytest.mark.parametrize(("path", "message"), [
    ("no_such_module_xyz:Head", "cannot import 'no_such_module_xyz'"),
    ("reference.models:NoSuchHead", "module 'reference.models' has no attribute 'NoSuchHead'"),
])
def test_import_object_errors_name_the_path(path, message):
    with pytest.raises(SpecError, match=message):
        import_object(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_on_a_cpu_machine_is_a_clear_error(example_spec):
    with pytest.raises(SpecError, match=r"device 'cuda' requested but torch.cuda.is_available\(\) is False"):
        build_pipeline(example_spec, device="cuda")


def test_predict_accepts_any_image_a_service_is_handed(pipeline, tmp_path):
    """PIL images of any mode, numpy uint8 (H, W[, C]) arrays, encoded bytes and paths: each gives what the
    shared loader gives for the same image stored as a file, with the same conversion note."""
    from PIL import Image

    from parity.errors import FixtureError
    from parity.store.images import decode_image

    rgb = Image.open(EXAMPLE_FIXTURES / "images" / "chelsea.png").convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(200)
    gray = rgb.convert("L")
    biases = [[0, 1]]

    for image in (gray, rgba, rgb.convert("P")):
        path = tmp_path / f"{image.mode}.png"
        image.save(path)
        expected_image, expected_note = decode_image(path)
        notes: list[str] = []
        got = pipeline.predict([image], biases, conversions=notes)
        assert notes == [expected_note] and expected_note.startswith(f"{image.mode} -> RGB")
        assert torch.equal(got, pipeline.predict([path], biases))
        assert torch.equal(got, pipeline.predict([path.read_bytes()], biases))
        assert torch.equal(pipeline.preprocess(image), pipeline.transform(expected_image))

    for array, like in ((np.asarray(rgb), rgb), (np.asarray(rgba), rgba), (np.asarray(gray), gray),
                        (np.asarray(gray)[:, :, None], gray)):
        notes = []
        got = pipeline.predict([array], biases, conversions=notes)
        assert torch.equal(got, pipeline.predict([like], biases)), array.shape
        assert notes[0].startswith("numpy uint8")

    with pytest.raises(FixtureError, match=r"dtype float32 and shape \(4, 4, 3\): expected uint8"):
        pipeline.predict([np.zeros((4, 4, 3), np.float32)], biases)
    with pytest.raises(FixtureError, match="cannot decode image <3 bytes>"):
        pipeline.predict([b"abc"], biases)
