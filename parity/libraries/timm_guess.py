"""Which timm model made a checkpoint: from the user's ``timm.create_model`` calls, else from its tensors.

Every proposal is a module built on the meta device (no memory, no weights), so that the caller can
check that the checkpoint loads into it with ``strict=True``. What tensors cannot show (the number
of attention heads when the width is not a model's own, QuickGELU vs GELU, the pretrained tag that
picks the preprocessing) is returned as a TODO, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from parity.libraries.base import BackboneGuess, CallSite

__all__ = ["guess_timm"]

_CREATE = ("timm.create_model", "timm.models.create_model")
# create_model's arguments that say where weights come from, not what is built.
_LOADING_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                 "scriptable", "exportable", "no_jit")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_SIZE = re.compile(r"_(\d+)$")


def _build(name: str, kwargs: Mapping[str, Any]):
    """``timm.create_model(name, **kwargs)`` on the meta device, or None when timm refuses it."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - a name or kwargs this model does not take: not a proposal
        return None


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _classifier(shapes: Mapping[str, tuple[int, ...]], source: str) -> tuple[int, str]:
    """The classifier width the tensors hold (0: none), and how they show it."""
    head = shapes.get("head.weight")
    if head is not None and len(head) == 2:
        return head[0], f"{source}: head.weight has {head[0]} rows"
    return 0, f"{source}: no head.* tensors (a model without a classifier)"


def _from_calls(shapes: Mapping[str, tuple[int, ...]], calls: Sequence[CallSite], source: str) -> list[BackboneGuess]:
    import timm

    guesses = []
    for call in calls:
        if call.function not in _CREATE or not call.args or not isinstance(call.args[0], str):
            continue
        name = call.args[0]
        if not timm.is_model(name):
            continue
        kwargs = {k: v for k, v in call.kwargs.items() if k not in _LOADING_ARGS}
        origins = {"model": f"{call.where}: timm.create_model({name!r}, ...)",
                   **{f"kwargs.{k}": f"{call.where}: timm.create_model(..., {k}={v!r})" for k, v in kwargs.items()}}
        module = _build(name, kwargs)
        if module is not None and _shapes(module) != shapes and "num_classes" not in kwargs:
            # A classifier added or removed after creation (reset_classifier): the tensors say which.
            classes, why = _classifier(shapes, source)
            refit = _build(name, {**kwargs, "num_classes": classes})
            if refit is not None and _shapes(refit) == shapes:
                module, kwargs = refit, {**kwargs, "num_classes": classes}
                origins["kwargs.num_classes"] = why
        if module is not None:
            guesses.append(BackboneGuess("timm", name, kwargs, origins, module=module))
    return guesses


def _from_tensors(shapes: Mapping[str, tuple[int, ...]], source: str) -> list[BackboneGuess]:
    """A Vision Transformer's width, depth, patch, image size and classifier, and the timm models that fit."""
    import timm

    patch = shapes.get("patch_embed.proj.weight")
    if patch is None or len(patch) != 4 or "blocks.0.attn.qkv.weight" not in shapes:
        return []
    width, size = patch[0], patch[-1]
    depth = len({int(m[1]) for k in shapes for m in [_BLOCK.match(k)] if m})
    prefix = int("cls_token" in shapes) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
    tokens = shapes.get("pos_embed", (1, 0, 0))[1] - prefix
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        return []
    image = side * size
    hidden = shapes.get("blocks.0.mlp.fc1.weight", (4 * width,))[0]
    classes, classes_why = _classifier(shapes, source)
    clip = "norm_pre.weight" in shapes
    names = [n for n in timm.list_models(f"vit_*_patch{size}_*")
             if (m := _SIZE.search(n)) and int(m[1]) == image and ("_clip" in n) == clip]
    explicit: dict[str, Any] = {"embed_dim": width, "depth": depth, "num_classes": classes}
    if hidden != 4 * width:
        explicit["mlp_ratio"] = hidden / width
    fitting = []
    for name in names:
        default = _build(name, {})
        if default is None or not hasattr(default, "blocks") or not len(default.blocks):
            continue
        own_width = default.embed_dim
        heads = default.blocks[0].attn.num_heads
        # Any head count builds the same tensors; 1 divides every width.
        module = _build(name, {**explicit, "num_heads": heads if own_width == width else 1})
        if module is not None and _shapes(module) == shapes:
            fitting.append((name, heads if own_width == width else None, module))
    if not fitting:
        return []
    own = [entry for entry in fitting if entry[1] is not None]
    fitting = own or fitting  # models of this very width first: their head count is known
    what = f"patch {size}, {image}x{image} px, width {width}, depth {depth}" + (", CLIP pre-norm" if clip else "")
    origins = {"kwargs.embed_dim": f"{source}: patch_embed.proj.weight is {width} wide",
               "kwargs.depth": f"{source}: blocks.0 to blocks.{depth - 1}",
               "kwargs.num_classes": classes_why,
               "kwargs.mlp_ratio": f"{source}: blocks.0.mlp.fc1.weight has {hidden} rows"}
    kwargs = dict(explicit)
    todos: dict[str, str] = {}
    heads = {h for _, h, _ in fitting}
    if len(heads) == 1 and None not in heads:
        kwargs["num_heads"] = heads.pop()
        origins["kwargs.num_heads"] = "the default of every timm model of this width (the tensors do not show it)"
    else:
        kwargs["num_heads"] = None
        todos["kwargs.num_heads"] = (f"the backbone's number of attention heads ({width} must divide by it): the "
                                     f"tensors do not show it (blocks.*.attn.qkv holds 3 x {width} rows whatever "
                                     "the heads)")
    tags = [t for name, _, _ in fitting for t in timm.list_pretrained(f"{name}.*")]
    model = fitting[0][0] if len(fitting) == 1 and len(tags) <= 1 else None
    if model is None:
        shown = ", ".join(name for name, _, _ in fitting)
        todos["model"] = (f"the timm model {source} was made with. Its tensors ({what}) fit {shown}; they differ "
                          "in what tensors do not show: the activation, and the pretrained tag (such as .openai) "
                          "that picks the preprocessing")
    else:
        origins["model"] = f"{source}: the only timm model with these tensors ({what})"
    return [BackboneGuess("timm", model, kwargs, {k: v for k, v in origins.items() if k == "model" or
                                                  k.removeprefix("kwargs.") in kwargs}, todos,
                          module=fitting[0][2])]


def guess_timm(shapes: Mapping[str, tuple[int, ...]], calls: Sequence[CallSite], *, source: str) -> list[BackboneGuess]:
    """timm models that could have made a checkpoint of ``shapes``: the user's calls first, then the tensors'."""
    return _from_calls(shapes, calls, source) + _from_tensors(shapes, source)
