"""Outputs under a post-processing: each fit named with its parameters, and never the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.explain.detectors import detect
from parity.explain.detectors.outputs import apply_postprocess, fit_postprocess
from parity.results import CandidateRun, Tolerance
from tests.support.judging import judged

BUDGET = Tolerance(atol=1e-5, rtol=1.3e-6)  # the float32 default


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return (np.random.default_rng(7).normal(0, 4, (24, 6))).astype(np.float32)


def shipped(fn, x: np.ndarray) -> np.ndarray:
    """What an app's own torch code returns, in float32."""
    return fn(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name, fn", [
    ("sigmoid", torch.sigmoid),
    ("softmax", lambda t: torch.softmax(t, dim=-1)),
    ("log_softmax", lambda t: torch.log_softmax(t, dim=-1)),
    ("scale", lambda t: t * 0.25),
])
def test_each_post_processing_is_named(logits, name, fn):
    found = fit_postprocess(shipped(fn, logits), logits, BUDGET)
    assert found is not None and found[0] == name
    assert found[2] < 1e-5
    if name == "scale":
        assert found[1]["scale"] == pytest.approx(0.25, rel=1e-6)


def test_logit_when_the_reference_outputs_probabilities(logits):
    probabilities = shipped(torch.sigmoid, logits * 0.3)
    found = fit_postprocess(shipped(torch.logit, torch.from_numpy(probabilities).numpy()), probabilities, BUDGET)
    assert found is not None and found[0] == "logit"


@pytest.mark.parametrize("name, fn", [
    ("softmax_temperature", lambda t: torch.softmax(t / 2.5, dim=-1)),
    ("sigmoid_temperature", lambda t: torch.sigmoid(t / 0.7)),
])
def test_temperature_is_fitted(logits, name, fn):
    found = fit_postprocess(shipped(fn, logits), logits, BUDGET)
    assert found is not None and found[0] == name
    assert found[1]["temperature"] == pytest.approx(2.5 if "softmax" in name else 0.7, rel=1e-4)
    assert np.abs(apply_postprocess(*found[:2], logits) - shipped(fn, logits)).max() < 1e-5


def test_no_identity_and_no_rough_fit(logits):
    assert fit_postprocess(logits, logits, BUDGET) is None  # scale 1, T = 1: the identity of each family
    noisy = logits + np.random.default_rng(1).normal(0, 1e-3, logits.shape).astype(np.float32)
    assert fit_postprocess(noisy, logits, BUDGET) is None  # a scale ~1 does not explain noise
    # a sigmoid of something else is close in places but not within budget
    other = shipped(torch.sigmoid, logits + 0.01)
    assert fit_postprocess(other, logits, BUDGET) is None
    assert fit_postprocess(logits[:, :3], logits, BUDGET) is None  # shapes differ
    assert fit_postprocess(np.full_like(logits, np.nan), logits, BUDGET) is None


def test_detect_names_a_sigmoid_after_the_head_with_its_call_site(dnn):
    fixture, spec = dnn
    rows = tuple(range(len(fixture.rows)))
    run = CandidateRun("python", rows=rows, outputs=shipped(torch.sigmoid, fixture.outputs),
                       head_outputs=fixture.outputs.copy(), call_sites={"head": "deploy/app.py:42 in predict"})
    found = detect(run, fixture, judged(run, fixture, spec), spec)
    assert list(found) == ["outputs"]  # the head itself passes: the change is after it
    (finding,) = found["outputs"]
    assert finding.detector == "outputs.sigmoid"
    assert "sigmoid after the head" in finding.cause and "logits" in finding.cause
    assert finding.fix.startswith("Change the shipped code: ") and "without a sigmoid" in finding.fix
    assert "(at deploy/app.py:42 in predict)" in finding.fix
    assert finding.where == "deploy/app.py:42 in predict"
    assert finding.max_abs < 1e-5 and "max abs" in finding.evidence
