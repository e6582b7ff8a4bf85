"""The gate, the matrix and diagnosis share one extraction function and one budget policy."""

from __future__ import annotations

import numpy as np
import pytest

from parity.commands.check import run_check
from parity.commands.diagnose import _Prober
from parity.store.fixtures import load_fixture
from parity.results import Status, Tolerance
from tests.support.drifts import DRIFTS


def test_the_matrix_deployment_cell_computes_the_gates_embeddings_bit_for_bit(example_spec):
    """Same configuration, same machine, same process: the two paths run the same code, so the bits agree."""
    from parity.store.images import load_image
    from parity.model.pipeline import build_pipeline
    from parity.runners import run_candidate
    from parity.commands.matrix import _Engine, base_values, expand_matrix, resolve_data_config

    spec = example_spec.replace(runtime={"batch_size": 3})  # a ragged last batch on both paths
    fixture = load_fixture(spec.fixture_root())
    gate = run_candidate(spec, fixture, device="cpu").embeddings

    engine = _Engine(build_pipeline(spec, device="cpu", fingerprints=False), spec.runtime.batch_size)
    engine.load([load_image(row.image, exif_transpose=True) for row in fixture.rows])
    values = base_values(spec, resolve_data_config(spec), device="cpu")
    (deployment,) = [c for c in expand_matrix(spec, {"extract": ["pre_logits", "mean_tokens"]}) if c.deployment]
    assert dict(deployment.values) == values
    matrix = engine.embeddings(values, ["pre_logits", "mean_tokens"])
    assert gate.dtype == matrix["pre_logits"].dtype == np.float32
    assert np.array_equal(matrix["pre_logits"], gate)
    assert not np.array_equal(matrix["mean_tokens"], gate)


LOOSE = {"embedding": Tolerance(atol=0.2, rtol=0.0, min_cosine=0.9, origin="spec"),
         "head": Tolerance(atol=0.2, rtol=0.0, origin="spec"), "outputs": Tolerance(atol=0.2, rtol=0.0, origin="spec")}
CASES = {name: change for name, (change, _) in DRIFTS.items()}
# The spec's own budgets decide: loose enough, a half-precision candidate passes both.
CASES["float16-with-a-loose-budget"] = {"runtime": {"dtype": "float16"}, "tolerances": LOOSE}
CASES["interpolation-with-a-loose-budget"] = {"preprocess": {"interpolation": "bilinear"}, "tolerances": LOOSE}
CASES["clean"] = {}


@pytest.mark.parametrize("change", CASES.values(), ids=CASES.keys())
def test_a_probe_diagnosis_calls_ok_is_a_candidate_the_gate_passes(example_spec, change):
    candidate = example_spec.replace(**change)
    fixture = load_fixture(candidate.fixture_root())
    probe = _Prober(fixture, range(len(fixture.rows)), "cpu").score(candidate)
    report = run_check(candidate)
    judged = [report.stage(s).status for s in ("embedding", "outputs")]
    assert probe["ok"] == all(s is not Status.FAIL for s in judged), (probe, [str(s) for s in judged])
    if probe["ok"]:
        assert report.passed or report.first_failure.stage == "pixels", report.first_failure
