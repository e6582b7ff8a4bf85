"""The candidate inference pipeline, built from a spec: what is tested is what ships."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from parity.checkpoints import load_state_dict_strict, read_state_dict
from parity.errors import SpecError
from parity.images import load_image
from parity.spec import Spec

__all__ = ["Pipeline", "build_pipeline", "import_object", "extract_embedding", "describe_backbone"]

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


def describe_backbone(model, *, name: str, kwargs: dict, extract: str) -> dict[str, Any]:
    """Static facts about a backbone that a strict state_dict load cannot see."""
    # QuickGELU vs GELU leaves every key identical, so record the activation classes.
    activations = sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "act"})
    dim = getattr(model, "num_classes", None) if extract == "forward" else getattr(model, "num_features", None)
    return {
        "library": "timm",
        "model": name,
        "kwargs": dict(kwargs),
        "extract": extract,
        "activation": activations,
        "embedding_dim": dim,
    }


def describe_data_config(config: dict) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in _DATA_CONFIG_KEYS}


@dataclass
class Pipeline:
    """image → pixels → backbone → embedding → head → outputs, on one device and dtype."""

    spec: Spec
    backbone: Any
    head: Any
    transform: Any
    data_config: dict[str, Any]
    device: Any
    dtype: Any

    def preprocess(self, image: Image.Image | str | Path):
        """Pixels (3, H, W) float32 on the CPU; paths are decoded with the shared loader."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return self.transform(image)

    def embed(self, pixels):
        """Embeddings (B, D) float32 on the CPU for pixels (B, 3, H, W)."""
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, self.dtype)
            return extract_embedding(self.backbone, x, self.spec.backbone.extract).float().cpu()

    def run_head(self, embeddings, input_biases):
        """Head outputs (B, L) float32 on the CPU."""
        import torch

        with torch.inference_mode():
            e = torch.as_tensor(embeddings).to(self.device, self.dtype)
            b = torch.as_tensor(input_biases, dtype=torch.long).to(self.device)
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
            "backbone": describe_backbone(self.backbone, name=spec.backbone.model,
                                          kwargs=dict(spec.backbone.kwargs), extract=spec.backbone.extract),
            "preprocess": describe_data_config(self.data_config),
            "head": {"class": spec.head.class_path},
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


def build_pipeline(spec: Spec, *, device: str | None = None) -> Pipeline:
    """Create the backbone and head, load both checkpoints with ``strict=True``, set eval mode.

    Raises:
        SpecError: the model name, head class or kwargs cannot be used.
        CheckpointError: a checkpoint is unreadable or does not load strictly
            (`StrictLoadError` carries the key diff).
    """
    import timm
    import torch

    torch_device = resolve_device(device or spec.runtime.device)
    dtype = getattr(torch, spec.runtime.dtype)
    bb = spec.backbone
    try:
        backbone = timm.create_model(bb.model, pretrained=False, **bb.kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SpecError(f"{spec.path}: timm cannot create [backbone].model {bb.model!r} with {dict(bb.kwargs)}: {e}") from e
    if bb.checkpoint is not None:
        load_state_dict_strict(backbone, read_state_dict(bb.checkpoint),
                               target=f"timm {bb.model}", source=f"backbone checkpoint {bb.checkpoint}")
    # Layered like timm: explicit spec fields, then the model's pretrained_cfg, then timm's defaults.
    data_config = timm.data.resolve_model_data_config(backbone, args=spec.preprocess.overrides())
    transform = timm.data.create_transform(**data_config, is_training=False)

    head_cls = import_object(spec.head.class_path)
    try:
        head = head_cls(**spec.head.kwargs)
    except TypeError as e:
        raise SpecError(f"{spec.path}: [head].kwargs do not fit {spec.head.class_path}: {e}") from e
    load_state_dict_strict(head, read_state_dict(spec.head.weights),
                           target=spec.head.class_path, source=f"head weights {spec.head.weights}")
    backbone.eval().to(torch_device, dtype)
    head.eval().to(torch_device, dtype)
    return Pipeline(spec=spec, backbone=backbone, head=head, transform=transform,
                    data_config=data_config, device=torch_device, dtype=dtype)
