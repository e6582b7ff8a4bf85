"""The timm adapter on its own: its extraction points on a ViT built here, its names for a model and the model's
QuickGELU/GELU sibling, its description of timm's eval transform, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from parity.errors import SpecError
from parity.libraries import get
from parity.libraries.timm import describe_timm

timm = pytest.importorskip("timm")

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
CLASSES = 7


@pytest.fixture(scope="module")
def adapter():
    return get("timm")


@pytest.fixture(scope="module")
def vit():
    """A one-block ViT at 32 px with a 7-class head: small enough to run, every extraction point distinct."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=16,
                             depth=1, num_heads=1, num_classes=CLASSES).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _extract(adapter, model, pixels, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return adapter.take(model, adapter.trunk(model, pixels, mode), mode)


def test_each_extraction_point_is_the_tensor_it_names(adapter, vit, pixels):
    with torch.no_grad():
        tokens = vit.forward_features(pixels)  # after the final norm: (batch, 1 + patches, width)
        expected = {"forward": vit(pixels), "pre_logits": vit.forward_head(tokens, pre_logits=True),
                    "cls": tokens[:, 0], "mean_tokens": tokens[:, 1:].mean(dim=1)}
    for mode, want in expected.items():
        torch.testing.assert_close(_extract(adapter, vit, pixels, mode), want, rtol=0, atol=1e-6, msg=mode)
    assert _extract(adapter, vit, pixels, "forward").shape == (2, CLASSES)
    assert _extract(adapter, vit, pixels, "pre_logits").shape == (2, 16)
    # The patch tokens' mean is not the class token: the two modes are told apart.
    assert not torch.allclose(expected["cls"], expected["mean_tokens"])


def test_an_unknown_extraction_mode_is_a_spec_error_naming_it(adapter, vit, pixels):
    with pytest.raises(SpecError, match="'penultimate'"):
        _extract(adapter, vit, pixels, "penultimate")


def test_the_embedding_width_follows_the_extraction_point(adapter, vit):
    assert adapter.embedding_dim(vit, "forward") == CLASSES
    assert adapter.embedding_dim(vit, "pre_logits") == vit.num_features == 16
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=16,
                                 depth=1, num_heads=1, num_classes=0)
    assert adapter.embedding_dim(headless, "forward") == 16  # num_classes 0: forward() stops at the pre-logits


def test_a_models_name_is_its_architecture_and_pretrained_tag(adapter, vit):
    cfg = vit.pretrained_cfg
    assert adapter.model_name(vit) == f"{cfg['architecture']}.{cfg['tag']}"
    assert adapter.model_name(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("model, sibling", [
    ("vit_large_patch14_clip_quickgelu_336.openai", "vit_large_patch14_clip_336.openai"),
    ("vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_quickgelu_224.openai"),
])
def test_a_clip_model_has_exactly_its_other_activations_sibling(adapter, model, sibling):
    assert adapter.sibling_models(model) == (sibling,)
    assert timm.is_model(sibling.partition(".")[0])


def test_a_model_outside_the_clip_family_has_no_sibling(adapter):
    assert adapter.sibling_models("resnet50.a1_in1k") == ()


# -- timm's eval transform, described -----------------------------------------------------------------------------

def test_a_square_center_crop_resizes_the_short_side_to_size_over_crop_pct():
    config = describe_timm({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
                            "mean": MEAN, "std": STD})
    assert (config.resize, config.resize_size, config.resize_rounding) == ("shortest_edge", 256, "truncate")
    assert config.crop_size == (224, 224) and config.interpolation == "bicubic"
    assert (config.mean, config.std) == (MEAN, STD)


def test_a_non_square_center_crop_keeps_the_ratio_and_rounds_both_sides():
    config = describe_timm({"input_size": (3, 224, 320), "crop_pct": 0.875})
    assert config.resize_size == (256, 365) and config.resize_rounding == "round"
    assert config.crop_size == (224, 320)


def test_squash_and_border_crop_modes():
    squash = describe_timm({"input_size": (3, 224, 224), "crop_pct": 1.0, "crop_mode": "squash"})
    assert (squash.resize, squash.resize_size, squash.resize_rounding) == ("squash", (224, 224), None)
    border = describe_timm({"input_size": (3, 224, 224), "crop_pct": 1.0, "crop_mode": "border", "mean": MEAN})
    assert border.resize == "longest_edge"
    assert border.pad_fill == tuple(round(255 * v) for v in MEAN)  # padded with the mean colour


@pytest.mark.parametrize("backend, antialias", [("pil", True), ("tensor", True), ("tensor_noaa", False)])
def test_the_resize_backend_decides_the_antialiasing(backend, antialias):
    config = describe_timm({"input_size": (3, 224, 224), "crop_pct": 0.9}, resize_backend=backend)
    assert config.antialias is antialias
    assert config.resize_backend == ("pil" if backend == "pil" else "tensor")


@pytest.mark.parametrize("config, backend, named", [
    ({"crop_mode": "centre"}, "pil", "crop_mode"),
    ({"crop_border_pixels": 2}, "pil", "crop_border_pixels"),
    ({}, "cv2", "resize_backend"),
])
def test_what_timm_would_silently_change_is_refused_naming_the_field(config, backend, named):
    with pytest.raises(SpecError, match=named):
        describe_timm({"input_size": (3, 224, 224), **config}, resize_backend=backend)


def test_the_transform_built_from_a_description_is_that_description(adapter):
    config = describe_timm({"input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bilinear",
                            "mean": MEAN, "std": STD})
    transform = adapter.create_transform(config)
    assert transform is not None
    assert adapter.describe_preprocess({"input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bilinear",
                                        "mean": list(MEAN), "std": list(STD)}, source="timm data config") == config


# -- preprocessing for another library's backbone ------------------------------------------------------------------

def test_timm_preprocessing_for_another_backbone_needs_every_field(adapter, example_spec):
    spec = example_spec.replace(backbone={"library": "open_clip"}, preprocess={"crop_pct": None, "mean": None})
    with pytest.raises(SpecError) as raised:
        adapter.resolve_preprocess(spec, backbone=None)
    message = str(raised.value)
    assert "crop_pct" in message and "mean" in message and "interpolation" not in message
    assert adapter.unset_preprocess_origin(spec) == "timm's defaults"
    assert "pretrained_cfg" in adapter.unset_preprocess_origin(example_spec)
