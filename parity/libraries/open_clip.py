"""open_clip: the vision tower of a CLIP built by model-config name, open_clip's eval transform for that
model config, and open_clip's extraction points."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.convert import hf_to_openai
from parity.errors import SpecError
from parity.extras import require
from parity.libraries.base import Library
from parity.preprocess import Preprocess, create_open_clip_preprocess
from parity.preprocess_config import PreprocessConfig, describe_open_clip
from parity.spec import LibraryVocabulary, Spec

__all__ = ["OpenClip", "TEXT_TOWER"]

# Keys of the text tower in a whole-CLIP checkpoint: set aside by name, and the rest still loads strictly.
TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "text.", "text_projection", "positional_embedding",
              "logit_scale", "logit_bias", "attn_mask")


def _visual_prefix(state: Mapping) -> dict:
    """open_clip's vision-tower keys without their ``visual.`` prefix (a bare tower is returned as is)."""
    if not any(k.startswith("visual.") for k in state):
        return dict(state)
    state = {k: v for k, v in state.items() if not k.startswith(TEXT_TOWER)}
    return {k.removeprefix("visual."): v for k, v in state.items()}


class OpenClip(Library):
    # encode_image is the projection, pooled the feature before `proj`.
    vocabulary = LibraryVocabulary(name="open_clip", extract_modes=("encode_image", "pooled"),
                                   preprocess_source="open_clip's model config")
    converters = {
        "open_clip": lambda state, model: _visual_prefix(state),
        "transformers": lambda state, model: hf_to_openai(state, prefix=""),
    }
    points = {"pooled": "pooled (class token after the final norm)", "encode_image": "projection"}
    extraction_hint = ("open_clip's encode_image() returns the projection (visual.proj); extract = \"pooled\" gives "
                       "the pooled features before it.")
    # The whole CLIP is built (open_clip has no vision-only factory; its factory moves the model to a
    # device, which a meta model refuses); the text tower is discarded.
    meta_create = False

    def create(self, spec: Spec, *, meta: bool = False):
        open_clip = require("open_clip")
        bb = spec.backbone
        return open_clip.create_model(bb.model, pretrained=None, **bb.kwargs).visual

    def trunk(self, model, pixels, mode: str):
        if mode == "encode_image":
            return model(pixels)
        # VisionTransformer.forward without its last step, `pooled @ self.proj`.
        return model._pool(model.transformer(model._embeds(pixels)))[0]

    def take(self, model, trunk, mode: str):
        if mode not in self.points:
            raise SpecError(f"unknown extract mode {mode!r} for a open_clip backbone")
        return trunk

    def embedding_dim(self, model, extract: str) -> int | None:
        return getattr(model, "output_dim", None) if extract == "encode_image" else model.transformer.width

    def resolve_preprocess(self, spec: Spec, backbone) -> tuple[Preprocess, dict[str, Any]]:
        """The open_clip backbone's own ``preprocess_cfg``."""
        pp = spec.preprocess
        if pp.resize_backend != "pil":
            raise SpecError(f"{spec.path}: [preprocess].resize_backend applies to timm preprocessing; "
                            "open_clip runs its own resize")
        cfg = getattr(backbone, "preprocess_cfg", None)
        if spec.backbone.library != self.name or not cfg:
            raise SpecError(f"{spec.path}: [preprocess].library = \"open_clip\" reads the open_clip backbone's "
                            "preprocess_cfg; with another backbone use library = \"timm\" with explicit fields")
        config = {"library": self.name, **cfg}
        return create_open_clip_preprocess(cfg["size"], mean=cfg["mean"], std=cfg["std"],
                                           interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"],
                                           fill_color=cfg.get("fill_color", 0), channel_order=pp.channel_order,
                                           value_scale=pp.value_scale), config

    def describe_preprocess(self, record: Mapping[str, Any], *, source: str) -> PreprocessConfig:
        return describe_open_clip(record["size"], mean=record["mean"], std=record["std"],
                                  interpolation=record.get("interpolation", "bicubic"),
                                  resize_mode=record.get("resize_mode", "shortest"),
                                  fill_color=record.get("fill_color", 0), source=source,
                                  channel_order=record.get("channel_order", "rgb"),
                                  value_scale=record.get("value_scale", "unit"))
