"""Preprocessing: timm's eval transform, split so that variants share the expensive part.

A transform is geometry (resize + crop, on a PIL image or a uint8 tensor) followed by
cheap per-pixel steps (channel order, value scale, mean/std). Matrices compute the
geometry once per image and derive every per-pixel variant from it.

open_clip's and transformers' eval preprocessing are built into the same `Preprocess`
shape (`create_open_clip_preprocess`, `create_hf_preprocess`), so every library is
geometry → [0, 1] pixels, then finish → normalized pixels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from parity.errors import SpecError
from parity.extras import require
from parity.spec import CHANNEL_ORDERS, MEAN_STD_PRESETS, RESIZE_BACKENDS, VALUE_SCALES

__all__ = [
    "RESIZE_BACKENDS",
    "PROCESSOR_BACKEND",
    "CHANNEL_ORDERS",
    "VALUE_SCALES",
    "MEAN_STD_PRESETS",
    "HF_PROCESSORS",
    "HF_PROCESSOR_TYPES",
    "OPEN_CLIP_RESIZE_MODES",
    "TIMM_DATA_CONFIG_KEYS",
    "Preprocess",
    "ProcessorGeometry",
    "create_preprocess",
    "describe_data_config",
    "create_open_clip_preprocess",
    "check_open_clip_options",
    "create_hf_preprocess",
    "create_hf_processor",
    "load_preprocessor_config",
    "processor_mean_std",
]

# Not in RESIZE_BACKENDS: a spec cannot ask timm for it; transformers processors run whole.
PROCESSOR_BACKEND = "processor"
HF_PROCESSORS = ("fast", "slow")
# Every name a CLIP preprocessor_config.json carries across transformers 4.x and 5.x; the
# slow class saves itself without its "Pil" suffix, so the name never says fast or slow.
HF_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")
OPEN_CLIP_RESIZE_MODES = ("shortest", "longest", "squash")
# The entries of timm's data config that decide its eval transform (what manifests record of it).
TIMM_DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


@dataclass(frozen=True)
class Preprocess:
    """image → pixels (3, H, W) float32, as ``geometry`` then ``finish``."""

    geometric: tuple[Any, ...]
    to_tensor: Any
    normalize: Any
    resize_backend: str = "pil"
    channel_order: str = "rgb"
    value_scale: str = "unit"

    def pil_part(self, image: Image.Image) -> Image.Image:
        """The steps that run on PIL alone (the pil backend's resize and crop), the image as is for the others.

        No torch kernel runs here, so a decode thread may call it without starting an OpenMP team of its
        own; `tensor_part` of its result is exactly this transform's pixels.
        """
        if self.resize_backend != "pil":
            return image  # the tensor backends and the processors resize with torch kernels
        for step in self.geometric:
            image = step(image)
        return image

    def tensor_part(self, staged: Image.Image):
        """Pixels (3, H, W) float32 from `pil_part`'s image: the rest of the transform (torch kernels)."""
        return self.finish(self._unit(staged))

    def geometry(self, image: Image.Image):
        """Resize and crop; returns float pixels in [0, 1] before any per-pixel step."""
        return self._unit(self.pil_part(image))

    def _unit(self, image: Image.Image):
        """[0, 1] pixels from `pil_part`'s image."""
        if self.resize_backend == PROCESSOR_BACKEND:
            (processor,) = self.geometric  # resizes, crops and rescales on its own
            return processor(image)
        if self.resize_backend == "pil":
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


def check_open_clip_options(interpolation: str, resize_mode: str) -> None:
    """open_clip asserts on these; a SpecError names the option instead.

    Raises:
        SpecError: an interpolation or resize_mode open_clip does not accept.
    """
    if interpolation not in ("bicubic", "bilinear"):
        raise SpecError(f"open_clip interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    if resize_mode not in OPEN_CLIP_RESIZE_MODES:
        raise SpecError(f"open_clip resize_mode must be one of {OPEN_CLIP_RESIZE_MODES}, got {resize_mode!r}")


def create_open_clip_preprocess(image_size: int | Sequence[int], *, mean: Sequence[float], std: Sequence[float],
                                interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color: int = 0,
                                channel_order: str = "rgb", value_scale: str = "unit") -> Preprocess:
    """Build open_clip's eval transform (``image_transform(..., is_train=False)``) split into geometry and finish.

    Args:
        image_size: the model's input size, an int or (height, width).
        mean, std: per-channel normalization, as open_clip's ``PreprocessCfg``.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (open_clip accepts nothing else).
        resize_mode: ``"shortest"``, ``"longest"`` or ``"squash"``.
        fill_color: padding value of ``"longest"`` mode.

    Raises:
        SpecError: open_clip is missing, or an option is outside what open_clip accepts.
    """
    open_clip = require("open_clip", "open_clip preprocessing")
    from open_clip.transform import MaybeConvertMode
    from torchvision import transforms

    check_open_clip_options(interpolation, resize_mode)
    size = image_size if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    compose = open_clip.image_transform(size, is_train=False, mean=tuple(mean), std=tuple(std),
                                        interpolation=interpolation, resize_mode=resize_mode, fill_color=fill_color)
    # Images reach us as RGB already (the shared loader converts them), so the mode step is a no-op.
    *geometric, to_tensor, normalize = [t for t in compose.transforms if not isinstance(t, MaybeConvertMode)]
    if not isinstance(normalize, transforms.Normalize):
        raise SpecError(f"unexpected open_clip eval transform (no final Normalize): {compose}")
    return Preprocess(tuple(geometric), to_tensor, normalize, "pil", channel_order, value_scale)


def load_preprocessor_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A transformers ``preprocessor_config.json`` as a dict, from a mapping, the file or its directory.

    Raises:
        SpecError: the file is missing, is not JSON, or does not hold a JSON object.
    """
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    if not path.is_file():
        raise SpecError(f"preprocessor config not found: {path}\n"
                        "Note: pass a preprocessor_config.json or a directory containing one")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read preprocessor config {path}: {e}") from e
    if not isinstance(loaded, dict):
        raise SpecError(f"preprocessor config {path} must hold a JSON object, got {type(loaded).__name__}")
    for key in ("size", "crop_size"):  # an int, or a mapping of sides (shortest_edge, height, width)
        value = loaded.get(key)
        sides = value.values() if isinstance(value, dict) else [value] if value is not None else []
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sides):
            raise SpecError(f"preprocessor config {path}: {key} = {json.dumps(value)} is not a size: every side must "
                            "be a positive integer")
    return loaded


def _hf_processor_class(config: Mapping[str, Any], processor: str):
    if processor not in HF_PROCESSORS:
        raise SpecError(f"processor must be one of {HF_PROCESSORS}, got {processor!r}")
    for field in ("image_processor_type", "feature_extractor_type"):
        name = config.get(field)
        if name is not None and name not in HF_PROCESSOR_TYPES:
            raise SpecError(f"{field} = {name!r} is not supported: parity reproduces only the CLIP image "
                            f"processor ({', '.join(HF_PROCESSOR_TYPES)})")
    require("transformers", "transformers preprocessing")
    try:
        from transformers.models.clip import CLIPImageProcessor, CLIPImageProcessorPil
    except ImportError as e:
        raise SpecError("transformers preprocessing needs transformers >= 5 (CLIPImageProcessor and "
                        "CLIPImageProcessorPil)\nNote: pip install 'parity[hf]'") from e
    # transformers 5.x: the plain class is the torchvision ("fast") backend, the Pil class the slow one.
    return CLIPImageProcessor if processor == "fast" else CLIPImageProcessorPil


def create_hf_processor(config: Mapping[str, Any] | str | Path, *, processor: str = "fast"):
    """The transformers CLIP image processor for a preprocessor config, exactly as configured.

    Raises:
        SpecError: as `create_hf_preprocess`.
    """
    config = load_preprocessor_config(config)
    cls = _hf_processor_class(config, processor)
    try:
        return cls.from_dict(dict(config))
    except (TypeError, ValueError) as e:
        raise SpecError(f"transformers cannot build {cls.__name__} from this preprocessor config: {e}") from e


@dataclass(frozen=True)
class ProcessorGeometry:
    """A transformers image processor as the single geometry step: PIL image → [0, 1] pixels (3, H, W)."""

    processor: Any

    def __call__(self, image: Image.Image):
        # Normalization moves to Preprocess.finish; a fixed 1/255 rescale makes the output [0, 1] pixels.
        out = self.processor(image, do_normalize=False, do_rescale=True, rescale_factor=1 / 255,
                             return_tensors="pt")
        return out["pixel_values"][0]

    def __repr__(self) -> str:
        p = self.processor
        resample = getattr(p.resample, "value", p.resample)
        return (f"ProcessorGeometry({type(p).__name__}(size={_set_entries(p.size)}, "
                f"crop_size={_set_entries(p.crop_size)}, resample={resample}, do_resize={p.do_resize}, "
                f"do_center_crop={p.do_center_crop}))")


def _set_entries(size: Any) -> Any:
    """A transformers SizeDict without its unset entries, for a readable repr."""
    from dataclasses import asdict, is_dataclass

    return {k: v for k, v in asdict(size).items() if v is not None} if is_dataclass(size) else size


def _channels(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, Sequence) else (float(value),) * 3


def processor_mean_std(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A transformers image processor's per-channel mean and std; (0, 0, 0) and (1, 1, 1) with normalization off."""
    if not processor.do_normalize:
        return (0.0,) * 3, (1.0,) * 3
    return _channels(processor.image_mean), _channels(processor.image_std)


def create_hf_preprocess(config: Mapping[str, Any] | str | Path, *, processor: str = "fast",
                         channel_order: str = "rgb", value_scale: str = "unit") -> Preprocess:
    """Build a transformers CLIP image processor as a `Preprocess` whose geometry runs the processor itself.

    Args:
        config: the preprocessor config as a mapping, a ``preprocessor_config.json`` path or its directory.
        processor: ``"fast"`` (``CLIPImageProcessor``, torchvision) or ``"slow"`` (``CLIPImageProcessorPil``).

    Returns:
        A `Preprocess` with ``resize_backend == "processor"``: ``geometry`` gives the processor's pixels with
        normalization off, ``finish`` applies its ``image_mean``/``image_std`` (and any non-1/255 rescale).

    Raises:
        SpecError: the config is missing or unreadable, names a processor other than CLIP's, or transformers
            is not installed.
    """
    from torchvision import transforms

    config = load_preprocessor_config(config)
    built = create_hf_processor(config, processor=processor)
    mean, std = processor_mean_std(built)
    # geometry rescales by 1/255; a processor that scales otherwise (or not at all) is folded into mean/std:
    # (x*r - m)/s == (x/255 - m/(255r)) / (s/(255r)).
    scale = 255 * (float(built.rescale_factor) if built.do_rescale else 1.0)
    if scale != 1.0:
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    normalize = transforms.Normalize(mean, std)
    return Preprocess((ProcessorGeometry(built),), None, normalize, PROCESSOR_BACKEND, channel_order, value_scale)


def describe_data_config(config: Mapping[str, Any], *, resize_backend: str = "pil", channel_order: str = "rgb",
                         value_scale: str = "unit", exif_transpose: bool = True) -> dict[str, Any]:
    """The resolved preprocessing as recorded in manifests: the library's configuration plus the variant.

    A timm data config is recorded with its resize backend; a configuration marked by its
    ``library`` key (open_clip's ``preprocess_cfg``, a transformers preprocessor config) runs
    its own resize.
    """
    if "library" in config:
        described = json.loads(json.dumps(dict(config), default=str))  # JSON-safe: tuples → lists, enums → str
        return dict(described, channel_order=channel_order, value_scale=value_scale, exif_transpose=exif_transpose)
    described = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in TIMM_DATA_CONFIG_KEYS}
    return dict(described, resize_backend=resize_backend, channel_order=channel_order, value_scale=value_scale,
                exif_transpose=exif_transpose)
