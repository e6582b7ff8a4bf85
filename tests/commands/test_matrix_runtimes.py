"""The matrix's runtime, quantize and threads axes: exported and compiled backbones are judged like the eager
one, carry their export or compile time as their load, and cells that cannot run here skip with the reason."""

from __future__ import annotations

import sys

import pytest
import torch

from parity.commands.choose import DEPLOYMENT_AXES, deployment_axes
from parity.commands.matrix import expand_matrix, run_matrix
from parity.report.console import render_text
from parity.results import Status
from parity.spec import load_spec, parse_axes
from tests.support.specs import write_spec

CPU = {"device": ["cpu"], "dtype": ["float32"]}


def _by_id(report) -> dict:
    return {r.cell.id: r for r in report.cells}


def test_exported_runtimes_pass_at_every_thread_count_and_carry_their_costs(example_spec, monkeypatch):
    import timm.models.vision_transformer as vit

    callers = []
    original = vit.VisionTransformer.forward_features

    def watched(self, x):  # every trunk call, traced for an export or run eagerly, comes through the batch loop
        frame, names = sys._getframe(1), set()
        while frame is not None:
            names.add(frame.f_globals.get("__name__"))
            frame = frame.f_back
        callers.append("parity.model.batches" in names)
        return original(self, x)

    monkeypatch.setattr(vit.VisionTransformer, "forward_features", watched)
    before = torch.get_num_threads()
    report = run_matrix(example_spec, axes={**CPU, "runtime": ["eager", "onnxruntime", "openvino"], "threads": [1, 2]})
    assert torch.get_num_threads() == before  # each cell's threads are restored after it
    assert callers and all(callers)
    cells = _by_id(report)
    assert list(cells) == [f"pre_logits-bicubic-pil-cpu-float32-{runtime}-t{n}"
                           for runtime in ("eager", "onnxruntime", "openvino") for n in (1, 2)]
    for result in cells.values():
        assert result.status is Status.PASS, result.reason
        cost = result.cost
        assert cost.images == 17 and 0 < cost.latency_p50_ms <= cost.latency_p95_ms and cost.throughput > 0
    # an exported cell's load is its own export and session: it is measured, not the pipeline's build
    assert all(cells[f"pre_logits-bicubic-pil-cpu-float32-{r}-t1"].cost.load_s > 0 for r in ("onnxruntime", "openvino"))
    assert report.reproducing("runtime") == ["eager", "onnxruntime", "openvino"]
    assert report.reproducing("threads") == [1, 2]
    text = render_text(report, width=240)
    assert "onnxruntime-t2" in text and "p50 ms" in text


def test_int8_and_impossible_cells(example_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # OpenVINO absent: its cells skip naming the extra
    report = run_matrix(example_spec, axes={"device": ["cpu"], "dtype": ["float32", "bfloat16"],
                                            "runtime": ["onnxruntime", "openvino"], "quantize": ["none", "int8"]})
    cells = _by_id(report)
    exact = cells["pre_logits-bicubic-pil-cpu-float32-onnxruntime-q_none"]
    assert exact.status is Status.PASS
    # int8 moves the embeddings far beyond the float32 budget: the cell fails on them, it is not skipped
    int8 = cells["pre_logits-bicubic-pil-cpu-float32-onnxruntime-q_int8"]
    assert int8.status is Status.FAIL and int8.comparison.shapes_match and int8.comparison.max_abs > 1e-2
    assert int8.cost is not None and int8.cost.load_s > 0
    skipped = {cell_id: r.reason for cell_id, r in cells.items() if r.status is Status.SKIP}
    for quantize in ("none", "int8"):
        assert "onnxruntime runs the exported float32 graph" in \
            skipped[f"pre_logits-bicubic-pil-cpu-bfloat16-onnxruntime-q_{quantize}"]
    for cell_id in ("float32-openvino-q_none", "float32-openvino-q_int8", "bfloat16-openvino-q_none"):
        assert "pip install 'parity[deploy]'" in skipped[f"pre_logits-bicubic-pil-cpu-{cell_id}"]
    assert "starts from the float32 module" in skipped["pre_logits-bicubic-pil-cpu-bfloat16-openvino-q_int8"]
    assert all(reason.startswith("cannot deploy: ") for reason in skipped.values())
    assert set(skipped) == {c for c in cells if "openvino" in c or "bfloat16" in c}
    assert not report.passed  # the int8 deployment cell drifts


def test_eager_cells_refuse_onnxruntime_quantization(example_spec):
    report = run_matrix(example_spec, axes={**CPU, "quantize": ["int8"]})
    (cell,) = report.cells
    assert cell.status is Status.SKIP
    assert cell.reason == ("cannot deploy: quantize = int8 is made by onnxruntime.quantization for runtime "
                           "onnxruntime or openvino, not eager")
    # torch's dynamic int8 copy: a float32 CPU model only, refused per cell with the runtimes' own reason
    report = run_matrix(example_spec, axes={"device": ["cpu", "cuda"], "dtype": ["float32", "bfloat16"],
                                            "quantize": ["dynamic_int8"], "batch_size": [8]})
    reasons = {(r.cell["device"], r.cell["dtype"]): (r.status, r.reason) for r in report.cells}
    assert reasons["cpu", "float32"][0] is not Status.SKIP
    assert reasons["cpu", "bfloat16"] == (Status.SKIP, "quantize = dynamic_int8 starts from the float32 module, "
                                                       "not bfloat16")
    assert reasons["cuda", "float32"][0] is Status.SKIP


@pytest.mark.slow
def test_a_compiled_backbone_passes(example_spec):
    report = run_matrix(example_spec, axes={**CPU, "runtime": ["compile"], "batch_size": [1]})
    (cell,) = report.cells
    assert cell.status is Status.PASS, cell.reason
    assert cell.cost.load_s > 0  # the compile, measured as the cell's load


def test_a_compiler_failure_skips_the_cell_with_its_message(example_spec, monkeypatch):
    def broken(module, **kwargs):
        def call(*args):
            raise RuntimeError("InductorError: no C++ compiler found\nlong log")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    (cell,) = run_matrix(example_spec, axes={**CPU, "runtime": ["compile"]}).cells
    assert cell.status is Status.SKIP
    assert cell.reason == "cannot deploy: torch.compile failed: RuntimeError: InductorError: no C++ compiler found"


def test_runtime_and_threads_axes_in_ids_and_grammar(example_spec):
    cells = expand_matrix(example_spec, {"runtime": ["eager", "openvino"], "threads": [1, 4]})
    assert [c.id for c in cells] == ["pre_logits-bicubic-pil-cpu-float32-eager-t1",
                                     "pre_logits-bicubic-pil-cpu-float32-eager-t4",
                                     "pre_logits-bicubic-pil-cpu-float32-openvino-t1",
                                     "pre_logits-bicubic-pil-cpu-float32-openvino-t4"]
    (own,) = expand_matrix(example_spec, {})
    assert own["runtime"] == "eager" and own["quantize"] == "none" and own["threads"] == torch.get_num_threads()
    assert parse_axes({"threads": [1, 2.0], "runtime": ["compile"], "quantize": ["none", "dynamic_int8", "int8"]},
                      where="t") == {"threads": (1, 2), "runtime": ("compile",),
                                     "quantize": ("none", "dynamic_int8", "int8")}


def test_choose_varies_runtimes_only_when_the_spec_lists_them(tmp_path, example_spec):
    assert {"runtime", "threads"} <= set(DEPLOYMENT_AXES)
    assert "runtime" not in deployment_axes(example_spec, "cpu")["cpu"]  # exports are slow: not by default
    spec = load_spec(write_spec(tmp_path, {'dtype = ["float32", "bfloat16"]':
                                           'dtype = ["float32"]\nruntime = ["eager", "onnxruntime"]\nthreads = [1]'}))
    axes = deployment_axes(spec, "cpu")["cpu"]
    assert axes["runtime"] == ("eager", "onnxruntime") and axes["threads"] == (1,)
