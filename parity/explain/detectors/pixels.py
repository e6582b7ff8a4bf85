"""Golden pixels under a change of preprocessing: what the shipped code's transform does differently.

Three passes, cheapest first, stopping at the first that reproduces the shipped pixels:

1. per-pixel steps on the reference pixels themselves: channel order, 0-255 values, every known
   mean/std and none (the reference pixels un-normalised with the reference's own mean/std), up to
   two at once, then a fitted per-channel mean/std;
2. geometry re-run from each fixture image (`parity.explain.detectors.geometry`): the reference's
   `PreprocessConfig` with one field changed, or a shipped image transform before it, each also
   with one per-pixel change (BGR + squash);
3. JPEG re-encoding, its quality estimated (`parity.explain.detectors.jpeg`).

A change is named only when it reproduces the shipped pixels within the pixels budget on every
golden image and moves at least one of them away from the reference (never the identity).
"""

from __future__ import annotations

import numpy as np

from parity.explain.detectors.evidence import Evidence, number
from parity.explain.detectors.geometry import image_candidates
from parity.explain.detectors.jpeg import estimate_jpeg
from parity.explain.detectors.pixel_fit import (Candidate, Finish, PixelFit, Target, Variant, finish, fitted_mean_std,
                                        per_pixel_variants, rebuilds, reference_unit)
from parity.libraries import create_transform, describe_record
from parity.results import Finding

__all__ = ["Finish", "Variant", "Candidate", "PixelFit", "Target", "finish", "reference_unit", "per_pixel_variants",
           "findings"]


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """What the shipped preprocessing does differently, when a change of it reproduces the failing pixels stage."""
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
    if not fits and (fitted := fitted_mean_std(target, units, reference)) is not None:
        fits = target.search([Candidate((), "", (), (), units.get)], [fitted])
    # 2. geometry from the images, with at most one per-pixel change
    plain = Variant(reference)
    if not fits and rebuilds(evidence, transform, exif, target, plain):
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
