"""The candidate inference pipeline, built from a spec: what is tested is what ships."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from parity.checkpoints import StrictLoadError, explain_key_diff, fingerprint, read_checkpoint
from parity.errors import CheckpointError, SpecError
from parity.forensics import diagnose_load, summarize_structure
from parity.images import load_image
from parity.preprocess import Preprocess, create_preprocess
from parity.spec import Spec

__all__ = [
    "Pipeline",
    "build_pipeline",
    "load_backbone",
    "load_head",
    "assemble_pipeline",
    "create_backbone",
    "create_head",
    "load_weights",
    "import_object",
    "extract_embedding",
    "describe_backbone",
    "describe_head",
    "describe_data_config",
]

_DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def import_object(path: str) -> Any:
    """Import ``package.module:Name``. This runs the module's code: name only code you trust."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import {module_name!r} for {path!r}: {e}. Is it installed or on PYTHONPATH?") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise SpecError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from e


def extract_embedding(model, pixels, mode: str):
    """Run the backbone and take the embedding the way ``mode`` names it.

    ``forward`` gives timm's head output (the CLIP projection); ``pre_logits`` the
    pooled feature before it; ``cls`` the class token of ``forward_features``;
    ``mean_tokens`` the mean of the patch tokens.
    """
    if mode == "forward":
        return model(pixels)
    tokens = model.forward_features(pixels)
    if mode == "pre_logits":
        return model.forward_head(tokens, pre_logits=True)
    if mode == "cls":
        return tokens[:, 0]
    if mode == "mean_tokens":
        return tokens[:, getattr(model, "num_prefix_tokens", 1):].mean(dim=1)
    raise SpecError(f"unknown extract mode {mode!r}")


def describe_backbone(model, *, name: str, kwargs: dict, extract: str, normalize: str = "none") -> dict[str, Any]:
    """Static facts about a backbone that a strict state_dict load cannot see."""
    # QuickGELU vs GELU leaves every key identical, so record the activation classes.
    activations = sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "act"})
    dim = getattr(model, "num_classes", None) if extract == "forward" else getattr(model, "num_features", None)
    return {
        "library": "timm",
        "model": name,
        "kwargs": dict(kwargs),
        "extract": extract,
        "normalize": normalize,
        "activation": activations,
        "embedding_dim": dim,
        "structure": summarize_structure(model),
    }


def describe_head(head, *, class_path: str, input_biases_order: Sequence[int] | None = None) -> dict[str, Any]:
    order = list(input_biases_order) if input_biases_order is not None else None
    return {"class": class_path, "input_biases_order": order, "structure": summarize_structure(head)}


def describe_data_config(config: Mapping[str, Any], *, resize_backend: str = "pil", channel_order: str = "rgb",
                         value_scale: str = "unit", exif_transpose: bool = True) -> dict[str, Any]:
    """The resolved preprocessing as recorded in manifests: timm's data config plus the variant."""
    described = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in _DATA_CONFIG_KEYS}
    return dict(described, resize_backend=resize_backend, channel_order=channel_order, value_scale=value_scale,
                exif_transpose=exif_transpose)


@dataclass
class Pipeline:
    """image → pixels → backbone → embedding → head → outputs, on one device and dtype."""

    spec: Spec
    backbone: Any
    head: Any
    transform: Preprocess
    data_config: dict[str, Any]
    device: Any
    dtype: Any
    fingerprints: dict[str, dict[str, str]]

    def preprocess(self, image: Image.Image | str | Path):
        """Pixels (3, H, W) float32 on the CPU; paths are decoded with the shared loader."""
        if not isinstance(image, Image.Image):
            image = load_image(image, exif_transpose=self.spec.preprocess.exif_transpose)
        return self.transform(image)

    def embed(self, pixels):
        """Embeddings (B, D) float32 on the CPU for pixels (B, 3, H, W)."""
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, self.dtype)
            embedding = extract_embedding(self.backbone, x, self.spec.backbone.extract).float()
            if self.spec.backbone.normalize == "l2":
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
            return embedding.cpu()

    def embed_images(self, images: Sequence[Image.Image], *, batch_size: int | None = None):
        """Embeddings (N, D) float32 as numpy for decoded images, batch by batch."""
        import numpy as np
        import torch

        size = batch_size or self.spec.runtime.batch_size
        return np.concatenate([self.embed(torch.stack([self.preprocess(im) for im in images[s:s + size]])).numpy()
                               for s in range(0, len(images), size)])

    def run_head(self, embeddings, input_biases):
        """Head outputs (B, L) float32 on the CPU."""
        import torch

        with torch.inference_mode():
            e = torch.as_tensor(embeddings).to(self.device, self.dtype)
            b = torch.as_tensor(input_biases, dtype=torch.long).to(self.device)
            order = self.spec.head.input_biases_order
            if order is not None:
                if len(order) != b.shape[1]:
                    raise ValueError(f"[head].input_biases_order has {len(order)} entries for {b.shape[1]} columns")
                b = b[:, list(order)]
            return self.head(e, b).float().cpu()

    def predict(self, images: Sequence[Image.Image | str | Path], input_biases) -> Any:
        """The deployed path end to end: images and their ``input_biases`` → outputs."""
        import torch

        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.run_head(self.embed(pixels), input_biases)

    def describe(self) -> dict[str, Any]:
        """The configuration recorded in fixture manifests, for this pipeline."""
        spec = self.spec
        return {
            "backbone": describe_backbone(self.backbone, name=spec.backbone.model, kwargs=dict(spec.backbone.kwargs),
                                          extract=spec.backbone.extract, normalize=spec.backbone.normalize),
            "preprocess": describe_data_config(self.data_config, **spec.preprocess.variant(),
                                               exif_transpose=spec.preprocess.exif_transpose),
            "head": describe_head(self.head, class_path=spec.head.class_path,
                                  input_biases_order=spec.head.input_biases_order),
            "runtime": {"device": str(self.device), "dtype": spec.runtime.dtype},
        }


def resolve_device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(
            f"device {name!r} requested but torch.cuda.is_available() is False on this machine. "
            "Run on a GPU machine or use --device cpu."
        )
    return torch.device(name)


def create_backbone(spec: Spec, *, meta: bool = False):
    """The timm model the spec names, with random weights (checkpoints load separately).

    With ``meta`` the parameters are shapes only: no time is spent on a random init
    that a checkpoint will replace (about 4 s for ViT-L on two cores).
    """
    import contextlib

    import timm
    import torch

    bb = spec.backbone
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(bb.model, pretrained=False, **bb.kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SpecError(f"{spec.path}: timm cannot create [backbone].model {bb.model!r} with {dict(bb.kwargs)}: {e}") from e


def create_head(spec: Spec):
    """An instance of ``[head].class`` built with ``[head].kwargs``."""
    head_cls = import_object(spec.head.class_path)
    try:
        return head_cls(**spec.head.kwargs)
    except TypeError as e:
        raise SpecError(f"{spec.path}: [head].kwargs do not fit {spec.head.class_path}: {e}") from e


def _convert_open_clip(state: dict, model) -> dict:
    """OpenAI / open_clip key layout → timm, with timm's own checkpoint filter."""
    import sys

    pos = state.get("visual.positional_embedding")
    if pos is not None and pos.shape[0] != model.pos_embed.shape[1]:
        # timm would interpolate the position embeddings without a word: a silent input-size drift.
        raise CheckpointError(
            f"the checkpoint's position embeddings have {pos.shape[0]} tokens, the model {model.pos_embed.shape[1]}: "
            "it was trained at another input size. Use the model name whose input size matches."
        )
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise CheckpointError(f"timm has no checkpoint filter for {type(model).__name__}; convert the checkpoint to timm keys")
    return filter_fn(state, model)


def load_weights(module, path: Path, *, section: str, target: str, state_dict_key: str | None,
                 key_map: Mapping[str, str], drop_keys: Sequence[str], convert=None,
                 assign: bool = False, fingerprints: bool = True) -> dict[str, str]:
    """Load ``path`` into ``module`` with ``strict=True`` and return per-tensor fingerprints.

    Raises:
        StrictLoadError: keys or shapes do not match; the error's ``key_diff`` carries the
            recognised cause, the explicit spec fix when one exists, and the architecture
            inferred from the checkpoint's tensors.
    """
    state, diff = diagnose_load(read_checkpoint(path), module, section=section, target=target,
                                source=f"{section} checkpoint {path}", state_dict_key=state_dict_key,
                                key_map=key_map, drop_keys=drop_keys, convert=convert)
    if state is None:
        raise StrictLoadError(explain_key_diff(diff), diff)
    module.load_state_dict(state, strict=True, assign=assign)
    return fingerprint(module.state_dict()) if fingerprints else {}


def load_backbone(spec: Spec, *, device, fingerprints: bool = True):
    """The spec's backbone with its checkpoint loaded strictly, in eval mode on ``device`` and the spec's dtype.

    Returns:
        ``(module, fingerprints)``; fingerprints are taken before any dtype cast.
    """
    import torch

    bb = spec.backbone
    prints: dict[str, str] = {}
    if bb.checkpoint is None:
        backbone = create_backbone(spec)
    else:
        loading = dict(section="backbone", target=f"timm {bb.model}", state_dict_key=bb.state_dict_key,
                       key_map=bb.key_map, drop_keys=bb.drop_keys,
                       convert=_convert_open_clip if bb.checkpoint_format == "open_clip" else None,
                       fingerprints=fingerprints)
        backbone = create_backbone(spec, meta=True)
        prints = load_weights(backbone, bb.checkpoint, assign=True, **loading)
        if any(t.is_meta for t in itertools.chain(backbone.parameters(), backbone.buffers())):
            # Buffers outside the state_dict (non-persistent) need the model's own init.
            backbone = create_backbone(spec)
            prints = load_weights(backbone, bb.checkpoint, **loading)
    return backbone.eval().to(device, getattr(torch, spec.runtime.dtype)), prints


def load_head(spec: Spec, *, device, fingerprints: bool = True):
    """The spec's head with its weights loaded strictly, in eval mode: ``(module, fingerprints)``."""
    import torch

    hd = spec.head
    head = create_head(spec)
    prints = load_weights(head, hd.weights, section="head", target=hd.class_path, state_dict_key=hd.state_dict_key,
                          key_map=hd.key_map, drop_keys=hd.drop_keys, fingerprints=fingerprints)
    return head.eval().to(device, getattr(torch, spec.runtime.dtype)), prints


def assemble_pipeline(spec: Spec, backbone, head, *, device, fingerprints: dict | None = None) -> Pipeline:
    """Join loaded modules with the preprocessing the spec resolves to."""
    import timm
    import torch

    # Layered like timm: explicit spec fields, then the model's pretrained_cfg, then timm's defaults.
    data_config = timm.data.resolve_model_data_config(backbone, args=spec.preprocess.overrides())
    transform = create_preprocess(data_config, **spec.preprocess.variant())
    return Pipeline(spec=spec, backbone=backbone, head=head, transform=transform, data_config=data_config,
                    device=device, dtype=getattr(torch, spec.runtime.dtype), fingerprints=fingerprints or {})


def build_pipeline(spec: Spec, *, device: str | None = None, fingerprints: bool = True) -> Pipeline:
    """Create the backbone and head, load both checkpoints with ``strict=True``, set eval mode.

    Raises:
        SpecError: the model name, head class or kwargs cannot be used.
        CheckpointError: a checkpoint is unreadable or does not load strictly
            (`StrictLoadError` carries the key diff and the proposed fix).
    """
    torch_device = resolve_device(device or spec.runtime.device)
    backbone, backbone_prints = load_backbone(spec, device=torch_device, fingerprints=fingerprints)
    head, head_prints = load_head(spec, device=torch_device, fingerprints=fingerprints)
    prints = {part: p for part, p in (("backbone", backbone_prints), ("head", head_prints)) if p}
    return assemble_pipeline(spec, backbone, head, device=torch_device, fingerprints=prints)
