"""Deployment cells run the head too: on a transformers CLIPVisionModel with a BatchNorm grading head (written
apart from the bundled examples, its fixture frozen by `parity freeze`), a head that centres on the batch
fails the batch axis where it starts, a float16 cell is repaired by a module kept in float32, `choose` names
a passing cell, and a dynamic int8 cell that flips decisions fails on them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from parity.cli import main
from parity.commands.deployment import describe_module
from parity.commands.matrix import run_matrix
from parity.commands.repair import module_groups, repair_precision
from parity.errors import SpecError
from parity.model.layers import first_batch_dependent_module
from parity.model.pipeline import build_pipeline
from parity.model.quantize import dynamic_int8_copy
from parity.report.console import document, render_text, repair_line
from parity.report.html import render_html
from parity.report.markdown import render_markdown
from parity.results import Status, Tolerance
from parity.spec import load_spec, parse_axes
from tests.support.deployment_model import build_grader, write_grader_spec

pytest.importorskip("transformers")

CPU = {"device": ["cpu"]}


@pytest.fixture(scope="module")
def grader(tmp_path_factory):
    """The grader as trained: its spec (the fixture frozen from it) and its directory."""
    root = tmp_path_factory.mktemp("grader")
    return build_grader(root), root


@pytest.fixture(scope="module")
def float16_grader(tmp_path_factory):
    """A grader whose BatchNorm running_var (~1e5) is beyond float16's range; its activations are not."""
    return build_grader(tmp_path_factory.mktemp("grader16"), weakness="float16")


@pytest.fixture(scope="module")
def int8_grader(tmp_path_factory):
    """A grader with an outlier hidden feature and decisions bounded at a 10 % flip rate."""
    return build_grader(tmp_path_factory.mktemp("grader8"), weakness="int8", decisions="max_flip_rate = 0.1\n")


def _by(report, axis):
    return {r.cell[axis]: r for r in report.cells}


def test_a_head_centring_on_the_batch_fails_the_batch_axis_where_it_starts(grader):
    spec, root = grader
    axes = {**CPU, "dtype": ["float32"], "batch_size": [1, 8]}
    clean = run_matrix(load_spec(spec), axes=axes)
    for result in clean.cells:  # the trained head in eval mode: batch-size independent within the float32 budget
        assert result.status is Status.PASS and result.outputs and result.batch_outputs in (None, result.batch_outputs)
        assert result.outputs.max_abs <= result.outputs.tolerance.atol
        assert result.flips == 0 and 0 < result.flip_bound < 0.1
    centred = load_spec(write_grader_spec(root, head_class="BatchCentredGradeHead", name="centred.toml"))
    report = _by(run_matrix(centred, axes=axes), "batch_size")
    batched = report[8]
    assert batched.status is Status.FAIL
    assert batched.batch_comparison and not batched.batch_outputs  # the backbone is not the one mixing
    assert batched.reason.startswith("batch dependence: at batch size 8 the same images' head outputs differ")
    assert "it starts at head.centre (BatchCentre" in batched.reason
    assert "batch dependence" not in report[1].reason


def test_a_failing_float16_cell_is_repaired_by_keeping_the_head_norm_in_float32(float16_grader):
    spec = load_spec(float16_grader)
    report = _by(run_matrix(spec, axes={**CPU, "dtype": ["float32", "float16"], "batch_size": [8]}), "dtype")
    assert report["float32"].status is Status.PASS
    half = report["float16"]
    assert half.status is Status.FAIL and half.comparison  # the backbone holds float16; the head does not
    assert not half.outputs and half.reason.startswith("outputs: the head's outputs")
    repair = repair_precision(spec, dtype="float16", samples=8)
    assert not repair.before or repair.reason_before
    assert repair.keep == ("head.norm",) and repair.confirmed and repair.after and not repair.reason_after
    assert "kept = [copy.deepcopy(head.norm)]; model.to(torch.float16); head.to(torch.float16); head.norm = kept[0]" \
        in repair.code()
    assert "keep `head.norm` in float32, confirmed by re-running the cell" in repair_line(repair)


def test_choose_names_a_passing_cell_and_exits_0(grader, tmp_path, capsys):
    spec, _ = grader
    out = tmp_path / "choice.json"
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CHOSEN" in printed and "flip bound" in printed
    data = json.loads(out.read_text())
    chosen = data["chosen"]["cpu"]
    [row] = [row for row in data["rows"] if row["cell"] == chosen]
    assert row["verdict"] == "PASS" and row["flips"] == 0 and row["flip_bound"] < 0.1
    cells = {c["cell"]["id"]: c for c in data["matrix"]["cells"]}
    assert cells[chosen]["outputs"]["max_abs"] <= cells[chosen]["outputs"]["tolerance"]["atol"]


def test_a_dynamic_int8_cell_that_flips_decisions_fails_and_is_repaired(int8_grader):
    spec = load_spec(int8_grader)
    report = run_matrix(spec, axes={**CPU, "dtype": ["float32"], "quantize": ["none", "dynamic_int8", "int8"],
                                    "batch_size": [8]})
    cells = _by(report, "quantize")
    assert cells["none"].status is Status.PASS and cells["none"].flips == 0
    quantized = cells["dynamic_int8"]
    assert quantized.cell.id == "pooler_output-cpu-float32-q_dynamic_int8"
    assert quantized.status is Status.FAIL and quantized.flips > 0
    assert quantized.flip_bound > 0.1 > cells["none"].flip_bound
    assert "decisions: threshold:" in quantized.reason and "max_flip_rate" in quantized.reason
    assert cells["int8"].status is Status.SKIP  # static int8 is the exported graph's (runtime onnxruntime, openvino)
    assert cells["int8"].reason.startswith("cannot deploy: quantize = int8 is made by onnxruntime.quantization")
    data = document(report)
    for text in (render_markdown(data), render_html(data), render_text(report, width=260)):
        assert "flip bound" in text and "out max abs" in text
    repair = repair_precision(spec, dtype="float32", quantize="dynamic_int8", samples=8)
    assert repair.confirmed and "head.fc2" in repair.keep and not repair.reason_after
    assert "unquantized" in repair_line(repair)
    # The printed code quantizes exactly what the confirmed cell quantized.
    pipeline = build_pipeline(spec, fingerprints=False)
    printed = {"torch": torch, "model": pipeline.backbone, "head": pipeline.head}
    with warnings.catch_warnings():  # torch.ao announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(repair.code(), printed)  # noqa: S102 - the repair's own code, run as a user would paste it
    outer = tuple(k.removeprefix("head.") for k in repair.keep if k.startswith("head."))
    inner = tuple(k for k in repair.keep if not k.startswith("head."))
    for name in ("model", "head"):
        expected = dynamic_int8_copy(getattr(build_pipeline(spec, fingerprints=False), "backbone" if name == "model"
                                             else "head"), inner if name == "model" else outer)
        assert _quantized(printed[name]) == _quantized(expected)


def _quantized(module) -> list[str]:
    return [n for n, m in module.named_modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]


def test_the_deployment_matrix_runs_on_transformers_but_pixel_axes_are_refused(grader):
    spec, _ = grader
    groups = module_groups(build_pipeline(load_spec(spec), fingerprints=False).backbone)
    # transformers' own nesting (a vision_model wrapper or not, by version) is looked through
    order = [next(i for i, g in enumerate(groups) if g.endswith(name))
             for name in ("embeddings", "encoder.layers.0", "encoder.layers.1", "post_layernorm")]
    assert order == sorted(order) and len(set(order)) == 4
    with pytest.raises(SpecError, match="only deployment axes"):
        run_matrix(load_spec(spec), axes={"interpolation": ["bicubic", "bilinear"]})
    assert parse_axes({"quantize": ["dynamic_int8"]}, where="t") == {"quantize": ("dynamic_int8",)}
    with pytest.raises(SpecError, match="quantize"):
        parse_axes({"quantize": ["int4"]}, where="t")


def test_a_batchnorm_left_in_training_mode_is_named_with_its_mode():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, 5)
    # features (N, 4 channels, 3 positions): a batch of one still has statistics, over the positions
    head = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Unflatten(1, (4, 3)), torch.nn.BatchNorm1d(4),
                               torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    head[2].train()  # the shipped bug: one module back in training mode after .eval()
    images = torch.randn(4, 6)

    def run(start: int, stop: int) -> None:
        head(backbone(images[start:stop]))

    start = first_batch_dependent_module({"backbone": backbone, "head": head}, run, 4, atol=1e-5, rtol=1.3e-6)
    assert start.module == "head.2" and start.max_abs > 1e-2
    assert describe_module(head[2]).startswith("BatchNorm1d in training mode: it normalises with the batch's")
    head[2].eval()
    assert first_batch_dependent_module({"backbone": backbone, "head": head}, run, 4, atol=1e-5, rtol=1.3e-6) is None


def test_a_decisions_gate_accepts_a_cell_whose_drift_flips_no_decision(grader, tmp_path):
    """As `parity check` with ``[decisions].gate = "decisions"``: numeric drift that flips no decision passes.

    float16 moves the grader's outputs by about 1e-3 (budget here 1e-5); its smallest reference output is
    about 5e-3 from the threshold, so no decision flips on any CPU whose float16 error is within 5x of that.
    """
    axes, tight = {**CPU, "dtype": ["float16"], "batch_size": [8]}, Tolerance(atol=1e-5, rtol=0.0)
    decisions_gate = build_grader(tmp_path, decisions='gate = "decisions"\n')
    (strict,) = run_matrix(load_spec(grader[0]), axes=axes, tolerance=tight).cells
    (lenient,) = run_matrix(load_spec(decisions_gate), axes=axes, tolerance=tight).cells
    assert strict.status is Status.FAIL and not strict.outputs and strict.flips == 0
    assert strict.reason.startswith("outputs: ")
    assert lenient.status is Status.PASS and not lenient.outputs and not lenient.comparison and lenient.flips == 0
    assert lenient.reason.startswith("drift whose decisions pass (0 changed")
    assert 'gate = "decisions"' in lenient.reason and "embeddings: max abs" in lenient.reason
