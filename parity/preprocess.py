"""Preprocessing: timm's eval transform, split so that variants share the expensive part.

A transform is geometry (resize + crop, on a PIL image or a uint8 tensor) followed by
cheap per-pixel steps (channel order, value scale, mean/std). Matrices compute the
geometry once per image and derive every per-pixel variant from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from parity.errors import SpecError

__all__ = ["RESIZE_BACKENDS", "CHANNEL_ORDERS", "VALUE_SCALES", "MEAN_STD_PRESETS", "Preprocess", "create_preprocess"]

RESIZE_BACKENDS = ("pil", "tensor", "tensor_noaa")
CHANNEL_ORDERS = ("rgb", "bgr")
VALUE_SCALES = ("unit", "byte")
MEAN_STD_PRESETS = {
    "openai_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class Preprocess:
    """image → pixels (3, H, W) float32, as ``geometry`` then ``finish``."""

    geometric: tuple[Any, ...]
    to_tensor: Any
    normalize: Any
    resize_backend: str = "pil"
    channel_order: str = "rgb"
    value_scale: str = "unit"

    def geometry(self, image: Image.Image):
        """Resize and crop; returns float pixels in [0, 1] before any per-pixel step."""
        if self.resize_backend == "pil":
            for step in self.geometric:
                image = step(image)
            return self.to_tensor(image)
        from torchvision.transforms.functional import pil_to_tensor

        x = pil_to_tensor(image)  # uint8 (3, H, W): torchvision resizes it with torch kernels
        for step in self.geometric:
            x = step(x)
        return x.float().div(255)

    def finish(self, unit):
        """Channel order, value scale and mean/std on [0, 1] pixels from `geometry`."""
        if self.channel_order == "bgr":
            unit = unit.flip(0)  # what an OpenCV-decoded image looks like to an RGB model
        if self.value_scale == "byte":
            unit = unit * 255
        return self.normalize(unit)

    def __call__(self, image: Image.Image):
        return self.finish(self.geometry(image))


def create_preprocess(data_config: Mapping[str, Any], *, resize_backend: str = "pil",
                      channel_order: str = "rgb", value_scale: str = "unit") -> Preprocess:
    """Build timm's eval transform for ``data_config`` and split it into geometry and per-pixel steps."""
    import copy

    import timm
    from torchvision import transforms

    compose = timm.data.create_transform(**data_config, is_training=False)
    *geometric, to_tensor, normalize = compose.transforms
    if not isinstance(normalize, transforms.Normalize):
        raise SpecError(f"unexpected timm eval transform (no final Normalize): {compose}")
    if resize_backend == "tensor_noaa":
        geometric = [copy.copy(step) for step in geometric]
        for step in geometric:
            if isinstance(step, transforms.Resize):
                step.antialias = False
    return Preprocess(tuple(geometric), to_tensor, normalize, resize_backend, channel_order, value_scale)
