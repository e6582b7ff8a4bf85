"""Runner records: what the spec runner observes, and that the comparator judges only the record."""

from __future__ import annotations

import numpy as np

import parity.model.batches as spec_runner
from parity.commands.check import judge_run, run_check
from parity.numerics.emulate import gate_budgets
from parity.judge.stages import STAGE_ORDER, compare_run
from parity.store.fixtures import load_fixture
from parity.results import CandidateRun, Status
from tests.support.specs import reseal, write_spec


def test_each_sample_is_decoded_once_golden_pixels_included(example_spec, monkeypatch):
    calls: list[str] = []
    real = spec_runner.decode_image

    def counting(path, **kwargs):
        calls.append(path.name)
        return real(path, **kwargs)

    monkeypatch.setattr(spec_runner, "decode_image", counting)
    report = run_check(example_spec)
    fixture = load_fixture(example_spec.fixture_root())
    assert report.passed
    assert sorted(calls) == sorted(row.image.name for row in fixture.rows)
    assert report.stage("pixels").comparison.total > 0


def test_decode_errors_survive_a_backbone_failure(fixture_copy, tmp_path):
    (fixture_copy / "images" / "coins.png").write_bytes(b"not an image")
    reseal(fixture_copy)
    # A 224 px input into the 336 px model: timm refuses it in the first batch.
    spec_path = write_spec(tmp_path, {"input_size = [3, 336, 336]": "input_size = [3, 224, 224]"})
    from parity.spec import load_spec

    report = run_check(load_spec(spec_path), fixtures=fixture_copy)
    decode, embedding = report.stage("decode"), report.stage("embedding")
    assert decode.status is Status.FAIL
    assert [name for name, _ in decode.sample_errors] == ["coins.png"]
    assert embedding.status is Status.FAIL and "the backbone raised" in embedding.headline


def test_unobservable_stages_are_skipped_with_the_reason_never_passed(example_spec):
    fixture = load_fixture(example_spec.fixture_root())
    rows = tuple(range(len(fixture.rows)))
    run = CandidateRun("url", rows=rows, outputs=fixture.outputs.copy(),
                       unobservable={s: "an HTTP service returns outputs only"
                                     for s in ("load", "weights", "pixels", "embedding", "head")})
    stages = compare_run(run, fixture, example_spec, budgets=gate_budgets(example_spec, fixture))
    assert list(stages) == list(STAGE_ORDER)
    for stage in ("load", "weights", "pixels", "embedding", "head"):
        assert stages[stage].status is Status.SKIP
        assert stages[stage].headline == "not observable: an HTTP service returns outputs only"
    assert stages["outputs"].status is Status.PASS
    assert stages["decisions"].status is Status.PASS
    report = judge_run(run, fixture, example_spec)
    assert report.passed

    moved = fixture.outputs.copy()
    moved[3] += 0.5
    drifted = judge_run(CandidateRun("url", rows=rows, outputs=moved, unobservable=run.unobservable),
                        fixture, example_spec)
    assert not drifted.passed
    assert drifted.first_failure.stage == "outputs"
    assert drifted.stage("outputs").comparison.worst[0].name == fixture.rows[3].name


def test_the_comparator_judges_the_record_alone(example_spec):
    """A record built by hand from the fixture's own arrays passes; one row moved fails at embedding."""
    fixture = load_fixture(example_spec.fixture_root())
    rows = tuple(range(len(fixture.rows)))
    embeddings = fixture.embeddings.copy()
    run = CandidateRun("test", rows=rows, embeddings=embeddings, pixels=dict(fixture.golden_pixels),
                       head_outputs=fixture.outputs.copy(), outputs=fixture.outputs.copy(),
                       unobservable={"load": "hand-made", "weights": "hand-made"})
    stages = compare_run(run, fixture, example_spec, budgets=gate_budgets(example_spec, fixture))
    assert all(s.status is not Status.FAIL for s in stages.values())
    embeddings = embeddings.copy()
    embeddings[0] = -embeddings[0]
    moved = compare_run(CandidateRun("test", rows=rows, embeddings=embeddings), fixture, example_spec,
                        budgets=gate_budgets(example_spec, fixture))
    assert moved["embedding"].status is Status.FAIL
    assert moved["embedding"].comparison.min_cosine < 0
    assert np.isclose(moved["embedding"].comparison.min_cosine, -1.0)
