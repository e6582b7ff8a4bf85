"""The gate's explainer: `diff_config` names the recorded fields the candidate changed, and `explain_run` turns
them into a fix on the stage each one moves first, in the spec's terms; stages after it follow from it.

The stage results are made by hand (nothing is re-judged); the recorded configuration is the bundled
fixture's, the candidate's that record with one field changed, as a spec runner would describe it.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from parity.explain.fixes import diff_config, explain_run
from parity.results import CandidateRun, ConfigDiff, KeyDiff, StageResult, Status
from parity.store.fixtures import load_fixture
from parity.store.forensics import ABSENT
from tests.support.paths import EXAMPLE_FIXTURES

# -- diff_config ------------------------------------------------------------------------------------------------


def test_diff_config_names_each_differing_field_by_its_dotted_path():
    recorded = {"preprocess": {"interpolation": "bicubic", "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5]},
                "runtime": {"dtype": "float32", "device": "cpu"}}
    candidate = {"preprocess": {"interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5]},
                 "runtime": {"dtype": "float16", "device": "cpu"}}
    assert diff_config(recorded, candidate) == (ConfigDiff("preprocess.interpolation", "bicubic", "bilinear"),
                                                ConfigDiff("runtime.dtype", "float32", "float16"))


def test_diff_config_compares_lists_and_tuples_by_value():
    recorded = {"preprocess": {"input_size": [3, 224, 224], "pairs": [[1, 2], [3, 4]]}}
    assert diff_config(recorded, {"preprocess": {"input_size": (3, 224, 224), "pairs": ((1, 2), (3, 4))}}) == ()
    (diff,) = diff_config(recorded, {"preprocess": {"input_size": (3, 336, 336), "pairs": ((1, 2), (3, 4))}})
    assert diff.field == "preprocess.input_size"


def test_diff_config_leaves_out_fields_only_one_side_records():
    """A field the fixture did not record (an older manifest) or the candidate cannot describe is no difference."""
    recorded = {"preprocess": {"interpolation": "bicubic", "crop_pct": 0.9}}
    candidate = {"preprocess": {"interpolation": "bicubic", "resize_backend": "tensor"}, "runtime": {"dtype": "x"}}
    assert diff_config(recorded, candidate) == ()


def test_diff_config_compares_kwargs_whole_and_structures_module_by_module():
    recorded = {"backbone": {"kwargs": {"depth": 2, "width": 64}},
                "head": {"structure": {"fc": "Linear", "fc.weight": "[5, 64]", "bn": "BatchNorm1d"}}}
    candidate = {"backbone": {"kwargs": {"depth": 3, "width": 64}},
                 "head": {"structure": {"fc": "Linear", "fc.weight": "[5, 32]", "drop": "Dropout"}}}
    diffs = {d.field: (d.reference, d.candidate) for d in diff_config(recorded, candidate)}
    assert diffs == {
        "backbone.kwargs": ({"depth": 2, "width": 64}, {"depth": 3, "width": 64}),
        "head.structure.fc.weight": ("[5, 64]", "[5, 32]"),
        "head.structure.bn": ("BatchNorm1d", ABSENT),
        "head.structure.drop": (ABSENT, "Dropout"),
    }


# -- explain_run --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(EXAMPLE_FIXTURES)


def _described(fixture, **changes: dict) -> dict:
    """The fixture's recorded pipeline with ``changes`` (section -> fields) applied: the candidate's description."""
    description = copy.deepcopy(dict(fixture.pipeline))
    for section, fields in changes.items():
        description[section] = {**description[section], **fields}
    return description


def _stages(**statuses: Status) -> dict[str, StageResult]:
    """Every stage passing but those named."""
    order = ("load", "weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")
    return {name: StageResult(name, statuses.get(name, Status.PASS), f"{name} as judged") for name in order}


def test_a_settable_field_is_fixed_at_the_stage_it_moves_first(example_spec, fixture):
    run = CandidateRun("spec", description=_described(fixture, preprocess={"interpolation": "bilinear"}))
    stages = _stages(pixels=Status.FAIL, embedding=Status.FAIL, outputs=Status.FAIL)
    explained, diffs = explain_run(stages, run, fixture, example_spec)

    assert [d for d in diffs if d.field.startswith(("preprocess.", "backbone.", "head.", "runtime."))] == [
        ConfigDiff("preprocess.interpolation", "bicubic", "bilinear")]
    (fix,) = [n for n in explained["pixels"].notes if n.startswith("Fix:")]
    assert '[preprocess].interpolation = "bicubic"' in fix and '"bilinear"' in fix
    # The stages after it follow from the pixels: no fix of their own, a note naming the first stage.
    for stage in ("embedding", "outputs"):
        assert not any(n.startswith("Fix:") for n in explained[stage].notes), stage
        assert any("pixels" in n for n in explained[stage].notes), stage
    # Passing stages are left as judged.
    assert explained["head"].notes == () and explained["head"].status is Status.PASS
    assert {name: s.status for name, s in explained.items()} == {name: s.status for name, s in stages.items()}


def test_a_runtime_field_is_fixed_at_the_embedding_stage(example_spec, fixture):
    run = CandidateRun("spec", description=_described(fixture, runtime={"dtype": "float16"}))
    explained, _ = explain_run(_stages(embedding=Status.FAIL, outputs=Status.FAIL), run, fixture, example_spec)
    embedding = explained["embedding"].notes
    assert any(n.startswith("Fix:") and '[runtime].dtype = "float32"' in n for n in embedding), embedding
    # The pixels matched: the note says the backbone computes differently, not the preprocessing.
    assert any("pixels match" in n for n in embedding)
    assert not any("[runtime]" in n for n in explained["outputs"].notes)


def test_a_field_the_fixture_was_made_without_is_fixed_by_removing_it(example_spec, fixture):
    assert fixture.pipeline["head"]["input_biases_order"] is None
    run = CandidateRun("spec", description=_described(fixture, head={"input_biases_order": [1, 0]}))
    explained, diffs = explain_run(_stages(head=Status.FAIL, outputs=Status.FAIL), run, fixture, example_spec)
    assert ConfigDiff("head.input_biases_order", None, [1, 0]) in diffs
    assert any(n.startswith("Fix: remove [head].input_biases_order") for n in explained["head"].notes)


def test_a_field_no_spec_sets_is_named_with_both_values_not_given_a_fix(example_spec, fixture):
    run = CandidateRun("spec", description=_described(fixture, backbone={"embedding_dim": 32}))
    explained, _ = explain_run(_stages(embedding=Status.FAIL), run, fixture, example_spec)
    notes = explained["embedding"].notes
    assert any(n.startswith("backbone.embedding_dim:") and "64" in n and "32" in n for n in notes), notes
    assert not any("embedding_dim" in n and n.startswith("Fix:") for n in notes)


def test_a_strict_load_failure_is_left_as_judged(example_spec, fixture):
    failure = KeyDiff("head", "head.pth", missing=("fc.weight",))
    stages = _stages(load=Status.FAIL)
    run = CandidateRun("spec", description=_described(fixture, preprocess={"interpolation": "bilinear"}),
                       load_failure=failure)
    assert explain_run(stages, run, fixture, example_spec) == (stages, ())


def test_a_fixture_that_records_a_field_the_candidate_does_not_describe_gives_no_fix(example_spec, fixture):
    described = _described(fixture)
    del described["preprocess"]["interpolation"]
    recorded = replace(fixture, manifest={**fixture.manifest,
                                          "pipeline": _described(fixture, preprocess={"interpolation": "bilinear"})})
    explained, diffs = explain_run(_stages(pixels=Status.FAIL), CandidateRun("spec", description=described),
                                   recorded, example_spec)
    assert not any(d.field == "preprocess.interpolation" for d in diffs)
    assert not any("interpolation" in n and n.startswith("Fix:") for n in explained["pixels"].notes)
