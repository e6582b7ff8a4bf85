"""Image modes the shipped code does not convert, and the shipped image transforms diagnose applies."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from parity.explain.detectors import SHIPPED_IMAGE_TRANSFORMS, detect
from parity.explain.detectors.images import image_modes
from parity.results import CandidateRun
from tests.support.judging import judged


def test_modes_that_failed_and_never_passed():
    modes = {"a": "RGB", "b": "L", "c": "RGBA", "d": "P", "e": "LA", "f": "RGBA"}
    assert image_modes(modes, {"c", "d", "e", "f"}) == (["LA", "P", "RGBA"], ["L", "RGB"])
    assert image_modes(modes, {"c", "a"}) is None  # an RGB image failed too: not the mode
    assert image_modes(modes, {"c"}) is None  # another RGBA image passed
    assert image_modes(modes, {"zz"}) is None  # not a fixture image
    assert image_modes(modes, set()) is None


def _rgba_failures(fixture):
    """What an app that converts only mode L does: RGBA images reach the model with 4 channels."""
    failed = []
    for row in fixture.rows:
        with Image.open(row.image) as image:
            if image.mode == "RGBA":
                failed.append(row.name)
    assert failed
    rows = tuple(i for i, row in enumerate(fixture.rows) if row.name not in failed)
    inputs = {row.name: ((1, 4 if row.name in failed else 3, 336, 336), "torch.float32") for row in fixture.rows}
    errors = tuple((n, "RuntimeError: Given groups=1, weight of size [64, 3, 14, 14], expected input[1, 4, 336, 336] "
                       "to have 3 channels, but got 4 channels instead") for n in failed)
    return failed, rows, inputs, errors


def test_detect_names_the_modes_and_what_reached_the_model(dnn):
    fixture, spec = dnn
    failed, rows, inputs, errors = _rgba_failures(fixture)
    run = CandidateRun("python", rows=rows, outputs=fixture.outputs[list(rows)], sample_errors=errors,
                       model_inputs=inputs, call_sites={"backbone": "app.py:25 in predict"})
    (finding,) = detect(run, fixture, judged(run, fixture, spec), spec)["decode"]
    assert finding.detector == "images.mode"
    assert "RGBA" in finding.cause and "RGB" in finding.cause.replace("RGBA", "")
    # The evidence: how many failed and passed, their modes, and what reached the model from the failures.
    assert f"{len(failed)} sample(s) that failed are all of mode RGBA" in finding.evidence
    assert f"{len(fixture.rows) - len(failed)} that passed are L, RGB" in finding.evidence
    assert "(1, 4, 336, 336) float32" in finding.evidence
    assert finding.fix.startswith("Change the shipped code: ") and '`image.convert("RGB")`' in finding.fix
    assert "`ImageOps.exif_transpose`" in finding.fix and finding.fix.endswith("(at app.py:25 in predict)")


def test_no_mode_finding_when_the_model_got_three_channels(dnn):
    fixture, spec = dnn
    failed, rows, inputs, errors = _rgba_failures(fixture)
    three = {name: ((1, 3, 336, 336), "torch.float32") for name in inputs}
    run = CandidateRun("python", rows=rows, outputs=fixture.outputs[list(rows)], sample_errors=errors,
                       model_inputs=three)
    assert detect(run, fixture, judged(run, fixture, spec), spec) == {}


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), "RGB")


def test_every_shipped_transform_says_cause_and_fix(photo):
    for name, shipped in SHIPPED_IMAGE_TRANSFORMS.items():
        assert shipped.name == name and shipped.cause and shipped.fix.startswith("Change the shipped code: ")
        out = shipped.apply(photo, (32, 48))
        assert out.mode == "RGB"
        assert out.size == ((48, 32) if name.startswith("squash") else photo.size)
    assert not SHIPPED_IMAGE_TRANSFORMS["no_exif"].exif_transpose


def test_shipped_transforms_do_what_they_say(photo):
    array = np.asarray(photo)
    assert (np.asarray(SHIPPED_IMAGE_TRANSFORMS["bgr"].apply(photo, (0, 0))) == array[..., ::-1]).all()
    gray = np.asarray(SHIPPED_IMAGE_TRANSFORMS["grayscale"].apply(photo, (0, 0)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    errors = {q: np.abs(np.asarray(SHIPPED_IMAGE_TRANSFORMS[f"jpeg_q{q}"].apply(photo, (0, 0)), float) - array).mean()
              for q in (50, 95)}
    assert 0 < errors[95] < errors[50]


def test_without_model_inputs_the_errors_must_speak_of_channels(dnn):
    fixture, spec = dnn
    failed, rows, _, errors = _rgba_failures(fixture)
    unseen = CandidateRun("python", rows=rows, outputs=fixture.outputs[list(rows)], sample_errors=errors)
    (finding,) = detect(unseen, fixture, judged(unseen, fixture, spec), spec)["decode"]
    assert finding.detector == "images.mode"
    other = CandidateRun("python", rows=rows, outputs=fixture.outputs[list(rows)],
                         sample_errors=tuple((n, "TimeoutError: upstream took too long") for n in failed))
    assert detect(other, fixture, judged(other, fixture, spec), spec) == {}
