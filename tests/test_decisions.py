"""Margin-aware decisions: a flip at a near-tie is reported, a flip outside the noise band fails."""

from __future__ import annotations

import numpy as np
import pytest

from parity.check import run_check
from parity.pipeline import build_pipeline
from parity.fixtures import load_fixture
from parity.results import Status
from tests.conftest import EXAMPLE_FIXTURES

BILINEAR = {"preprocess": {"interpolation": "bilinear"}}


@pytest.fixture(scope="module")
def moved(example_spec):
    """The reference output that the bilinear drift moves most, and by how much."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    pipeline = build_pipeline(example_spec.replace(**BILINEAR))
    got = pipeline.predict([row.image for row in fixture.rows], [row.input_biases for row in fixture.rows]).numpy()
    delta = got - fixture.outputs
    index = np.unravel_index(np.abs(delta).argmax(), delta.shape)
    return float(fixture.outputs[index]), float(delta[index]), f"{fixture.rows[index[0]].name}[{index[1]}]"


def test_flip_of_a_near_tie_is_reported_not_failed(example_spec, moved):
    reference, delta, label = moved
    band = 1e-5  # the float32 outputs budget
    threshold = reference + np.sign(delta) * band / 2  # the reference sits within the band, the candidate crosses
    decisions = run_check(example_spec.replace(**BILINEAR, threshold=threshold)).stage("decisions")
    assert decisions.status is Status.PASS
    assert decisions.decisions.near_ties == (label,) and decisions.decisions.flips == ()
    assert decisions.headline.startswith("0 decision flip(s), 1 near-tie(s)")


def test_flip_outside_the_noise_band_fails(example_spec, moved):
    reference, delta, label = moved
    decisions = run_check(example_spec.replace(**BILINEAR, threshold=reference + delta / 2)).stage("decisions")
    assert decisions.status is Status.FAIL and label in decisions.decisions.flips


def test_clean_candidate_flips_nothing(example_spec):
    decisions = run_check(example_spec).stage("decisions")
    assert decisions.status is Status.PASS and decisions.decisions.flips == decisions.decisions.near_ties == ()


def test_without_a_threshold_the_stage_skips(example_spec):
    assert run_check(example_spec.replace(threshold=None)).stage("decisions").status is Status.SKIP
