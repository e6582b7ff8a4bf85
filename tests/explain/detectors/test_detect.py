"""`detect` as the explainer calls it: nothing on a clean run, never the identity, never a raise."""

from __future__ import annotations

import numpy as np
import pytest

from parity.judge.stages import STAGE_ORDER
from parity.explain.detectors import detect
from parity.results import CandidateRun
from tests.support.judging import judged


def test_a_clean_run_of_the_spec_pipeline_has_no_findings(dnn):
    from parity.runners import run_candidate

    fixture, spec = dnn
    run = run_candidate(spec, fixture)
    stages = judged(run, fixture, spec)
    assert all(stages[s] for s in STAGE_ORDER)
    assert detect(run, fixture, stages, spec) == {}


def _mirror(fixture) -> CandidateRun:
    """A candidate that observed exactly the reference, at every stage a detector reads."""
    rows = tuple(range(len(fixture.rows)))
    return CandidateRun(
        "python", rows=rows, pixels=dict(fixture.golden_pixels), embeddings=fixture.embeddings.copy(),
        head_outputs=fixture.outputs.copy(), outputs=fixture.outputs.copy(),
        head_inputs={row.name: np.array(row.input_biases) for row in fixture.rows},
        model_inputs={row.name: ((1, 3, 336, 336), "torch.float32") for row in fixture.rows},
        dtypes={"backbone": "float32", "head": "float32"}, call_sites={"head": "app.py:1 in f"})


@pytest.mark.parametrize("which", ["dnn", "mlp"])
def test_the_identity_is_never_a_cause(request, which):
    """Every stage forced to FAIL on values equal to the reference: no detector may claim them."""
    fixture, spec = request.getfixturevalue(which)
    run = _mirror(fixture)
    stages = judged(run, fixture, spec, failing=("decode", "pixels", "embedding", "head", "outputs"))
    assert detect(run, fixture, stages, spec) == {}


@pytest.mark.parametrize("odd", [
    dict(pixels={"chelsea.png": np.zeros((4, 7))}),
    dict(pixels={"chelsea.png": np.full((3, 336, 336), np.nan, np.float32)}),
    dict(embeddings=np.zeros(5), rows=(0,)),
    dict(outputs=np.full((17, 5), np.inf), rows=tuple(range(17))),
    dict(head_inputs={"chelsea.png": "a, b"}, sample_errors=(("chelsea.png", "IndexError: index out of range"),)),
    dict(model_inputs={"logo.png": "?"}, sample_errors=(("logo.png", "boom"),)),
    dict(module_states={"head": (("x", "BatchNorm1d"),)}, dtypes={"head": object()}),
])
def test_odd_records_never_raise(dnn, odd):
    fixture, spec = dnn
    run = CandidateRun("python", **odd)
    stages = judged(run, fixture, spec, failing=("decode", "pixels", "embedding", "head", "outputs"))
    found = detect(run, fixture, stages, spec)
    assert isinstance(found, dict)
    assert all(stages[s].status.value == "FAIL" for s in found)
