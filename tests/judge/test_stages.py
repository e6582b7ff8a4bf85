"""`compare_run` on records and fixtures made by hand: the budgets passed in are what judge each stage, a stage the
record did not observe is SKIP (never PASS), and ``shipped_outputs`` stands in for the reference's outputs.

No model runs here: the fixture is four rows of seeded arrays, the record those arrays moved on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.judge.stages import STAGE_ORDER, compare_run
from parity.results import CandidateRun, Status, Tolerance
from parity.store.fixtures import Fixture, FixtureRow

NAMES = ("a.png", "b.png", "c.png", "d.png")
ROWS = tuple(range(len(NAMES)))
COMPARED = ("pixels", "embedding", "head", "outputs")
LOOSE = Tolerance(atol=0.1, rtol=0.0, origin="loose")
TIGHT = Tolerance(atol=1e-3, rtol=0.0, origin="tight")
MOVE = 0.01  # what the record adds to every value: inside LOOSE, outside TIGHT


@pytest.fixture
def fixture(tmp_path: Path) -> Fixture:
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(len(NAMES), 3))
    outputs = (np.sign(raw) * (0.5 + np.abs(raw))).astype(np.float32)  # every output 0.5 or more from 0
    return Fixture(root=tmp_path, manifest={}, rows=tuple(FixtureRow(n, tmp_path / n, (0,)) for n in NAMES),
                   embeddings=rng.normal(size=(len(NAMES), 8)).astype(np.float32), outputs=outputs,
                   golden_pixels={NAMES[0]: rng.random((3, 4, 4), dtype=np.float32)})


def _moved(fixture: Fixture, runner: str = "test") -> CandidateRun:
    """Every stage observed, every value MOVE from the fixture's."""
    return CandidateRun(runner, rows=ROWS, pixels={n: p + MOVE for n, p in fixture.golden_pixels.items()},
                        embeddings=fixture.embeddings + MOVE, head_outputs=fixture.outputs + MOVE,
                        outputs=fixture.outputs + MOVE)


def test_every_stage_is_reported_in_data_order(example_spec, fixture):
    stages = compare_run(_moved(fixture), fixture, example_spec, budgets=dict.fromkeys(COMPARED, LOOSE))
    assert list(stages) == list(STAGE_ORDER)
    assert {name: s.status for name, s in stages.items()} == {
        "load": Status.PASS, "weights": Status.SKIP, "decode": Status.PASS, "pixels": Status.PASS,
        "embedding": Status.PASS, "head": Status.PASS, "outputs": Status.PASS, "decisions": Status.PASS}


@pytest.mark.parametrize("tight", COMPARED)
def test_the_budget_passed_in_is_what_judges_each_stage(example_spec, fixture, tight):
    """Tightening one stage's budget fails that stage alone; the comparison carries the very budget given."""
    budgets = {stage: TIGHT if stage == tight else LOOSE for stage in COMPARED}
    stages = compare_run(_moved(fixture), fixture, example_spec, budgets=budgets)
    for stage in COMPARED:
        assert stages[stage].comparison.tolerance is budgets[stage]
        assert stages[stage].status is (Status.FAIL if stage == tight else Status.PASS), stage
    assert stages[tight].comparison.max_abs == pytest.approx(MOVE, rel=1e-3)


def test_the_decisions_band_is_the_outputs_budget(example_spec, fixture):
    """An output moved across the 0.0 threshold is a near-tie within the outputs budget, a flip outside it."""
    outputs = fixture.outputs.copy()
    reference = fixture.outputs.copy()
    reference[1, 0] = 0.004
    outputs[1, 0] = -0.004
    hand_made = Fixture(root=fixture.root, manifest={}, rows=fixture.rows, embeddings=fixture.embeddings,
                        outputs=reference)
    run = CandidateRun("test", rows=ROWS, outputs=outputs)
    near = compare_run(run, hand_made, example_spec, budgets=dict.fromkeys(COMPARED, LOOSE))["decisions"]
    assert near.status is Status.PASS
    (flips,) = near.decisions
    assert (len(flips.flips), len(flips.near_ties)) == (0, 1)
    far = compare_run(run, hand_made, example_spec, budgets=dict.fromkeys(COMPARED, TIGHT))["decisions"]
    assert far.status is Status.FAIL
    assert [len(d.flips) for d in far.decisions] == [1]


def test_a_stage_the_record_did_not_observe_is_skip_never_pass(example_spec, fixture):
    run = CandidateRun("url", rows=ROWS, outputs=fixture.outputs.copy(),
                       unobservable={"embedding": "the service answers outputs only"})
    stages = compare_run(run, fixture, example_spec, budgets=dict.fromkeys(COMPARED, TIGHT))
    assert stages["outputs"].status is Status.PASS
    for stage in ("weights", "pixels", "embedding", "head"):
        assert stages[stage].status is Status.SKIP, stage
        assert stages[stage].comparison is None
    # The reason the runner gave is kept; a stage merely not recorded says so.
    assert stages["embedding"].headline.endswith("the service answers outputs only")
    assert "not run" in stages["pixels"].headline and "not run" in stages["head"].headline


def test_a_record_that_observed_nothing_passes_no_compared_stage(example_spec, fixture):
    stages = compare_run(CandidateRun("test", rows=ROWS), fixture, example_spec,
                         budgets=dict.fromkeys(COMPARED, LOOSE))
    assert all(stages[stage].status is Status.SKIP for stage in (*COMPARED, "weights", "decisions"))


def test_an_error_at_a_stage_fails_it_whatever_the_budget(example_spec, fixture):
    run = CandidateRun("test", rows=ROWS, outputs=fixture.outputs.copy(),
                       errors={"embedding": "the backbone raised RuntimeError: out of memory"})
    stages = compare_run(run, fixture, example_spec, budgets=dict.fromkeys(COMPARED, LOOSE))
    assert stages["embedding"].status is Status.FAIL
    assert "RuntimeError" in stages["embedding"].headline
    assert stages["outputs"].status is Status.PASS


def test_a_candidate_that_did_not_load_skips_every_later_stage(example_spec, fixture):
    run = CandidateRun("python", errors={"load": "the app raised ImportError at import"})
    stages = compare_run(run, fixture, example_spec, budgets=dict.fromkeys(COMPARED, LOOSE))
    assert stages["load"].status is Status.FAIL and "ImportError" in stages["load"].headline
    assert all(stages[stage].status is Status.SKIP for stage in STAGE_ORDER[1:])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def test_shipped_outputs_replace_the_reference_outputs_for_the_outputs_stage(example_spec, fixture):
    """A shipped app adds a sigmoid after the head: its outputs match the shipped reference, not the raw one."""
    shipped = _sigmoid(fixture.outputs)
    run = CandidateRun("python", rows=ROWS, head_outputs=fixture.outputs.copy(), outputs=shipped.copy())
    budgets = dict.fromkeys(COMPARED, TIGHT)

    raw = compare_run(run, fixture, example_spec, budgets=budgets)
    assert raw["outputs"].status is Status.FAIL
    assert raw["outputs"].comparison.max_abs == pytest.approx(np.abs(shipped - fixture.outputs).max(), rel=1e-5)

    judged = compare_run(run, fixture, example_spec, budgets=budgets, shipped_outputs=shipped)
    assert judged["outputs"].status is Status.PASS and judged["outputs"].comparison.max_abs < 1e-6
    # The app's head module is still judged against the head's own (raw) outputs.
    assert judged["head"].status is Status.PASS


def test_shipped_outputs_are_taken_at_the_records_rows(example_spec, fixture):
    shipped = _sigmoid(fixture.outputs)
    kept = (1, 3)
    run = CandidateRun("url", rows=kept, outputs=shipped[list(kept)])
    stages = compare_run(run, fixture, example_spec, budgets=dict.fromkeys(COMPARED, TIGHT), shipped_outputs=shipped)
    assert stages["outputs"].status is Status.PASS
    moved = shipped[list(kept)].copy()
    moved[1] += 0.5
    stages = compare_run(CandidateRun("url", rows=kept, outputs=moved), fixture, example_spec,
                         budgets=dict.fromkeys(COMPARED, TIGHT), shipped_outputs=shipped)
    assert stages["outputs"].status is Status.FAIL
    assert stages["outputs"].comparison.worst[0].name == NAMES[3]


def test_a_runner_without_a_head_module_has_its_head_judged_against_the_shipped_outputs(example_spec, fixture):
    """An exported graph's head is the shipped code, post-processing included."""
    shipped = _sigmoid(fixture.outputs)
    run = CandidateRun("onnx", rows=ROWS, head_outputs=shipped.copy(), outputs=shipped.copy())
    budgets = dict.fromkeys(COMPARED, TIGHT)
    assert compare_run(run, fixture, example_spec, budgets=budgets)["head"].status is Status.FAIL
    assert compare_run(run, fixture, example_spec, budgets=budgets,
                       shipped_outputs=shipped)["head"].status is Status.PASS
