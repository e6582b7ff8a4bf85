"""Golden pixels under a change of preprocessing: what the shipped code's transform does differently.

Three passes, cheapest first, stopping at the first that reproduces the shipped pixels:

1. per-pixel steps on the reference pixels themselves: channel order, 0-255 values, every known
   mean/std and none (the reference pixels un-normalised with the reference's own mean/std), up to
   two at once, then a fitted per-channel mean/std;
2. geometry re-run from each fixture image (`parity.detectors.geometry`): the reference's
   `PreprocessConfig` with one field changed, or a shipped image transform before it, each also
   with one per-pixel change (BGR + squash);
3. JPEG re-encoding, its quality estimated (`parity.detectors.jpeg`).

A change is named only when it reproduces the shipped pixels within the pixels budget on every
golden image and moves at least one of them away from the reference (never the identity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity.detectors.evidence import Evidence, Fit, fit, number
from parity.results import Finding, Tolerance
from parity.spec import MEAN_STD_PRESETS

__all__ = ["Finish", "Variant", "Candidate", "PixelFit", "Target", "finish", "reference_unit", "per_pixel_variants",
           "findings"]


@dataclass(frozen=True)
class Finish:
    """The per-pixel steps after the geometry: channel order, value scale, mean/std (``norm`` names it:
    ``reference``, a `MEAN_STD_PRESETS` name, ``none`` or ``fitted``)."""

    channel_order: str
    value_scale: str
    norm: str
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
    x = np.asarray(pixels, np.float64) * np.asarray(reference.std)[:, None, None] \
        + np.asarray(reference.mean)[:, None, None]
    if reference.value_scale == "byte":
        x = x / 255
    if reference.channel_order == "bgr":
        x = x[::-1]
    levels = x * 255
    snapped = np.round(levels)
    if np.abs(levels - snapped).max() < 1e-2:  # decoded 8-bit images: the exact levels, not their float error
        return snapped.astype(np.float32) / np.float32(255)
    return x.astype(np.float32)


@dataclass(frozen=True)
class Variant:
    """A finish and what it changes from the reference's, in the shipped code's words."""

    how: Finish
    changed: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    causes: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()


def _triple(values: Sequence[float], digits: int = 8) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _variant(how: Finish, reference: Finish, changed: tuple[str, ...]) -> Variant:
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
            fixes.append("normalise the 0-255 values without dividing them by 255")
    if "mean_std" in changed:
        ref = f"mean {_triple(reference.mean)}, std {_triple(reference.std)}"
        if how.norm == "none":
            labels.append("no mean/std normalisation")
            causes.append(f"The shipped code does not normalise with a mean/std; the reference used {ref}.")
        else:
            named = f"the {how.norm} " if how.norm in MEAN_STD_PRESETS else ""
            digits = 5 if how.norm == "fitted" else 8  # a least-squares estimate carries no more
            shipped = f"mean {_triple(how.mean, digits)}, std {_triple(how.std, digits)}"
            labels.append(f"{named}{shipped}")
            causes.append(f"The shipped code normalises with {named}{shipped}; the reference used {ref}.")
        fixes.append(f"normalise with {ref}")
    return Variant(how, changed, tuple(labels), tuple(causes), tuple(fixes))


def per_pixel_variants(reference: Finish, *, most: int = 2) -> list[Variant]:
    """Every finish that differs from ``reference`` in 1 to ``most`` of channel order, value scale and
    mean/std (each known preset, and none), fewest changes first."""
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
                    out.append(_variant(Finish(order, scale, norm, tuple(mean), tuple(std)), reference, changed))
    return sorted(out, key=lambda v: len(v.changed))


def _fitted_mean_std(target: Target, units: Mapping[str, np.ndarray], reference: Finish) -> Variant | None:
    """A per-channel mean/std on 0-1 pixels (after either channel order) fitted by least squares, when
    it reproduces the shipped pixels: a mean/std that is no known preset."""
    o = np.concatenate([target.observed[n].reshape(3, -1) for n in target.names], axis=1).astype(np.float64)
    for order in ("rgb", "bgr"):
        u = np.concatenate([(units[n][::-1] if order == "bgr" else units[n]).reshape(3, -1) for n in target.names],
                           axis=1).astype(np.float64)
        spread = u.std(axis=1)
        if (spread == 0).any():
            return None
        slope = ((u - u.mean(axis=1, keepdims=True)) * (o - o.mean(axis=1, keepdims=True))).mean(axis=1) / spread ** 2
        if (slope <= 0).any():
            continue
        offset = o.mean(axis=1) - slope * u.mean(axis=1)
        how = Finish(order, "unit", "fitted", tuple(float(v) for v in -offset / slope),
                     tuple(float(v) for v in 1 / slope))
        changed = ("mean_std",) + (("channel_order",) if order != reference.channel_order else ())
        variant = _variant(how, reference, changed)
        candidate = Candidate((), "", (), (), units.get)
        if target.fits(candidate, variant) is not None:
            return variant
    return None


# -- the search ---------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A way of producing the [0, 1] RGB pixels of a golden image (``unit(name)``), with its words."""

    names: tuple[str, ...]
    label: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]
    produce: Callable[[str], np.ndarray | None]
    _cache: dict[str, np.ndarray | None] = field(default_factory=dict)

    def unit(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            try:
                self._cache[name] = self.produce(name)
            except Exception:  # a kernel this backend lacks (box on tensors): not a candidate
                self._cache[name] = None
        return self._cache[name]


@dataclass(frozen=True)
class PixelFit:
    """A candidate and finish that reproduce the shipped pixels (``approximate``: the closest explanation
    within a loose budget, not a reproduction)."""

    names: tuple[str, ...]
    label: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]
    max_abs: float
    note: str = ""
    approximate: bool = False

    @classmethod
    def of(cls, candidate: Candidate, variant: Variant, max_abs: float, **extra) -> PixelFit:
        return cls(candidate.names + variant.changed, " + ".join(filter(None, (candidate.label, *variant.labels))),
                   candidate.causes + variant.causes, candidate.fixes + variant.fixes, max_abs, **extra)


@dataclass(frozen=True)
class Target:
    """The shipped pixels to reproduce, the reference's, the budget, and the image screened first."""

    observed: Mapping[str, np.ndarray]
    golden: Mapping[str, np.ndarray]
    tolerance: Tolerance
    screened: str

    @property
    def names(self) -> list[str]:
        return [self.screened, *[n for n in self.observed if n != self.screened]]

    def fits(self, candidate: Candidate, variant: Variant) -> Fit | None:
        """The fit over every golden image (the screened one first, so most candidates cost one image), or
        ``None`` when an image misses or when every image equals the reference's (the identity)."""
        worst, total, moved = 0.0, 0.0, False
        for name in self.names:
            values = candidate.unit(name)
            if values is None:
                return None
            produced = finish(values, variant.how)
            result = fit(self.observed[name], produced, self.tolerance)
            if not result.passed:
                return None
            moved = moved or not fit(self.golden[name], produced, self.tolerance).passed
            worst, total = max(worst, result.max_abs), total + result.mean_abs
        return Fit(True, worst, total / len(self.names)) if moved else None

    def search(self, candidates: Sequence[Candidate], variants: Sequence[Variant]) -> list[PixelFit]:
        found = []
        for candidate in candidates:
            for variant in variants:
                result = self.fits(candidate, variant)
                if result is not None:
                    found.append(PixelFit.of(candidate, variant, result.max_abs))
        return found


def _rebuilds(evidence: Evidence, transform, exif: bool, target: Target, plain: Variant) -> bool:
    """Whether the reference's transform, rebuilt here, reproduces its own golden pixels (else no geometry
    search can be trusted)."""
    image = evidence.image(target.screened, exif_transpose=exif)
    try:
        unit = None if image is None else np.asarray(transform.geometry(image), np.float32)
    except Exception:
        return False
    return unit is not None and fit(target.golden[target.screened], finish(unit, plain.how), target.tolerance).passed


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """What the shipped preprocessing does differently, when a change of it reproduces the failing pixels stage."""
    from parity.detectors.geometry import image_candidates
    from parity.detectors.jpeg import estimate_jpeg
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
    record = fixture.pipeline.get("preprocess", {})
    config = describe_record(record, source="the reference")
    transform = create_transform(config)
    reference = Finish(config.channel_order, config.value_scale, "reference",
                       tuple(float(v) for v in transform.normalize.mean), tuple(float(v) for v in transform.normalize.std))
    exif = bool(record.get("exif_transpose", True))
    tolerance = evidence.tolerance("pixels")
    # the image that moved most decides first: most candidates are then refused after one image
    target = Target(observed, golden, tolerance, max(names, key=lambda n: float(np.abs(observed[n] - golden[n]).max())))
    variants = per_pixel_variants(reference)

    # 1. per-pixel steps on the reference pixels
    units = {n: reference_unit(golden[n], reference) for n in names}
    fits = target.search([Candidate((), "", (), (), units.get)], variants)
    if not fits and (fitted := _fitted_mean_std(target, units, reference)) is not None:
        fits = target.search([Candidate((), "", (), (), units.get)], [fitted])
    # 2. geometry from the images, with at most one per-pixel change
    plain = Variant(reference)
    if not fits and _rebuilds(evidence, transform, exif, target, plain):
        single = [v for v in variants if len(v.changed) == 1]
        fits = target.search(image_candidates(evidence, config, transform, exif, names), [plain, *single])
        # 3. JPEG re-encoding, its quality estimated
        if not fits:
            fits = estimate_jpeg(evidence, target, transform, exif, [plain, *single])
    at, where = evidence.at("preprocess", "backbone"), evidence.where("preprocess", "backbone")
    return {"pixels": [Finding(
        detector="pixels." + "+".join(f.names), stage="pixels", cause=" ".join(f.causes),
        evidence=(f"{f.label} {'comes closest to' if f.approximate else 'reproduces'} the shipped pixels: max abs "
                  f"{number(f.max_abs)} over {len(names)} golden image(s) ({tolerance.describe()}){f.note}"),
        fix="Change the shipped code: " + "; ".join(f.fixes) + at, where=where, max_abs=f.max_abs)
        for f in sorted(fits, key=lambda f: (len(f.names), f.max_abs))]} if fits else {}
