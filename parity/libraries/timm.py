"""timm: models created by name, timm's data config and eval transform (and its comparable
description), timm's extraction points."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from parity.libraries.convert import hf_to_timm, openai_to_timm
from parity.errors import SpecError
from parity.libraries.base import BackboneGuess, CallSite, Library
from parity.libraries.timm_guess import guess_timm
from parity.preprocess.transform import RESIZE_BACKENDS, TIMM_DATA_CONFIG_KEYS, Preprocess, create_preprocess
from parity.preprocess.config import PreprocessConfig, derived_fields, require_same, size_pair
from parity.spec import LibraryVocabulary, Spec

__all__ = ["Timm", "data_config", "describe_timm"]

# The fields that decide timm's eval transform and that a spec may pin (the rest comes from the
# model's pretrained_cfg, then timm's defaults).
_DATA_CONFIG_FIELDS = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "input_size")
_ACTIVATION_SWAPS = (("_clip_quickgelu_", "_clip_"),)
# Without a timm pretrained_cfg to fall back on, every one of these must be explicit.
_REQUIRED_WITHOUT_MODEL = ("input_size", "interpolation", "crop_pct", "mean", "std")
# timm's crop_mode → the shared `PreprocessConfig.resize` vocabulary.
_CROP_MODES = {"center": "shortest_edge", "squash": "squash", "border": "longest_edge"}


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


def _timm_default(name: str) -> Any:
    """One of timm's data constants, imported only for a config that leaves it unset: importing timm
    imports torch, which a complete record (a manifest's) never needs."""
    import timm.data

    return getattr(timm.data, name)


def describe_timm(data_config: Mapping[str, Any], *, resize_backend: str = "pil", channel_order: str = "rgb",
                  value_scale: str = "unit", source: str = "timm data config") -> PreprocessConfig:
    """Describe timm's eval transform for ``data_config`` (as from ``timm.data.resolve_model_data_config``).

    Mirrors ``timm.data.transforms_factory.transforms_imagenet_eval``; ``resize_backend`` is the
    `create_preprocess` backend (``"pil"``, ``"tensor"``, ``"tensor_noaa"``).

    Raises:
        SpecError: an unknown backend or crop_mode, or a crop_border_pixels parity does not model.
    """
    if resize_backend not in RESIZE_BACKENDS:
        raise SpecError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {resize_backend!r}")
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in _CROP_MODES:
        # timm itself would fall back to center silently; a typo should not.
        raise SpecError(f"crop_mode must be one of {tuple(_CROP_MODES)}, got {crop_mode!r}")
    if data_config.get("crop_border_pixels"):
        raise SpecError("crop_border_pixels is not modelled by parity's preprocessing descriptions")
    input_size = data_config.get("input_size", 224)
    img_size = size_pair(input_size if isinstance(input_size, int) else tuple(input_size)[-2:])
    crop_pct = data_config.get("crop_pct") or _timm_default("DEFAULT_CROP_PCT")
    scale = tuple(math.floor(x / crop_pct) for x in img_size)
    mean = tuple(float(v) for v in (data_config["mean"] if "mean" in data_config
                                    else _timm_default("IMAGENET_DEFAULT_MEAN")))
    std = tuple(float(v) for v in (data_config["std"] if "std" in data_config
                                   else _timm_default("IMAGENET_DEFAULT_STD")))
    resize = _CROP_MODES[crop_mode]
    fill: tuple[int, ...] = (0, 0, 0)  # torchvision CenterCrop pads with zeros
    if crop_mode == "squash":
        # both edges to 1/crop_pct of the target, then the center crop: aspect ratio lost
        resize_size, rounding = scale, None
    elif crop_mode == "border":
        # the long edge to 1/crop_pct of the target, padded with the mean colour: nothing cut at crop_pct 1
        resize_size, rounding = scale, "round"
        fill = tuple(round(255 * v) for v in mean)
    elif scale[0] == scale[1]:
        # center, square: torchvision Resize(int) scales the short side and truncates the long one
        resize_size, rounding = scale[0], "truncate"
    else:
        # center, non-square target: ResizeKeepRatio rounds both sides
        resize_size, rounding = scale, "round"
    # create_preprocess turns antialias off only on torchvision Resize, not on ResizeKeepRatio.
    plain_resize = rounding != "round"
    return PreprocessConfig(
        library="timm", source=source, resize=resize, resize_size=resize_size, resize_rounding=rounding,
        crop_size=img_size,
        **derived_fields(resize, resize_size, img_size, crop_rule="round_half_even", pad_rule="ceil", fill=fill),
        interpolation=str(data_config.get("interpolation", "bilinear")),
        resize_backend="pil" if resize_backend == "pil" else "tensor",
        antialias=not (resize_backend == "tensor_noaa" and plain_resize),
        rescale_factor=1 / 255, mean=mean, std=std, convert_rgb="none",
        channel_order=channel_order, value_scale=value_scale)


def _model_data_config(name: str) -> dict[str, Any]:
    import timm
    from timm.data import resolve_data_config, resolve_model_data_config

    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}\nNote: timm.list_models() lists the names")
    # The registry's pretrained_cfg is what create_model would attach; reading it builds nothing.
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None:
        return resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    import torch

    with torch.device("meta"):  # no memory, no weights: only the model's own pretrained_cfg is needed
        model = timm.create_model(name, pretrained=False)
    return resolve_model_data_config(model)


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
    source_forms = {"timm": "timm:MODEL_NAME"}
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

    def guess_backbones(self, shapes: Mapping[str, tuple[int, ...]], calls: Sequence[CallSite], *,
                        source: str) -> list[BackboneGuess]:
        return guess_timm(shapes, calls, source=source)

    def sibling_models(self, model: str) -> tuple[str, ...]:
        """QuickGELU and GELU CLIP variants: identical keys, so strict loading cannot tell them apart."""
        siblings = []
        for quick, plain in _ACTIVATION_SWAPS:
            # A QuickGELU name holds the plain marker too ("_clip_quickgelu_" has "_clip_"): one swap per name.
            if quick in model:
                siblings.append(model.replace(quick, plain, 1))
            elif plain in model:
                siblings.append(model.replace(plain, quick, 1))
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

    def describe_source(self, prefix: str, rest: str, text: str) -> PreprocessConfig:
        """``timm:MODEL``: the eval transform of the registry's pretrained_cfg for MODEL (nothing is built)."""
        return describe_timm(_model_data_config(rest), source=text)

    def create_transform(self, config: PreprocessConfig) -> Preprocess:
        """timm's eval transform with a data config whose crop_pct floors to the description's resize."""
        variant = dict(channel_order=config.channel_order, value_scale=config.value_scale)
        if config.crop_size is None or config.resize_size is None or config.resize == "none":
            raise SpecError("timm's eval transform always resizes and crops; this description does not")
        crop_mode = {v: k for k, v in _CROP_MODES.items()}[config.resize]
        # floor(crop / crop_pct) == resize on every side: crop / (resize + 1) < crop_pct <= crop / resize.
        # The middle of the allowed range survives float error; an empty range is caught below.
        sides = tuple(zip(config.crop_size, size_pair(config.resize_size)))
        low, high = max(c / (r + 1) for c, r in sides), min(c / r for c, r in sides)
        timm_config = {"input_size": (3, *config.crop_size), "interpolation": config.interpolation,
                       "mean": config.mean, "std": config.std, "crop_pct": (low + high) / 2,
                       "crop_mode": crop_mode}
        backend = "pil" if config.resize_backend == "pil" else ("tensor" if config.antialias else "tensor_noaa")
        require_same(config, describe_timm(timm_config, resize_backend=backend, source=config.source, **variant))
        return create_preprocess(timm_config, resize_backend=backend, **variant)

    def unset_preprocess_origin(self, spec: Spec) -> str | None:
        """Explicit fields first, then the model's pretrained_cfg when the backbone is timm's, then timm's defaults."""
        if spec.backbone.library == self.name:
            return "the model's pretrained_cfg (timm.data.resolve_model_data_config)"
        return "timm's defaults"
