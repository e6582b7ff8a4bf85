"""The open_clip adapter on its own: its two extraction points on a vision tower built here, its checkpoint
converter for whole-CLIP state dicts, its description of open_clip's eval transform, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from parity.errors import SpecError
from parity.libraries import get
from parity.libraries.open_clip import TEXT_TOWER, describe_open_clip, describe_open_clip_model

open_clip = pytest.importorskip("open_clip")

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
WIDTH, OUTPUT = 32, 8


@pytest.fixture(scope="module")
def adapter():
    return get("open_clip")


@pytest.fixture(scope="module")
def tower():
    """A one-block open_clip VisionTransformer at 32 px, width 32, projected to 8."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, width=WIDTH, layers=1, heads=2, mlp_ratio=2.0,
                             output_dim=OUTPUT).eval()


def _extract(adapter, model, pixels, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return adapter.take(model, adapter.trunk(model, pixels, mode), mode)


def test_pooled_is_the_feature_the_projection_takes(adapter, tower):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    projected, pooled = _extract(adapter, tower, pixels, "encode_image"), _extract(adapter, tower, pixels, "pooled")
    assert projected.shape == (3, OUTPUT) and pooled.shape == (3, WIDTH)
    torch.testing.assert_close(pooled @ tower.proj.detach(), projected, rtol=1e-5, atol=1e-6)
    assert (adapter.embedding_dim(tower, "encode_image"), adapter.embedding_dim(tower, "pooled")) == (OUTPUT, WIDTH)


def test_an_unknown_extraction_mode_is_a_spec_error_naming_it(adapter, tower):
    with pytest.raises(SpecError, match="'pre_logits'"):
        adapter.take(tower, torch.zeros(1, WIDTH), "pre_logits")


def test_a_whole_clip_state_dict_gives_the_vision_tower_keys_without_the_text_tower(adapter):
    vision = {"visual.conv1.weight": torch.zeros(1), "visual.proj": torch.zeros(1)}
    text = {name + "weight" if name.endswith(".") else name: torch.zeros(1) for name in TEXT_TOWER}
    converted = adapter.converters["open_clip"]({**vision, **text}, None)
    assert sorted(converted) == ["conv1.weight", "proj"]
    bare = {"conv1.weight": torch.zeros(1)}
    assert adapter.converters["open_clip"](bare, None) == bare  # a bare tower is kept as it is


# -- open_clip's eval transform, described ------------------------------------------------------------------------

def test_a_square_size_resizes_the_short_side_and_center_crops():
    config = describe_open_clip(224, mean=MEAN, std=STD)
    assert (config.resize, config.resize_size, config.resize_rounding) == ("shortest_edge", 224, "truncate")
    assert config.crop_size == (224, 224) and config.interpolation == "bicubic" and config.convert_rgb == "convert"


def test_a_non_square_size_keeps_the_ratio_and_is_always_bicubic():
    """open_clip builds ResizeKeepRatio without passing the interpolation on: bilinear asked, bicubic run."""
    config = describe_open_clip((224, 320), mean=MEAN, std=STD, interpolation="bilinear")
    assert config.resize_size == (224, 320) and config.resize_rounding == "round"
    assert config.interpolation == "bicubic"


def test_squash_and_longest_resize_modes():
    squash = describe_open_clip(224, mean=MEAN, std=STD, resize_mode="squash")
    assert (squash.resize, squash.resize_size, squash.resize_rounding) == ("squash", (224, 224), None)
    longest = describe_open_clip(224, mean=MEAN, std=STD, resize_mode="longest", fill_color=128)
    assert longest.resize == "longest_edge" and longest.pad_fill == (128, 128, 128)


@pytest.mark.parametrize("options, named", [({"interpolation": "lanczos"}, "lanczos"),
                                            ({"resize_mode": "shortest_edge"}, "shortest_edge")])
def test_options_open_clip_does_not_accept_are_refused_naming_them(options, named):
    with pytest.raises(SpecError, match=named):
        describe_open_clip(224, mean=MEAN, std=STD, **options)


def test_a_model_config_is_described_without_building_the_model():
    config = describe_open_clip_model("ViT-B-32")
    assert config.source == "open_clip:ViT-B-32"
    assert config.crop_size == (224, 224) and config.mean == pytest.approx(MEAN) and config.std == pytest.approx(STD)


def test_an_unknown_model_or_pretrained_tag_is_refused_naming_it():
    with pytest.raises(SpecError, match="unknown open_clip model 'ViT-Q-99'"):
        describe_open_clip_model("ViT-Q-99")
    with pytest.raises(SpecError, match="unknown pretrained tag 'nowhere' for open_clip model 'ViT-B-32'; known: "):
        describe_open_clip_model("ViT-B-32", pretrained="nowhere")


def test_the_transform_built_from_a_description_is_that_description(adapter):
    config = describe_open_clip(224, mean=MEAN, std=STD)
    assert adapter.create_transform(config) is not None
    assert adapter.describe_preprocess({"size": 224, "mean": list(MEAN), "std": list(STD)},
                                       source="open_clip image_transform") == config


# -- what the adapter refuses to resolve ----------------------------------------------------------------------------

def test_resolving_needs_the_open_clip_backbones_own_preprocess_cfg(adapter, example_spec, tower):
    spec = example_spec.replace(backbone={"library": "open_clip"}, preprocess={"library": "open_clip"})
    with pytest.raises(SpecError, match="preprocess_cfg"):
        adapter.resolve_preprocess(spec, tower)  # a bare tower carries no preprocess_cfg
    with pytest.raises(SpecError, match="resize_backend"):
        adapter.resolve_preprocess(spec.replace(preprocess={"resize_backend": "tensor"}), tower)
