"""CLIP vision-tower state dicts between the OpenAI/open_clip and Hugging Face transformers layouts.

The same ViT ships under three key layouts: OpenAI/open_clip (``visual.conv1.weight``,
packed ``attn.in_proj_weight``), transformers (``vision_model.encoder.layers.N.self_attn.q_proj``)
and timm. Converting by hand is where parity drifts start, so every conversion here is total:
each input key of the vision tower is either converted or named in a `CheckpointError`.
open_clip -> timm is timm's own ``checkpoint_filter_fn`` (`openai_to_timm`); `hf_to_timm` chains it.

Layouts follow the installed transformers (5.x): ``CLIPVisionModelWithProjection`` and
``CLIPModel`` hold the tower under ``vision_model.``; ``CLIPVisionModel`` *is* the tower, so its
``state_dict()`` has bare keys (``embeddings.class_embedding``). ``position_ids`` is a
non-persistent buffer and appears in neither; older checkpoints that saved it are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parity.errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "openai_to_hf",
    "hf_to_openai",
    "hf_vision_config_from_openai",
    "openai_to_timm",
    "hf_to_timm",
]

_HF_TOWER = "vision_model."
_HF_PROJECTION = "visual_projection.weight"
_HF_POSITION_IDS = "embeddings.position_ids"
_OPENAI_BLOCK = "transformer.resblocks.{}."
_HF_BLOCK = "encoder.layers.{}."
_SHOWN_KEYS = 12

# (OpenAI name, HF name) for tensors that only change name; the packed attention input
# projection and the output projection (transposed) are handled on their own.
_TOP_PAIRS = (
    ("class_embedding", "embeddings.class_embedding"),
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight"),  # sic: transformers' spelling
    ("ln_pre.bias", "pre_layrnorm.bias"),
    ("ln_post.weight", "post_layernorm.weight"),
    ("ln_post.bias", "post_layernorm.bias"),
)
_BLOCK_PAIRS = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)
_QKV = ("q_proj", "k_proj", "v_proj")  # the order OpenAI packs them in in_proj_weight


@dataclass(frozen=True)
class _Geometry:
    """The numbers that fix every tensor shape of an OpenAI-style ViT."""

    width: int
    channels: int
    patch_size: int
    grid: int
    mlp_width: int
    layers: int

    def top_shapes(self) -> dict[str, tuple[int, ...]]:
        d, p = self.width, self.patch_size
        return {
            "class_embedding": (d,),
            "conv1.weight": (d, self.channels, p, p),
            "positional_embedding": (self.grid**2 + 1, d),
            "ln_pre.weight": (d,), "ln_pre.bias": (d,),
            "ln_post.weight": (d,), "ln_post.bias": (d,),
        }

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        d, m = self.width, self.mlp_width
        return {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
            "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (m, d), "mlp.c_fc.bias": (m,),
            "mlp.c_proj.weight": (d, m), "mlp.c_proj.bias": (d,),
        }

    def describe(self) -> str:
        return (f"width {self.width}, {self.layers} layers, MLP width {self.mlp_width}, "
                f"patch {self.patch_size}, {self.grid}x{self.grid} patches")


def openai_to_hf(
    state: Mapping[str, Tensor], *, prefix: str = "visual.", with_projection: bool = True
) -> dict[str, Tensor]:
    """An OpenAI/open_clip CLIP state dict as a transformers CLIP vision state dict.

    Args:
        state: a CLIP state dict; keys outside ``prefix`` (the text tower) are ignored.
        prefix: where the vision tower lives; ``""`` for an already stripped tower (``conv1.weight``).
        with_projection: True gives ``CLIPVisionModelWithProjection`` keys (``vision_model.*`` and
            ``visual_projection.weight``); False gives the bare keys of a ``CLIPVisionModel`` and
            drops ``proj`` (transformers < 5 wrapped that model in ``vision_model.`` too).

    Raises:
        CheckpointError: a key is missing, has an inconsistent shape, or is not understood.
    """
    where = "openai_to_hf"
    pending = _vision_part(state, prefix, where)
    geometry = _openai_geometry(pending, prefix, where)
    out: dict[str, Tensor] = {}
    top = geometry.top_shapes()
    for openai, hf in _TOP_PAIRS:
        out[hf] = _take(pending, openai, top[openai], prefix, where)
    for i in range(geometry.layers):
        out.update(_block_to_hf(pending, i, geometry, prefix, where))
    proj = pending.pop("proj", None)
    if with_projection:
        out = {_HF_TOWER + k: v for k, v in out.items()}
        out[_HF_PROJECTION] = _projection_to_hf(proj, geometry, prefix, where)
    _reject_leftovers(pending, prefix, where, "OpenAI ViT vision tower")
    return out


def hf_to_openai(state: Mapping[str, Tensor], *, prefix: str = "visual.") -> dict[str, Tensor]:
    """A transformers CLIP vision state dict as OpenAI/open_clip keys under ``prefix``.

    Accepts ``CLIPVisionModelWithProjection`` and ``CLIPModel`` state dicts (tower under
    ``vision_model.``; the text tower, ``text_projection`` and ``logit_scale`` are ignored) and
    the bare keys of a ``CLIPVisionModel``. Without ``visual_projection.weight`` there is no ``proj``.

    Raises:
        CheckpointError: no vision tower found, a key is missing, has an inconsistent shape,
            or is not understood.
    """
    where = "hf_to_openai"
    tower, pending = _hf_vision_part(state, where)
    geometry = _hf_geometry(pending, tower, where)
    _drop_position_ids(pending, geometry, tower, where)
    top = geometry.top_shapes()
    out: dict[str, Tensor] = {}
    for openai, hf in _TOP_PAIRS:
        out[openai] = _take(pending, hf, top[openai], tower, where)
    for i in range(geometry.layers):
        out.update(_block_to_openai(pending, i, geometry, tower, where))
    projection = pending.pop(_HF_PROJECTION, None)
    if projection is not None:
        out["proj"] = _projection_to_openai(projection, geometry, where)
    _reject_leftovers(pending, tower, where, "transformers CLIP vision tower")
    return {prefix + k: v for k, v in out.items()}


def hf_vision_config_from_openai(
    state: Mapping[str, Tensor],
    *,
    hidden_act: str,
    prefix: str = "visual.",
    head_width: int = 64,
    layer_norm_eps: float = 1e-5,
) -> dict:
    """``CLIPVisionConfig`` keyword arguments for the tower in an OpenAI/open_clip state dict.

    The activation leaves no trace in the weights, and GELU and QuickGELU both load with
    ``strict=True``, so ``hidden_act`` must be given: ``"quick_gelu"`` for OpenAI's own weights
    and open_clip ``*-quickgelu`` models, ``"gelu"`` for most open_clip LAION/DataComp weights.
    The head count is not stored either: it is ``hidden_size // head_width`` (OpenAI ViTs use
    64-wide heads). ``layer_norm_eps`` is 1e-5 in OpenAI and open_clip.

    Raises:
        CheckpointError: a key that fixes the geometry is missing or inconsistent, or
            ``head_width`` does not divide the width.
    """
    where = "hf_vision_config_from_openai"
    vision = _vision_part(state, prefix, where)
    geometry = _openai_geometry(vision, prefix, where)
    config = {
        "hidden_size": geometry.width,
        "intermediate_size": geometry.mlp_width,
        "num_hidden_layers": geometry.layers,
        "num_attention_heads": _num_heads(geometry.width, head_width, where),
        "num_channels": geometry.channels,
        "image_size": geometry.grid * geometry.patch_size,
        "patch_size": geometry.patch_size,
        "hidden_act": hidden_act,
        "layer_norm_eps": layer_norm_eps,
    }
    if "proj" in vision:
        config["projection_dim"] = int(vision["proj"].shape[-1])
    return config


def openai_to_timm(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An OpenAI/open_clip CLIP state dict for a timm model, with timm's own ``checkpoint_filter_fn``.

    Raises:
        CheckpointError: the checkpoint was trained at another input size (timm would resample the
            position embeddings without a word: a silent input-size drift), or timm has no filter
            for the model's family.
    """
    import sys

    pos = state.get("visual.positional_embedding")
    if pos is not None and pos.shape[0] != model.pos_embed.shape[1]:
        raise CheckpointError(
            f"the checkpoint's position embeddings have {pos.shape[0]} tokens, the model {model.pos_embed.shape[1]}: "
            "it was trained at another input size. Use the model name whose input size matches."
        )
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise CheckpointError(f"timm has no checkpoint filter for {type(model).__name__}; "
                              "convert the checkpoint to timm keys")
    return filter_fn(state, model)


def hf_to_timm(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A transformers CLIP vision state dict for a timm ``VisionTransformer``, via `openai_to_timm`.

    Raises:
        CheckpointError: see `hf_to_openai` and `openai_to_timm`.
    """
    return openai_to_timm(hf_to_openai(state), model)


def _vision_part(state: Mapping[str, Tensor], prefix: str, where: str) -> dict[str, Tensor]:
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        stripped = "conv1.weight" in state
        hint = "\nNote: pass prefix='' for a tower whose keys start with 'conv1.'." if stripped else ""
        raise CheckpointError(
            f"{where}: no keys under prefix {prefix!r}; expected an OpenAI/open_clip CLIP state dict "
            f"with keys like {prefix + 'conv1.weight'!r}, got {_shown(state)}.{hint}"
        )
    return part


def _hf_vision_part(state: Mapping[str, Tensor], where: str) -> tuple[str, dict[str, Tensor]]:
    """Strip the tower prefix; the projection lives beside the tower and is kept under its own name."""
    if any(k.startswith(_HF_TOWER) for k in state):
        part = {k[len(_HF_TOWER):]: v for k, v in state.items() if k.startswith(_HF_TOWER)}
        if _HF_PROJECTION in state:
            part[_HF_PROJECTION] = state[_HF_PROJECTION]
        return _HF_TOWER, part
    if "embeddings.class_embedding" in state:
        return "", dict(state)
    raise CheckpointError(
        f"{where}: no CLIP vision tower found; expected 'vision_model.embeddings.class_embedding' "
        f"(CLIPVisionModelWithProjection, CLIPModel) or 'embeddings.class_embedding' (CLIPVisionModel), "
        f"got {_shown(state)}"
    )


def _openai_geometry(vision: Mapping[str, Tensor], prefix: str, where: str) -> _Geometry:
    return _geometry(
        vision, prefix, where,
        patch_key="conv1.weight",
        positions_key="positional_embedding",
        fc1_key=_OPENAI_BLOCK.format(0) + "mlp.c_fc.weight",
        block=_OPENAI_BLOCK,
    )


def _hf_geometry(vision: Mapping[str, Tensor], prefix: str, where: str) -> _Geometry:
    return _geometry(
        vision, prefix, where,
        patch_key="embeddings.patch_embedding.weight",
        positions_key="embeddings.position_embedding.weight",
        fc1_key=_HF_BLOCK.format(0) + "mlp.fc1.weight",
        block=_HF_BLOCK,
    )


def _geometry(vision: Mapping[str, Tensor], prefix: str, where: str, *,
              patch_key: str, positions_key: str, fc1_key: str, block: str) -> _Geometry:
    """Read the geometry off three tensors; every other shape is then checked against it."""
    patch = _peek(vision, patch_key, prefix, where)
    positions = _peek(vision, positions_key, prefix, where)
    fc1 = _peek(vision, fc1_key, prefix, where)
    if patch.dim() != 4 or patch.shape[2] != patch.shape[3]:
        raise CheckpointError(
            f"{where}: {prefix + patch_key!r} has shape {tuple(patch.shape)}, expected a square patch "
            "convolution (width, channels, patch, patch)"
        )
    grid = round(max(positions.shape[0] - 1, 0) ** 0.5)
    if positions.dim() != 2 or grid < 1 or grid * grid + 1 != positions.shape[0]:
        raise CheckpointError(
            f"{where}: {prefix + positions_key!r} has shape {tuple(positions.shape)}, expected "
            "(grid**2 + 1, width): one class token and a square grid of patches"
        )
    pattern = re.compile(re.escape(block.format("@")).replace("@", r"(\d+)"))
    indices = [int(m.group(1)) for k in vision if (m := pattern.match(k))]
    return _Geometry(
        width=int(patch.shape[0]),
        channels=int(patch.shape[1]),
        patch_size=int(patch.shape[2]),
        grid=grid,
        mlp_width=int(fc1.shape[0]),
        # A gap in the indices surfaces as the missing keys of that block.
        layers=max(indices) + 1,
    )


def _block_to_hf(pending: dict, i: int, geometry: _Geometry, prefix: str, where: str) -> dict[str, Tensor]:
    src, dst = _OPENAI_BLOCK.format(i), _HF_BLOCK.format(i)
    shapes = geometry.block_shapes()
    out = {dst + hf: _take(pending, src + openai, shapes[openai], prefix, where) for openai, hf in _BLOCK_PAIRS}
    for kind in ("weight", "bias"):
        name = f"attn.in_proj_{kind}"
        packed = _take(pending, src + name, shapes[name], prefix, where)
        # clone: chunks share storage, which safetensors.save_file refuses.
        for proj, part in zip(_QKV, packed.chunk(3, dim=0)):
            out[f"{dst}self_attn.{proj}.{kind}"] = part.clone()
    return out


def _block_to_openai(pending: dict, i: int, geometry: _Geometry, prefix: str, where: str) -> dict[str, Tensor]:
    import torch

    src, dst = _HF_BLOCK.format(i), _OPENAI_BLOCK.format(i)
    shapes = geometry.block_shapes()
    out = {dst + openai: _take(pending, src + hf, shapes[openai], prefix, where) for openai, hf in _BLOCK_PAIRS}
    for kind in ("weight", "bias"):
        one = shapes[f"attn.in_proj_{kind}"]
        one = (one[0] // 3, *one[1:])
        parts = [_take(pending, f"{src}self_attn.{proj}.{kind}", one, prefix, where) for proj in _QKV]
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


def _projection_to_hf(proj: Tensor | None, geometry: _Geometry, prefix: str, where: str) -> Tensor:
    if proj is None:
        raise CheckpointError(
            f"{where}: missing key {prefix + 'proj'!r}, needed for 'visual_projection.weight'.\n"
            "Note: pass with_projection=False for a tower without projection (a CLIPVisionModel)."
        )
    if proj.dim() != 2 or proj.shape[0] != geometry.width:
        raise CheckpointError(
            f"{where}: {prefix + 'proj'!r} has shape {tuple(proj.shape)}, expected (width, projection_dim) "
            f"with width {geometry.width}"
        )
    # OpenAI multiplies x @ proj; nn.Linear stores the transpose. contiguous: safetensors needs it.
    return proj.t().contiguous()


def _projection_to_openai(projection: Tensor, geometry: _Geometry, where: str) -> Tensor:
    if projection.dim() != 2 or projection.shape[1] != geometry.width:
        raise CheckpointError(
            f"{where}: {_HF_PROJECTION!r} has shape {tuple(projection.shape)}, expected "
            f"(projection_dim, width) with width {geometry.width}"
        )
    return projection.t().contiguous()


def _drop_position_ids(pending: dict, geometry: _Geometry, prefix: str, where: str) -> None:
    """Accept the buffer that transformers < 4.31 saved, but only if it holds what it is rebuilt to."""
    import torch

    ids = pending.pop(_HF_POSITION_IDS, None)
    if ids is None:
        return
    expected = torch.arange(geometry.grid**2 + 1).expand((1, -1))
    if tuple(ids.shape) != tuple(expected.shape) or not torch.equal(ids.to(expected.dtype), expected):
        raise CheckpointError(
            f"{where}: {prefix + _HF_POSITION_IDS!r} is not arange({expected.shape[1]}) of shape "
            f"{tuple(expected.shape)}; transformers rebuilds that buffer, so these positions would be lost"
        )


def _num_heads(width: int, head_width: int, where: str) -> int:
    if head_width <= 0 or width % head_width:
        raise CheckpointError(
            f"{where}: head_width {head_width} does not divide the tower's width {width}.\n"
            "Note: pass the head_width the model was trained with (open_clip vision_cfg 'head_width'; "
            "64 for OpenAI ViTs)."
        )
    return width // head_width


def _peek(vision: Mapping[str, Tensor], key: str, prefix: str, where: str) -> Tensor:
    if key not in vision:
        raise CheckpointError(f"{where}: missing key {prefix + key!r}")
    return vision[key]


def _take(pending: dict, key: str, shape: tuple[int, ...], prefix: str, where: str) -> Tensor:
    """Pop ``key`` from what is left to convert, checking its shape against the geometry."""
    if key not in pending:
        raise CheckpointError(f"{where}: missing key {prefix + key!r} (expected shape {shape})")
    tensor = pending.pop(key)
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{where}: {prefix + key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _reject_leftovers(pending: Mapping, prefix: str, where: str, layout: str) -> None:
    if pending:
        keys = sorted(prefix + k for k in pending)
        raise CheckpointError(
            f"{where}: {len(keys)} unexpected key(s) {_shown(keys)}; expected only the keys of a plain "
            f"{layout}.\nNote: they belong to a variant this conversion does not handle (layer scale, "
            "attention pooling, biased patch embedding, ...); dropping them would change the model silently."
        )


def _shown(keys) -> str:
    keys = list(keys)
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return f"{keys[:_SHOWN_KEYS]}{more}"
