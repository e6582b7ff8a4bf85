"""open_clip: the vision tower of a CLIP built by model-config name, open_clip's eval transform for that
model config (and its comparable description), and open_clip's extraction points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from parity.libraries.convert import hf_to_openai
from parity.errors import SpecError
from parity.extras import require
from parity.libraries.base import Library
from parity.preprocess.transform import Preprocess, check_open_clip_options, create_open_clip_preprocess
from parity.preprocess.config import PreprocessConfig, derived_fields, require_same, size_pair
from parity.spec import LibraryVocabulary, Spec

__all__ = ["OpenClip", "TEXT_TOWER", "describe_open_clip", "describe_open_clip_model"]

# Keys of the text tower in a whole-CLIP checkpoint: set aside by name, and the rest still loads strictly.
TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "text.", "text_projection", "positional_embedding",
              "logit_scale", "logit_bias", "attn_mask")
# open_clip's resize_mode → the shared `PreprocessConfig.resize` vocabulary.
_RESIZE_MODES = {"shortest": "shortest_edge", "longest": "longest_edge", "squash": "squash"}


def _visual_prefix(state: Mapping) -> dict:
    """open_clip's vision-tower keys without their ``visual.`` prefix (a bare tower is returned as is)."""
    if not any(k.startswith("visual.") for k in state):
        return dict(state)
    state = {k: v for k, v in state.items() if not k.startswith(TEXT_TOWER)}
    return {k.removeprefix("visual."): v for k, v in state.items()}


def describe_open_clip(image_size: int | Sequence[int], *, mean: Sequence[float], std: Sequence[float],
                       interpolation: str = "bicubic", resize_mode: str = "shortest", fill_color: int = 0,
                       channel_order: str = "rgb", value_scale: str = "unit",
                       source: str = "open_clip image_transform") -> PreprocessConfig:
    """Describe ``open_clip.image_transform(image_size, is_train=False, ...)``.

    Raises:
        SpecError: an interpolation or resize_mode open_clip does not accept.
    """
    check_open_clip_options(interpolation, resize_mode)
    size = size_pair(image_size)
    resize = _RESIZE_MODES[resize_mode]
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
        **derived_fields(resize, resize_size, size, crop_rule="round_half_even", pad_rule="ceil", fill=fill),
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


class OpenClip(Library):
    # encode_image is the projection, pooled the feature before `proj`.
    vocabulary = LibraryVocabulary(name="open_clip", extract_modes=("encode_image", "pooled"),
                                   preprocess_source="open_clip's model config")
    converters = {
        "open_clip": lambda state, model: _visual_prefix(state),
        "transformers": lambda state, model: hf_to_openai(state, prefix=""),
    }
    points = {"pooled": "pooled (class token after the final norm)", "encode_image": "projection"}
    source_forms = {"open_clip": "open_clip:MODEL_NAME[@PRETRAINED_TAG]"}
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

    def describe_source(self, prefix: str, rest: str, text: str) -> PreprocessConfig:
        """``open_clip:MODEL[@TAG]``: the model config's preprocess_cfg, with the pretrained tag's entries."""
        name, _, tag = rest.partition("@")
        return describe_open_clip_model(name, pretrained=tag or None)

    def create_transform(self, config: PreprocessConfig) -> Preprocess:
        """``open_clip.image_transform`` for the description's size, resize mode, fill and normalization."""
        variant = dict(channel_order=config.channel_order, value_scale=config.value_scale)
        mode = {v: k for k, v in _RESIZE_MODES.items()}.get(config.resize)
        if mode is None or config.crop_size is None:
            raise SpecError(f"open_clip cannot resize {config.resize!r} without a fixed output size")
        options = dict(mean=config.mean, std=config.std, interpolation=config.interpolation, resize_mode=mode,
                       fill_color=config.pad_fill[0] if config.pad_fill else 0, **variant)
        require_same(config, describe_open_clip(config.crop_size, source=config.source, **options))
        return create_open_clip_preprocess(config.crop_size, **options)
