"""`merge_reports` on partial reports judged by hand: the shards of one run merge into the report of the whole,
in any order and through JSON; a part of another run, a missing or a repeated shard is refused, naming the part.

Each part is what `parity check --shard I/N` judges: `compare_run` on its shard of a six-row fixture made of
seeded arrays (no model runs), one sample drifted across the decision threshold.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from parity.commands.merge import load_partial, merge_reports
from parity.errors import SpecError
from parity.judge.stages import compare_run
from parity.report.console import write_json
from parity.results import CandidateRun, Report, Shard, Status, Tolerance
from parity.store.fixtures import Fixture, FixtureRow

NAMES = tuple(f"s{i}.png" for i in range(6))
BUDGET = Tolerance(atol=1e-3, rtol=0.0, min_cosine=0.999, origin="test")
DRIFTED = 4  # the sample whose first output crosses 0.0, the spec's decision threshold
VERSION = json.dumps({"fixture": "f" * 64, "spec": "a" * 64}, sort_keys=True)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    raw = rng.normal(size=(len(NAMES), 3))
    outputs = (np.sign(raw) * (0.5 + np.abs(raw))).astype(np.float32)
    embeddings = rng.normal(size=(len(NAMES), 8)).astype(np.float32)
    moved = outputs + rng.uniform(-1e-4, 1e-4, size=outputs.shape).astype(np.float32)
    moved[DRIFTED, 0] = -outputs[DRIFTED, 0]
    return {"outputs": outputs, "embeddings": embeddings, "candidate_outputs": moved,
            "candidate_embeddings": embeddings + np.float32(1e-5)}


def _judged(spec, arrays, rows: list[int], tmp_path: Path) -> Report:
    """The report `check` makes over ``rows``: the fixture restricted to them, judged by `compare_run`."""
    fixture = Fixture(root=tmp_path, manifest={}, rows=tuple(FixtureRow(NAMES[i], tmp_path / NAMES[i], (0,))
                                                             for i in rows),
                      embeddings=arrays["embeddings"][rows], outputs=arrays["outputs"][rows])
    run = CandidateRun("spec", rows=tuple(range(len(rows))), embeddings=arrays["candidate_embeddings"][rows],
                       outputs=arrays["candidate_outputs"][rows],
                       unobservable={"weights": "hand-made", "pixels": "hand-made", "head": "hand-made"})
    stages = compare_run(run, fixture, spec, budgets=dict.fromkeys(("pixels", "embedding", "head", "outputs"),
                                                                       BUDGET))
    return Report(spec=str(spec.path), fixtures=str(tmp_path), device="cpu", dtype="float32",
                  stages=tuple(stages.values()))


def _part(spec, arrays, rows: list[int], index: int, count: int, tmp_path: Path, **shard) -> Report:
    report = _judged(spec, arrays, rows, tmp_path)
    return replace(report, shard=Shard(index, count, len(NAMES), tuple(rows), tuple(NAMES[i] for i in rows),
                                       **{"version": VERSION, **shard}))


@pytest.fixture
def whole(example_spec, arrays, tmp_path) -> Report:
    return _judged(example_spec, arrays, list(range(len(NAMES))), tmp_path)


@pytest.fixture
def parts(example_spec, arrays, tmp_path) -> list[Report]:
    """Two shards that interleave the samples, as `shard_rows` does."""
    return [_part(example_spec, arrays, [0, 2, 3], 1, 2, tmp_path),
            _part(example_spec, arrays, [1, 4, 5], 2, 2, tmp_path)]


def _summary(report: Report) -> dict:
    """What a merge must reproduce: each stage's status and numbers, the worst samples, the flips."""
    out = {}
    for stage in report.stages:
        comparison = stage.comparison
        out[stage.stage] = (stage.status, stage.headline if stage.stage == "decode" else None,
                            None if comparison is None else (comparison.mismatched, comparison.total,
                                                             round(comparison.max_abs, 7),
                                                             [w.name for w in comparison.worst]),
                            [(d.kind, d.flips, d.total) for d in stage.decisions])
    return out


def test_two_shards_merge_into_the_report_of_the_whole(whole, parts):
    merged = merge_reports(parts)
    assert merged.shard is None
    assert _summary(merged) == _summary(whole)
    assert merged.verdict == whole.verdict and not merged.passed
    assert merged.stage("outputs").status is Status.FAIL
    assert merged.stage("outputs").comparison.worst[0].name == NAMES[DRIFTED]
    assert merged.stage("decisions").decisions[0].flips == (f"{NAMES[DRIFTED]}[0]",)  # sample [output index]
    assert merged.stage("decode").headline.startswith(f"{len(NAMES)}/{len(NAMES)} decoded")


def test_the_order_the_parts_come_in_changes_nothing(parts):
    assert _summary(merge_reports(parts[::-1])) == _summary(merge_reports(parts))


def test_parts_merge_the_same_through_the_json_files_merge_reads(parts, tmp_path):
    paths = []
    for i, part in enumerate(parts, start=1):
        paths.append(tmp_path / f"part{i}.json")
        write_json(part, paths[-1])
    assert _summary(merge_reports([load_partial(p) for p in paths], sources=paths)) == _summary(merge_reports(parts))


def test_a_part_of_other_fixture_data_is_refused_naming_it(parts):
    other = replace(parts[1], shard=replace(parts[1].shard,
                                            version=json.dumps({"fixture": "0" * 64, "spec": "a" * 64})))
    with pytest.raises(SpecError) as raised:
        merge_reports([parts[0], other], sources=["first.json", "regenerated.json"])
    message = str(raised.value)
    assert "fixture data" in message
    assert "regenerated.json: 6 samples, data version 0000000000000000" in message
    assert "first.json: 6 samples, data version ffffffffffffffff" in message


def test_a_part_of_another_spec_file_is_refused_naming_it(parts):
    edited = json.dumps({"fixture": "f" * 64, "spec": "b" * 64})
    other = replace(parts[0], shard=replace(parts[0].shard, version=edited))
    with pytest.raises(SpecError, match=r"spec contents .*edited\.json: spec sha256 bbbbbbbbbbbbbbbb"):
        merge_reports([other, parts[1]], sources=["edited.json", "second.json"])


def test_a_part_of_another_candidate_is_refused(parts):
    other = replace(parts[1], shard=replace(parts[1].shard, runner="url"))
    with pytest.raises(SpecError, match=r"candidates .*part 2: url"):
        merge_reports([parts[0], other])


def test_a_missing_or_repeated_shard_is_refused_naming_it(parts):
    with pytest.raises(SpecError, match=r"shard\(s\) 2/2 missing"):
        merge_reports(parts[:1])
    with pytest.raises(SpecError, match=r"shard\(s\) 1/2 given twice"):
        merge_reports([parts[0], parts[0]])


def test_parts_of_different_shardings_are_refused(example_spec, arrays, parts, tmp_path):
    third = _part(example_spec, arrays, [1, 4], 2, 3, tmp_path)
    with pytest.raises(SpecError, match=r"different shardings: N = \[2, 3\]"):
        merge_reports([parts[0], third])


def test_a_report_that_is_not_a_shard_is_refused(whole, parts):
    with pytest.raises(SpecError, match="shard reports only"):
        merge_reports([whole, parts[1]])
