"""The spec's preprocessing in numpy and PIL alone: the library transform's pixels, bit for bit, without torch.

A candidate that holds its own model (an ONNX graph, a service, a log) needs only the spec's
pixels; importing torch, timm and torchvision to make them costs seconds. `numpy_preprocess`
builds the same transform from the library-neutral description (`PreprocessConfig`) with
the steps the libraries themselves run on a PIL image:

- resize: ``Image.resize(size, filter)``, exactly as torchvision's ``F.resize`` and
  transformers' PIL backend call it (no box, no ``reducing_gap``; Pillow always antialiases);
- crop and pad: `parity.preprocess.config.crop_box` places the crop, pixels outside the
  resized image take ``pad_fill`` (torchvision pads with ``ImageOps.expand``, a constant);
- [0, 1] pixels: ``float32(u8) / 255`` in float32, as ``to_tensor`` does it; transformers'
  ``float64(u8) * (1/255)`` rounds to the same 256 values (asserted in the tests);
- finish: channel order, value scale (``* 255``), then ``(x - mean) / std`` in float32 with
  mean and std rounded to float32 first, torchvision ``Normalize``'s ``sub_(mean).div_(std)``.

A torch-resized description (``resize_backend = "tensor"``: timm's tensor backends, the
transformers fast processor) runs torch's interpolation kernels, which numpy does not
reproduce bit for bit: `numpy_preprocess` raises `TorchPreprocessOnly` and the caller keeps
the library transform.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from parity.errors import FixtureError, SpecError
from parity.preprocess.config import PreprocessConfig, crop_box

__all__ = ["PIL_FILTERS", "NumpyPreprocess", "TorchPreprocessOnly", "numpy_preprocess"]

# What torchvision's pil_modes_mapping and transformers' PILImageResampling hand to Pillow per name.
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
_BYTE = np.float32(255)


class TorchPreprocessOnly(NotImplementedError):
    """A description only torch reproduces bit for bit (its own resize kernels): keep the library transform."""


@dataclass(frozen=True)
class NumpyPreprocess:
    """image → pixels (3, H, W) float32, as ``geometry`` (uint8) then ``unit`` then ``finish``, without torch.

    Build it with `numpy_preprocess`, which refuses what it cannot reproduce.
    """

    config: PreprocessConfig
    filter: Image.Resampling
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)

    def geometry(self, image: Image.Image) -> np.ndarray:
        """Resize, crop and pad an RGB image: uint8 (H, W, 3)."""
        if image.mode != "RGB":
            raise FixtureError(f"numpy preprocessing takes RGB images (as parity.store.images.decode_image returns them), "
                               f"got mode {image.mode}")
        config = self.config
        box = crop_box(config, image)
        if config.resize != "none":
            # torchvision returns the image untouched at its own size; Pillow's resize then copies: same pixels
            image = image.resize((box.resized_w, box.resized_h), self.filter)
        top, left, height, width = box.top, box.left, box.height, box.width
        if top >= 0 and left >= 0 and top + height <= box.resized_h and left + width <= box.resized_w:
            return np.asarray(image.crop((left, top, left + width, top + height)))
        # part of the crop lies outside the resized image: that part is padding, a constant colour
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = np.asarray(self.config.pad_fill or (0, 0, 0), np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, box.resized_h), min(left + width, box.resized_w)
        if y1 > y0 and x1 > x0:
            canvas[y0 - top:y1 - top, x0 - left:x1 - left] = np.asarray(image.crop((x0, y0, x1, y1)))
        return canvas

    @staticmethod
    def unit(pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) → float32 (3, H, W) in [0, 1], as torchvision's ``to_tensor`` divides."""
        # the uint8 transpose first: a strided float copy costs several times more
        x = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32)
        return np.divide(x, _BYTE, out=x)

    def finish(self, unit: np.ndarray) -> np.ndarray:
        """Channel order, value scale and mean/std on [0, 1] pixels from `unit`, in float32."""
        if self.config.channel_order == "bgr":
            unit = unit[::-1]  # what an OpenCV-decoded image looks like to an RGB model
        if self.config.value_scale == "byte":
            unit = unit * _BYTE
        x = np.subtract(unit, self.mean, dtype=np.float32)  # a new array: ``unit`` may feed other variants
        return np.divide(x, self.std, out=x)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.finish(self.unit(self.geometry(image)))


def numpy_preprocess(config: PreprocessConfig) -> NumpyPreprocess:
    """The transform ``config`` describes, in numpy and PIL: pixels (3, H, W) float32 equal to the library's.

    Args:
        config: the description, as `parity.libraries.describe_record` gives it for a manifest's or a
            resolved spec's preprocessing record.

    Raises:
        TorchPreprocessOnly: the description resizes with torch (``resize_backend = "tensor"``); keep the
            library transform for it.
        SpecError: an interpolation Pillow has no filter for, or a std that is zero in float32.
    """
    if config.resize_backend != "pil":
        raise TorchPreprocessOnly(
            f"{config.library} preprocessing with resize_backend {config.resize_backend!r} resizes with torch's "
            "interpolation kernels, which numpy does not reproduce bit for bit; use the library transform")
    if config.interpolation not in PIL_FILTERS:
        raise SpecError(f"interpolation {config.interpolation!r} has no Pillow filter; expected one of "
                        f"{tuple(PIL_FILTERS)}")
    # transformers rescales by rescale_factor and normalizes with mean/std; the library transform moves the
    # rescale to 1/255 and folds the rest into mean/std, (x*r - m)/s == (x/255 - m/(255r)) / (s/(255r)):
    # the same float64 arithmetic here gives the same float32 mean/std (1.0 for timm and open_clip: no fold).
    scale = 255 * float(config.rescale_factor)
    mean, std = tuple(float(m) for m in config.mean), tuple(float(s) for s in config.std)
    if scale != 1.0:
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    mean32 = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std32 = np.asarray(std, np.float32).reshape(-1, 1, 1)
    if (std32 == 0).any():
        raise SpecError(f"std {config.std} is zero in float32 after the rescale fold; normalization would divide by it")
    return NumpyPreprocess(config, PIL_FILTERS[config.interpolation], mean32, std32)

