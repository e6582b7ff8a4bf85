"""How two preprocessing descriptions differ: each field with its consequence, and measured pixels.

`explain_preprocess` names every field of `PreprocessConfig` on which two descriptions
disagree, with one sentence on what that does to the pixels, and runs the real libraries'
transforms on given images, predicting from the geometry alone where a crop only shifts.
The transforms come from the caller (`parity.libraries.create_transform`): this module knows
no library, and rendering (`parity.report.console`) imports it without importing the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image

from parity.preprocess.transform import Preprocess
from parity.errors import SpecError
from parity.preprocess.config import PreprocessConfig, crop_box

__all__ = ["FieldDifference", "ImageDifference", "PreprocessExplanation", "explain_preprocess", "format_field_value"]

# Identity, not behaviour: two libraries may well produce the same pixels.
_IDENTITY_FIELDS = ("library", "source")


@dataclass(frozen=True)
class FieldDifference:
    """One field on which two descriptions disagree, and what that does to the pixels."""

    field: str
    a: Any
    b: Any
    effect: str


@dataclass(frozen=True)
class ImageDifference:
    """Both transforms on one image: normalized and [0, 1] pixel gaps, and the predicted crop shift.

    Attributes:
        name: the image's name.
        size: (height, width) of the input image.
        max_abs, mean_abs: over the normalized pixels (what the model sees); inf when shapes differ.
        max_abs_unit: over the [0, 1] pixels before channel order, value scale and mean/std.
        shift: b's crop box minus a's, (dy, dx), when the two resize alike and crop the same
            size (so they can differ only by offset); None otherwise.
        shapes: the two outputs' shapes.
    """

    name: str
    size: tuple[int, int]
    max_abs: float
    mean_abs: float
    max_abs_unit: float
    shift: tuple[int, int] | None
    shapes: tuple[tuple[int, ...], tuple[int, ...]]

    @property
    def identical(self) -> bool:
        return self.shapes[0] == self.shapes[1] and self.max_abs == 0


@dataclass(frozen=True)
class PreprocessExplanation:
    """How description ``b`` differs from ``a``: fields, then measured pixels; truthy when nothing differs."""

    a: PreprocessConfig
    b: PreprocessConfig
    differences: tuple[FieldDifference, ...]
    images: tuple[ImageDifference, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the differing fields, in declaration order."""
        return tuple(d.field for d in self.differences)

    def __bool__(self) -> bool:
        return not self.differences and all(image.identical for image in self.images)


def _label(a: PreprocessConfig, b: PreprocessConfig) -> tuple[str, str]:
    return (a.library, b.library) if a.library != b.library else ("a", "b")


_RESIZE_MEANING = {
    "shortest_edge": "scales the short side to the target and keeps the aspect ratio",
    "longest_edge": "scales the long side to the target and pads the rest",
    "squash": "stretches both sides to the target, distorting the aspect ratio",
    "none": "does not resize",
}
_CONVERT_MEANING = {
    "none": "leaves non-RGB images as they are",
    "convert": "drops alpha with PIL convert('RGB')",
    "composite_white": "composites transparency onto white",
}


def _effect(field: str, a: PreprocessConfig, b: PreprocessConfig) -> str:
    """One sentence: what the disagreement on ``field`` does to the pixels."""
    la, lb = _label(a, b)
    va, vb = getattr(a, field), getattr(b, field)
    if field == "resize":
        return f"{la} {_RESIZE_MEANING[va]} while {lb} {_RESIZE_MEANING[vb]}: different content reaches the model."
    if field == "resize_size":
        if a.resize == b.resize == "shortest_edge" and a.crop_size == b.crop_size and isinstance(va, int) \
                and isinstance(vb, int) and a.crop_size is not None:
            tight, loose = (la, lb) if va > vb else (lb, la)
            zoom = max(va, vb) / min(va, vb) - 1
            return (f"{la} resizes the short side to {va} and {lb} to {vb} before the same "
                    f"{a.crop_size[0]}x{a.crop_size[1]} crop: {tight} crops tighter, zoomed in {zoom:.1%} "
                    f"relative to {loose}, dropping more of the border.")
        return f"{la} resizes to {va} and {lb} to {vb}: the image is scaled differently before the crop."
    if field == "crop_pct":
        if va is None or vb is None:
            return f"only one of {la} and {lb} crops a fixed fraction of the resized image."
        tight = la if va < vb else lb
        return (f"{la} keeps {va:.3f} of the resized side and {lb} {vb:.3f}: {tight}'s crop is tighter "
                "(zoomed in, less border).")
    if field == "crop_size":
        return f"{la} outputs {va} pixels and {lb} {vb}: the model sees a different input resolution."
    if field == "resize_rounding":
        return (f"the side taken from the aspect ratio is rounded by {va} in {la} and {vb} in {lb}: on some "
                "image sizes it differs by one pixel, rescaling the whole image slightly.")
    if field in ("crop_offset_rounding", "pad_offset_rounding", "pad_fill") and (va is None or vb is None):
        who, value = (la, va) if va is not None else (lb, vb)
        action = "crops with room to spare" if field == "crop_offset_rounding" else "ever pads"
        return f"only {who} {action} ({field} {value}); the other's geometry never needs it."
    if field == "crop_offset_rounding":
        return (f"{la} places the crop by {va} and {lb} by {vb}: a one-pixel crop shift on images whose resized "
                "side exceeds the crop by an odd number of pixels (with round_half_even against floor: "
                "when that excess is 3 mod 4, e.g. 59 or 111).")
    if field == "pad_offset_rounding":
        return (f"when the resized image is smaller than the crop, {la} pads by {va} and {lb} by {vb}: "
                "a one-pixel shift of images padded by an odd number of pixels.")
    if field == "pad_fill":
        return f"padded borders are filled with {va} in {la} and {vb} in {lb}."
    if field == "interpolation":
        return f"{la} resamples with {va} and {lb} with {vb}: every resized pixel changes slightly."
    if field == "resize_backend":
        return (f"{la} resizes with {va} and {lb} with {vb} kernels: the same filter, rounded differently, "
                "moves a few pixels of every image by about 1-2/255.")
    if field == "antialias":
        off = la if not va else lb
        return (f"{off} downscales without antialiasing: fine texture aliases, large differences on images "
                "shrunk a lot.")
    if field == "rescale_factor":
        return f"pixel values are scaled by {va} in {la} and {vb} in {lb} before mean/std."
    if field in ("mean", "std"):
        return f"{la} normalizes with {field} {va} and {lb} with {vb}: every pixel moves by a per-channel offset."
    if field == "convert_rgb":
        return (f"only for non-RGB inputs: {la} {_CONVERT_MEANING[va]}, {lb} {_CONVERT_MEANING[vb]}; "
                "identical on RGB images.")
    if field == "channel_order":
        return f"{la} feeds {va} and {lb} {vb}: red and blue are swapped."
    if field == "value_scale":
        return f"{la} normalizes {va} values and {lb} {vb} values: mean/std see a 255x different range."
    return f"{field} is {va!r} in {la} and {vb!r} in {lb}."


def _compare_image(name: str, image: Image.Image, a: PreprocessConfig, b: PreprocessConfig,
                   ta: Preprocess, tb: Preprocess) -> ImageDifference:
    size = (image.height, image.width)
    box_a, box_b = crop_box(a, size), crop_box(b, size)
    # Only offsets may differ for the shift to explain the pixels: same resize, same crop size.
    shift = ((box_b.top - box_a.top, box_b.left - box_a.left) if box_a[2:] == box_b[2:] else None)
    unit_a, unit_b = ta.geometry(image), tb.geometry(image)
    pix_a, pix_b = ta.finish(unit_a), tb.finish(unit_b)
    shapes = (tuple(pix_a.shape), tuple(pix_b.shape))
    if shapes[0] != shapes[1]:
        return ImageDifference(name, size, math.inf, math.inf, math.inf, shift, shapes)
    gap = (pix_a - pix_b).abs()
    return ImageDifference(name, size, float(gap.max()), float(gap.mean()), float((unit_a - unit_b).abs().max()),
                           shift, shapes)


def explain_preprocess(a: PreprocessConfig, b: PreprocessConfig, *,
                       images: Sequence[tuple[str, Image.Image]] = (),
                       transform: Callable[[PreprocessConfig], Preprocess] | None = None) -> PreprocessExplanation:
    """Name every field on which ``b`` differs from ``a`` and measure both real transforms on ``images``.

    Args:
        a, b: the two descriptions; ``library`` and ``source`` are not compared.
        images: (name, RGB PIL image) pairs, decoded as the pipeline decodes them.
        transform: builds the transform a description stands for, with the library it names
            (`parity.libraries.create_transform`); needed only with ``images``.

    Raises:
        SpecError: a description its library cannot reproduce (only when images are given), or
            images without a ``transform`` to run them through.
    """
    differences = tuple(FieldDifference(f.name, getattr(a, f.name), getattr(b, f.name), _effect(f.name, a, b))
                        for f in fields(PreprocessConfig)
                        if f.name not in _IDENTITY_FIELDS and getattr(a, f.name) != getattr(b, f.name))
    measured: tuple[ImageDifference, ...] = ()
    if images:
        if transform is None:
            raise SpecError("explain_preprocess measures images with the libraries' transforms: pass "
                            "transform=parity.libraries.create_transform")
        ta, tb = transform(a), transform(b)
        measured = tuple(_compare_image(name, image, a, b, ta, tb) for name, image in images)
    return PreprocessExplanation(a, b, differences, measured)


def format_field_value(value: Any, *, missing: str = "-") -> str:
    """A description field's value as shown to people: floats to 4 significant digits, tuples inline."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(format_field_value(v, missing=missing) for v in value) + ")"
    return missing if value is None else str(value)
