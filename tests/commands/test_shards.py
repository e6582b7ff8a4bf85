"""Shards and merge: `check --shard I/N` parts put together by `parity merge` give the unsharded report.

Merging is exact (property-tested on random partitions). End to end, a shard's samples run in
other batches than in the unsharded run, and a batched matmul may round a value differently by
an ulp or so: per-stage statistics are compared within ``BUDGET`` (a tenth of the float32 atol),
verdicts, statuses, sample errors and decisions exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.commands.check import run_check
from parity.cli import EXIT_PASS, EXIT_USAGE, main
from parity.judge.arrays import MAX_SAMPLES, compare_arrays, merge_comparisons
from parity.store.fixtures import load_fixture
from parity.commands.merge import load_partial, merge_reports
from parity.model.pipeline import build_pipeline
from parity.report.console import write_json
from parity.results import Report, Status, Tolerance
from parity.store.shards import parse_shard, shard_rows
from parity.commands.capture import capture_pipeline
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC
from tests.support.specs import write_spec
from tests.support.heads import BatchNormHead, trained_head

BUDGET = 1e-6


# -- merging comparisons is exact -------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 6), parts=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       cosine=st.booleans(), ties=st.booleans())
def test_merging_comparisons_of_any_partition_equals_comparing_the_whole(rows, width, parts, seed, cosine, ties):
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(rows, width)).astype(np.float32)
    noise = rng.normal(scale=1e-5, size=(rows, width))
    if ties:  # equal row errors: the order among them must still be the whole run's
        noise = np.round(noise * 1e5) / 1e5
    candidate = (reference + noise).astype(np.float32)
    names = [f"s{i:03d}" for i in range(rows)]
    tolerance = Tolerance(1e-5, 0.0, 0.9999 if cosine else None)
    whole = compare_arrays(candidate, reference, tolerance=tolerance, names=names, cosine=cosine)
    shard_of = rng.integers(0, parts, size=rows)
    pieces = [compare_arrays(candidate[shard_of == k], reference[shard_of == k], tolerance=tolerance,
                             names=[n for n, s in zip(names, shard_of) if s == k], cosine=cosine)
              for k in range(parts) if (shard_of == k).any()]
    merged = merge_comparisons(pieces, names.index)
    for field in dataclasses.fields(whole):
        if field.name != "mean_abs":
            assert getattr(merged, field.name) == getattr(whole, field.name), field.name
    assert merged.mean_abs == pytest.approx(whole.mean_abs, rel=1e-12, abs=1e-300)
    assert bool(merged) == bool(whole)


def test_merging_keeps_the_worst_samples_when_there_are_too_many_to_keep():
    rows = MAX_SAMPLES + 10
    reference = np.zeros((rows, 1))
    candidate = np.arange(rows, dtype=float)[:, None] % 97  # many ties among the largest errors
    names = [f"s{i}" for i in range(rows)]
    tolerance = Tolerance(1000.0, 0.0)
    whole = compare_arrays(candidate, reference, tolerance=tolerance, names=names)
    half = rows // 2
    merged = merge_comparisons([compare_arrays(candidate[:half], reference[:half], tolerance=tolerance, names=names[:half]),
                                compare_arrays(candidate[half:], reference[half:], tolerance=tolerance,
                                               names=names[half:])], names.index)
    assert merged.samples == whole.samples and merged.worst == whole.worst


def test_a_shape_mismatch_in_any_part_never_merges_into_a_match():
    tolerance = Tolerance(1e-5, 0.0)
    good = compare_arrays(np.zeros((2, 3)), np.zeros((2, 3)), tolerance=tolerance)
    bad = compare_arrays(np.zeros((2, 4)), np.zeros((2, 3)), tolerance=tolerance)
    assert not merge_comparisons([good, bad], lambda name: 0)


# -- shard assignment ---------------------------------------------------------------------

def test_shards_partition_the_samples_and_adding_one_moves_no_other(tmp_path):
    fixture = load_fixture(EXAMPLE_FIXTURES)
    rows = fixture.rows
    for count in (1, 2, 3, 5):
        parts = [shard_rows(rows, i, count) for i in range(1, count + 1)]
        assert sorted(i for p in parts for i in p) == list(range(len(rows)))
    extra = tmp_path / "extra.png"
    extra.write_bytes(b"\x89PNG not really an image, only content to hash")
    grown = rows[:5] + (dataclasses.replace(rows[0], name="extra.png", image=extra),) + rows[5:]
    for count in (2, 3):
        for i in range(1, count + 1):
            before = {rows[j].name for j in shard_rows(rows, i, count)}
            after = {grown[j].name for j in shard_rows(grown, i, count)} - {"extra.png"}
            assert before == after


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "2", "", "1/2/3"])
def test_a_malformed_shard_is_a_usage_error(text, capsys):
    with pytest.raises(Exception) as info:
        parse_shard(text)
    assert "--shard" in str(info.value)
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--shard", text]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is not I/N" in err or "between 1 and N" in err


# -- merged shards equal the unsharded report ------------------------------------------------

def _assert_same_report(merged: Report, whole: Report) -> None:
    assert merged.verdict == whole.verdict and merged.passed == whole.passed
    for got, want in zip(merged.stages, whole.stages):
        assert (got.stage, got.status) == (want.stage, want.status)
        assert got.sample_errors == want.sample_errors, got.stage
        if got.stage in ("load", "weights", "decode"):
            assert got.headline == want.headline, got.stage
        a, b = got.comparison, want.comparison
        assert (a is None) == (b is None), got.stage
        if a is not None:
            assert a.candidate_shape == b.candidate_shape and a.total == b.total
            assert a.mismatched == b.mismatched and a.nonfinite == b.nonfinite
            assert a.max_abs == pytest.approx(b.max_abs, abs=BUDGET), got.stage
            assert a.mean_abs == pytest.approx(b.mean_abs, abs=BUDGET), got.stage
            # The worst samples above rounding: the same errors, each a sample whose unsharded error is as large.
            whole_errors = {s.name: s.max_abs for s in b.samples}
            worst = [s for s in a.worst if s.max_abs > BUDGET]
            assert [s.max_abs for s in worst] == pytest.approx([s.max_abs for s in b.worst if s.max_abs > BUDGET],
                                                               abs=BUDGET)
            for sample in worst:
                assert whole_errors[sample.name] == pytest.approx(sample.max_abs, abs=BUDGET)
            assert [s.name for s in a.samples] == [s.name for s in b.samples]
        assert len(got.decisions) == len(want.decisions)
        for d, e in zip(got.decisions, want.decisions):
            assert (d.kind, d.total, d.flips, d.near_ties, d.flip_rate_bound) == \
                   (e.kind, e.total, e.flips, e.near_ties, e.flip_rate_bound)


def _sharded(spec, count: int, **kwargs) -> list[Report]:
    return [run_check(spec, shard=(i, count), **kwargs) for i in range(1, count + 1)]


@pytest.mark.parametrize("spec_path", [EXAMPLE_SPEC, CLASSIFIER_SPEC], ids=["clip_dnn", "clip_mlp"])
def test_merged_shards_equal_the_unsharded_report_on_both_examples(spec_path):
    spec = load_spec(spec_path)
    whole = run_check(spec)
    for count in (1, 2, 3):
        parts = _sharded(spec, count)
        assert sum(len(p.shard.rows) for p in parts) == len(load_fixture(spec.fixture_root(None)).rows)
        _assert_same_report(merge_reports(parts), whole)


def test_merge_through_json_files_and_the_cli(tmp_path, capsys):
    parts = []
    for i in (1, 2, 3):
        path = tmp_path / f"part{i}.json"
        assert main(["check", "--spec", str(CLASSIFIER_SPEC), "--shard", f"{i}/3", "--json", str(path)]) == EXIT_PASS
        parts.append(path)
    out = capsys.readouterr().out
    assert "SHARD 3/3" in out
    assert main(["merge", *map(str, parts), "--json", str(tmp_path / "merged.json"),
                 "--report", str(tmp_path / "report")]) == EXIT_PASS
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["verdict"] == "parity" and merged["shard"] is None
    assert "merge" not in (tmp_path / "report" / "report.md").read_text().split("\n")[0]
    _assert_same_report(merge_reports([load_partial(p) for p in parts]), run_check(load_spec(CLASSIFIER_SPEC)))
    # A missing shard, a repeated one, a whole report: refused with the reason, exit 2.
    capsys.readouterr()
    assert main(["merge", str(parts[0]), str(parts[2])]) == EXIT_USAGE
    assert "2/3 missing" in capsys.readouterr().err
    assert main(["merge", str(parts[0]), str(parts[0]), str(parts[1]), str(parts[2])]) == EXIT_USAGE
    assert "1/3 given twice" in capsys.readouterr().err
    write_json(run_check(load_spec(CLASSIFIER_SPEC)), tmp_path / "whole.json")
    assert main(["merge", str(tmp_path / "whole.json")]) == EXIT_USAGE
    assert "not a shard's" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["merge", str(tmp_path / "broken.json")]) == EXIT_USAGE


def test_parts_of_different_fixtures_do_not_merge(tmp_path, capsys):
    one = run_check(load_spec(EXAMPLE_SPEC), shard=(1, 2))
    other = run_check(load_spec(CLASSIFIER_SPEC), shard=(2, 2))
    for i, report in enumerate((one, other)):
        write_json(report, tmp_path / f"p{i}.json")
    assert main(["merge", str(tmp_path / "p0.json"), str(tmp_path / "p1.json")]) == EXIT_USAGE
    assert "different" in capsys.readouterr().err


def test_a_drifting_candidate_merges_to_the_same_drift_and_flips(tmp_path):
    spec = load_spec(write_spec(tmp_path, {'interpolation = "bicubic"': 'interpolation = "bilinear"'}))
    spec = dataclasses.replace(spec, decisions=dataclasses.replace(spec.decisions, argmax=True,
                                                                   verification_threshold=0.9))
    whole = run_check(spec)
    assert not whole.passed
    for count in (2, 3):
        merged = merge_reports(_sharded(spec, count))
        _assert_same_report(merged, whole)
        # Verification pairs that cross shards are judged: as many pairs as the whole run has.
        pairs = next(d for d in merged.stage("decisions").decisions if d.kind == "verification")
        n = len(whole.stage("embedding").comparison.samples)
        assert pairs.total == n * (n - 1) // 2


def test_a_sample_that_does_not_decode_is_kept_by_its_shard(tmp_path, fixture_copy):
    from tests.support.specs import reseal

    broken = next(p for p in sorted((fixture_copy / "images").iterdir()) if p.suffix == ".jpg")
    broken.write_bytes(b"not an image")
    reseal(fixture_copy)
    spec = load_spec(write_spec(tmp_path))
    whole = run_check(spec, fixtures=fixture_copy)
    assert whole.stage("decode").status is Status.FAIL
    merged = merge_reports(_sharded(spec, 3, fixtures=fixture_copy))
    _assert_same_report(merged, whole)
    assert merged.stage("decode").headline == whole.stage("decode").headline


# -- a model and fixture of the user's own, one sample added -----------------------------------

@pytest.fixture(scope="module")
def batchnorm_fixtures(tmp_path_factory):
    """A BatchNorm head (not the bundled one) frozen over 9 and then 10 of the example images."""
    folder = tmp_path_factory.mktemp("bn")
    weights = folder / "head.pth"
    torch.save(trained_head(BatchNormHead).state_dict(), weights)
    spec_path = write_spec(folder, {
        'class = "reference.models:MultiLabelRegressionNN"': 'class = "tests.support.heads:BatchNormHead"',
        f'weights = "{EXAMPLE_FIXTURES}/dnnV1_model_best.pth"': f'weights = "{weights}"',
        "kwargs = { embedding_dim = 64, bias_cardinalities = [3, 4], num_outputs = 5, bias_dim = 8, "
        "hidden_dims = [128, 64], dropout = 0.1 }": "kwargs = {}",
    })
    spec = load_spec(spec_path)
    reference = load_fixture(EXAMPLE_FIXTURES)
    pipeline = build_pipeline(spec)
    made = {}
    for count in (9, 10):
        rows = reference.rows[:count]
        made[count] = capture_pipeline(pipeline, [r.image for r in rows], folder / f"fixture{count}",
                                       input_biases=[r.input_biases for r in rows], golden=[rows[0].image.name])
    return spec, made


def test_a_users_head_merges_and_one_added_sample_moves_no_other(batchnorm_fixtures):
    spec, made = batchnorm_fixtures
    before = {n: _sharded(spec, n, fixtures=made[9]) for n in (2, 3)}
    whole = run_check(spec, fixtures=made[10])
    for count in (1, 2, 3):
        parts = _sharded(spec, count, fixtures=made[10])
        _assert_same_report(merge_reports(parts), whole)
        if count in before:
            added = [set(p.shard.names) - set(q.shard.names) for p, q in zip(parts, before[count])]
            assert sum(len(a) for a in added) == 1  # the new sample joined exactly one shard
            for p, q in zip(parts, before[count]):
                assert set(q.shard.names) <= set(p.shard.names)  # nobody left their shard


# -- a replayed service log, sharded -------------------------------------------------------

def test_a_logged_replay_merges_to_the_unsharded_replay(tmp_path):
    fixture = load_fixture(EXAMPLE_FIXTURES)
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for k, row in enumerate(fixture.rows[:12]):
        shutil.copy(row.image, images / row.image.name)
        embedding = fixture.embeddings[fixture.names.index(row.name)] + (0.05 if k == 3 else 0.0)
        lines.append(json.dumps({"image": f"images/{row.image.name}", "input_biases": list(row.input_biases),
                                 "embedding": embedding.tolist()}))
    log = tmp_path / "requests.jsonl"
    log.write_text("\n".join(lines) + "\n")
    spec = load_spec(EXAMPLE_SPEC)  # no fixture: the spec's pipeline on the logged images is the reference
    spec = dataclasses.replace(spec, candidate=dataclasses.replace(spec.candidate, kind="logged", target=str(log)),
                               fixtures=None)
    whole = run_check(spec)
    assert whole.stage("embedding").status is Status.FAIL  # one logged embedding was changed
    for count in (2, 3):
        parts = _sharded(spec, count)
        assert all(p.shard.of == 12 for p in parts)
        merged = merge_reports(parts)
        _assert_same_report(merged, whole)
        assert not merged.passed


# -- a sharded matrix -------------------------------------------------------------------------

def test_merged_matrix_shards_equal_the_unsharded_matrix(tmp_path, capsys):
    from parity.commands.matrix import parse_axes, run_matrix

    spec = load_spec(EXAMPLE_SPEC)
    axes = {**spec.matrix, **parse_axes({"extract": ["pre_logits", "cls", "forward"], "interpolation": ["bicubic", "bilinear"],
                                         "resize_backend": ["pil"], "device": ["cpu"], "dtype": ["float32"]},
                                        where="test")}
    whole = run_matrix(spec, axes=axes)
    parts = [run_matrix(spec, axes=axes, shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted(r for p in parts for r in p.shard.rows) == list(range(len(load_fixture(EXAMPLE_FIXTURES).rows)))
    merged = merge_reports(parts)
    assert merged.passed == whole.passed and merged.equivalent_modes == whole.equivalent_modes
    for got, want in zip(merged.cells, whole.cells):
        assert (got.cell.id, got.status) == (want.cell.id, want.status)
        if want.comparison is not None and want.comparison.shapes_match:
            assert got.comparison.max_abs == pytest.approx(want.comparison.max_abs, abs=BUDGET)
            assert got.comparison.mean_abs == pytest.approx(want.comparison.mean_abs, abs=BUDGET)
            assert got.comparison.mismatched == want.comparison.mismatched
    # Through files: a matrix and a check part do not merge together.
    for i, part in enumerate(parts):
        write_json(part, tmp_path / f"m{i}.json")
    write_json(run_check(spec, shard=(1, 3)), tmp_path / "check.json")
    assert main(["merge", *(str(tmp_path / f"m{i}.json") for i in range(3))]) == (EXIT_PASS if whole.passed else 1)
    assert "MATRIX:" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "m0.json"), str(tmp_path / "check.json")]) == EXIT_USAGE


# -- a sharded diagnosis ---------------------------------------------------------------------

@pytest.mark.slow
def test_merged_diagnosis_shards_name_the_unsharded_fix(tmp_path, capsys):
    from parity.commands.diagnose import diagnose

    spec = load_spec(write_spec(tmp_path, {'interpolation = "bicubic"': 'interpolation = "bilinear"'}))
    whole = diagnose(spec)
    parts = [diagnose(spec, shard=(i, 2)) for i in (1, 2)]
    merged = merge_reports(parts)
    _assert_same_report(merged.report, whole.report)
    assert [c.toml() for c in merged.fix] == [c.toml() for c in whole.fix] == ['[preprocess].interpolation = "bicubic"']
    assert merged.confirmed and whole.confirmed
    assert sorted(merged.affected) == sorted(whole.affected) and merged.total == whole.total
    for i, part in enumerate(parts):
        write_json(part, tmp_path / f"d{i}.json")
    assert main(["merge", str(tmp_path / "d0.json"), str(tmp_path / "d1.json")]) == 1  # drift, with its fix
    assert 'interpolation = "bicubic"' in capsys.readouterr().out
    assert main(["diagnose", "--spec", str(EXAMPLE_SPEC), "--logged", str(tmp_path / "x.jsonl"),
                 "--shard", "1/2"]) == EXIT_USAGE
    assert "does not take --shard" in capsys.readouterr().err


def test_shards_without_samples_run_nothing_and_merge_away():
    spec = load_spec(EXAMPLE_SPEC)
    count = 20  # more shards than the 17 samples: some are empty
    parts = _sharded(spec, count)
    empty = [p for p in parts if not p.shard.rows]
    assert empty and all(p.stage("embedding").status is Status.SKIP for p in empty)
    assert "no sample falls in shard" in empty[0].stage("embedding").headline
    whole = run_check(spec)
    merged = merge_reports(parts)
    _assert_same_report(merged, whole)
    assert merged.stage("decisions").headline == whole.stage("decisions").headline


@pytest.fixture(scope="module")
def classifier_parts():
    return [run_check(load_spec(CLASSIFIER_SPEC), shard=(i, 2)) for i in (1, 2)]


@pytest.mark.parametrize("edit", [
    lambda d: d.update(schema_version=99),
    lambda d: d.update(stages=d["stages"][:3]),
    lambda d: d["stages"][4].update(comparison={"max_abs": "big"}),
    lambda d: d.update(shard={"index": "one"}),
    lambda d: d.update(kind="calibration"),
    lambda d: d.update(shard=None),
], ids=["schema", "stages", "comparison", "shard", "kind", "whole"])
def test_a_damaged_partial_report_is_refused_never_a_traceback(edit, classifier_parts, tmp_path, capsys):
    for i, part in enumerate(classifier_parts):
        write_json(part, tmp_path / f"p{i}.json")
    data = json.loads((tmp_path / "p0.json").read_text())
    edit(data)
    (tmp_path / "p0.json").write_text(json.dumps(data))
    assert main(["merge", str(tmp_path / "p0.json"), str(tmp_path / "p1.json")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "p0.json" in err and "internal error" not in err
