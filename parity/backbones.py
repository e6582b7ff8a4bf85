"""Backbones from three libraries behind one interface: create, convert weights, extract, describe.

timm models are created by name; transformers vision models from the ``config.json`` of a
local directory (never the hub); open_clip models by model-config name, of which only the
vision tower is kept. Every library's own extraction points are available under the names
it uses itself (see `parity.spec.EXTRACT_MODES_BY_LIBRARY`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity.convert import hf_to_openai, hf_to_timm, openai_to_hf, openai_to_timm
from parity.errors import CheckpointError, SpecError
from parity.extras import require
from parity.forensics import summarize_structure
from parity.spec import Spec

__all__ = [
    "create_backbone",
    "backbone_weights",
    "weights_file",
    "checkpoint_converter",
    "extract_embedding",
    "describe_backbone",
    "model_name",
    "canonical_names",
    "extraction_hint",
    "activation_classes",
    "extraction_point",
    "equivalent_extract",
    "activation_family",
]

_HF_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
# Keys of the other tower in a whole-CLIP checkpoint: set aside by name, and the rest still loads strictly.
_TEXT_TOWER = {
    "open_clip": ("transformer.", "token_embedding.", "ln_final.", "text.", "text_projection", "positional_embedding",
                  "logit_scale", "logit_bias", "attn_mask"),
    "transformers": ("text_model.", "text_projection.", "logit_scale"),
}
# Leaf-module names that hold a block's activation in each library (QuickGELU vs GELU keeps every key).
_ACTIVATION_NAMES = ("act", "activation_fn", "gelu")


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


def create_backbone(spec: Spec, *, meta: bool = False):
    """The module the spec names, with random weights (checkpoints load separately).

    With ``meta`` the parameters are shapes only: no time is spent on a random init
    that a checkpoint will replace (about 4 s for ViT-L on two cores).

    Raises:
        SpecError: the model name, class or kwargs cannot be used, or the library is missing.
    """
    import torch

    bb = spec.backbone
    where = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        if bb.library == "timm":
            import timm

            with where:
                return timm.create_model(bb.model, pretrained=False, **bb.kwargs)
        if bb.library == "transformers":
            transformers = require("transformers")
            if bb.model not in _HF_CLASSES:
                raise SpecError(f"{spec.path}: [backbone].model = {bb.model!r} is not a supported transformers class. "
                                f"Accepted values: {', '.join(_HF_CLASSES)}")
            if bb.extract == "image_embeds" and bb.model != "CLIPVisionModelWithProjection":
                raise SpecError(f"{spec.path}: extract = \"image_embeds\" needs the projection: "
                                "set [backbone].model = \"CLIPVisionModelWithProjection\"")
            config = _hf_config(spec)
            with where:
                return getattr(transformers, bb.model)(config).eval()
        open_clip = require("open_clip")
        # The whole CLIP is built (open_clip has no vision-only factory; its factory moves the model to a
        # device, which a meta model refuses); the text tower is discarded.
        return open_clip.create_model(bb.model, pretrained=None, **bb.kwargs).visual
    except SpecError:
        raise
    except Exception as e:  # a wrongly typed config or kwarg surfaces as any type inside the library
        raise SpecError(f"{spec.path}: {bb.library} cannot create [backbone].model {bb.model!r} "
                        f"with {dict(bb.kwargs)}: {type(e).__name__}: {e}") from e


def backbone_weights(spec: Spec) -> Path | None:
    """The weight file: the checkpoint itself, or model.safetensors in a transformers directory."""
    bb = spec.backbone
    if bb.checkpoint is None or bb.library != "transformers" or bb.checkpoint_format != "transformers":
        return bb.checkpoint
    return weights_file(_hf_directory(spec))


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


def _drop_text_tower(state: Mapping, library: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(_TEXT_TOWER[library])}


def _hf_layout(state: Mapping, model) -> dict:
    """A transformers checkpoint's keys in the layout of ``model``.

    transformers 5 saves ``CLIPVisionModel`` without the ``vision_model.`` prefix that
    ``CLIPModel``, ``CLIPVisionModelWithProjection`` and older versions use; a whole-CLIP
    checkpoint also carries the text tower (and a projection a bare vision model has no use for).
    """
    whole_clip = any(k.startswith(_TEXT_TOWER["transformers"]) for k in state)
    state = _drop_text_tower(state, "transformers")
    if hasattr(model, "vision_model"):
        return {k if k.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{k}": v
                for k, v in state.items()}
    if whole_clip:
        state = {k: v for k, v in state.items() if not k.startswith("visual_projection.")}
    return {k.removeprefix("vision_model."): v for k, v in state.items()}


def _visual_prefix(state: Mapping) -> dict:
    """open_clip's vision-tower keys without their ``visual.`` prefix (a bare tower is returned as is)."""
    if not any(k.startswith("visual.") for k in state):
        return dict(state)
    state = _drop_text_tower(state, "open_clip")
    return {k.removeprefix("visual."): v for k, v in state.items()}


# (library, checkpoint_format) → how the checkpoint's keys become the module's.
_CONVERTERS = {
    ("timm", "open_clip"): openai_to_timm,
    ("timm", "transformers"): hf_to_timm,
    ("transformers", "transformers"): _hf_layout,
    ("transformers", "open_clip"): lambda state, model: openai_to_hf(
        state, with_projection=hasattr(model, "visual_projection")),
    ("open_clip", "open_clip"): lambda state, model: _visual_prefix(state),
    ("open_clip", "transformers"): lambda state, model: hf_to_openai(state, prefix=""),
}


def checkpoint_converter(spec: Spec):
    """The key conversion for the spec's library and checkpoint format (``None``: keys are the library's own).

    Raises:
        SpecError: no conversion between the two exists.
    """
    bb = spec.backbone
    if bb.library == bb.checkpoint_format == "timm":
        return None
    try:
        return _CONVERTERS[bb.library, bb.checkpoint_format]
    except KeyError:
        accepted = sorted(f for lib, f in _CONVERTERS if lib == bb.library)
        accepted += ["timm"] if bb.library == "timm" else []
        raise SpecError(f"{spec.path}: a {bb.checkpoint_format} checkpoint cannot be converted for a {bb.library} "
                        f"backbone. Accepted checkpoint_format values: {', '.join(accepted)}") from None


def _hf_forward(model, pixels) -> tuple[Any, Any]:
    """(last_hidden_state, pooler_output) of a CLIPVisionModel or CLIPVisionModelWithProjection."""
    out = getattr(model, "vision_model", model)(pixel_values=pixels)
    return out.last_hidden_state, out.pooler_output


def extract_embedding(model, pixels, mode: str, *, library: str = "timm"):
    """Run the backbone and take the embedding the way ``mode`` names it in ``library``.

    timm: ``forward`` gives the head output (the CLIP projection), ``pre_logits`` the pooled
    feature before it, ``cls`` the class token of ``forward_features`` (after the final norm),
    ``mean_tokens`` the mean of the patch tokens. transformers: ``pooler_output`` (CLS after
    ``post_layernorm``), ``cls`` (``last_hidden_state[:, 0]``, before it), ``image_embeds``.
    open_clip: ``encode_image`` (with ``proj``) and ``pooled`` (without it).
    """
    if library == "transformers":
        tokens, pooled = _hf_forward(model, pixels)
        if mode == "pooler_output":
            return pooled
        if mode == "cls":
            return tokens[:, 0]
        if mode == "image_embeds":
            return model.visual_projection(pooled)
    elif library == "open_clip":
        if mode == "encode_image":
            return model(pixels)
        if mode == "pooled":
            # VisionTransformer.forward without its last step, `pooled @ self.proj`.
            return model._pool(model.transformer(model._embeds(pixels)))[0]
    else:
        if mode == "forward":
            return model(pixels)
        tokens = model.forward_features(pixels)
        if mode == "pre_logits":
            return model.forward_head(tokens, pre_logits=True)
        if mode == "cls":
            return tokens[:, 0]
        if mode == "mean_tokens":
            return tokens[:, getattr(model, "num_prefix_tokens", 1):].mean(dim=1)
    raise SpecError(f"unknown extract mode {mode!r} for a {library} backbone")


# What each library's extraction mode returns, in words shared across libraries. timm's `cls` is
# taken after the final norm, so it is the pooled feature; transformers' `cls` is taken before it.
_POINTS = {
    ("timm", "pre_logits"): "pooled (class token after the final norm)",
    ("timm", "cls"): "pooled (class token after the final norm)",
    ("timm", "forward"): "projection",
    ("timm", "mean_tokens"): "mean of the patch tokens",
    ("transformers", "pooler_output"): "pooled (class token after the final norm)",
    ("transformers", "cls"): "class token before the final norm",
    ("transformers", "image_embeds"): "projection",
    ("open_clip", "pooled"): "pooled (class token after the final norm)",
    ("open_clip", "encode_image"): "projection",
}


def extraction_point(library: str, extract: str) -> str:
    """What ``extract`` returns in ``library``, in words that compare across libraries."""
    return _POINTS.get((library, extract), f"{library} {extract}")


def equivalent_extract(library: str, point: str) -> str | None:
    """``library``'s extraction mode that returns ``point`` (the first, where several do), or ``None``."""
    return next((mode for (lib, mode), p in _POINTS.items() if lib == library and p == point), None)


def activation_family(name: str) -> str:
    """An activation class name without its library's suffix: ``QuickGELUActivation`` → ``QuickGELU``."""
    return name.removesuffix("Activation")


def activation_classes(model) -> list[str]:
    """The activation classes of the blocks: QuickGELU vs GELU leaves every key identical."""
    return sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in _ACTIVATION_NAMES})


def _embedding_dim(model, library: str, extract: str) -> int | None:
    if library == "transformers":
        return model.config.projection_dim if extract == "image_embeds" else model.config.hidden_size
    if library == "open_clip":
        return getattr(model, "output_dim", None) if extract == "encode_image" else model.transformer.width
    if extract == "forward" and getattr(model, "num_classes", 0):  # num_classes = 0: forward() stops at pre-logits
        return model.num_classes
    return getattr(model, "num_features", None)


def model_name(model, library: str) -> str | None:
    """What ``[backbone].model`` would say for ``model``, when the module itself tells (else ``None``).

    timm: ``architecture.tag`` from its ``pretrained_cfg``; transformers: the class; open_clip's
    vision tower does not know the config name it was built from.
    """
    if library == "transformers":
        name = type(model).__name__
        return name if name in _HF_CLASSES else None
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        architecture, tag = cfg.get("architecture"), cfg.get("tag")
        if not architecture:
            return None
        return f"{architecture}.{tag}" if tag else architecture
    return None


# Wrapper prefixes a library adds for some of its classes around the same tower.
_WRAPPER_PREFIXES = {"transformers": "vision_model."}


# What each library returns where, for a note on an embedding of the wrong width.
_EXTRACTION_HINTS = {
    "timm": "timm's forward() gives the head output (the CLIP projection); pre-logits features come from "
            "forward_head(forward_features(x), pre_logits=True) (extract = \"pre_logits\").",
    "transformers": "transformers' image_embeds is the projection (CLIPVisionModelWithProjection.visual_projection); "
                    "pooler_output is the pooled class token before it, last_hidden_state[:, 0] (extract = \"cls\") "
                    "the same token before post_layernorm.",
    "open_clip": "open_clip's encode_image() returns the projection (visual.proj); extract = \"pooled\" gives the "
                 "pooled features before it.",
}


def extraction_hint(library: str) -> str:
    """Which extraction mode of ``library`` returns the projection and which the pooled features."""
    return _EXTRACTION_HINTS.get(library, "")


def canonical_names(entries: Mapping[str, Any], library: str) -> dict[str, Any]:
    """Tensor or module names as every class of ``library`` shares them.

    transformers' ``CLIPVisionModelWithProjection`` (and ``CLIPVisionModel`` before version 5)
    holds the tower under ``vision_model.``; ``CLIPVisionModel`` in version 5 is the tower itself.
    The same weights then compare by fingerprint, not by the class's naming.
    """
    prefix = _WRAPPER_PREFIXES.get(library)
    if prefix is None:
        return dict(entries)
    return {name.removeprefix(prefix): value for name, value in entries.items() if name != prefix[:-1]}


def describe_backbone(model, *, name: str | None, kwargs: Mapping, extract: str, normalize: str = "none",
                      library: str = "timm") -> dict[str, Any]:
    """Static facts about a backbone that a strict state_dict load cannot see.

    An unknown ``name`` is left out of the record: unknown is not a value to drift from.
    """
    described = {
        "library": library,
        **({"model": name} if name is not None else {}),
        "kwargs": dict(kwargs),
        "extract": extract,
        "normalize": normalize,
        "activation": activation_classes(model),
        "embedding_dim": _embedding_dim(model, library, extract),
        "structure": summarize_structure(model),
    }
    if library == "transformers":
        # SDPA and eager attention round differently; the config's choice is part of the deployment.
        described["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        described["hidden_act"] = model.config.hidden_act
    return described
