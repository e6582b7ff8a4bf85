"""Golden pixels under a change of preprocessing: what the shipped code's transform does differently.

Three passes, cheapest first, stopping at the first that reproduces the shipped pixels:

1. per-pixel steps on the reference pixels themselves: channel order, 0-255 values, every known
   mean/std and none (the reference pixels are un-normalised with the reference's own mean/std);
2. geometry re-run from each fixture image with the reference's `PreprocessConfig` with one field
   changed (interpolation, antialias, resize backend, crop_pct, squash vs crop) or one of the
   `SHIPPED_IMAGE_TRANSFORMS` before it (a squash, EXIF not applied, grayscale), each also with one
   per-pixel change (BGR + squash);
3. JPEG re-encoding, with its quality estimated.

A change fits when it reproduces the shipped pixels within the pixels budget on every golden
image; a JPEG round trip through another encoder than Pillow's cannot, so it is named when it is
clearly closer than anything else and within a stated loose budget, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from parity.detectors.evidence import Evidence, Fit, fit, number
from parity.detectors.images import (JPEG_QUALITIES, SHIPPED_IMAGE_TRANSFORMS, ShippedTransform, composite_white,
                                     has_alpha, reencode_jpeg)
from parity.results import Finding, Tolerance
from parity.spec import INTERPOLATIONS, MEAN_STD_PRESETS

__all__ = ["Finish", "finish", "reference_unit", "per_pixel_variants", "geometry_variants", "JPEG_LOOSE_LEVELS",
           "findings"]

_CROP_PCTS = (0.875, 0.9, 0.95, 1.0)
_COARSE_Q = (50, 60, 70, 75, 80, 85, 90, 95, 100)
# Pillow's default chroma subsampling (None) first; the others when it does not reproduce.
_SUBSAMPLINGS = {"4:2:0": None, "4:4:4": 0, "4:2:2": 1}
# A JPEG fit through another encoder: mean abs within this many 8-bit levels (in normalised units),
# at most half the residual without re-encoding ...
JPEG_LOOSE_LEVELS = 1.0
_JPEG_GAIN = 2.0
_JPEG_SHARP = 1.15  # ... and at least this much closer than at quality +-2
_JPEG_HINT = 0.8  # a round trip this much closer than none hints at JPEG: worth trying other subsamplings


@dataclass(frozen=True)
class Finish:
    """The per-pixel steps after the geometry: channel order, value scale, mean/std (named)."""

    channel_order: str
    value_scale: str
    norm: str  # "reference", a `MEAN_STD_PRESETS` name, "none", or "fitted"
    mean: tuple[float, ...]
    std: tuple[float, ...]


def finish(unit: np.ndarray, how: Finish) -> np.ndarray:
    """``unit`` (3, H, W) RGB pixels in [0, 1] through ``how``, in float32 as torchvision computes it."""
    x = unit[::-1] if how.channel_order == "bgr" else unit
    if how.value_scale == "byte":
        x = x * np.float32(255)
    mean = np.asarray(how.mean, np.float32)[:, None, None]
    std = np.asarray(how.std, np.float32)[:, None, None]
    return (x - mean) / std


def reference_unit(pixels: np.ndarray, reference: Finish) -> np.ndarray:
    """The [0, 1] RGB pixels the reference normalised into ``pixels``, snapped to the 8-bit grid they came from."""
    x = np.asarray(pixels, np.float64) * np.asarray(reference.std)[:, None, None] + np.asarray(reference.mean)[:, None, None]
    if reference.value_scale == "byte":
        x = x / 255
    if reference.channel_order == "bgr":
        x = x[::-1]
    levels = x * 255
    snapped = np.round(levels)
    if np.abs(levels - snapped).max() < 1e-2:  # decoded 8-bit images: the exact levels, not their float error
        return (snapped.astype(np.float32) / np.float32(255)).astype(np.float32)
    return x.astype(np.float32)


def per_pixel_variants(reference: Finish, *, most: int = 2) -> list[tuple[Finish, tuple[str, ...]]]:
    """Every finish that differs from ``reference`` in 1 to ``most`` of channel order, value scale and
    mean/std (each known preset, and none), with the names of what changed."""
    norms = [("reference", reference.mean, reference.std)]
    for name, (mean, std) in MEAN_STD_PRESETS.items():
        if not (np.allclose(mean, reference.mean, atol=1e-6) and np.allclose(std, reference.std, atol=1e-6)):
            norms.append((name, mean, std))
    if not (np.allclose(reference.mean, 0) and np.allclose(reference.std, 1)):
        norms.append(("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    out = []
    for order in ("rgb", "bgr"):
        for scale in ("unit", "byte"):
            for norm, mean, std in norms:
                changed = tuple(name for name, moved in (("channel_order", order != reference.channel_order),
                                                         ("value_scale", scale != reference.value_scale),
                                                         ("mean_std", norm != "reference")) if moved)
                if 1 <= len(changed) <= most:
                    out.append((Finish(order, scale, norm, tuple(mean), tuple(std)), changed))
    out.sort(key=lambda item: len(item[1]))
    return out


def _finish_words(how: Finish, reference: Finish, changed: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(labels, causes, fixes) of the per-pixel changes, in the shipped code's terms."""
    labels, causes, fixes = [], [], []
    if "channel_order" in changed:
        shipped, ref = how.channel_order.upper(), reference.channel_order.upper()
        labels.append(f"{shipped} channel order")
        causes.append(f"The shipped code feeds the model {shipped} images; the reference used {ref}"
                      + (" (OpenCV decodes to BGR)" if shipped == "BGR" else "") + ".")
        fixes.append("convert the image to RGB before preprocessing (`cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`, or "
                     "`array[..., ::-1]`)" if ref == "RGB" else "reverse the channels to BGR before preprocessing")
    if "value_scale" in changed:
        if how.value_scale == "byte":
            labels.append("0-255 pixel values")
            causes.append("The shipped code normalises 0-255 pixel values; the reference scaled them to 0-1 first.")
            fixes.append("divide the pixels by 255 before the mean/std normalisation (as `ToTensor()` does)")
        else:
            labels.append("0-1 pixel values")
            causes.append("The shipped code scales pixels to 0-1; the reference normalised 0-255 values.")
            fixes.append("normalise the 0-255 values without dividing by 255")
    if "mean_std" in changed:
        ref = f"mean {_triple(reference.mean)}, std {_triple(reference.std)}"
        if how.norm == "none":
            labels.append("no mean/std normalisation")
            causes.append(f"The shipped code does not normalise with a mean/std; the reference used {ref}.")
        else:
            named = f"the {how.norm} " if how.norm in MEAN_STD_PRESETS else ""
            labels.append(f"{named}mean {_triple(how.mean)}, std {_triple(how.std)}")
            causes.append(f"The shipped code normalises with {named}mean {_triple(how.mean)}, std "
                          f"{_triple(how.std)}; the reference used {ref}.")
        fixes.append(f"normalise with {ref}")
    return labels, causes, fixes


def _triple(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# -- geometry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    """A way of producing [0, 1] pixels from a fixture image, with its words."""

    name: str
    label: str
    cause: str
    fix: str
    unit: Callable[[Evidence, str], np.ndarray | None]


def _derived(config, **changes):
    """``config`` with ``changes`` and its derived crop/pad fields recomputed, once per rule the library may use."""
    from parity.preprocess_config import derived_fields

    moved = replace(config, **changes)
    fill = config.pad_fill or (0, 0, 0)
    crop_rules = dict.fromkeys(r for r in (config.crop_offset_rounding, "round_half_even", "floor") if r)
    pad_rules = dict.fromkeys(r for r in (config.pad_offset_rounding, "ceil", "floor") if r)
    return [replace(moved, **derived_fields(moved.resize, moved.resize_size, moved.crop_size, crop_rule=c,
                                            pad_rule=p, fill=fill))
            for c in crop_rules for p in pad_rules]


def _buildable(configs) -> Any:
    """The transform of the first of ``configs`` its library builds as described, or ``None``."""
    from parity.libraries import create_transform

    for config in configs:
        try:
            return create_transform(config)
        except Exception:  # the library refuses this description: not a candidate
            continue
    return None


def _siblings(library: str) -> tuple[str, ...]:
    """The description libraries of the adapter that builds ``library`` (fast and slow processors)."""
    from parity import libraries

    for name in libraries.names():
        try:
            described = libraries.get(name).description_libraries
        except Exception:
            continue
        if library in described:
            return tuple(described)
    return (library,)


_BACKENDS = {"pil": "Pillow (on the PIL image)", "tensor": "torch kernels (torchvision on a uint8 tensor)"}


def _size(value) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, (tuple, list)) else f"{value}"


def geometry_variants(config) -> list[tuple[str, str, str, str, Any]]:
    """The reference's preprocessing with one field changed, as ``(name, label, cause, fix, transform)``
    for each change its library can build (the reference's own value excluded)."""
    out = []

    def add(name: str, label: str, cause: str, fix: str, configs) -> None:
        transform = _buildable(configs)
        if transform is not None:
            out.append((name, label, cause, fix, transform))

    for interpolation in INTERPOLATIONS:
        if interpolation != config.interpolation:
            add("interpolation", interpolation,
                f"The shipped code resizes with {interpolation}; the reference used {config.interpolation}.",
                f"resize with {config.interpolation}", [replace(config, interpolation=interpolation)])
    add("antialias", "antialias=True" if not config.antialias else "antialias=False",
        f"The shipped code resizes {'with' if not config.antialias else 'without'} antialiasing; the reference "
        f"used antialias={config.antialias}.", f"resize with antialias={config.antialias}",
        [replace(config, antialias=not config.antialias)])
    for backend, words in _BACKENDS.items():
        if backend != config.resize_backend:
            add("resize_backend", f"resizing with {words}",
                f"The shipped code resizes with {words}; the reference resized with {_BACKENDS[config.resize_backend]}.",
                f"resize with {_BACKENDS[config.resize_backend]}",
                [replace(config, library=library, resize_backend=backend) for library in _siblings(config.library)])
    if config.resize == "shortest_edge" and config.crop_size is not None and isinstance(config.resize_size, int):
        crop = config.crop_size[0]
        for pct in _CROP_PCTS:
            side = math.floor(crop / pct)
            if side != config.resize_size:
                add("crop_pct", f"crop_pct {pct:g} (short side to {side}, then a {_size(config.crop_size)} crop)",
                    f"The shipped code resizes the short side to {side} before the {_size(config.crop_size)} center "
                    f"crop (crop_pct {pct:g}); the reference resized it to {config.resize_size}.",
                    f"resize the short side to {config.resize_size}, then center-crop {_size(config.crop_size)}",
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


def _geometry(transform, before: ShippedTransform | None, exif: bool, size: tuple[int, int]):
    def unit(evidence: Evidence, name: str) -> np.ndarray | None:
        image = evidence.image(name, exif_transpose=exif)
        if image is None:
            return None
        try:
            if before is not None:
                image = before.apply(image, size)
            return np.asarray(transform.geometry(image), dtype=np.float32)
        except Exception:  # a kernel this backend lacks (box on tensors): not a candidate
            return None
    return unit


def _alpha(transform, exif: bool):
    def unit(evidence: Evidence, name: str) -> np.ndarray | None:
        raw = evidence.raw(name, exif_transpose=exif)
        image = composite_white(raw) if raw is not None and has_alpha(raw) else evidence.image(name, exif_transpose=exif)
        try:
            return None if image is None else np.asarray(transform.geometry(image), dtype=np.float32)
        except Exception:
            return None
    return unit


# -- the search ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fit:
    names: tuple[str, ...]
    label: str
    cause: str
    fixes: tuple[str, ...]
    max_abs: float
    note: str = ""
    approximate: bool = False  # a loose JPEG fit: the closest explanation, not a reproduction


def _confirm(unit: Callable[[str], np.ndarray | None], how: Finish, observed: Mapping[str, np.ndarray],
             golden: Mapping[str, np.ndarray], tolerance: Tolerance, screened: str) -> Fit | None:
    """The fit over every golden image (``screened`` first), or ``None`` when one misses or all equal the reference."""
    worst, total, count, moved = 0.0, 0.0, 0, False
    for name in [screened, *[n for n in observed if n != screened]]:
        values = unit(name)
        if values is None:
            return None
        candidate = finish(values, how)
        result = fit(observed[name], candidate, tolerance)
        if not result.passed:
            return None
        moved = moved or not fit(golden[name], candidate, tolerance).passed
        worst, total, count = max(worst, result.max_abs), total + result.mean_abs, count + 1
    return Fit(True, worst, total / max(count, 1)) if moved else None


def _search(units: Sequence[tuple[tuple[str, ...], str, list[str], list[str], Callable]], finishes, observed, golden,
            tolerance, screened) -> list[_Fit]:
    found = []
    for names, label, causes, fixes, unit in units:
        first = unit(screened)
        if first is None:
            continue
        for how, changed, (f_labels, f_causes, f_fixes) in finishes:
            if not fit(observed[screened], finish(first, how), tolerance).passed:
                continue
            cache = {screened: first}

            def cached(name: str, unit=unit, cache=cache) -> np.ndarray | None:
                if name not in cache:
                    cache[name] = unit(name)
                return cache[name]
            confirmed = _confirm(cached, how, observed, golden, tolerance, screened)
            if confirmed is not None:
                found.append(_Fit(tuple(names) + changed, " + ".join([label, *f_labels] if label else f_labels),
                                  " ".join(causes + f_causes), tuple(fixes + f_fixes), confirmed.max_abs))
    return found


def _affine(observed: Mapping[str, np.ndarray], units: Mapping[str, np.ndarray], reference: Finish,
            tolerance: Tolerance) -> tuple[Finish, tuple[str, ...]] | None:
    """A per-channel mean/std (after either channel order) that reproduces the shipped pixels, when no preset does."""
    for order in ("rgb", "bgr"):
        o = np.concatenate([observed[n].reshape(3, -1) for n in observed], axis=1).astype(np.float64)
        u = np.concatenate([(units[n][::-1] if order == "bgr" else units[n]).reshape(3, -1) for n in observed], axis=1)
        mean, std = [], []
        for c in range(3):
            spread = u[c].std()
            if spread == 0:
                return None
            a = float(np.cov(u[c], o[c], bias=True)[0, 1] / spread ** 2)
            if a <= 0:
                break
            b = float(o[c].mean() - a * u[c].mean())
            mean.append(-b / a)
            std.append(1 / a)
        else:
            how = Finish(order, "unit", "fitted", tuple(mean), tuple(std))
            if np.allclose(how.mean, reference.mean, atol=1e-4) and np.allclose(how.std, reference.std, rtol=1e-4):
                if order == reference.channel_order:
                    continue
            if all(fit(observed[n], finish(units[n], how), tolerance).passed for n in observed):
                changed = ("mean_std",) + (("channel_order",) if order != reference.channel_order else ())
                return how, changed
    return None


def _jpeg(evidence: Evidence, transform, exif: bool, finishes, observed, golden, tolerance, screened,
          reference: Finish) -> list[_Fit]:
    """The JPEG quality (and chroma subsampling) whose round trip best reproduces the shipped pixels,
    if it fits exactly or loosely."""
    def unit_at(key: tuple[int, int | None]) -> Callable[[str], np.ndarray | None]:
        def unit(name: str) -> np.ndarray | None:
            image = evidence.image(name, exif_transpose=exif)
            if image is None:
                return None
            return np.asarray(transform.geometry(reencode_jpeg(image, key[0], subsampling=key[1])), np.float32)
        return unit

    options = [(Finish(reference.channel_order, reference.value_scale, "reference", reference.mean, reference.std),
                (), ([], [], []))] + list(finishes)
    scores: dict[tuple[int, int | None], tuple[float, int, bool]] = {}  # key -> (mean abs, option, within budget)

    def score(key: tuple[int, int | None]) -> float:
        if key not in scores:
            values = unit_at(key)(screened)
            scores[key] = (math.inf, 0, False)
            if values is not None:
                results = [fit(observed[screened], finish(values, how), tolerance) for how, _, _ in options]
                best = min(range(len(options)), key=lambda i: results[i].mean_abs)
                scores[key] = (results[best].mean_abs, best, results[best].passed)
        return scores[key][0]

    def around(quality: int, subsampling: int | None) -> None:
        for q in range(max(1, quality - 4), min(100, quality + 4) + 1):
            score((q, subsampling))

    baseline = fit(observed[screened], golden[screened], tolerance).mean_abs
    for subsampling in _SUBSAMPLINGS.values():
        for q in _COARSE_Q:
            score((q, subsampling))
        around(min((k for k in scores if k[1] == subsampling), key=score)[0], subsampling)
        if any(passed for _, _, passed in scores.values()) or min(map(score, scores)) > _JPEG_HINT * baseline:
            break  # reproduced, or no quality comes near: the other subsamplings need not be tried
    key = min(scores, key=score)
    quality, subsampling = key
    how, changed, (f_labels, f_causes, f_fixes) = options[scores[key][1]]
    unit = unit_at(key)
    chroma = next(name for name, value in _SUBSAMPLINGS.items() if value == subsampling)
    label = f"JPEG re-encoding at quality {quality}" + (f" ({chroma} chroma)" if subsampling is not None else "")
    cause = f"The shipped code (or its client) re-encodes each image as JPEG at quality {quality} before the model."
    fix = SHIPPED_IMAGE_TRANSFORMS[f"jpeg_q{JPEG_QUALITIES[0]}"].fix.removeprefix("Change the shipped code: ")
    exact = _confirm(unit, how, observed, golden, tolerance, screened)
    if exact is not None:
        neighbours = ", ".join(f"quality {q}: {number(scores[(q, subsampling)][0])}" for q in (quality - 1, quality + 1)
                               if (q, subsampling) in scores)
        return [_Fit(("jpeg",) + changed, " + ".join([label, *f_labels]), " ".join([cause, *f_causes]),
                     (fix, *f_fixes), exact.max_abs, note=f"; mean abs at {neighbours}" if neighbours else "")]
    # Another encoder (a browser, OpenCV, a phone) never matches Pillow's bit for bit: accept a quality
    # that is clearly the closest explanation, and say that it is an estimate.
    level = JPEG_LOOSE_LEVELS / 255 / min(reference.std)
    residual, baseline, worst = 0.0, 0.0, 0.0
    for name in observed:
        values, plain = unit(name), evidence.image(name, exif_transpose=exif)
        if values is None or plain is None:
            return []
        result = fit(observed[name], finish(values, how), tolerance)
        before = fit(observed[name], finish(np.asarray(transform.geometry(plain), np.float32), how), tolerance)
        residual, baseline, worst = residual + result.mean_abs, baseline + before.mean_abs, max(worst, result.max_abs)
    residual, baseline = residual / len(observed), baseline / len(observed)
    # the quality must be identified too: a clear minimum of the residual, not a plateau
    sides = [scores[(q, subsampling)][0] for q in (quality - 2, quality + 2) if (q, subsampling) in scores]
    sharp = bool(sides) and min(sides) >= _JPEG_SHARP * scores[key][0]
    if not (residual <= level and residual * _JPEG_GAIN <= baseline and sharp):
        return []
    return [_Fit(("jpeg",) + changed, " + ".join([label.replace("at quality", "at about quality"), *f_labels]),
                 " ".join([cause.replace("at quality", "at about quality"), *f_causes]), (fix, *f_fixes), worst,
                 approximate=True,
                 note=(f"; not within the pixel budget, as expected of another JPEG encoder than Pillow's: mean abs "
                        f"{number(residual)} against {number(baseline)} without re-encoding (loose budget: mean abs "
                        f"within {JPEG_LOOSE_LEVELS:g} 8-bit level = {number(level)}, a {_JPEG_GAIN:g}x gain, and "
                        f"{_JPEG_SHARP:g}x closer than at quality +-2)"))]


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """What the shipped preprocessing does differently, when a change of it reproduces the failing pixels stage."""
    from parity.libraries import create_transform, describe_record

    run, fixture = evidence.run, evidence.fixture
    if not evidence.failing("pixels") or not run.pixels or not fixture.golden_pixels:
        return {}
    names = [n for n in fixture.names if n in run.pixels and n in fixture.golden_pixels]
    observed = {n: np.asarray(run.pixels[n], np.float32) for n in names}
    golden = {n: np.asarray(fixture.golden_pixels[n], np.float32) for n in names}
    if not names or any(observed[n].shape != golden[n].shape or observed[n].ndim != 3 or observed[n].shape[0] != 3
                        for n in names):
        return {}
    tolerance = evidence.tolerance("pixels")
    record = fixture.pipeline.get("preprocess", {})
    config = describe_record(record, source="reference")
    transform = create_transform(config)
    mean = tuple(float(v) for v in transform.normalize.mean)
    std = tuple(float(v) for v in transform.normalize.std)
    reference = Finish(config.channel_order, config.value_scale, "reference", mean, std)
    exif = bool(record.get("exif_transpose", True))
    screened = max(names, key=lambda n: float(np.abs(observed[n] - golden[n]).max()))
    variants = [(how, changed, _finish_words(how, reference, changed)) for how, changed in per_pixel_variants(reference)]
    at = evidence.at("preprocess", "backbone")

    def done(fits: list[_Fit]) -> dict[str, list[Finding]]:
        fits = sorted(fits, key=lambda f: (len(f.names), f.max_abs))
        return {"pixels": [Finding(
            detector="pixels." + "+".join(f.names), stage="pixels", cause=f.cause,
            evidence=(f"{f.label} {'comes closest to' if f.approximate else 'reproduces'} the shipped pixels: max abs "
                      f"{number(f.max_abs)} over {len(names)} golden image(s) ({tolerance.describe()}){f.note}"),
            fix="Change the shipped code: " + "; ".join(f.fixes) + at,
            where=evidence.where("preprocess", "backbone"), max_abs=f.max_abs) for f in fits]}

    # 1. per-pixel steps on the reference pixels
    units = {n: reference_unit(golden[n], reference) for n in names}
    fits = _search([((), "", [], [], units.get)], variants, observed, golden, tolerance, screened)
    if not fits:
        fitted = _affine(observed, units, reference, tolerance)
        if fitted is not None:
            how, changed = fitted
            fits = _search([((), "", [], [], units.get)], [(how, changed, _finish_words(how, reference, changed))],
                           observed, golden, tolerance, screened)
    if fits:
        return done(fits)

    # 2. geometry from the images: the rebuilt reference must reproduce its own golden pixels first
    base = _geometry(transform, None, exif, config.crop_size or (0, 0))
    first = base(evidence, screened)
    if first is None or not fit(golden[screened], finish(first, reference), tolerance).passed:
        return {}
    size = tuple(config.crop_size) if config.crop_size is not None else first.shape[1:]
    candidates = []
    for name, label, cause, fix, built in geometry_variants(config):
        candidates.append(((name,), label, [cause], [fix], _bind(_geometry(built, None, exif, size), evidence)))
    for shipped in SHIPPED_IMAGE_TRANSFORMS.values():
        if shipped.name.startswith("jpeg_"):
            continue
        if shipped.name == "no_exif":
            if not any((m := evidence.mode(n)) is not None and m[1] != 1 for n in names):
                continue  # no golden image has an orientation to ignore
            cause, fix = ((shipped.cause, shipped.fix.removeprefix("Change the shipped code: ")) if exif else
                          ("the shipped code applies the EXIF orientation; the reference did not",
                           "do not apply `ImageOps.exif_transpose`"))
            candidates.append((("exif",), "EXIF orientation " + ("not applied" if exif else "applied"),
                               [cause[0].upper() + cause[1:] + "."], [fix],
                               _bind(_geometry(transform, None, not exif, size), evidence)))
            continue
        candidates.append(((shipped.name,), shipped.description, [shipped.cause[0].upper() + shipped.cause[1:] + "."],
                           [shipped.fix.removeprefix("Change the shipped code: ")],
                           _bind(_geometry(transform, shipped, exif, size), evidence)))
    if any((raw := evidence.raw(n, exif_transpose=exif)) is not None and has_alpha(raw) for n in names):
        candidates.append((("alpha",), "transparency composited onto white",
                           ["The shipped code composites transparent images onto white (what transformers' image "
                            "processors do with an RGBA input); the reference dropped the alpha channel."],
                           ["convert every image with `image.convert(\"RGB\")` before preprocessing"],
                           _bind(_alpha(transform, exif), evidence)))
    plain = [(Finish(reference.channel_order, reference.value_scale, "reference", mean, std), (), ([], [], []))]
    single = [v for v in variants if len(v[1]) == 1]
    fits = _search(candidates, plain + single, observed, golden, tolerance, screened)
    if fits:
        return done(fits)

    # 3. JPEG re-encoding, its quality estimated
    fits = _jpeg(evidence, transform, exif, single, observed, golden, tolerance, screened, reference)
    return done(fits) if fits else {}


def _bind(unit, evidence: Evidence) -> Callable[[str], np.ndarray | None]:
    return lambda name: unit(evidence, name)
