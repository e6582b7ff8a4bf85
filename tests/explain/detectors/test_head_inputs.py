"""The head's inputs: re-ordered or re-coded input_biases, the dtype, modules left in training mode."""

from __future__ import annotations

import numpy as np
import pytest

from parity.explain.detectors import detect
from parity.explain.detectors.head_inputs import column_mapping, training_modules
from parity.results import CandidateRun
from tests.support.judging import judged

BIASES = np.array([[0, 0, 4], [1, 2, 0], [2, 3, 1], [0, 1, 2], [1, 3, 3]])


def test_a_swap_and_a_cycle_of_columns():
    found = column_mapping(BIASES[:, [1, 0, 2]], BIASES)
    assert found is not None and found.order == (1, 0, 2) and not found.recoded
    found = column_mapping(BIASES[:, [2, 0, 1]], BIASES)
    assert found is not None and found.order == (2, 0, 1)


def test_a_recoding_from_one():
    found = column_mapping(BIASES + 1, BIASES)
    assert found is not None and found.order == (0, 1, 2) and found.offsets == (1, 1, 1)
    found = column_mapping(BIASES[:, [1, 0, 2]] + np.array([0, 1, 0]), BIASES)
    assert found is not None and found.order == (1, 0, 2) and found.offsets == (0, 1, 0)


def test_nothing_that_is_not_a_mapping():
    assert column_mapping(BIASES, BIASES) is None  # the identity
    assert column_mapping(BIASES[::-1], BIASES) is None  # rows shuffled: no column mapping explains it
    same = np.array([[1, 1], [0, 0], [2, 2]])
    assert column_mapping(same, same) is None  # equal columns: a swap cannot be told apart
    assert column_mapping(BIASES[:1, [1, 0, 2]], BIASES[:1]) is None  # one sample proves nothing
    assert column_mapping(BIASES[:, :2], BIASES) is None


def test_swapped_columns_named_with_their_index_errors(dnn):
    fixture, spec = dnn
    swapped = {row.name: np.array(row.input_biases[::-1]) for row in fixture.rows}
    # "scene" has 4 categories, "source" 3: a scene of 3 in the source column is out of range
    raised = [name for name, b in swapped.items() if b[0] >= 3]
    assert raised
    rows = tuple(i for i, row in enumerate(fixture.rows) if row.name not in raised)
    run = CandidateRun(
        "python", rows=rows, outputs=fixture.outputs[list(rows)] + 0.3, head_outputs=fixture.outputs.copy(),
        head_inputs=swapped, sample_errors=tuple((n, "IndexError: index out of range in self") for n in raised),
        call_sites={"head": "handler.py:57 in __call__"})
    found = detect(run, fixture, judged(run, fixture, spec), spec)
    assert set(found) == {"decode", "outputs"}
    for stage in ("decode", "outputs"):
        finding = found[stage][0]
        assert finding.detector == "head_inputs.columns"
        shipped, _, trained = finding.cause.partition("; ")
        assert "input_biases" in shipped and shipped.endswith("('scene', 'source')")
        assert trained.endswith("('source', 'scene')")
        assert finding.fix.startswith("Change the shipped code: ") and "('source', 'scene')" in finding.fix
        assert finding.fix.endswith("(at handler.py:57 in __call__)")
    assert f"{len(raised)} sample(s) raised an index error" in found["decode"][0].evidence
    assert "'source' has 3 rows, 'scene' has 4 rows" in found["decode"][0].evidence


def test_batchnorm_in_training_mode_linked_to_its_error(dnn):
    fixture, spec = dnn
    message = "ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 128])"
    run = CandidateRun("python", sample_errors=tuple((row.name, message) for row in fixture.rows),
                       module_states={"head": (("body", "Sequential"), ("body.1", "BatchNorm1d"),
                                               ("body.3", "Dropout"))},
                       call_sites={"head": "app.py:20 in predict"})
    found = detect(run, fixture, judged(run, fixture, spec), spec)
    (finding,) = found["decode"]
    assert finding.detector == "head_inputs.training_mode"
    assert finding.fix.startswith("Change the shipped code: ") and "`.eval()`" in finding.fix
    assert "(body.1, body.3)" in finding.fix and finding.fix.endswith("(at app.py:20 in predict)")
    assert "BatchNorm in training mode raises on a batch of one" in finding.evidence
    assert "body.1 (BatchNorm1d), body.3 (Dropout)" in finding.evidence


def test_a_dropout_alone_in_training_mode_needs_random_outputs(dnn):
    fixture, spec = dnn
    rows = tuple(range(len(fixture.rows)))
    states = {"head": (("mlp.3", "Dropout"),)}
    calm = CandidateRun("python", rows=rows, outputs=fixture.outputs + 0.5, module_states=states)
    assert detect(calm, fixture, judged(calm, fixture, spec), spec) == {}  # Dropout(p=0) changes nothing
    random = CandidateRun("python", rows=rows, outputs=fixture.outputs + 0.5, module_states=states,
                          nondeterministic=("outputs",))
    (finding,) = detect(random, fixture, judged(random, fixture, spec), spec)["outputs"]
    assert finding.detector == "head_inputs.training_mode" and "changed between two identical calls" in finding.evidence
    assert training_modules([("a", "Linear"), ("b", "BatchNorm2d"), ("c", "DropPath")]) == [("b", "BatchNorm2d"),
                                                                                              ("c", "DropPath")]


def test_a_half_precision_backbone(dnn):
    fixture, spec = dnn
    rows = tuple(range(len(fixture.rows)))
    half = fixture.embeddings.astype(np.float16)
    run = CandidateRun("python", rows=rows, embeddings=half.astype(np.float32), dtypes={"backbone": "torch.float16"},
                       call_sites={"backbone": "app.py:12 in <module>"})
    (finding,) = detect(run, fixture, judged(run, fixture, spec), spec)["embedding"]
    assert finding.detector == "head_inputs.dtype"
    shipped, _, reference = finding.cause.partition("; ")
    assert "backbone" in shipped and "float16" in shipped and "`.half()`" in shipped and "float32" in reference
    assert finding.fix.startswith("Change the shipped code: ") and "float32" in finding.fix
    assert "(at app.py:12 in <module>)" in finding.fix
    # a drift far beyond float16 rounding is not blamed on the dtype
    moved = CandidateRun("python", rows=rows, embeddings=fixture.embeddings + 0.5, dtypes={"backbone": "float16"})
    assert detect(moved, fixture, judged(moved, fixture, spec), spec) == {}


@pytest.mark.parametrize("odd", [{"a.png": "x"}, {"nope": np.zeros(2)}, {}])
def test_odd_head_inputs_are_silent(dnn, odd):
    fixture, spec = dnn
    run = CandidateRun("python", rows=(0,), outputs=fixture.outputs[:1] + 1, head_inputs=odd)
    assert detect(run, fixture, judged(run, fixture, spec), spec) == {}


def test_categories_counted_from_one(dnn):
    fixture, spec = dnn
    shifted = {row.name: np.array(row.input_biases) + 1 for row in fixture.rows}
    rows = tuple(range(len(fixture.rows)))
    run = CandidateRun("python", rows=rows, outputs=fixture.outputs + 0.2, head_inputs=shifted)
    (finding,) = detect(run, fixture, judged(run, fixture, spec), spec)["outputs"]
    assert "'source' +1" in finding.cause and "'scene' +1" in finding.cause
    assert finding.fix.startswith("Change the shipped code: ") and "unshifted" in finding.fix
