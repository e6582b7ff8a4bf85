"""The logged runner: a service's log is a candidate like any other, judged stage by stage with [decisions]."""

from __future__ import annotations

import csv
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np

from parity.commands.check import run_check
from parity.cli import EXIT_DRIFT, EXIT_PASS, main
from parity.store.fixtures import load_fixture
from parity.results import Status, Verdict
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC, ROOT
from tests.support.specs import write_spec

NOT_LOGGED = ("load", "weights", "pixels", "head")


@cache
def _pipeline(spec_path: Path, change: tuple = ()):
    from parity.model.pipeline import build_pipeline

    spec = load_spec(spec_path)
    return build_pipeline(spec.replace(**{section: dict(fields) for section, fields in change}))


@cache
def _records(spec: Path, change: tuple, images: tuple[Path, ...], biases: tuple[tuple[int, ...], ...]) -> tuple:
    """Embedding and outputs of each image under ``spec`` with ``change``; computed once per test session."""
    import torch

    pipeline = _pipeline(spec, change)
    out = []
    for image, bias in zip(images, biases):
        emb = pipeline.embed(torch.stack([pipeline.preprocess(image)]))
        out.append((emb[0].tolist(), pipeline.run_head(emb, [bias] if bias else None)[0].tolist()))
    return tuple(out)


def write_log(path: Path, images: list[Path], biases: list[tuple[int, ...]], *, spec: Path = EXAMPLE_SPEC,
              change: tuple = (), embedding: bool = True, outputs: bool = True,
              edit=None) -> Path:
    """What a service running ``spec`` (with ``change``) logs for ``images``: JSONL, or CSV by suffix."""
    records = []
    for image, bias, (emb, out) in zip(images, biases, _records(spec, change, tuple(images), tuple(biases))):
        record = {"image": str(image), "input_biases": list(bias)}
        if embedding:
            record["embedding"] = list(emb)
        if outputs:
            record["outputs"] = list(out)
        records.append(record)
    if edit is not None:
        edit(records)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fixture_log(path: Path, **kwargs) -> Path:
    fixture = load_fixture(EXAMPLE_FIXTURES)
    return write_log(path, [row.image for row in fixture.rows], [row.input_biases for row in fixture.rows], **kwargs)


def logged_spec(directory: Path, log: Path, replacements: dict[str, str] | None = None, extra: str = "") -> Path:
    path = write_spec(directory, replacements, name="logged.toml")
    path.write_text(path.read_text() + f'\n[candidate]\nlogged = "{log}"\n{extra}')
    return path


BILINEAR = (("preprocess", (("interpolation", "bilinear"),)),)


def test_a_clean_log_of_the_fixture_images_passes(tmp_path):
    log = fixture_log(tmp_path / "requests.jsonl")
    report = run_check(load_spec(logged_spec(tmp_path, log)))
    assert report.passed, report.first_failure
    for stage in ("embedding", "outputs", "decisions"):
        assert report.stage(stage).status is Status.PASS
    assert report.stage("embedding").comparison.total == load_fixture(EXAMPLE_FIXTURES).embeddings.size
    for stage in NOT_LOGGED:
        assert report.stage(stage).headline.startswith("not observable: a service log holds only")


def test_a_log_from_a_bilinear_service_fails_at_the_embedding(tmp_path):
    log = fixture_log(tmp_path / "requests.csv", change=BILINEAR)
    spec = logged_spec(tmp_path, log)
    report = run_check(load_spec(spec))
    assert not report.passed
    assert report.first_failure.stage == "embedding"
    assert report.stage("outputs").status is Status.FAIL
    assert main(["check", "--spec", str(spec)]) == EXIT_DRIFT


def _nudge(amount: float, *, flip_one: bool = False):
    """Move every logged output by ``amount``; with ``flip_one``, negate the output farthest from 0."""
    def edit(records):
        for r in records:
            r["outputs"] = [v + amount for v in r["outputs"]]
        if flip_one:
            i, j = max(((i, j) for i in range(len(records)) for j in range(len(records[i]["outputs"]))),
                       key=lambda ij: abs(records[ij[0]]["outputs"][ij[1]]))
            records[i]["outputs"][j] = -records[i]["outputs"][j]
    return edit


def test_decisions_gate_accepts_drift_that_flips_nothing_and_fails_a_flip(tmp_path):
    fixture = load_fixture(EXAMPLE_FIXTURES)
    margin = float(np.abs(fixture.outputs).min())
    small = margin / 4  # moves every output, crosses no threshold at 0
    drifted = fixture_log(tmp_path / "small.jsonl", embedding=False, edit=_nudge(small))

    strict = run_check(load_spec(logged_spec(tmp_path, drifted)))
    assert strict.verdict is Verdict.DRIFT_NO_FLIPS and not strict.passed
    assert strict.stage("embedding").headline.startswith("not observable: a service log holds only")
    gated = run_check(load_spec(logged_spec(tmp_path, drifted, extra="", replacements={
        "threshold = 0.0": 'threshold = 0.0\ngate = "decisions"'})))
    assert gated.verdict is Verdict.DRIFT_NO_FLIPS and gated.passed

    flipped = fixture_log(tmp_path / "flip.jsonl", embedding=False, edit=_nudge(0.0, flip_one=True))
    report = run_check(load_spec(logged_spec(tmp_path, flipped, replacements={
        "threshold = 0.0": 'threshold = 0.0\ngate = "decisions"'})))
    assert report.verdict is Verdict.DECISION_FLIPS and not report.passed
    assert len(report.stage("decisions").decisions[0].flips) == 1


def _copies(directory: Path, count: int = 5) -> tuple[list[Path], list[tuple[int, ...]]]:
    """Fixture images under other names in another folder: not in the fixture."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    directory.mkdir()
    images = [Path(shutil.copy(row.image, directory / f"upload_{i}{row.image.suffix}"))
              for i, row in enumerate(fixture.rows[:count])]
    return images, [row.input_biases for row in fixture.rows[:count]]


def test_images_outside_the_fixture_are_judged_against_the_spec_pipeline(tmp_path):
    images, biases = _copies(tmp_path / "uploads")
    clean = write_log(tmp_path / "clean.jsonl", images, biases)
    report = run_check(load_spec(logged_spec(tmp_path, clean)))
    assert report.passed, report.first_failure
    assert report.stage("outputs").comparison.total == 5 * 5

    drifted = write_log(tmp_path / "drifted.jsonl", images, biases, change=BILINEAR)
    report = run_check(load_spec(logged_spec(tmp_path, drifted)))
    assert not report.passed and report.first_failure.stage == "embedding"


def test_same_name_other_bytes_is_not_the_fixture_image(tmp_path):
    """An upload called chelsea.png that is another photo must not be compared with the fixture's."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    (tmp_path / "up").mkdir()
    impostor = Path(shutil.copy(fixture.rows[0].image, tmp_path / "up" / "chelsea.png"))
    log = write_log(tmp_path / "log.jsonl", [impostor], [fixture.rows[2].input_biases])
    report = run_check(load_spec(logged_spec(tmp_path, log)))
    assert report.passed, report.first_failure  # judged against the spec pipeline on the impostor itself


def test_a_spec_without_fixtures_replays_against_its_pipeline(tmp_path):
    images, biases = _copies(tmp_path / "uploads", count=3)
    log = write_log(tmp_path / "log.jsonl", images, biases, change=BILINEAR, embedding=False)
    spec = logged_spec(tmp_path, log, {f'fixtures = "{ROOT / "fixtures"}/clip_dnn"\n': ""})
    assert load_spec(spec).fixtures is None
    report = run_check(load_spec(spec))
    assert report.first_failure.stage == "outputs"
    clean = write_log(tmp_path / "clean.jsonl", images, biases, embedding=False)
    spec = logged_spec(tmp_path, clean, {f'fixtures = "{ROOT / "fixtures"}/clip_dnn"\n': ""})
    assert main(["check", "--spec", str(spec)]) == EXIT_PASS


def test_a_row_logged_with_other_input_biases_is_a_per_sample_error(tmp_path):
    fixture = load_fixture(EXAMPLE_FIXTURES)

    def swap(records):
        records[1]["input_biases"] = [0, 0]

    log = fixture_log(tmp_path / "log.jsonl", edit=swap)
    report = run_check(load_spec(logged_spec(tmp_path, log)))
    decode = report.stage("decode")
    assert decode.status is Status.FAIL
    assert decode.sample_errors == ((fixture.rows[1].name, f"logged with input_biases [0, 0], the fixture's are "
                                                           f"{list(fixture.rows[1].input_biases)}: not the same request"),)
    assert report.stage("outputs").status is Status.PASS  # the other rows still compared


def test_a_classifier_log_with_embeddings_only_checks_verification_decisions(tmp_path):
    """The transformers example (no input_biases; argmax and verification decisions), logged by a
    service running the slow (PIL) image processor: embeddings drift, no identity decision flips."""
    fixture = load_fixture(CLASSIFIER_FIXTURES)
    images, biases = [row.image for row in fixture.rows], [() for _ in fixture.rows]
    slow = (("preprocess", (("processor", "slow"),)),)
    log = write_log(tmp_path / "log.jsonl", images, biases, spec=CLASSIFIER_SPEC, change=slow, outputs=False)
    spec = tmp_path / "mlp.toml"
    spec.write_text(CLASSIFIER_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
                    + f'\n[candidate]\nlogged = "{log}"\n')
    report = run_check(load_spec(spec))
    assert report.stage("embedding").status is Status.FAIL
    headline = report.stage("outputs").headline
    assert headline.startswith("not observable: ") and "service log" in headline and "no 'outputs'" in headline
    decisions = report.stage("decisions")
    assert [d.kind for d in decisions.decisions] == ["verification"]
    assert decisions.decisions[0].total > 0
    assert report.verdict in (Verdict.DRIFT_NO_FLIPS, Verdict.DECISION_FLIPS)
    assert report.verdict is (Verdict.DECISION_FLIPS if decisions.decisions[0].flips else Verdict.DRIFT_NO_FLIPS)


def test_diagnose_logged_carries_the_gate_report_of_the_log(tmp_path, capsys):
    from parity.commands.diagnose import diagnose_logged
    from parity.report.console import to_json

    images, biases = _copies(tmp_path / "uploads", count=3)
    log = write_log(tmp_path / "log.jsonl", images, biases)
    result = diagnose_logged(load_spec(EXAMPLE_SPEC), log)
    assert result.matches and result.report is not None and result.report.passed
    assert result.report.stage("outputs").comparison.total == 3 * 5
    assert to_json(result)["report"]["verdict"] == "parity"
    assert main(["diagnose", "--spec", str(EXAMPLE_SPEC), "--logged", str(log)]) == EXIT_PASS
    out = capsys.readouterr().out
    assert "parity check: clip_dnn.toml" in out and "The service MATCHES the spec's pipeline." in out
