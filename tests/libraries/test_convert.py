"""open_clip, transformers and timm compute the same CLIP image features from converted weights."""

from __future__ import annotations

import copy

import pytest
import torch

from parity.libraries.convert import hf_to_openai, hf_to_timm, hf_vision_config_from_openai, openai_to_hf
from parity.errors import CheckpointError

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

WIDTH, LAYERS, HEAD_WIDTH, PATCH, IMAGE, EMBED = 64, 2, 32, 32, 64, 32
ATOL = 1e-5


def _open_clip_model() -> torch.nn.Module:
    """A tiny random open_clip ViT, perturbed so that its features are far from degenerate."""
    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-32-quickgelu",
        pretrained=None,
        embed_dim=EMBED,
        vision_cfg={"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH,
                    "head_width": HEAD_WIDTH},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    return _open_clip_model()


@pytest.fixture(scope="module")
def state(clip) -> dict[str, torch.Tensor]:
    return clip.state_dict()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def reference(clip, pixels) -> dict[str, torch.Tensor]:
    """open_clip's image embedding and its pooled feature before ``proj``."""
    unprojected = copy.deepcopy(clip.visual)
    unprojected.proj = None
    with torch.inference_mode():
        return {"image_embeds": clip.encode_image(pixels), "pooled": unprojected(pixels)}


def _hf_model(state, *, with_projection: bool = True):
    config = transformers.CLIPVisionConfig(
        **hf_vision_config_from_openai(state, hidden_act="quick_gelu", head_width=HEAD_WIDTH)
    )
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    model = cls(config).eval()
    model.load_state_dict(openai_to_hf(state, with_projection=with_projection), strict=True)
    return model


def _timm_model() -> torch.nn.Module:
    return timm.create_model(
        "vit_base_patch32_clip_quickgelu_224.openai", pretrained=False,
        img_size=IMAGE, embed_dim=WIDTH, depth=LAYERS, num_heads=WIDTH // HEAD_WIDTH, num_classes=EMBED,
    ).eval()


def _assert_timm_matches(model, pixels, reference) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(model(pixels), reference["image_embeds"], rtol=0, atol=ATOL)
        pre_logits = model.forward_head(model.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(pre_logits, reference["pooled"], rtol=0, atol=ATOL)


def test_the_perturbed_model_is_not_degenerate(reference):
    pooled = reference["pooled"]
    assert pooled.std() > 0.1
    assert (pooled[0] - pooled[1]).abs().max() > 0.1


def test_config_is_inferred_from_the_weights(state):
    assert hf_vision_config_from_openai(state, hidden_act="quick_gelu", head_width=HEAD_WIDTH) == {
        "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
        "num_attention_heads": WIDTH // HEAD_WIDTH, "num_channels": 3, "image_size": IMAGE,
        "patch_size": PATCH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": EMBED,
    }


def test_head_width_that_does_not_divide_the_width_is_refused(state):
    with pytest.raises(CheckpointError, match="head_width 48 does not divide the tower's width 64"):
        hf_vision_config_from_openai(state, hidden_act="quick_gelu", head_width=48)


def test_default_head_width_is_openai_64(state):
    assert hf_vision_config_from_openai(state, hidden_act="gelu")["num_attention_heads"] == 1


def test_transformers_matches_open_clip(state, pixels, reference):
    model = _hf_model(state)
    with torch.inference_mode():
        out = model(pixel_values=pixels)
        pooled = model.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(out.image_embeds, reference["image_embeds"], rtol=0, atol=ATOL)
    torch.testing.assert_close(pooled, reference["pooled"], rtol=0, atol=ATOL)
    # The class token of last_hidden_state is taken *before* post_layernorm: reading it instead
    # of pooler_output is a real drift source.
    assert not torch.allclose(out.last_hidden_state[:, 0], pooled, atol=1e-2)


def test_plain_vision_model_has_no_projection(state, pixels, reference):
    converted = openai_to_hf(state, with_projection=False)
    assert "visual_projection.weight" not in converted
    assert "embeddings.class_embedding" in converted  # transformers 5: CLIPVisionModel is the tower itself
    model = _hf_model(state, with_projection=False)
    with torch.inference_mode():
        pooled = model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(pooled, reference["pooled"], rtol=0, atol=ATOL)
    assert "visual.proj" not in hf_to_openai(converted)


def test_position_ids_is_not_saved(state):
    assert not any("position_ids" in k for k in openai_to_hf(state))
    assert not any("position_ids" in k for k in _hf_model(state).state_dict())


def test_timm_filter_on_open_clip_weights_matches_open_clip(state, pixels, reference):
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = _timm_model()
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    _assert_timm_matches(model, pixels, reference)


def test_round_trip_is_exact(state):
    vision = {k: v for k, v in state.items() if k.startswith("visual.")}
    back = hf_to_openai(openai_to_hf(state))
    assert back.keys() == vision.keys()
    for key, value in vision.items():
        assert torch.equal(back[key], value), key


def test_stripped_prefix_round_trips(state):
    stripped = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    converted = openai_to_hf(stripped, prefix="")
    assert converted.keys() == openai_to_hf(state).keys()
    assert hf_to_openai(converted, prefix="").keys() == stripped.keys()


def test_hf_to_timm_loads_strictly_and_matches(state, pixels, reference):
    model = _timm_model()
    model.load_state_dict(hf_to_timm(openai_to_hf(state), model), strict=True)
    _assert_timm_matches(model, pixels, reference)


def test_saved_position_ids_are_accepted(state):
    converted = openai_to_hf(state)
    converted["vision_model.embeddings.position_ids"] = torch.arange(5).expand((1, -1))
    assert "visual.conv1.weight" in hf_to_openai(converted)
    converted["vision_model.embeddings.position_ids"] = torch.arange(5).flip(0).expand((1, -1))
    with pytest.raises(CheckpointError, match="'vision_model.embeddings.position_ids' is not arange"):
        hf_to_openai(converted)


def test_clip_model_text_keys_are_ignored(state):
    converted = openai_to_hf(state)
    converted.update({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
                      "text_projection.weight": torch.zeros(2, 2), "logit_scale": torch.zeros(())})
    assert hf_to_openai(converted).keys() == hf_to_openai(openai_to_hf(state)).keys()


@pytest.mark.parametrize("key", ["visual.ln_post.bias", "visual.transformer.resblocks.1.attn.in_proj_weight"])
def test_missing_openai_key_is_named(state, key):
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=f"openai_to_hf: missing key '{key}'"):
        openai_to_hf(broken)


def test_unknown_openai_key_is_named(state):
    broken = {**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)}
    with pytest.raises(CheckpointError) as info:
        openai_to_hf(broken)
    assert "unexpected key(s) ['visual.transformer.resblocks.0.ls_1.gamma']" in str(info.value)


def test_missing_hf_key_is_named(state):
    converted = openai_to_hf(state)
    del converted["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match="missing key 'vision_model.encoder.layers.0.self_attn.k_proj.bias'"):
        hf_to_openai(converted)


def test_unknown_hf_key_is_named(state):
    converted = {**openai_to_hf(state), "vision_model.embeddings.patch_embedding.bias": torch.zeros(WIDTH)}
    with pytest.raises(CheckpointError, match=r"\['vision_model.embeddings.patch_embedding.bias'\]"):
        hf_to_openai(converted)


def test_missing_projection_says_how_to_do_without(state):
    broken = {k: v for k, v in state.items() if k != "visual.proj"}
    with pytest.raises(CheckpointError, match="pass with_projection=False"):
        openai_to_hf(broken)
    assert "visual_projection.weight" not in openai_to_hf(broken, with_projection=False)


def test_inconsistent_shape_is_named(state):
    broken = {**state, "visual.ln_pre.bias": torch.zeros(WIDTH + 1)}
    with pytest.raises(CheckpointError, match=r"'visual.ln_pre.bias' has shape \(65,\), expected \(64,\)"):
        openai_to_hf(broken)


def test_stripped_tower_with_default_prefix_suggests_an_empty_prefix(state):
    stripped = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="pass prefix=''"):
        openai_to_hf(stripped)
