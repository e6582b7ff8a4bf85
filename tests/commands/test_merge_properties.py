"""`parity merge` is a function of the set of parts: every order gives one document, and parts made
from different inputs (fixture data, spec contents) or carrying damaged embeddings do not merge.

Parts are real partial reports of a drifting candidate (bilinear resize, with flips and pair
decisions), of a matrix, and diagnoses wrapped around the check parts whose shards disagree on the
fix; each goes through JSON as `parity merge` reads it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.commands.check import run_check
from parity.errors import SpecError
from parity.commands.merge import load_partial, merge_reports
from parity.report.console import document, write_json
from parity.results import Cause, Change, Diagnosis
from parity.spec import load_spec
from tests.support.specs import write_spec

SHARDS = 4
DRIFT = {'interpolation = "bicubic"': 'interpolation = "bilinear"',
         "threshold = 0.0": "threshold = 0.0\nverification_threshold = 0.9"}
ORDERS = settings(max_examples=30, deadline=None)


def _through_json(reports, directory: Path, stem: str) -> list[Path]:
    paths = []
    for report in reports:
        path = directory / f"{stem}{len(paths) + 1}.json"
        write_json(report, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    spec_path = write_spec(root, DRIFT)
    spec = load_spec(spec_path)
    checks = [run_check(spec, shard=(i, SHARDS)) for i in range(1, SHARDS + 1)]
    whole = run_check(spec)
    assert not whole.passed  # a drift with flips: the verdict is worth keeping stable
    from parity.commands.matrix import run_matrix

    axes = {"interpolation": ("bicubic", "bilinear"), "device": ("cpu",), "dtype": ("float32",)}
    matrices = [run_matrix(spec, axes=axes, shard=(i, 2)) for i in (1, 2)]
    # Diagnoses whose shards found different fixes, with one cause both found at other strengths.
    shared, other = Change("preprocess", (("interpolation", "bicubic"),)), Change("preprocess", (("crop_pct", 0.9),))
    diagnoses = [Diagnosis(part, (Cause(shared, "pixels", "max abs", 0.1 * (i + 1), 0.0, True, '"bilinear"'),),
                           (shared if i % 2 else other,), i % 2 == 1, affected=tuple(part.shard.names[:2]),
                           total=part.shard.of, notes=(f"shard note {i}",))
                 for i, part in enumerate(checks)]
    return {"root": root, "spec": spec_path, "whole": whole,
            "check": _through_json(checks, root, "check"), "matrix": _through_json(matrices, root, "matrix"),
            "diagnosis": _through_json(diagnoses, root, "diagnosis")}


def _merged_document(paths: list[Path]) -> str:
    merged = merge_reports([load_partial(p) for p in paths], sources=paths)
    return json.dumps(document(merged), sort_keys=True)


@ORDERS
@given(kind=st.sampled_from(["check", "matrix", "diagnosis"]), data=st.data())
def test_every_order_of_the_parts_merges_to_one_document(made, kind, data):
    paths = made[kind]
    order = data.draw(st.permutations(paths))
    assert _merged_document(list(order)) == _merged_document(paths)


def test_the_merged_verdict_is_the_unsharded_verdict_in_every_order(made):
    import itertools

    parts = [load_partial(p) for p in made["check"]]
    verdicts = {merge_reports(list(order)).verdict for order in itertools.permutations(parts)}
    assert verdicts == {made["whole"].verdict}


def test_parts_of_one_spec_file_edited_between_shards_do_not_merge(made, tmp_path):
    spec = Path(shutil.copy(made["spec"], tmp_path / "candidate.toml"))
    early = run_check(load_spec(spec), shard=(1, 2))
    spec.write_text(spec.read_text().replace("batch_size = 8", "batch_size = 4"))
    late = run_check(load_spec(spec), shard=(2, 2))
    paths = _through_json([early, late], tmp_path, "part")
    with pytest.raises(SpecError, match=r"different spec contents \(.*part1\.json: spec sha256 [0-9a-f]{16}; "
                                        r".*part2\.json: spec sha256 [0-9a-f]{16}\)"):
        merge_reports([load_partial(p) for p in paths], sources=paths)


def test_the_same_spec_contents_at_another_path_merge(made, tmp_path):
    elsewhere = Path(shutil.copy(made["spec"], tmp_path / "checked-out-elsewhere.toml"))
    parts = [run_check(load_spec(made["spec"]), shard=(1, 2)), run_check(load_spec(elsewhere), shard=(2, 2))]
    merged = merge_reports([load_partial(p) for p in _through_json(parts, tmp_path, "part")])
    assert merged.verdict == made["whole"].verdict


def test_parts_written_before_they_carried_digests_are_compared_by_path(made, tmp_path):
    old = []
    for i, path in enumerate(made["check"][:2], start=1):
        data = json.loads(path.read_text())
        data["shard"]["version"] = json.loads(data["shard"]["version"])["fixture"]
        data["shard"]["count"] = 2
        if i == 2:
            data["spec"] = "/another/checkout/candidate.toml"
        old.append(tmp_path / f"old{i}.json")
        old[-1].write_text(json.dumps(data))
    with pytest.raises(SpecError, match="different specs .*old1.json.*old2.json"):
        merge_reports([load_partial(p) for p in old], sources=old)


def test_parts_of_other_fixture_data_do_not_merge(made, tmp_path):
    data = json.loads(made["check"][1].read_text())
    version = json.loads(data["shard"]["version"])
    data["shard"]["version"] = json.dumps({**version, "fixture": "0" * 64})
    edited = tmp_path / "regenerated.json"
    edited.write_text(json.dumps(data))
    paths = [made["check"][0], edited, *made["check"][2:]]
    with pytest.raises(SpecError, match="different fixture data .*regenerated.json"):
        merge_reports([load_partial(p) for p in paths], sources=paths)


@pytest.mark.parametrize("side", ["candidate", "reference"])
def test_a_part_with_nan_embeddings_its_stages_do_not_report_is_refused(made, tmp_path, side):
    data = json.loads(made["check"][0].read_text())
    vectors = data["shard"]["vectors"]
    values = np.frombuffer(base64.b64decode(vectors[side]), "<f4").copy()
    values[::3] = np.nan
    vectors[side] = base64.b64encode(values.tobytes()).decode()
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"damaged\.json: its embeddings for pair decisions hold NaN"):
        load_partial(damaged)


def test_the_spec_digest_is_of_the_files_bytes(made):
    import hashlib

    from parity.store.shards import read_part_version

    version = read_part_version(load_partial(made["check"][0]).shard.version)
    assert version["spec"] == hashlib.sha256(Path(made["spec"]).read_bytes()).hexdigest()
    assert dataclasses.asdict(load_partial(made["matrix"][0]))["shard"]["version"] != ""
