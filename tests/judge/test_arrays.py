"""compare_arrays: element metrics, the atol that would pass, shapes, non-finite values, cosine, worst rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from parity.judge.arrays import compare_arrays
from parity.results import SampleError, Tolerance

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=150)

# Dyadic values: every difference and rtol * |b| below is exact in binary floating point.
CANDIDATE = np.array([[0.0, 4.5], [2.0, -1.0]])
REFERENCE = np.array([[1.0, 4.0], [2.0, -2.0]])


def _compare(candidate, reference, atol=0.0, rtol=0.0, **kwargs):
    return compare_arrays(np.asarray(candidate), np.asarray(reference), tolerance=Tolerance(atol, rtol), **kwargs)


def test_element_metrics_on_a_hand_made_pair():
    c = _compare(CANDIDATE, REFERENCE, rtol=0.25)
    assert (c.max_abs, c.mean_abs, c.max_rel) == (1.0, 0.625, 1.0)
    # |a - b| = [1, .5, 0, 1] against atol + rtol * |b| = [.25, 1, .5, .5]: two elements fail.
    assert (c.mismatched, c.total, c.nonfinite) == (2, 4, 0)
    assert c.required_atol == 0.75
    assert not c


def test_required_atol_is_the_smallest_atol_that_passes():
    required = _compare(CANDIDATE, REFERENCE, rtol=0.25).required_atol
    assert _compare(CANDIDATE, REFERENCE, atol=required, rtol=0.25).passed
    below = _compare(CANDIDATE, REFERENCE, atol=np.nextafter(required, 0.0), rtol=0.25)
    assert not below.passed
    assert below.mismatched == 1


def test_required_atol_passes_when_the_subtraction_rounds_down():
    """1.3 - 0.1 * 1.3 rounds to 1.17, yet 1.17 + 0.13 < 1.3 in float64: the reported atol fails."""
    required = _compare([[0.0]], [[1.3]], rtol=0.1).required_atol
    assert _compare([[0.0]], [[1.3]], atol=required, rtol=0.1).passed


def test_relative_error_is_taken_against_the_reference():
    assert _compare([[3.0]], [[2.0]]).max_rel == 0.5
    assert _compare([[2.0]], [[3.0]]).max_rel == pytest.approx(1 / 3)


@pytest.mark.parametrize(("candidate_shape", "reference_shape"), [((4, 1, 8), (4, 8)), ((4, 8), (4, 1, 8))])
def test_shape_mismatch_never_broadcasts(candidate_shape, reference_shape):
    c = compare_arrays(np.ones(candidate_shape), np.ones(reference_shape), tolerance=Tolerance(1e9, 1e9))
    assert not c.shapes_match
    assert not c.passed
    assert (c.candidate_shape, c.reference_shape) == (candidate_shape, reference_shape)
    assert c.total == 0


def test_nan_and_inf_in_the_candidate_fail_and_are_counted():
    c = _compare([[1.0, np.nan], [np.inf, 2.0], [-np.inf, 3.0]], np.ones((3, 2)), atol=1e9)
    assert c.nonfinite == 3
    assert c.mismatched == 3
    assert c.max_abs == 2.0  # taken over the finite differences only
    assert not c.passed


def test_per_row_cosine():
    c = _compare([[3.0, 4.0], [1.0, 0.0], [-1.0, 0.0]], [[6.0, 8.0], [0.0, 1.0], [1.0, 0.0]],
                 atol=100.0, cosine=True, names=["same direction", "orthogonal", "opposite"])
    assert {s.name: s.cosine for s in c.worst} == pytest.approx(
        {"same direction": 1.0, "orthogonal": 0.0, "opposite": -1.0})
    assert c.min_cosine == pytest.approx(-1.0)
    assert c.mismatched == 0


def test_cosine_of_zero_rows():
    """Two zero rows are identical; a zero row against a non-zero one shares no direction."""
    assert _compare([[0.0, 0.0]], [[0.0, 0.0]], cosine=True).min_cosine == 1.0
    assert _compare([[0.0, 0.0]], [[1.0, 0.0]], cosine=True).min_cosine == 0.0


def test_min_cosine_floor_fails_rows_that_pass_element_wise():
    candidate, reference = np.array([[1.0, 0.1]]), np.array([[1.0, -0.1]])
    loose = Tolerance(atol=1.0, rtol=0.0, min_cosine=0.9)
    strict = Tolerance(atol=1.0, rtol=0.0, min_cosine=0.99)
    assert compare_arrays(candidate, reference, tolerance=loose, cosine=True).passed
    failing = compare_arrays(candidate, reference, tolerance=strict, cosine=True)
    assert failing.mismatched == 0
    assert failing.min_cosine == pytest.approx(0.99 / 1.01)
    assert not failing.passed


def test_worst_samples_are_named_and_ordered_by_max_abs():
    reference = np.zeros((5, 2))
    candidate = np.array([[0.1, 0.0], [0.0, 0.0], [0.0, -0.5], [0.3, 0.2], [0.05, 0.0]])
    c = _compare(candidate, reference, names=["a.png", "b.png", "c.png", "d.png", "e.png"])
    assert c.worst == (SampleError("c.png", 0.5), SampleError("d.png", 0.3), SampleError("a.png", 0.1))


def test_rows_without_error_are_not_listed_as_worst():
    c = _compare([[1.0], [2.0], [3.5]], [[1.0], [2.0], [3.0]])
    assert c.worst == (SampleError("row 2", 0.5),)


def test_a_non_finite_row_is_the_worst():
    c = _compare([[0.5], [np.nan]], [[0.0], [0.0]], names=["fine", "broken"])
    assert [s.name for s in c.worst] == ["broken", "fine"]
    assert c.worst[0].max_abs == np.inf


def test_names_must_match_the_rows():
    with pytest.raises(ValueError, match="names has 2 entries for 3 rows"):
        _compare(np.zeros((3, 2)), np.zeros((3, 2)), names=["a", "b"])


def test_an_empty_batch_compares_without_error():
    c = _compare(np.zeros((0, 4)), np.zeros((0, 4)), cosine=True)
    assert c.total == 0
    assert c.worst == ()


def _pairs():
    elements = st.floats(-1e3, 1e3, width=32)
    return hnp.array_shapes(min_dims=2, max_dims=2, max_side=5).flatmap(
        lambda shape: st.tuples(hnp.arrays(np.float32, shape, elements=elements),
                                hnp.arrays(np.float32, shape, elements=elements))
    )


@DETERMINISTIC
@given(_pairs())
def test_error_magnitudes_are_symmetric(pair):
    a, b = pair
    forward = compare_arrays(a, b, tolerance=Tolerance(1e-5, 0.0), cosine=True)
    backward = compare_arrays(b, a, tolerance=Tolerance(1e-5, 0.0), cosine=True)
    assert forward.max_abs == backward.max_abs
    assert forward.mean_abs == backward.mean_abs
    assert forward.min_cosine == backward.min_cosine


@DETERMINISTIC
@given(_pairs(), st.floats(0, 10), st.floats(0, 10), st.sampled_from([0.0, 1.3e-6, 1e-2]))
def test_passing_is_monotone_in_atol(pair, atol_1, atol_2, rtol):
    a, b = pair
    small, large = sorted((atol_1, atol_2))
    at_small = compare_arrays(a, b, tolerance=Tolerance(small, rtol))
    at_large = compare_arrays(a, b, tolerance=Tolerance(large, rtol))
    assert at_large.mismatched <= at_small.mismatched
    assert not at_small.passed or at_large.passed


@DETERMINISTIC
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
                  elements=st.floats(-1e3, 1e3, width=32)))
def test_identical_arrays_pass_with_zero_error(array):
    c = compare_arrays(array, array.copy(), tolerance=Tolerance(0.0, 0.0, min_cosine=1 - 1e-9), cosine=True)
    assert c.passed
    assert (c.max_abs, c.mean_abs, c.max_rel, c.required_atol) == (0.0, 0.0, 0.0, 0.0)
    assert (c.mismatched, c.nonfinite, c.worst) == (0, 0, ())


def test_a_subnormal_reference_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = _compare([[1.0]], [[1e-310]])
    assert c.max_rel == np.inf
