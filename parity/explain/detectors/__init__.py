"""Detectors: named explanations of a failing stage, each tested against what the runner observed.

A detector transforms the reference (the fixture) the way a shipped app, handler or service
commonly departs from it, and names the cause only when that transform reproduces the
candidate's numbers within the stage's budget. One module per family:

- `images`: image modes the shipped code does not convert; the PIL changes services commonly make;
- `pixels`: channel order, value scale, mean/std, interpolation, antialias, resize backend,
  crop_pct, squash, EXIF, grayscale, JPEG re-encoding (quality estimated);
- `head_inputs`: input_biases columns re-ordered or re-coded, the dtype, modules in training mode;
- `embeddings`: an L2 norm added or left out, a batch-wide norm, a constant scale;
- `outputs`: sigmoid, softmax, log-softmax, logit, scale, temperature (`fit_postprocess`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from parity.explain.detectors import embeddings, head_inputs, images, outputs, pixels
from parity.explain.detectors.evidence import Evidence
from parity.explain.detectors.images import SHIPPED_IMAGE_TRANSFORMS, ShippedTransform
from parity.explain.detectors.outputs import apply_postprocess, fit_postprocess
from parity.store.fixtures import Fixture
from parity.results import CandidateRun, Finding, StageResult
from parity.spec import Spec

__all__ = ["detect", "fit_postprocess", "apply_postprocess", "SHIPPED_IMAGE_TRANSFORMS", "ShippedTransform",
           "FAMILIES"]

# In order of specificity: a finding earlier in this list is listed first on its stage.
FAMILIES: tuple[tuple[str, Callable[[Evidence], dict[str, list[Finding]]]], ...] = (
    ("head_inputs", head_inputs.findings),
    ("images", images.findings),
    ("pixels", pixels.findings),
    ("embeddings", embeddings.findings),
    ("outputs", outputs.findings),
)


def detect(run: CandidateRun, fixture: Fixture, stages: Mapping[str, StageResult],
           spec: Spec) -> dict[str, tuple[Finding, ...]]:
    """What each failing stage's detectors reproduced: stage -> findings, most specific first.

    Only failing stages appear, and only with findings. Never raises: a detector that cannot run
    on this evidence (a missing image, an odd shape, a library that cannot rebuild the
    preprocessing) is silent, since a wrong explanation costs a user more than none.
    """
    evidence = Evidence(run, fixture, spec, stages)
    found: dict[str, list[Finding]] = {}
    for _, family in FAMILIES:
        try:
            produced = family(evidence)
        except Exception:  # odd input for this family: it has nothing to say
            continue
        for stage, items in produced.items():
            if evidence.failing(stage):
                found.setdefault(stage, []).extend(items)
    return {stage: tuple(items) for stage, items in found.items() if items}
