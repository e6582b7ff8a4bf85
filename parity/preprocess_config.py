"""One comparable description of any library's eval preprocessing, and why two of them differ.

timm, open_clip and transformers all "resize then center-crop", but each rounds the
derived side, the crop offset and the padding its own way, and resizes with its own
kernel. `PreprocessConfig` records those choices side by side, and `crop_box` predicts the
geometry from them alone; `parity.preprocess_diff` explains how two of them differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from parity.errors import SpecError
from parity.extras import require
from parity.preprocess import (
    CHANNEL_ORDERS,
    HF_PROCESSORS,
    RESIZE_BACKENDS,
    VALUE_SCALES,
    Preprocess,
    check_open_clip_options,
    create_hf_preprocess,
    create_hf_processor,
    create_open_clip_preprocess,
    create_preprocess,
    load_preprocessor_config,
    processor_mean_std,
)

__all__ = [
    "LIBRARIES",
    "RESIZES",
    "SOURCE_FORMS",
    "PreprocessConfig",
    "CropBox",
    "describe_timm",
    "describe_open_clip",
    "describe_open_clip_model",
    "describe_hf",
    "resolve_source",
    "create_transform",
    "crop_box",
]

LIBRARIES = ("timm", "open_clip", "transformers-fast", "transformers-slow")
RESIZES = ("shortest_edge", "longest_edge", "squash", "none")
SOURCE_FORMS = ("timm:MODEL_NAME", "open_clip:MODEL_NAME[@PRETRAINED_TAG]", "hf:PATH", "hf-slow:PATH")
_TIMM_CROP_MODES = {"center": "shortest_edge", "squash": "squash", "border": "longest_edge"}
_OPEN_CLIP_RESIZE_MODES = {"shortest": "shortest_edge", "longest": "longest_edge", "squash": "squash"}


@dataclass(frozen=True)
class PreprocessConfig:
    """What one library's eval preprocessing does to an RGB image, in fields every library shares.

    Fields that cannot act for this configuration are None (a crop that never has slack
    has no offset rule; a resize that never leaves the image smaller than the crop never pads).

    Attributes:
        library: ``"timm"``, ``"open_clip"``, ``"transformers-fast"`` or ``"transformers-slow"``.
        source: where the description came from (``timm:MODEL``, a config path, ...); not compared.
        resize: ``"shortest_edge"`` (short side to the target, aspect kept), ``"longest_edge"``
            (long side to the target, aspect kept, then padded), ``"squash"`` (both sides set,
            aspect lost) or ``"none"``.
        resize_size: the size handed to the resize: an int (the short side) or (height, width)
            (a box the image is fitted to, or the squash size); None without a resize.
        resize_rounding: how the side taken from the aspect ratio is rounded: ``"truncate"``
            (torchvision ``Resize(int)`` and transformers' ``get_resize_output_image_size``:
            ``int(size * long / short)``), ``"round"`` (timm/open_clip ``ResizeKeepRatio``:
            ``round(side / ratio)``), None when both sides are given.
        crop_size: (height, width) of the output; None when the output keeps the resized size.
        crop_pct: crop height / resized height (the short side for ``"shortest_edge"``); timm's
            nominal 0.9 at 224 becomes 224 / floor(224 / 0.9) = 224 / 248 = 0.903 here.
        crop_offset_rounding: the crop's top/left when the resized image exceeds the crop by
            ``e`` pixels: ``"round_half_even"`` (torchvision ``CenterCrop``: ``int(round(e / 2))``,
            Python's banker's rounding) or ``"floor"`` (transformers: ``e // 2``).
        pad_offset_rounding: the crop's top/left when the resized image is ``e`` pixels smaller
            than the crop and gets padded: ``"ceil"`` (torchvision and transformers-fast put the
            odd padding pixel at the end) or ``"floor"`` (transformers-slow puts it first).
        pad_fill: per-channel padding value (0-255), or None when this geometry never pads.
        interpolation: the resampling filter (``"bicubic"``, ``"bilinear"``, ...).
        resize_backend: ``"pil"`` (Pillow resizes the image) or ``"tensor"`` (torch kernels on uint8).
        antialias: whether downscaling low-pass filters first (Pillow always does).
        rescale_factor: the factor taking 0-255 values to what mean/std expect (1/255 usually).
        mean, std: per-channel normalization; (0, 0, 0) and (1, 1, 1) when normalization is off.
        convert_rgb: what happens to a non-RGB input: ``"none"`` (timm: left as is),
            ``"convert"`` (open_clip: PIL ``convert("RGB")``, alpha dropped) or
            ``"composite_white"`` (transformers: transparency composited onto white).
        channel_order: ``"rgb"``, or ``"bgr"`` to model an OpenCV-decoded image.
        value_scale: ``"unit"`` ([0, 1] before mean/std) or ``"byte"`` ([0, 255]).
    """

    library: str
    source: str
    resize: str
    resize_size: int | tuple[int, int] | None
    resize_rounding: str | None
    crop_size: tuple[int, int] | None
    crop_pct: float | None
    crop_offset_rounding: str | None
    pad_offset_rounding: str | None
    pad_fill: tuple[int, ...] | None
    interpolation: str
    resize_backend: str
    antialias: bool
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    convert_rgb: str
    channel_order: str = "rgb"
    value_scale: str = "unit"

    def __post_init__(self):
        for name, allowed in (("library", LIBRARIES), ("resize", RESIZES), ("resize_backend", ("pil", "tensor")),
                              ("channel_order", CHANNEL_ORDERS), ("value_scale", VALUE_SCALES)):
            if getattr(self, name) not in allowed:
                raise SpecError(f"PreprocessConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


class CropBox(NamedTuple):
    """Where the crop lands, in the resized image's pixels (negative top/left: padding before the image)."""

    top: int
    left: int
    height: int
    width: int
    resized_h: int
    resized_w: int


# ---------------------------------------------------------------------------------------------
# Descriptions


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _derived(resize: str, resize_size, crop_size, *, crop_rule: str, pad_rule: str, fill) -> dict[str, Any]:
    """crop_pct and the offset/padding rules, set to None where this geometry cannot use them."""
    if crop_size is None:
        return dict(crop_pct=None, crop_offset_rounding=None, pad_offset_rounding=None, pad_fill=None)
    ch, cw = crop_size
    if resize in ("shortest_edge", "squash"):
        th, tw = _pair(resize_size)
        # shortest_edge never leaves a side below its target; the long side always has slack.
        can_pad = ch > th or cw > tw
        has_slack = resize == "shortest_edge" or th > ch or tw > cw
    else:  # longest_edge and none: any short side is possible, so both can happen
        can_pad = has_slack = True
    crop_pct = ch / _pair(resize_size)[0] if resize_size is not None else None
    return dict(crop_pct=crop_pct, crop_offset_rounding=crop_rule if has_slack else None,
                pad_offset_rounding=pad_rule if can_pad else None,
                pad_fill=tuple(int(v) for v in fill) if can_pad else None)


def describe_timm(data_config: Mapping[str, Any], *, resize_backend: str = "pil", channel_order: str = "rgb",
                  value_scale: str = "unit", source: str = "timm data config") -> PreprocessConfig:
    """Describe timm's eval transform for ``data_config`` (as from ``timm.data.resolve_model_data_config``).

    Mirrors ``timm.data.transforms_factory.transforms_imagenet_eval``; ``resize_backend`` is the
    `create_preprocess` backend (``"pil"``, ``"tensor"``, ``"tensor_noaa"``).

    Raises:
        SpecError: an unknown backend or crop_mode, or a crop_border_pixels parity does not model.
    """
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if resize_backend not in RESIZE_BACKENDS:
        raise SpecError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {resize_backend!r}")
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in _TIMM_CROP_MODES:
        # timm itself would fall back to center silently; a typo should not.
        raise SpecError(f"crop_mode must be one of {tuple(_TIMM_CROP_MODES)}, got {crop_mode!r}")
    if data_config.get("crop_border_pixels"):
        raise SpecError("crop_border_pixels is not modelled by parity's preprocessing descriptions")
    input_size = data_config.get("input_size", 224)
    img_size = _pair(input_size if isinstance(input_size, int) else tuple(input_size)[-2:])
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    scale = tuple(math.floor(x / crop_pct) for x in img_size)
    mean = tuple(float(v) for v in data_config.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in data_config.get("std", IMAGENET_DEFAULT_STD))
    resize = _TIMM_CROP_MODES[crop_mode]
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
        **_derived(resize, resize_size, img_size, crop_rule="round_half_even", pad_rule="ceil", fill=fill),
        interpolation=str(data_config.get("interpolation", "bilinear")),
        resize_backend="pil" if resize_backend == "pil" else "tensor",
        antialias=not (resize_backend == "tensor_noaa" and plain_resize),
        rescale_factor=1 / 255, mean=mean, std=std, convert_rgb="none",
        channel_order=channel_order, value_scale=value_scale)


def describe_open_clip(image_size: int | Sequence[int], *, mean: Sequence[float], std: Sequence[float],
                       interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color: int = 0,
                       channel_order: str = "rgb", value_scale: str = "unit",
                       source: str = "open_clip image_transform") -> PreprocessConfig:
    """Describe ``open_clip.image_transform(image_size, is_train=False, ...)``.

    Raises:
        SpecError: an interpolation or resize_mode open_clip does not accept.
    """
    check_open_clip_options(interpolation, resize_mode)
    size = _pair(image_size)
    resize = _OPEN_CLIP_RESIZE_MODES[resize_mode]
    fill: tuple[int, ...] = (0, 0, 0)
    if resize_mode == "squash":
        # Resize((h, w)) and no crop step: the output is the resize, an identity crop
        resize_size, rounding = size, None
    elif resize_mode == "longest":
        resize_size, rounding = size, "round"
        fill = (int(fill_color),) * 3
    elif size[0] == size[1]:
        resize_size, rounding = size[0], "truncate"
    else:
        # open_clip builds ResizeKeepRatio(image_size) without passing interpolation: always bicubic
        resize_size, rounding, interpolation = size, "round", "bicubic"
    return PreprocessConfig(
        library="open_clip", source=source, resize=resize, resize_size=resize_size, resize_rounding=rounding,
        crop_size=size,
        **_derived(resize, resize_size, size, crop_rule="round_half_even", pad_rule="ceil", fill=fill),
        interpolation=interpolation, resize_backend="pil", antialias=True, rescale_factor=1 / 255,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), convert_rgb="convert",
        channel_order=channel_order, value_scale=value_scale)


def describe_open_clip_model(name: str, *, pretrained: str | None = None, channel_order: str = "rgb",
                             value_scale: str = "unit") -> PreprocessConfig:
    """Describe the eval preprocessing open_clip gives model ``name`` (and pretrained tag), without building it.

    Layers as ``open_clip.create_model``: ``PreprocessCfg`` defaults, the model config's
    ``preprocess_cfg``, the pretrained tag's entries, then the vision tower's ``image_size``.

    Raises:
        SpecError: open_clip is missing, or the model name or pretrained tag is unknown.
    """
    open_clip = require("open_clip", "open_clip preprocessing")
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from dataclasses import asdict

    cleaned = name.replace("/", "-")  # as open_clip does for built-in names
    model_cfg = open_clip.get_model_config(cleaned)
    if model_cfg is None:
        raise SpecError(f"unknown open_clip model {name!r}\nNote: open_clip.list_models() lists the built-in names")
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg") or {})
    source = f"open_clip:{name}"
    if pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(cleaned, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(cleaned)
            raise SpecError(f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}; known: {tags}")
        cfg = merge_preprocess_dict(cfg, tag_cfg)
        source += f"@{pretrained}"
    image_size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    return describe_open_clip(image_size, mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"],
                              resize_mode=cfg["resize_mode"], fill_color=cfg["fill_color"],
                              channel_order=channel_order, value_scale=value_scale, source=source)


def _interpolation_name(resample: Any, processor: str) -> str:
    from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

    resample = PILImageResampling(resample if resample is not None else PILImageResampling.BILINEAR)
    if processor == "fast":
        return pil_torch_interpolation_mapping[resample].value  # what torchvision actually runs
    return resample.name.lower()


def describe_hf(config_or_path: Mapping[str, Any] | str | Path, *, processor: str = "fast",
                channel_order: str = "rgb", value_scale: str = "unit", source: str | None = None) -> PreprocessConfig:
    """Describe a transformers CLIP image processor (fast: torchvision backend, slow: PIL backend).

    Unset config entries take the processor class's defaults, read from the class itself.

    Raises:
        SpecError: a missing or unreadable config, a non-CLIP processor, or a ``size`` form
            other than ``shortest_edge`` or ``height``/``width``.
    """
    config = load_preprocessor_config(config_or_path)
    if source is None:
        source = "transformers preprocessor config" if isinstance(config_or_path, Mapping) else str(config_or_path)
    built = create_hf_processor(config, processor=processor)
    size = built.size
    if not built.do_resize:
        resize, resize_size, rounding = "none", None, None
    elif size.shortest_edge and not size.longest_edge:
        resize, resize_size, rounding = "shortest_edge", int(size.shortest_edge), "truncate"
    elif size.height and size.width:
        resize, resize_size, rounding = "squash", (int(size.height), int(size.width)), None
    else:
        raise SpecError(f"size = {config.get('size')!r} is not modelled: parity describes "
                        "{'shortest_edge': N} and {'height': H, 'width': W}")
    crop_size = (int(built.crop_size.height), int(built.crop_size.width)) if built.do_center_crop else None
    mean, std = processor_mean_std(built)
    return PreprocessConfig(
        library=f"transformers-{processor}", source=source, resize=resize, resize_size=resize_size,
        resize_rounding=rounding, crop_size=crop_size,
        # both backends floor the crop offset; when padding, fast pads like torchvision, slow centres by floor
        **_derived(resize, resize_size, crop_size, crop_rule="floor",
                   pad_rule="ceil" if processor == "fast" else "floor", fill=(0, 0, 0)),
        interpolation=_interpolation_name(built.resample, processor),
        resize_backend="tensor" if processor == "fast" else "pil", antialias=True,
        rescale_factor=float(built.rescale_factor) if built.do_rescale else 1.0, mean=mean, std=std,
        convert_rgb="composite_white" if built.do_convert_rgb else "none",
        channel_order=channel_order, value_scale=value_scale)


def _timm_data_config(name: str) -> dict[str, Any]:
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


def resolve_source(text: str) -> PreprocessConfig:
    """Describe a command-line source: ``timm:MODEL``, ``open_clip:MODEL[@TAG]``, ``hf:PATH`` or ``hf-slow:PATH``.

    Raises:
        SpecError: an unknown prefix (the message lists the accepted forms) or an unknown model or path.
    """
    prefix, sep, rest = text.partition(":")
    forms = ", ".join(SOURCE_FORMS)
    if not sep or not rest:
        raise SpecError(f"preprocessing source {text!r} is not PREFIX:VALUE; expected one of {forms}")
    if prefix == "timm":
        return describe_timm(_timm_data_config(rest), source=text)
    if prefix == "open_clip":
        name, _, tag = rest.partition("@")
        return describe_open_clip_model(name, pretrained=tag or None)
    if prefix in ("hf", "hf-slow"):
        return describe_hf(rest, processor="fast" if prefix == "hf" else "slow", source=text)
    raise SpecError(f"unknown preprocessing source prefix {prefix!r} in {text!r}; expected one of {forms}")


# ---------------------------------------------------------------------------------------------
# Transforms from descriptions


def _require_same(config: PreprocessConfig, rebuilt: PreprocessConfig) -> None:
    """Refuse a description the named library cannot reproduce (for instance one edited with replace())."""
    wrong = [f"{f.name} = {getattr(config, f.name)!r} (the library gives {getattr(rebuilt, f.name)!r})"
             for f in fields(config) if f.name != "source" and getattr(config, f.name) != getattr(rebuilt, f.name)]
    if wrong:
        raise SpecError(f"{config.library} cannot reproduce this preprocessing: " + "; ".join(wrong))


def _hf_config(config: PreprocessConfig) -> dict[str, Any]:
    from transformers.image_utils import PILImageResampling

    names = {m.name.lower(): m for m in PILImageResampling} | {"nearest-exact": PILImageResampling.NEAREST}
    if config.interpolation not in names:
        raise SpecError(f"transformers has no resample for interpolation {config.interpolation!r}")
    hf: dict[str, Any] = {"image_processor_type": "CLIPImageProcessor", "do_resize": config.resize != "none",
                          "resample": int(names[config.interpolation]), "do_center_crop": config.crop_size is not None,
                          "do_rescale": True, "rescale_factor": config.rescale_factor, "do_normalize": True,
                          "image_mean": list(config.mean), "image_std": list(config.std),
                          "do_convert_rgb": config.convert_rgb != "none"}
    if config.resize == "shortest_edge" and isinstance(config.resize_size, int):
        hf["size"] = {"shortest_edge": config.resize_size}
    elif config.resize == "squash":
        hf["size"] = dict(zip(("height", "width"), _pair(config.resize_size)))
    elif config.resize != "none":
        raise SpecError(f"transformers' CLIP processor cannot resize {config.resize} to {config.resize_size}")
    if config.crop_size is not None:
        hf["crop_size"] = dict(zip(("height", "width"), config.crop_size))
    return hf


def create_transform(config: PreprocessConfig) -> Preprocess:
    """Build the transform a description stands for, with the library it names.

    Raises:
        SpecError: that library cannot reproduce every field of the description.
    """
    variant = dict(channel_order=config.channel_order, value_scale=config.value_scale)
    if config.library == "timm":
        if config.crop_size is None or config.resize_size is None or config.resize == "none":
            raise SpecError("timm's eval transform always resizes and crops; this description does not")
        crop_mode = {v: k for k, v in _TIMM_CROP_MODES.items()}[config.resize]
        # floor(crop / crop_pct) == resize on every side: crop / (resize + 1) < crop_pct <= crop / resize.
        # The middle of the allowed range survives float error; an empty range is caught below.
        sides = tuple(zip(config.crop_size, _pair(config.resize_size)))
        low, high = max(c / (r + 1) for c, r in sides), min(c / r for c, r in sides)
        data_config = {"input_size": (3, *config.crop_size), "interpolation": config.interpolation,
                       "mean": config.mean, "std": config.std, "crop_pct": (low + high) / 2,
                       "crop_mode": crop_mode}
        backend = "pil" if config.resize_backend == "pil" else ("tensor" if config.antialias else "tensor_noaa")
        _require_same(config, describe_timm(data_config, resize_backend=backend, source=config.source, **variant))
        return create_preprocess(data_config, resize_backend=backend, **variant)
    if config.library == "open_clip":
        mode = {v: k for k, v in _OPEN_CLIP_RESIZE_MODES.items()}.get(config.resize)
        if mode is None or config.crop_size is None:
            raise SpecError(f"open_clip cannot resize {config.resize!r} without a fixed output size")
        options = dict(mean=config.mean, std=config.std, interpolation=config.interpolation, resize_mode=mode,
                       fill_color=config.pad_fill[0] if config.pad_fill else 0, **variant)
        _require_same(config, describe_open_clip(config.crop_size, source=config.source, **options))
        return create_open_clip_preprocess(config.crop_size, **options)
    processor = config.library.removeprefix("transformers-")
    if processor not in HF_PROCESSORS:
        raise SpecError(f"no transform for library {config.library!r}; expected one of {LIBRARIES}")
    hf = _hf_config(config)
    _require_same(config, describe_hf(hf, processor=processor, source=config.source, **variant))
    return create_hf_preprocess(hf, processor=processor, **variant)


# ---------------------------------------------------------------------------------------------
# Geometry


def _offset(resized: int, crop: int, crop_rule: str | None, pad_rule: str | None) -> int:
    if resized >= crop:
        if crop_rule == "round_half_even":
            return int(round((resized - crop) / 2.0))  # torchvision center_crop: round half to even
        return (resized - crop) // 2
    if pad_rule == "ceil":
        return -((crop - resized) // 2)  # the odd padding pixel goes after the image
    return (resized - crop) // 2


def crop_box(config: PreprocessConfig, image_size: tuple[int, int] | Image.Image) -> CropBox:
    """Predict the resize and crop for an image of ``image_size`` = (height, width), or a PIL image.

    Note that PIL's ``Image.size`` is (width, height); pass the image itself to avoid the swap.
    """
    if isinstance(image_size, Image.Image):
        h, w = image_size.height, image_size.width
    else:
        h, w = image_size
    if config.resize == "none":
        rh, rw = h, w
    elif config.resize == "squash":
        rh, rw = _pair(config.resize_size)
    elif config.resize_rounding == "truncate":
        # torchvision _compute_resized_output_size and transformers get_resize_output_image_size
        s = _pair(config.resize_size)[0]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        rh, rw = (new_long, s) if w <= h else (s, new_long)
    else:
        # timm/open_clip ResizeKeepRatio, same float expression
        th, tw = _pair(config.resize_size)
        longest = 1.0 if config.resize == "longest_edge" else 0.0
        ratio = max(h / th, w / tw) * longest + min(h / th, w / tw) * (1.0 - longest)
        rh, rw = round(h * 1.0 / ratio), round(w * 1.0 / ratio)
    if config.crop_size is None:
        return CropBox(0, 0, rh, rw, rh, rw)
    ch, cw = config.crop_size
    rules = config.crop_offset_rounding, config.pad_offset_rounding
    return CropBox(_offset(rh, ch, *rules), _offset(rw, cw, *rules), ch, cw, rh, rw)
