"""Embeddings up to a scale: which norm the shipped code added or left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity.explain.detectors import detect
from parity.explain.detectors.embeddings import fit_scale
from parity.results import CandidateRun, Tolerance
from tests.support.judging import judged

BUDGET = Tolerance(atol=1e-5, rtol=1.3e-6, min_cosine=0.99999)


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    """Embeddings as a backbone returns them: not unit-norm, norms that differ by row."""
    return torch.from_numpy(np.random.default_rng(3).normal(0, 0.3, (20, 48)).astype(np.float32))


def test_an_added_l2_norm(raw):
    found = fit_scale(F.normalize(raw, dim=-1).numpy(), raw.numpy(), BUDGET)
    assert found is not None and found.kind == "l2_added" and found.max_abs < 1e-6


def test_a_missing_l2_norm(raw):
    unit = F.normalize(raw, dim=-1)
    found = fit_scale(raw.numpy(), unit.numpy(), BUDGET)
    assert found is not None and found.kind == "l2_missing"


@pytest.mark.parametrize("batch", [4, 20])
def test_a_batch_wide_norm(raw, batch):
    # `x / x.norm()` over each batch the app received
    shipped = torch.cat([chunk / chunk.norm() for chunk in raw.split(batch)]).numpy()
    found = fit_scale(shipped, raw.numpy(), BUDGET)
    assert found is not None and found.kind == "batch_norm" and found.batch == batch


def test_a_batch_wide_norm_of_unit_rows_is_not_called_a_missing_l2(raw):
    unit = F.normalize(raw, dim=-1)
    shipped = torch.cat([chunk / chunk.norm() for chunk in unit.split(5)]).numpy()
    found = fit_scale(shipped, unit.numpy(), BUDGET)
    assert found is not None and found.kind == "batch_norm" and found.batch == 5


def test_a_constant_scale(raw):
    found = fit_scale((raw * 3.0).numpy(), raw.numpy(), BUDGET)
    assert found is not None and found.kind == "scale" and found.factors == (pytest.approx(3.0),)


def test_nothing_that_is_not_a_pure_scale(raw):
    x = raw.numpy()
    assert fit_scale(x, x, BUDGET) is None  # the identity
    assert fit_scale(x + 1e-3, x, BUDGET) is None  # an offset
    assert fit_scale(-x, x, BUDGET) is None  # a sign flip is not a norm
    rotated = x @ np.linalg.qr(np.random.default_rng(0).normal(size=(48, 48)))[0].astype(np.float32)
    assert fit_scale(rotated, x, BUDGET) is None
    assert fit_scale(x[:, :10], x, BUDGET) is None


def test_detect_names_a_batch_wide_norm_and_the_fix(dnn):
    fixture, spec = dnn
    reference = torch.from_numpy(fixture.embeddings)
    shipped = torch.cat([chunk / chunk.norm() for chunk in reference.split(8)]).numpy()
    rows = tuple(range(len(fixture.rows)))
    run = CandidateRun("python", rows=rows, embeddings=shipped, call_sites={"head": "service.py:88 in embed_and_score"})
    stages = judged(run, fixture, spec)
    assert stages["embedding"].comparison.min_cosine > 0.99999  # cosine alone never sees it
    (finding,) = detect(run, fixture, stages, spec)["embedding"]
    assert finding.detector == "embeddings.batch_norm"
    assert "one norm over the whole batch (`x / x.norm()`)" in finding.cause
    assert "each batch of 8 rows" in finding.evidence and "cosine unchanged" in finding.evidence
    assert finding.fix.startswith("Change the shipped code: remove the normalisation")
    assert finding.fix.endswith("(at service.py:88 in embed_and_score)")


def test_an_l2_norm_of_rows_of_equal_length_is_still_an_l2_norm(mlp):
    # clip_mlp's pooled embeddings leave a LayerNorm: every row has norm 8, so L2 is a constant 1/8
    fixture, spec = mlp
    rows = tuple(range(len(fixture.rows)))
    run = CandidateRun("python", rows=rows, embeddings=F.normalize(torch.from_numpy(fixture.embeddings), dim=-1).numpy())
    (finding,) = detect(run, fixture, judged(run, fixture, spec), spec)["embedding"]
    assert finding.detector == "embeddings.l2_added"
    assert finding.fix.startswith("Change the shipped code: pass the backbone's embedding to the head as it is")
