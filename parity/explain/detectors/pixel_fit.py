"""What the pixel detectors share: the per-pixel steps after the geometry, candidate changes and their fits.

Used by `parity.explain.detectors.pixels` (the family's findings), `parity.explain.detectors.geometry` and
`parity.explain.detectors.jpeg`; how the three passes run is said in `parity.explain.detectors.pixels`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity.explain.detectors.evidence import Evidence, Fit, fit
from parity.results import Tolerance
from parity.spec import MEAN_STD_PRESETS

__all__ = ["Finish", "Variant", "Candidate", "PixelFit", "Target", "finish", "reference_unit", "per_pixel_variants",
           "fitted_mean_std", "rebuilds"]


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


def fitted_mean_std(target: Target, units: Mapping[str, np.ndarray], reference: Finish) -> Variant | None:
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


def rebuilds(evidence: Evidence, transform, exif: bool, target: Target, plain: Variant) -> bool:
    """Whether the reference's transform, rebuilt here, reproduces its own golden pixels (else no geometry
    search can be trusted)."""
    image = evidence.image(target.screened, exif_transpose=exif)
    try:
        unit = None if image is None else np.asarray(transform.geometry(image), np.float32)
    except Exception:
        return False
    return unit is not None and fit(target.golden[target.screened], finish(unit, plain.how), target.tolerance).passed


