"""transformers: CLIP vision models from a local ``save_pretrained`` directory (never the hub), the CLIP
image processor (fast: torchvision, slow: PIL) and its comparable description, and transformers'
extraction points."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity.libraries.convert import openai_to_hf
from parity.errors import CheckpointError, SpecError
from parity.extras import require
from parity.libraries.base import Library
from parity.preprocess.transform import (HF_PROCESSORS, Preprocess, create_hf_preprocess, create_hf_processor,
                               describe_data_config, load_preprocessor_config, processor_mean_std)
from parity.preprocess.config import PreprocessConfig, derived_fields, require_same, size_pair
from parity.spec import LibraryVocabulary, Spec

__all__ = ["Transformers", "weights_file", "preprocess_record", "describe_preprocess_config", "describe_hf",
           "TEXT_TOWER"]

_HF_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
# Keys of the text tower in a whole-CLIP checkpoint: set aside by name, and the rest still loads strictly.
TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")
# Manifest-record keys that are not the preprocessor config's own.
_RECORD_KEYS = ("library", "processor", "channel_order", "value_scale", "exif_transpose", "resize_backend")
# `parity explain-preprocess` source prefix → the image processor backend it describes.
_SOURCE_PROCESSORS = {"hf": "fast", "hf-slow": "slow"}


def weights_file(directory: Path) -> Path:
    """The weight file of a transformers ``save_pretrained`` directory.

    Raises:
        CheckpointError: the directory holds no weights, or only a sharded checkpoint.
    """
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    if (directory / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{directory} holds a sharded checkpoint; save it as one model.safetensors "
                              "(save_pretrained(..., max_shard_size=\"100GB\")) to gate it")
    raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin")


def preprocess_record(config: Mapping[str, Any], processor: str) -> dict[str, Any]:
    """A transformers preprocessor config, marked with its library and processor backend."""
    return {"library": "transformers", "processor": processor, **config}


def describe_preprocess_config(path: str | Path, *, processor: str = "fast", channel_order: str = "rgb",
                               value_scale: str = "unit", exif_transpose: bool = True) -> dict[str, Any]:
    """The manifest record of a transformers image processor read from ``path`` (capture-side helper)."""
    return describe_data_config(preprocess_record(load_preprocessor_config(path), processor),
                                channel_order=channel_order, value_scale=value_scale, exif_transpose=exif_transpose)


def _hf_directory(spec: Spec) -> Path:
    bb = spec.backbone
    if bb.checkpoint is None or not bb.checkpoint.is_dir():
        raise SpecError(f"{spec.path}: a transformers backbone needs [backbone].checkpoint = a local directory with "
                        f"config.json and model.safetensors (what save_pretrained writes); got {bb.checkpoint}")
    if not (bb.checkpoint / "config.json").is_file():
        # transformers would silently fall back to a default configuration: another architecture.
        raise SpecError(f"{spec.path}: {bb.checkpoint} has no config.json; a transformers directory holds the "
                        "config.json and model.safetensors that save_pretrained writes")
    return bb.checkpoint


def _hf_config(spec: Spec):
    """The vision config: transformers' own reading of the checkpoint directory (a whole-CLIP config
    yields its vision_config), or [backbone].kwargs alone for weights saved in another layout."""
    transformers = require("transformers")
    bb = spec.backbone
    try:
        if bb.checkpoint_format == "transformers":
            return transformers.CLIPVisionConfig.from_pretrained(_hf_directory(spec), local_files_only=True,
                                                                 **bb.kwargs)
        return transformers.CLIPVisionConfig(**bb.kwargs)
    except SpecError:
        raise
    except Exception as e:  # OSError, TypeError, ValueError, and whatever a damaged config.json makes it raise
        raise SpecError(f"{spec.path}: transformers cannot build a CLIPVisionConfig from {bb.checkpoint} "
                        f"with {dict(bb.kwargs)}: {type(e).__name__}: {e}") from e


def _hf_layout(state: Mapping, model) -> dict:
    """A transformers checkpoint's keys in the layout of ``model``.

    transformers 5 saves ``CLIPVisionModel`` without the ``vision_model.`` prefix that
    ``CLIPModel``, ``CLIPVisionModelWithProjection`` and older versions use; a whole-CLIP
    checkpoint also carries the text tower (and a projection a bare vision model has no use for).
    """
    whole_clip = any(k.startswith(TEXT_TOWER) for k in state)
    state = {k: v for k, v in state.items() if not k.startswith(TEXT_TOWER)}
    if hasattr(model, "vision_model"):
        return {k if k.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{k}": v
                for k, v in state.items()}
    if whole_clip:
        state = {k: v for k, v in state.items() if not k.startswith("visual_projection.")}
    return {k.removeprefix("vision_model."): v for k, v in state.items()}


def _preprocessor_config_path(spec: Spec) -> Path:
    pp, bb = spec.preprocess, spec.backbone
    if pp.config is not None:
        return pp.config
    if bb.library == "transformers" and bb.checkpoint is not None and bb.checkpoint.is_dir():
        return bb.checkpoint / "preprocessor_config.json"
    raise SpecError(f"{spec.path}: [preprocess].library = \"transformers\" needs [preprocess].config = the "
                    "preprocessor_config.json (or a transformers [backbone].checkpoint directory holding one)")


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
        **derived_fields(resize, resize_size, crop_size, crop_rule="floor",
                   pad_rule="ceil" if processor == "fast" else "floor", fill=(0, 0, 0)),
        interpolation=_interpolation_name(built.resample, processor),
        resize_backend="tensor" if processor == "fast" else "pil", antialias=True,
        rescale_factor=float(built.rescale_factor) if built.do_rescale else 1.0, mean=mean, std=std,
        convert_rgb="composite_white" if built.do_convert_rgb else "none",
        channel_order=channel_order, value_scale=value_scale)


def _processor_config(config: PreprocessConfig) -> dict[str, Any]:
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
        hf["size"] = dict(zip(("height", "width"), size_pair(config.resize_size)))
    elif config.resize != "none":
        raise SpecError(f"transformers' CLIP processor cannot resize {config.resize} to {config.resize_size}")
    if config.crop_size is not None:
        hf["crop_size"] = dict(zip(("height", "width"), config.crop_size))
    return hf


class Transformers(Library):
    # pooler_output is post_layernorm CLS, cls is last_hidden_state[:, 0] (before post_layernorm),
    # image_embeds the projection.
    vocabulary = LibraryVocabulary(
        name="transformers", extract_modes=("pooler_output", "cls", "image_embeds"),
        preprocess_source="the preprocessor_config.json named by [preprocess].config", processors=HF_PROCESSORS)
    converters = {
        "transformers": _hf_layout,
        "open_clip": lambda state, model: openai_to_hf(state, with_projection=hasattr(model, "visual_projection")),
    }
    # transformers' `cls` is taken before the final norm.
    points = {
        "pooler_output": "pooled (class token after the final norm)",
        "cls": "class token before the final norm",
        "image_embeds": "projection",
    }
    # `parity explain-preprocess hf:PATH` describes the fast processor, `hf-slow:PATH` the slow one.
    source_forms = {prefix: f"{prefix}:PATH" for prefix in _SOURCE_PROCESSORS}
    # CLIPVisionModelWithProjection (and CLIPVisionModel before version 5) holds the tower under
    # `vision_model.`; CLIPVisionModel in version 5 is the tower itself.
    wrapper_prefix = "vision_model."
    extraction_hint = ("transformers' image_embeds is the projection (CLIPVisionModelWithProjection.visual_projection); "
                       "pooler_output is the pooled class token before it, last_hidden_state[:, 0] (extract = \"cls\") "
                       "the same token before post_layernorm.")

    def model_name(self, model) -> str | None:
        name = type(model).__name__
        return name if name in _HF_CLASSES else None

    def create(self, spec: Spec, *, meta: bool = False):
        import torch

        transformers = require("transformers")
        bb = spec.backbone
        if bb.model not in _HF_CLASSES:
            raise SpecError(f"{spec.path}: [backbone].model = {bb.model!r} is not a supported transformers class. "
                            f"Accepted values: {', '.join(_HF_CLASSES)}")
        if bb.extract == "image_embeds" and bb.model != "CLIPVisionModelWithProjection":
            raise SpecError(f"{spec.path}: extract = \"image_embeds\" needs the projection: "
                            "set [backbone].model = \"CLIPVisionModelWithProjection\"")
        config = _hf_config(spec)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return getattr(transformers, bb.model)(config).eval()

    def weights(self, spec: Spec) -> Path | None:
        """model.safetensors in the checkpoint directory (a checkpoint in another layout is a file)."""
        bb = spec.backbone
        if bb.checkpoint is None or bb.checkpoint_format != "transformers":
            return bb.checkpoint
        return weights_file(_hf_directory(spec))

    def directory_weights(self, directory: Path) -> Path | None:
        return weights_file(directory)

    def trunk(self, model, pixels, mode: str):
        """(last_hidden_state, pooler_output) of a CLIPVisionModel or CLIPVisionModelWithProjection."""
        out = getattr(model, "vision_model", model)(pixel_values=pixels)
        return out.last_hidden_state, out.pooler_output

    def take(self, model, trunk, mode: str):
        tokens, pooled = trunk
        if mode == "pooler_output":
            return pooled
        if mode == "cls":
            return tokens[:, 0]
        if mode == "image_embeds":
            return model.visual_projection(pooled)
        raise SpecError(f"unknown extract mode {mode!r} for a transformers backbone")

    def embedding_dim(self, model, extract: str) -> int | None:
        return model.config.projection_dim if extract == "image_embeds" else model.config.hidden_size

    def describe(self, model) -> dict[str, Any]:
        # SDPA and eager attention round differently; the config's choice is part of the deployment.
        return {"attn_implementation": getattr(model.config, "_attn_implementation", None),
                "hidden_act": model.config.hidden_act}

    def resolve_preprocess(self, spec: Spec, backbone) -> tuple[Preprocess, dict[str, Any]]:
        """The image processor of ``[preprocess].config`` (default: the backbone's directory),
        ``fast`` (torchvision backend) or ``slow`` (PIL)."""
        pp = spec.preprocess
        if pp.resize_backend != "pil":
            raise SpecError(f"{spec.path}: [preprocess].resize_backend applies to timm preprocessing; "
                            "transformers runs its own resize (choose processor = \"fast\" or \"slow\")")
        raw = load_preprocessor_config(_preprocessor_config_path(spec))
        return (create_hf_preprocess(raw, processor=pp.processor, channel_order=pp.channel_order,
                                     value_scale=pp.value_scale), preprocess_record(raw, pp.processor))

    def describe_preprocess(self, record: Mapping[str, Any], *, source: str) -> PreprocessConfig:
        config = {k: v for k, v in record.items() if k not in _RECORD_KEYS}
        return describe_hf(config, processor=record.get("processor", "fast"), source=source,
                           channel_order=record.get("channel_order", "rgb"),
                           value_scale=record.get("value_scale", "unit"))

    @property
    def description_libraries(self) -> tuple[str, ...]:
        return tuple(f"{self.name}-{processor}" for processor in HF_PROCESSORS)

    def describe_source(self, prefix: str, rest: str, text: str) -> PreprocessConfig:
        """``hf:PATH`` (fast processor) or ``hf-slow:PATH`` (slow): a preprocessor_config.json or its directory."""
        return describe_hf(rest, processor=_SOURCE_PROCESSORS[prefix], source=text)

    def create_transform(self, config: PreprocessConfig) -> Preprocess:
        """The CLIP image processor (fast or slow, as ``config.library`` says) configured as described."""
        variant = dict(channel_order=config.channel_order, value_scale=config.value_scale)
        processor = config.library.removeprefix(f"{self.name}-")  # one of `description_libraries`
        hf = _processor_config(config)
        require_same(config, describe_hf(hf, processor=processor, source=config.source, **variant))
        return create_hf_preprocess(hf, processor=processor, **variant)
