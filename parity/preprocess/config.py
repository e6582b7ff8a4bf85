"""One comparable description of any library's eval preprocessing, in fields every library shares.

timm, open_clip and transformers all "resize then center-crop", but each rounds the
derived side, the crop offset and the padding its own way, and resizes with its own
kernel. `PreprocessConfig` records those choices side by side, and `crop_box` predicts the
geometry from them alone; `parity.preprocess.diff` explains how two of them differ.

Nothing here knows a library: each adapter in `parity.libraries` describes its own
preprocessing (``Library.describe_source``, ``Library.describe_preprocess``) and builds the
transform a description stands for (``Library.create_transform``), with the helpers below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from PIL import Image

from parity.errors import SpecError
from parity.preprocess.transform import CHANNEL_ORDERS, VALUE_SCALES

__all__ = [
    "RESIZES",
    "PreprocessConfig",
    "CropBox",
    "size_pair",
    "derived_fields",
    "require_same",
    "crop_box",
]

RESIZES = ("shortest_edge", "longest_edge", "squash", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """What one library's eval preprocessing does to an RGB image, in fields every library shares.

    Fields that cannot act for this configuration are None (a crop that never has slack
    has no offset rule; a resize that never leaves the image smaller than the crop never pads).

    Attributes:
        library: who describes and builds it, as its adapter names it (``Library.description_libraries``):
            ``"timm"``, ``"open_clip"``, ``"transformers-fast"`` or ``"transformers-slow"`` for the
            built-in ones. Checked by the registry when a transform is built, not here.
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
        for name, allowed in (("resize", RESIZES), ("resize_backend", ("pil", "tensor")),
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
# Helpers the adapters' descriptions share


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int (square) or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def derived_fields(resize: str, resize_size, crop_size, *, crop_rule: str, pad_rule: str, fill) -> dict[str, Any]:
    """crop_pct and the offset/padding rules, set to None where this geometry cannot use them.

    An adapter's description passes its library's crop and pad rules; a rule the geometry never
    exercises is left out, so two libraries that differ only there describe alike.
    """
    if crop_size is None:
        return dict(crop_pct=None, crop_offset_rounding=None, pad_offset_rounding=None, pad_fill=None)
    ch, cw = crop_size
    if resize in ("shortest_edge", "squash"):
        th, tw = size_pair(resize_size)
        # shortest_edge never leaves a side below its target; the long side always has slack.
        can_pad = ch > th or cw > tw
        has_slack = resize == "shortest_edge" or th > ch or tw > cw
    else:  # longest_edge and none: any short side is possible, so both can happen
        can_pad = has_slack = True
    crop_pct = ch / size_pair(resize_size)[0] if resize_size is not None else None
    return dict(crop_pct=crop_pct, crop_offset_rounding=crop_rule if has_slack else None,
                pad_offset_rounding=pad_rule if can_pad else None,
                pad_fill=tuple(int(v) for v in fill) if can_pad else None)


def require_same(config: PreprocessConfig, rebuilt: PreprocessConfig) -> None:
    """Refuse a description the named library cannot reproduce (for instance one edited with replace()).

    ``rebuilt`` is the library's own description of the transform it would build for ``config``.

    Raises:
        SpecError: the fields (``source`` aside) that differ, with what the library gives.
    """
    wrong = [f"{f.name} = {getattr(config, f.name)!r} (the library gives {getattr(rebuilt, f.name)!r})"
             for f in fields(config) if f.name != "source" and getattr(config, f.name) != getattr(rebuilt, f.name)]
    if wrong:
        raise SpecError(f"{config.library} cannot reproduce this preprocessing: " + "; ".join(wrong))


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
        rh, rw = size_pair(config.resize_size)
    elif config.resize_rounding == "truncate":
        # torchvision _compute_resized_output_size and transformers get_resize_output_image_size
        s = size_pair(config.resize_size)[0]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        rh, rw = (new_long, s) if w <= h else (s, new_long)
    else:
        # timm/open_clip ResizeKeepRatio, same float expression
        th, tw = size_pair(config.resize_size)
        longest = 1.0 if config.resize == "longest_edge" else 0.0
        ratio = max(h / th, w / tw) * longest + min(h / th, w / tw) * (1.0 - longest)
        rh, rw = round(h * 1.0 / ratio), round(w * 1.0 / ratio)
    if config.crop_size is None:
        return CropBox(0, 0, rh, rw, rh, rw)
    ch, cw = config.crop_size
    rules = config.crop_offset_rounding, config.pad_offset_rounding
    return CropBox(_offset(rh, ch, *rules), _offset(rw, cw, *rules), ch, cw, rh, rw)
