"""timm: models created by name, timm's data config and eval transform, timm's extraction points."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from parity.convert import hf_to_timm, openai_to_timm
from parity.errors import SpecError
from parity.libraries.base import Library
from parity.preprocess import TIMM_DATA_CONFIG_KEYS, Preprocess, create_preprocess
from parity.preprocess_config import PreprocessConfig, describe_timm
from parity.spec import LibraryVocabulary, Spec

__all__ = ["Timm", "data_config"]

# The fields that decide timm's eval transform and that a spec may pin (the rest comes from the
# model's pretrained_cfg, then timm's defaults).
_DATA_CONFIG_FIELDS = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "input_size")
_ACTIVATION_SWAPS = (("_clip_quickgelu_", "_clip_"),)
# Without a timm pretrained_cfg to fall back on, every one of these must be explicit.
_REQUIRED_WITHOUT_MODEL = ("input_size", "interpolation", "crop_pct", "mean", "std")


def data_config(spec: Spec, model=None) -> dict[str, Any]:
    """timm's data config for the spec: explicit ``[preprocess]`` fields over the model's pretrained_cfg.

    With ``model`` the built module's own pretrained_cfg is read; without it the registry's entry
    for ``[backbone].model`` (what ``create_model`` would attach), so nothing is built.

    Raises:
        SpecError: timm knows no such model name.
    """
    import timm

    if model is not None:
        return timm.data.resolve_model_data_config(model, args=spec.preprocess.overrides())
    try:
        pretrained = timm.models.get_pretrained_cfg(spec.backbone.model)
    except Exception as e:  # timm raises RuntimeError or KeyError depending on the name's shape
        raise SpecError(f"{spec.path}: timm has no pretrained_cfg for [backbone].model {spec.backbone.model!r}: {e}") from e
    cfg = pretrained.to_dict() if pretrained is not None else {}
    return timm.data.resolve_data_config(dict(spec.preprocess.overrides()), pretrained_cfg=cfg)


class Timm(Library):
    # timm: forward() is the CLIP projection, pre_logits the pooled feature before it.
    vocabulary = LibraryVocabulary(
        name="timm", extract_modes=("pre_logits", "forward", "cls", "mean_tokens"),
        preprocess_fields=_DATA_CONFIG_FIELDS, preprocess_fields_name="timm data-config",
        preprocess_source="timm's data config", matrix=True)
    converters = {"open_clip": openai_to_timm, "transformers": hf_to_timm}
    # timm's `cls` is taken after the final norm, so it is the pooled feature.
    points = {
        "pre_logits": "pooled (class token after the final norm)",
        "cls": "pooled (class token after the final norm)",
        "forward": "projection",
        "mean_tokens": "mean of the patch tokens",
    }
    extraction_hint = ("timm's forward() gives the head output (the CLIP projection); pre-logits features come from "
                       "forward_head(forward_features(x), pre_logits=True) (extract = \"pre_logits\").")

    def model_name(self, model) -> str | None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        architecture, tag = cfg.get("architecture"), cfg.get("tag")
        if not architecture:
            return None
        return f"{architecture}.{tag}" if tag else architecture

    def create(self, spec: Spec, *, meta: bool = False):
        import timm
        import torch

        bb = spec.backbone
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(bb.model, pretrained=False, **bb.kwargs)

    def sibling_models(self, model: str) -> tuple[str, ...]:
        """QuickGELU and GELU CLIP variants: identical keys, so strict loading cannot tell them apart."""
        siblings = []
        for a, b in _ACTIVATION_SWAPS:
            for old, new in ((a, b), (b, a)):
                if old in model:
                    siblings.append(model.replace(old, new, 1))
        return tuple(siblings)

    def trunk(self, model, pixels, mode: str):
        """``forward_features``: every timm extraction mode is taken from its tokens."""
        return model.forward_features(pixels)

    def take(self, model, tokens, mode: str):
        """``forward`` is ``forward_head`` (the CLIP projection), ``pre_logits`` the pooled feature before it,
        ``cls`` the class token after the final norm, ``mean_tokens`` the mean of the patch tokens."""
        if mode == "forward":
            return model.forward_head(tokens)
        if mode == "pre_logits":
            return model.forward_head(tokens, pre_logits=True)
        if mode == "cls":
            return tokens[:, 0]
        if mode == "mean_tokens":
            return tokens[:, getattr(model, "num_prefix_tokens", 1):].mean(dim=1)
        raise SpecError(f"unknown extract mode {mode!r} for a timm backbone")

    def embedding_dim(self, model, extract: str) -> int | None:
        if extract == "forward" and getattr(model, "num_classes", 0):  # num_classes = 0: forward() stops at pre-logits
            return model.num_classes
        return getattr(model, "num_features", None)

    def resolve_preprocess(self, spec: Spec, backbone) -> tuple[Preprocess, dict[str, Any]]:
        """Layered like timm itself: explicit spec fields, then the model's pretrained_cfg, then timm's defaults."""
        import timm

        pp = spec.preprocess
        if spec.backbone.library == self.name:
            config = data_config(spec, backbone)
        else:
            # No timm pretrained_cfg to fall back on: timm's own defaults (ImageNet mean/std, crop_pct
            # 0.875) would be a silent drift, so every geometry and normalisation field must be set.
            missing = [k for k in _REQUIRED_WITHOUT_MODEL if getattr(pp, k) is None]
            if missing:
                raise SpecError(f"{spec.path}: timm preprocessing for a {spec.backbone.library} backbone needs every "
                                f"field explicitly (there is no timm pretrained_cfg); missing [preprocess]."
                                f"{', '.join(missing)}")
            config = timm.data.resolve_data_config(args=pp.overrides())
        return create_preprocess(config, **pp.variant()), config

    def data_config(self, spec: Spec) -> dict[str, Any]:
        return data_config(spec)

    def describe_preprocess(self, record: Mapping[str, Any], *, source: str) -> PreprocessConfig:
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in TIMM_DATA_CONFIG_KEYS}
        return describe_timm(config, resize_backend=record.get("resize_backend", "pil"), source=source,
                             channel_order=record.get("channel_order", "rgb"),
                             value_scale=record.get("value_scale", "unit"))
