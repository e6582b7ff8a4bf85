"""Margin-aware decisions: a flip at a near-tie is reported, a flip outside the noise band fails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from parity.check import run_check
from parity.decisions import argmax_flips, threshold_flips, verification_flips
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
    decisions = run_check(example_spec.replace(**BILINEAR, decisions={"threshold": threshold})).stage("decisions")
    assert decisions.status is Status.PASS
    assert decisions.decisions[0].near_ties == (label,) and decisions.decisions[0].flips == ()
    assert decisions.headline.startswith("threshold: 0 flip(s), 1 near-tie(s)")


def test_flip_outside_the_noise_band_fails(example_spec, moved):
    reference, delta, label = moved
    decisions = run_check(example_spec.replace(**BILINEAR, decisions={"threshold": reference + delta / 2})).stage("decisions")
    assert decisions.status is Status.FAIL and label in decisions.decisions[0].flips


def test_clean_candidate_flips_nothing(example_spec):
    decisions = run_check(example_spec).stage("decisions")
    assert decisions.status is Status.PASS and decisions.decisions[0].flips == decisions.decisions[0].near_ties == ()


def test_without_a_threshold_the_stage_skips(example_spec):
    assert run_check(example_spec.replace(decisions={"threshold": None})).stage("decisions").status is Status.SKIP


# -- properties of the decision metrics --------------------------------------------------------

logits = st.integers(2, 6).flatmap(lambda n: st.integers(2, 5).flatmap(
    lambda k: arrays(np.float32, (n, k), elements=st.floats(-10, 10, width=32))))
noise = st.floats(0, 1e-3)


@settings(max_examples=60, deadline=None)
@given(logits, noise, st.randoms(use_true_random=False))
def test_decision_metrics_see_no_flip_against_themselves_and_ignore_row_order(ref, scale, rnd):
    names = [f"s{i}" for i in range(len(ref))]
    for flips in (argmax_flips(ref, ref, 0.0, names), threshold_flips(0.0, ref, ref, 0.0, names),
                  verification_flips(0.5, ref, ref, 0.0, names)):
        assert flips.flips == flips.near_ties == ()
    got = ref + np.float32(scale) * np.sign(ref)
    order = list(range(len(ref)))
    rnd.shuffle(order)
    for metric in (lambda g, r, n: argmax_flips(g, r, 1e-4, n), lambda g, r, n: verification_flips(0.3, g, r, 1e-4, n)):
        a, b = metric(got, ref, names), metric(got[order], ref[order], [names[i] for i in order])
        assert len(a.flips) == len(b.flips) and len(a.near_ties) == len(b.near_ties) and a.total == b.total


@settings(max_examples=60, deadline=None)
@given(logits, st.floats(0, 1))
def test_a_wider_band_turns_flips_into_near_ties_never_the_reverse(ref, band):
    names = [f"s{i}" for i in range(len(ref))]
    got = ref[:, ::-1].copy()  # reversed logits: top-1 moves wherever there is a unique maximum
    narrow, wide = argmax_flips(got, ref, band, names), argmax_flips(got, ref, band * 2 + 0.1, names)
    assert set(wide.flips) <= set(narrow.flips)
    assert len(wide.flips) + len(wide.near_ties) == len(narrow.flips) + len(narrow.near_ties)
    assert 0.0 <= narrow.max_probability_error <= 1.0
