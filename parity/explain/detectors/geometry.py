"""Geometry candidates for the pixel detector: the reference's preprocessing with one field changed,
or with a shipped image change before it, each run from the fixture image itself.

The changed descriptions are built by the library the reference names (`create_transform`), which
refuses what it cannot reproduce, so every candidate is a transform that library really runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from parity import libraries
from parity.explain.detectors.evidence import Evidence
from parity.explain.detectors.images import SHIPPED_IMAGE_TRANSFORMS, ShippedTransform, composite_white, has_alpha
from parity.explain.detectors.pixel_fit import Candidate
from parity.preprocess.config import PreprocessConfig, derived_fields
from parity.spec import INTERPOLATIONS

__all__ = ["geometry_variants", "image_candidates"]

_CROP_PCTS = (0.875, 0.9, 0.95, 1.0)
_BACKENDS = {"pil": "Pillow (on the PIL image)", "tensor": "torch kernels (torchvision on a uint8 tensor)"}
_SHIPPED = "Change the shipped code: "


def _size(value: Any) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, (tuple, list)) else f"{value}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _derived(config: PreprocessConfig, **changes: Any) -> list[PreprocessConfig]:
    """``config`` with ``changes`` and its derived crop/pad fields recomputed, once per rounding rule
    the library may use (the library's own rebuild keeps the one it applies)."""
    moved = replace(config, **changes)
    fill = config.pad_fill or (0, 0, 0)
    crop_rules = dict.fromkeys(r for r in (config.crop_offset_rounding, "round_half_even", "floor") if r)
    pad_rules = dict.fromkeys(r for r in (config.pad_offset_rounding, "ceil", "floor") if r)
    return [replace(moved, **derived_fields(moved.resize, moved.resize_size, moved.crop_size, crop_rule=c,
                                            pad_rule=p, fill=fill))
            for c in crop_rules for p in pad_rules]


def _build(configs: Sequence[PreprocessConfig]) -> Any:
    """The transform of the first of ``configs`` its library builds as described, or ``None``."""
    for config in configs:
        try:
            return libraries.create_transform(config)
        except Exception:  # the library refuses this description: not a candidate
            continue
    return None


def _siblings(library: str) -> tuple[str, ...]:
    """The description libraries of the adapter that builds ``library`` (e.g. a fast and a slow processor)."""
    for name in libraries.names():
        try:
            described = libraries.get(name).description_libraries
        except Exception:
            continue
        if library in described:
            return tuple(described)
    return (library,)


def geometry_variants(config: PreprocessConfig) -> list[tuple[str, str, str, str, Any]]:
    """The reference's preprocessing with one field changed: ``(name, label, cause, fix, transform)`` for each
    change its library can build (interpolation, antialias, resize backend, crop_pct, squash vs crop)."""
    out = []

    def add(name: str, label: str, cause: str, fix: str, configs: Sequence[PreprocessConfig]) -> None:
        transform = _build(configs)
        if transform is not None:
            out.append((name, label, cause, fix, transform))

    for interpolation in (*INTERPOLATIONS, "nearest-exact"):
        if interpolation != config.interpolation:
            add("interpolation", interpolation,
                f"The shipped code resizes with {interpolation}; the reference used {config.interpolation}.",
                f"resize with {config.interpolation}", [replace(config, interpolation=interpolation)])
    add("antialias", f"antialias={not config.antialias}",
        f"The shipped code resizes {'with' if not config.antialias else 'without'} antialiasing; the reference "
        f"used antialias={config.antialias}.", f"resize with antialias={config.antialias}",
        [replace(config, antialias=not config.antialias)])
    for backend, words in _BACKENDS.items():
        if backend == config.resize_backend or config.resize_backend not in _BACKENDS:
            continue
        reference = _BACKENDS[config.resize_backend]
        # torchvision resized tensors without antialiasing by default before 0.17: try both
        for antialias in dict.fromkeys((config.antialias, True, False)):
            plain = antialias == config.antialias
            how = words if plain else f"{words} {'with' if antialias else 'without'} antialiasing"
            add("resize_backend" if plain else "resize_backend+antialias", f"resizing with {how}",
                f"The shipped code resizes with {how}; the reference resized with {reference}"
                + ("." if plain else f", antialias={config.antialias}."),
                f"resize with {reference}" + ("" if plain else f", antialias={config.antialias}"),
                [replace(config, library=library, resize_backend=backend, antialias=antialias)
                 for library in _siblings(config.library)])
    if config.resize == "shortest_edge" and config.crop_size is not None and isinstance(config.resize_size, int):
        crop = _size(config.crop_size)
        for pct in _CROP_PCTS:
            side = math.floor(config.crop_size[0] / pct)
            if side != config.resize_size:
                add("crop_pct", f"crop_pct {pct:g} (short side to {side}, then a {crop} crop)",
                    f"The shipped code resizes the short side to {side} before the {crop} center crop (crop_pct "
                    f"{pct:g}); the reference resized it to {config.resize_size}.",
                    f"resize the short side to {config.resize_size}, then center-crop {crop}",
                    _derived(config, resize_size=side))
    if config.crop_size is not None and config.resize != "squash":
        add("squash", f"a squash to {_size(config.crop_size)}",
            f"The shipped code resizes both sides to {_size(config.crop_size)}, aspect ratio lost; the reference "
            f"resized the short side to {_size(config.resize_size)} and center-cropped.",
            f"resize the short side to {_size(config.resize_size)} and center-crop {_size(config.crop_size)} "
            "(keep the aspect ratio)",
            _derived(config, resize="squash", resize_size=tuple(config.crop_size), resize_rounding=None))
    if config.crop_size is not None and config.resize == "squash":
        side = config.crop_size[0]
        add("crop", f"short side to {side}, then a center crop",
            f"The shipped code keeps the aspect ratio and center-crops; the reference squashed both sides to "
            f"{_size(config.resize_size)}.", f"resize both sides to {_size(config.resize_size)} (no crop)",
            [c for rounding in ("truncate", "round")
             for c in _derived(config, resize="shortest_edge", resize_size=side, resize_rounding=rounding)])
    return out


def _through(evidence: Evidence, transform: Any, exif: bool, before: ShippedTransform | None = None,
             size: tuple[int, int] = (0, 0)):
    def produce(name: str) -> np.ndarray | None:
        image = evidence.image(name, exif_transpose=exif)
        if image is None:
            return None
        if before is not None:
            image = before.apply(image, size)
        return np.asarray(transform.geometry(image), dtype=np.float32)
    return produce


def _composited(evidence: Evidence, transform: Any, exif: bool):
    def produce(name: str) -> np.ndarray | None:
        raw = evidence.raw(name, exif_transpose=exif)
        image = composite_white(raw) if raw is not None and has_alpha(raw) else evidence.image(name, exif_transpose=exif)
        return None if image is None else np.asarray(transform.geometry(image), dtype=np.float32)
    return produce


def image_candidates(evidence: Evidence, config: PreprocessConfig, transform: Any, exif: bool,
                     names: Sequence[str]) -> list[Candidate]:
    """Every way of producing the golden images' pixels that differs from the reference in one geometric step:
    a changed field (`geometry_variants`), a shipped image transform before the reference's preprocessing
    (squash, grayscale), EXIF orientation flipped (when a golden image has one), transparency composited
    onto white (when a golden image has alpha). JPEG is searched on its own (`parity.explain.detectors.jpeg`)."""
    size = tuple(config.crop_size) if config.crop_size is not None else (0, 0)
    out = [Candidate((name,), label, (cause,), (fix,), _through(evidence, built, exif))
           for name, label, cause, fix, built in geometry_variants(config)]
    for shipped in SHIPPED_IMAGE_TRANSFORMS.values():
        if shipped.name.startswith("jpeg_") or shipped.name == "no_exif" or (shipped.name.startswith("squash")
                                                                             and config.crop_size is None):
            continue
        out.append(Candidate((shipped.name,), shipped.description, (_sentence(shipped.cause),),
                             (shipped.fix.removeprefix(_SHIPPED),), _through(evidence, transform, exif, shipped, size)))
    if any((m := evidence.mode(n)) is not None and m[1] != 1 for n in names):  # an orientation to get wrong
        ignored = SHIPPED_IMAGE_TRANSFORMS["no_exif"]
        cause, fix = ((ignored.cause, ignored.fix.removeprefix(_SHIPPED)) if exif else
                      ("the shipped code applies the EXIF orientation; the reference did not",
                       "do not apply `ImageOps.exif_transpose`"))
        out.append(Candidate(("exif",), "EXIF orientation " + ("not applied" if exif else "applied"),
                             (_sentence(cause),), (fix,), _through(evidence, transform, not exif)))
    if any((raw := evidence.raw(n, exif_transpose=exif)) is not None and has_alpha(raw) for n in names):
        out.append(Candidate(("alpha",), "transparency composited onto white",
                             ("The shipped code composites transparent images onto white (what transformers' image "
                              "processors do with an RGBA input); the reference dropped the alpha channel.",),
                             ("convert every image with `image.convert(\"RGB\")` before preprocessing",),
                             _composited(evidence, transform, exif)))
    return out
