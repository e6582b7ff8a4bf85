"""Which budget judges a stage: the spec's, else a calibration at the candidate's dtype, else the emulated
reference's, else the default for the reference's precision; malformed calibrations are refused, never used.

The fixtures here are made by hand (a manifest and a few arrays), so no model runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from parity.errors import FixtureError
from parity.judge.tolerance import (
    FLOOR,
    MAX_COSINE_GAP,
    MAX_MARGIN,
    MAX_RELATIVE_NOISE,
    calibrated_tolerance,
    reference_dtype,
    stage_tolerance,
)
from parity.results import Tolerance
from parity.spec import default_tolerance
from parity.store.fixtures import Fixture, FixtureRow

SPEC_BUDGET = Tolerance(atol=0.25, rtol=0.0, min_cosine=0.9, origin="spec")
EMULATED = Tolerance(atol=0.003, rtol=0.0, min_cosine=0.9999, origin="emulated TF32 reference")


def _entry(max_abs: float = 2e-4, min_cosine: float | None = 0.99999, margin: float = 4.0, **extra) -> dict:
    """A well-formed calibration entry for the embedding stage."""
    noise = {"max_abs": max_abs, "scale": 3.0}
    if min_cosine is not None:
        noise["min_cosine"] = min_cosine
    return {"noise": {"embedding": noise}, "margin": margin, "runs": ["batch 1", "batch 7", "threads 1"],
            "device": "cpu", **extra}


def _fixture(tmp_path: Path, *, calibration: dict | None = None, reference: str = "float32") -> Fixture:
    manifest = {"pipeline": {"runtime": {"dtype": reference}}}
    if calibration is not None:
        manifest["calibration"] = calibration
    rows = (FixtureRow("a.png", tmp_path / "a.png", (0,)),)
    return Fixture(root=tmp_path, manifest=manifest, rows=rows, embeddings=np.zeros((1, 4), np.float32),
                   outputs=np.zeros((1, 2), np.float32))


def _never(*args):
    raise AssertionError(f"the emulated reference was asked for a budget a higher source gives: {args}")


# -- precedence ----------------------------------------------------------------------------------------------

def test_the_default_is_the_reference_precisions_when_nothing_else_says(example_spec, tmp_path):
    assert stage_tolerance(example_spec, _fixture(tmp_path), "embedding") == default_tolerance("embedding", "float32")
    # A bfloat16 reference earns bfloat16's wider default, whatever the candidate runs at.
    wide = stage_tolerance(example_spec, _fixture(tmp_path, reference="bfloat16"), "outputs")
    assert wide == default_tolerance("outputs", "bfloat16")
    assert wide.atol > default_tolerance("outputs", "float32").atol


@pytest.mark.parametrize("recorded, dtype", [("bfloat16", "bfloat16"), ("float64", "float64"), ("int8", "float32")])
def test_the_reference_dtype_is_what_the_fixture_recorded_or_float32(tmp_path, recorded, dtype):
    assert reference_dtype(_fixture(tmp_path, reference=recorded)) == dtype
    assert reference_dtype(replace(_fixture(tmp_path), manifest={})) == "float32"  # a fixture that does not say


def test_an_emulated_reference_budget_comes_before_the_default(example_spec, tmp_path):
    asked = []

    def emulated(spec, fixture, stage):
        asked.append(stage)
        return EMULATED if stage == "embedding" else None

    fixture = _fixture(tmp_path)
    assert stage_tolerance(example_spec, fixture, "embedding", reference=emulated) is EMULATED
    # None from the emulation means "no other numerics": the default applies.
    assert stage_tolerance(example_spec, fixture, "head", reference=emulated) == default_tolerance("head", "float32")
    assert asked == ["embedding", "head"]


def test_a_calibration_at_the_candidates_dtype_comes_before_the_emulated_reference(example_spec, tmp_path):
    fixture = _fixture(tmp_path, calibration={"float32": _entry(max_abs=2e-4, min_cosine=0.99999, margin=4.0)})
    budget = stage_tolerance(example_spec, fixture, "embedding", reference=_never)
    assert math.isclose(budget.atol, 8e-4) and budget.rtol == 0.0  # noise x margin
    assert math.isclose(budget.min_cosine, 1 - 4 * 1e-5)
    assert "cpu/float32" in budget.origin and "3 runs" in budget.origin and "x4 margin" in budget.origin


def test_a_calibration_holds_only_for_its_dtype_and_its_stages(example_spec, tmp_path):
    at_half = _fixture(tmp_path, calibration={"float16": _entry()})
    assert stage_tolerance(example_spec, at_half, "embedding") == default_tolerance("embedding", "float32")
    half = example_spec.replace(runtime={"dtype": "float16"})
    assert stage_tolerance(half, at_half, "embedding").origin.startswith("calibrated on cpu/float16")
    # The entry calibrates the embedding stage only: the head falls through to the next source.
    assert stage_tolerance(half, at_half, "head", reference=lambda *a: EMULATED) is EMULATED


def test_the_spec_budget_comes_before_everything(example_spec, tmp_path):
    fixture = _fixture(tmp_path, calibration={"float32": _entry()})
    spec = example_spec.replace(tolerances={"embedding": SPEC_BUDGET})
    assert stage_tolerance(spec, fixture, "embedding", reference=_never) is SPEC_BUDGET
    # Only the stage it names: the others still read the calibration or the default.
    assert stage_tolerance(spec, fixture, "outputs") == default_tolerance("outputs", "float32")


def test_a_calibrated_budget_is_never_below_the_floor(tmp_path):
    budget = calibrated_tolerance({"calibration": {"float32": _entry(max_abs=0.0, min_cosine=1.0)}},
                                  "embedding", "float32")
    assert budget.atol == FLOOR["atol"]
    assert budget.min_cosine == 1.0 - FLOOR["cosine_gap"]


def test_no_calibration_or_an_empty_one_is_none():
    assert calibrated_tolerance({}, "embedding", "float32") is None
    assert calibrated_tolerance({"calibration": {"float32": {}}}, "embedding", "float32") is None


# -- malformed calibration entries are refused, naming what is wrong ---------------------------------------------

def _with(change) -> dict:
    entry = copy.deepcopy(_entry())
    change(entry)
    return entry


MALFORMED = {
    "not an object": ("noise", ["a list"]),
    "no noise": ("noise", _with(lambda e: e.pop("noise"))),
    "stage noise not an object": ("noise for embedding", _with(lambda e: e["noise"].update(embedding=0.1))),
    "margin below 1": ("margin", _with(lambda e: e.update(margin=0.5))),
    "margin above the cap": ("margin", _with(lambda e: e.update(margin=MAX_MARGIN * 2))),
    "margin a boolean": ("margin", _with(lambda e: e.update(margin=True))),
    "margin missing": ("margin", _with(lambda e: e.pop("margin"))),
    "max_abs NaN": ("embedding max_abs", _with(lambda e: e["noise"]["embedding"].update(max_abs=float("nan")))),
    "max_abs negative": ("embedding max_abs", _with(lambda e: e["noise"]["embedding"].update(max_abs=-1e-4))),
    "max_abs a string": ("embedding max_abs", _with(lambda e: e["noise"]["embedding"].update(max_abs="1e-4"))),
    "min_cosine above 1": ("embedding min_cosine", _with(lambda e: e["noise"]["embedding"].update(min_cosine=1.5))),
    "scale infinite": ("embedding scale", _with(lambda e: e["noise"]["embedding"].update(scale=float("inf")))),
    "runs missing": ("runs", _with(lambda e: e.pop("runs"))),
    "runs not strings": ("runs", _with(lambda e: e.update(runs=[1, 2]))),
    "device missing": ("device", _with(lambda e: e.pop("device"))),
}


@pytest.mark.parametrize("field, entry", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_calibration_entry_is_refused_naming_the_field(example_spec, tmp_path, field, entry):
    with pytest.raises(FixtureError) as raised:
        stage_tolerance(example_spec, _fixture(tmp_path, calibration={"float32": entry}), "embedding")
    message = str(raised.value)
    assert message.startswith("manifest: ") and field in message


def test_a_calibration_that_is_not_an_object_is_refused(example_spec, tmp_path):
    with pytest.raises(FixtureError, match="'calibration' must be an object"):
        stage_tolerance(example_spec, _fixture(tmp_path, calibration=["float32"]), "embedding")


def test_a_budget_too_large_to_be_noise_is_refused_with_its_numbers(tmp_path):
    """Noise x margin above MAX_RELATIVE_NOISE of the reference's scale is another pipeline, not noise."""
    scale = 3.0
    too_wide = _entry(max_abs=scale * MAX_RELATIVE_NOISE, margin=2.0)  # atol 0.3 > 0.05 x 3 = 0.15
    with pytest.raises(FixtureError) as raised:
        calibrated_tolerance({"calibration": {"float32": too_wide}}, "embedding", "float32")
    message = str(raised.value)
    assert "embedding" in message and "atol 0.3" in message and "0.15" in message
    # Just inside the limit is accepted.
    inside = _entry(max_abs=scale * MAX_RELATIVE_NOISE / 2.0 * 0.99, margin=2.0)
    assert calibrated_tolerance({"calibration": {"float32": inside}}, "embedding", "float32").atol < 0.15


def test_a_cosine_gap_too_large_to_be_noise_is_refused(tmp_path):
    gap = MAX_COSINE_GAP * 2 / 4.0  # x4 margin: twice the allowed gap
    with pytest.raises(FixtureError, match=f"cosine gap at most {MAX_COSINE_GAP:g}"):
        calibrated_tolerance({"calibration": {"float32": _entry(min_cosine=1.0 - gap)}}, "embedding", "float32")
