"""The candidate inference pipeline, built from a spec: what is tested is what ships."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import parity
from parity.store.checkpoints import StrictLoadError, explain_key_diff, fingerprint, read_checkpoint
from parity.errors import SpecError
from parity.store.forensics import diagnose_load, summarize_structure
from parity.store.hashcache import cached
from parity.store.images import check_resize, decode_input
from parity.libraries import (backbone_weights, checkpoint_converter, create_backbone, describe_backbone,
                              extract_embedding, resolve_preprocess)
from parity.preprocess.transform import Preprocess, describe_data_config
from parity.spec import Spec, check_device

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
    "preprocess_record",
    "resolve_preprocess",
]


def import_object(path: str) -> Any:
    """Import ``package.module:Name``. This runs the module's code: name only code you trust."""
    module_name, _, attr = path.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise SpecError(f"{path!r} is not 'package.module:Name' (an absolute module path and a name)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import {module_name!r} for {path!r}: {e}. Is it installed or on PYTHONPATH?") from e
    except Exception as e:  # the module's own code failed: a SyntaxError, or anything it raises at import
        raise SpecError(f"importing {module_name!r} for {path!r} failed: {type(e).__name__}: {e}. "
                        "Fix that module; parity runs it as it is.") from e
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError as e:
        raise SpecError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from e


def describe_head(head, *, class_path: str, input_biases_order: Sequence[int] | None = None) -> dict[str, Any]:
    order = list(input_biases_order) if input_biases_order is not None else None
    return {"class": class_path, "input_biases_order": order, "structure": summarize_structure(head)}


def preprocess_record(spec: Spec, config: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest record of the preprocessing ``spec`` resolves to (``config`` from `resolve_preprocess`)."""
    return describe_data_config(config, **spec.preprocess.variant(), exif_transpose=spec.preprocess.exif_transpose)


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

    def decode(self, image) -> tuple[Image.Image, str]:
        """An RGB image and the conversion it took, from a path, encoded bytes, a PIL image of any
        mode or a numpy uint8 (H, W, C) array: the shared loader's decoding and RGB conversion."""
        return decode_input(image, exif_transpose=self.spec.preprocess.exif_transpose)

    def preprocess(self, image):
        """Pixels (3, H, W) float32 on the CPU for any input `decode` accepts.

        Raises:
            FixtureError: the input cannot be decoded, or its resize would be too large.
        """
        return self.pixels(self.decode(image)[0], name=getattr(image, "filename", "") or "image")

    def pixels(self, rgb: Image.Image, *, name: str | Path = "image"):
        """Pixels (3, H, W) for an image the shared loader already decoded to RGB (no second decode).

        Raises:
            FixtureError: its resize would be too large.
        """
        return self.finish_pixels(self.staged(rgb, name=name))

    def staged(self, rgb: Image.Image, *, name: str | Path = "image") -> Image.Image:
        """The part of `pixels` that runs on PIL alone (resize and crop with the pil backend): a decode thread
        runs it, as it starts no OpenMP team; `finish_pixels` of its result is `pixels`.

        Raises:
            FixtureError: its resize would be too large.
        """
        check_resize(rgb.size, _resize_edge(self.data_config), path=name)
        return self.transform.pil_part(rgb)

    def finish_pixels(self, staged: Image.Image):
        """Pixels (3, H, W) from `staged`'s image: the transform's torch steps, in the calling thread."""
        return self.transform.tensor_part(staged)

    def embed(self, pixels):
        """Embeddings (B, D) float32 on the CPU for pixels (B, 3, H, W)."""
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, self.dtype)
            embedding = extract_embedding(self.backbone, x, self.spec.backbone.extract,
                                          library=self.spec.backbone.library).float()
            if self.spec.backbone.normalize == "l2":
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
            return embedding.cpu()

    def run_head(self, embeddings, input_biases=None):
        """Head outputs (B, L) float32 on the CPU.

        A head is called as ``head(embeddings, input_biases)``, or ``head(embeddings)`` when the
        samples carry no ``input_biases`` (``None`` or zero columns), as a plain classifier is.
        """
        import torch

        with torch.inference_mode():
            e = torch.as_tensor(embeddings).to(self.device, self.dtype)
            b = None if input_biases is None else torch.as_tensor(input_biases, dtype=torch.long).to(self.device)
            if b is None or b.numel() == 0:
                return self.head(e).float().cpu()
            order = self.spec.head.input_biases_order
            if order is not None:
                if len(order) != b.shape[1]:
                    raise ValueError(f"[head].input_biases_order has {len(order)} entries for {b.shape[1]} columns")
                b = b[:, list(order)]
            return self.head(e, b).float().cpu()

    def predict(self, images: Sequence[Any], input_biases=None, *, conversions: list[str] | None = None) -> Any:
        """The deployed path end to end: images and their ``input_biases`` → outputs.

        ``images`` may mix paths, encoded bytes, PIL images of any mode and numpy uint8 arrays;
        pass a list as ``conversions`` to receive each image's conversion note (``""`` for RGB).
        """
        import torch

        decoded = [self.decode(image) for image in images]
        if conversions is not None:
            conversions.extend(note for _, note in decoded)
        pixels = torch.stack([self.transform(image) for image, _ in decoded])
        return self.run_head(self.embed(pixels), input_biases)

    def describe(self) -> dict[str, Any]:
        """The configuration recorded in fixture manifests, for this pipeline."""
        spec = self.spec
        return {
            "backbone": describe_backbone(self.backbone, name=spec.backbone.model, kwargs=dict(spec.backbone.kwargs),
                                          extract=spec.backbone.extract, normalize=spec.backbone.normalize,
                                          library=spec.backbone.library),
            "preprocess": preprocess_record(spec, self.data_config),
            "head": describe_head(self.head, class_path=spec.head.class_path,
                                  input_biases_order=spec.head.input_biases_order),
            "runtime": {"device": str(self.device), "dtype": spec.runtime.dtype},
        }


def resolve_device(name: str):
    import torch

    check_device(name)

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(
            f"device {name!r} requested but torch.cuda.is_available() is False on this machine. "
            "Run on a GPU machine or use --device cpu."
        )
    return torch.device(name)


def create_head(spec: Spec):
    """An instance of ``[head].class`` built with ``[head].kwargs``."""
    return construct_module(spec.head.class_path, spec.head.kwargs, where=f"{spec.path}: [head].")


def construct_module(class_path: str, kwargs: Any, *, where: str):
    """``class_path(**kwargs)``, refusing anything but a torch.nn.Module built from a kwargs mapping.

    Raises:
        SpecError: not importable, not an nn.Module subclass, kwargs not a mapping, or the constructor raised.
    """
    import torch

    if not isinstance(kwargs, Mapping):
        raise SpecError(f"{where}kwargs must be a mapping of argument names to values, got {kwargs!r:.80}")
    cls = import_object(class_path)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise SpecError(f"{where}class {class_path!r} is not a torch.nn.Module subclass "
                        f"(got {type(cls).__name__} {cls!r:.80})")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SpecError(f"{where}kwargs do not fit {class_path}: {e}") from e
    except Exception as e:  # the class's own checks (a negative width, num_heads = 0, ...)
        raise SpecError(f"{class_path}(**{dict(kwargs)}) raised {type(e).__name__}: {e}. "
                        f"Fix {where}kwargs.") from e


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
    settings = _fingerprint_settings(module, section=section, target=target, state_dict_key=state_dict_key,
                                     key_map=key_map, drop_keys=drop_keys, convert=convert, assign=assign)
    module.load_state_dict(state, strict=True, assign=assign)
    if not fingerprints:
        return {}
    names = set(module.state_dict())
    return cached(path, "fingerprint", lambda: fingerprint(module.state_dict()), settings=settings,
                  valid=lambda value: _is_fingerprints(value) and set(value) == names)


def _fingerprint_settings(module, **loading) -> dict[str, Any]:
    """Everything besides the file's bytes that the loaded tensors depend on, for the hash cache key.

    The module's own names, dtypes and shapes before loading (a strict load without ``assign`` casts
    the checkpoint's tensors to them); the converter by name and by its compiled code.
    """
    import torch

    convert = loading.pop("convert")
    signature = sorted((name, str(t.dtype), tuple(t.shape)) for name, t in module.state_dict().items())
    return {**loading, "key_map": sorted((loading["key_map"] or {}).items()),
            "drop_keys": sorted(loading["drop_keys"] or ()), "signature": signature,
            "module": f"{type(module).__module__}:{type(module).__qualname__}", "converter": _code_identity(convert),
            "versions": [torch.__version__, getattr(parity, "__version__", "")]}


def _code_identity(function) -> str | None:
    """A converter's name and a digest of its bytecode and constants: a changed conversion is a new key."""
    if function is None:
        return None
    code = getattr(getattr(function, "func", function), "__code__", None)
    name = f"{getattr(function, '__module__', '')}:{getattr(function, '__qualname__', repr(function))}"
    bound = repr((getattr(function, "args", ()), getattr(function, "keywords", {})))  # a functools.partial's
    if code is None:
        return f"{name}:{bound}"
    import hashlib

    return f"{name}:{hashlib.sha256(code.co_code + repr(code.co_consts).encode() + bound.encode()).hexdigest()[:16]}"


def _is_fingerprints(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def load_backbone(spec: Spec, *, device, fingerprints: bool = True):
    """The spec's backbone with its checkpoint loaded strictly, in eval mode on ``device`` and the spec's dtype.

    Returns:
        ``(module, fingerprints)``; fingerprints are taken before any dtype cast.
    """
    import torch

    bb = spec.backbone
    prints: dict[str, str] = {}
    weights = backbone_weights(spec)
    if weights is None:
        backbone = create_backbone(spec)
    else:
        loading = dict(section="backbone", target=f"{bb.library} {bb.model}", state_dict_key=bb.state_dict_key,
                       key_map=bb.key_map, drop_keys=bb.drop_keys, convert=checkpoint_converter(spec),
                       fingerprints=fingerprints)
        backbone = create_backbone(spec, meta=True)
        prints = load_weights(backbone, weights, assign=True, **loading)
        _materialize_buffers(backbone, spec)
    return backbone.eval().to(device, getattr(torch, spec.runtime.dtype)), prints


def _materialize_buffers(module, spec: Spec) -> None:
    """Give buffers outside the state_dict (non-persistent, e.g. transformers' ``position_ids``) the
    model's own init: a strict load fills every parameter and persistent buffer, never these."""
    leftover = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if not leftover:
        return
    fresh = dict(create_backbone(spec).named_buffers())
    for name in leftover:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, fresh[name])


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
    import torch

    transform, data_config = resolve_preprocess(spec, backbone)
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


def _resize_edge(data_config: Mapping[str, Any]) -> float:
    """The shortest edge preprocessing resizes to (timm's input size / crop_pct), for the memory bound."""
    size = data_config.get("input_size") or (0, 1024, 1024)
    crop = data_config.get("crop_pct") or 1.0
    try:
        return max(float(v) for v in tuple(size)[-2:]) / max(float(crop), 1e-3)
    except (TypeError, ValueError):
        return 1024.0
