"""Bad inputs, round two, for the runners of shipped code: silent passes and misleading errors.

Values of another shape never pass, whatever the gate; numbers as strings are not outputs; a
handler that is not a .py file and an ONNX graph with a fixed batch of 0 are refused naming
what to change. The command lines run in one process (`tests.support.bad_input_runner`); the
candidates are written here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from parity.store.fixtures import load_fixture
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import write_spec
from tests.support.corpus import Case, run_corpus

DECISIONS_GATE = {"threshold = 0.0": 'threshold = 0.0\ngate = "decisions"'}


def _rows():
    fixture = load_fixture(EXAMPLE_FIXTURES)
    return fixture, list(enumerate(fixture.rows))


def _wider_log(t: Path) -> Path:
    """A service log whose embeddings have one more component than the reference's, outputs unchanged."""
    fixture, rows = _rows()
    lines = [{"image": str(row.image.resolve()), "input_biases": list(row.input_biases),
              "embedding": fixture.embeddings[i].tolist() + [0.0], "outputs": fixture.outputs[i].tolist()}
             for i, row in rows]
    path = t / "service.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _strings_app(t: Path) -> Path:
    """An app returning its scores as strings (``["0.12", ...]``), as a JSON-minded service might."""
    fixture, rows = _rows()
    table = {row.image.name: [f"{v:.9g}" for v in fixture.outputs[i]] for i, row in rows}
    (t / "stringly.py").write_text(f"import os\n\nTABLE = {table!r}\n\n\ndef predict(path):\n"
                                   "    return TABLE[os.path.basename(path)]\n")
    spec = write_spec(t)
    spec.write_text(spec.read_text() + f'\n[candidate]\npython = "stringly:predict"\ninputs = ["image_path"]\n'
                                       f'python_path = "{t}"\n')
    return spec


def _strings_handler(t: Path, name: str = "handler.py") -> Path:
    """A handler answering {"scores": [strings]} by the sha256 of the bytes it is sent."""
    fixture, rows = _rows()
    table = {hashlib.sha256(row.image.read_bytes()).hexdigest(): [str(v) for v in fixture.outputs[i].tolist()]
             for i, row in rows}
    (t / name).write_text(f"import hashlib\n\nTABLE = {table!r}\n\n\nclass EndpointHandler:\n"
                          "    def __init__(self, path=''):\n        self.path = path\n\n"
                          "    def __call__(self, data):\n"
                          "        return {'scores': TABLE[hashlib.sha256(data['inputs']).hexdigest()]}\n")
    spec = write_spec(t)
    spec.write_text(spec.read_text() + f'\n[candidate]\nendpoint_handler = "{name}"\nsend = "bytes"\n'
                                       'output_key = "scores"\n')
    return spec


def _zero_batch_graph(t: Path) -> Path:
    """A head graph exported with a fixed batch of 0: embedding (0, D) -> outputs (0, L)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    fixture = load_fixture(EXAMPLE_FIXTURES)
    width, outputs = fixture.embeddings.shape[1], fixture.outputs.shape[1]
    weight = numpy_helper.from_array(np.zeros((width, outputs), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["embedding", "weight"], ["outputs"])], "head",
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [0, width])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [0, outputs])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = t / "head_batch0.onnx"
    onnx.save(model, str(path))
    return path


CASES = [
    Case("gate = decisions, logged embeddings of another shape", lambda t: [
        "check", "--spec", str(write_spec(t, DECISIONS_GATE)), "--candidate", f"logged:{_wider_log(t)}"],
         expect=(1,), says=("[17, 65] vs [17, 64]", "DRIFT: first drifted stage: embedding")),
    Case("python app returning numeric strings", lambda t: ["check", "--spec", str(_strings_app(t))], expect=(1,),
         says=("stringly:predict returned text, not numbers: ['", "return floats")),
    Case("handler returning numeric strings", lambda t: ["check", "--spec", str(_strings_handler(t))], expect=(1,),
         says=("the handler returned text, not numbers",)),
    Case("handler file named .txt", lambda t: ["check", "--spec", str(_strings_handler(t, "handler.txt"))],
         says=("handler.txt is not a .py file",)),
    Case("onnx graph with a fixed batch of 0", lambda t: [
        "check", "--spec", str(write_spec(t)), "--candidate", f"onnx:{_zero_batch_graph(t)}"],
         says=("input 'embedding' has the fixed shape [0, 64]", "dynamic batch dimension")),
]


def test_every_bad_runner_input_ends_in_a_clear_error(tmp_path):
    problems = run_corpus(CASES, tmp_path)
    assert not problems, "\n\n".join(problems)


def test_a_shape_mismatch_is_never_accepted_by_the_decisions_gate(example_spec, tmp_path):
    """The report's verdict and a service diagnosis built on it: drift, not 'drift without decision flips'."""
    from parity.commands.check import run_check
    from parity.results import ServiceDiagnosis, Status, Verdict
    from parity.spec import CandidateSpec

    log = _wider_log(tmp_path)
    spec = dataclasses.replace(example_spec, decisions=dataclasses.replace(example_spec.decisions, gate="decisions"),
                               candidate=CandidateSpec(kind="logged", target=str(log)))
    report = run_check(spec)
    assert report.stage("decisions").status is Status.PASS  # no decision flipped: not enough
    assert report.reshaped == ("embedding",)
    assert report.verdict is Verdict.DRIFT and not report.passed
    service = ServiceDiagnosis(str(log), 17, False, ("embedding", "outputs"), float("inf"), gate="decisions",
                               decisions=report.stage("decisions").decisions, report=report)
    assert not service.passed
    assert dataclasses.replace(service, report=None).passed  # the same flips without the shapes would pass
