"""Repair of a failing static int8 cell (runtime onnxruntime): on a transformers CLIPVisionModel written apart
from the bundled examples, whose first layer's MLP has an outlier hidden unit, onnxruntime's static int8 fails
the cell; leaving that layer's ONNX nodes out of the quantization (``nodes_to_exclude``) passes it, and the
printed ``quantize_static`` call, run on the user's own export of the backbone, gives a passing model.

The trained embedding here is scaled to about a quarter of unit scale (its final norm's weight), so that int8's
rounding elsewhere stays within the 8-bit budget: the outlier layer is the one module that breaks the cell.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from parity.commands.choose import choose
from parity.commands.matrix import run_matrix
from parity.commands.repair import module_groups, repair_precision
from parity.errors import SpecError
from parity.judge.arrays import compare_arrays
from parity.judge.tolerance import cell_tolerance
from parity.model.pipeline import build_pipeline
from parity.report.console import repair_line
from parity.results import Comparison, PrecisionRepair, Status, Tolerance
from parity.spec import load_spec
from parity.store.fixtures import load_fixture
from parity.store.images import load_image
from tests.support.deployment_model import build_grader, write_grader_spec

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

INT8_CELL = {"device": ["cpu"], "dtype": ["float32"], "runtime": ["onnxruntime"], "batch_size": [8]}


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """The grader whose backbone's first layer has an outlier MLP unit: its spec and directory."""
    root = tmp_path_factory.mktemp("outlier")
    return build_grader(root, backbone_weakness="int8"), root


@pytest.fixture(scope="module")
def repaired(outlier):
    spec, _ = outlier
    return repair_precision(load_spec(spec), dtype="float32", quantize="int8", runtime="onnxruntime")


def _layer(name: str) -> bool:
    """transformers nests the trunk in ``vision_model`` or not, by version."""
    return name.removeprefix("vision_model.") == "encoder.layers.0"


def test_the_static_int8_cell_fails_and_the_outlier_layer_is_left_unquantized(outlier, repaired):
    spec, _ = outlier
    report = run_matrix(load_spec(spec), axes={**INT8_CELL, "quantize": ["none", "int8"]})
    cells = {r.cell["quantize"]: r for r in report.cells}
    assert cells["none"].status is Status.PASS
    assert cells["int8"].status is Status.FAIL and not cells["int8"].comparison
    repair = repaired
    # the repair's first trial is the matrix's cell: the same export, calibration and budget
    assert repair.before.max_abs == pytest.approx(cells["int8"].comparison.max_abs, rel=0.05)
    assert repair.cell == "pooler_output-cpu-float32-onnxruntime-q_int8-bs8"
    assert len(repair.keep) == 1 and _layer(repair.keep[0])
    assert repair.confirmed and repair.after and not repair.reason_after
    assert repair.after.max_abs < repair.before.max_abs / 4
    assert repair.scopes in (("/encoder/layers.0/",), ("/vision_model/encoder/layers.0/",))
    assert repair.nodes and all(repair.scopes[0] in node for node in repair.nodes)
    assert any(node.endswith("/mlp/fc2/MatMul") for node in repair.nodes)
    line = repair_line(repair)
    assert "unquantized (float32), confirmed by re-running the cell" in line
    assert "quantize_static(model_input, model_output, calibration_data_reader" in line
    assert f"nodes_to_exclude=[node.name for node in onnx.load(model_input).graph.node if any(scope in node.name " \
           f"for scope in {repair.scopes!r})]" in line
    assert repair.tried <= 2 * len(module_groups(build_pipeline(load_spec(spec)).backbone)) + 3  # a bisection: before, all kept, halves..., after


class _Pooled(torch.nn.Module):
    """The user's own export wrapper (not parity's): pixels -> pooled embedding."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return self.clip(pixel_values=pixel_values).pooler_output


class _Reader:
    """The user's own calibration reader: the fixture's pixels in batches of 8 (as the cell's)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.batches = iter([{"pixel_values": pixels[s:s + 8]} for s in range(0, len(pixels), 8)])

    def get_next(self):
        return next(self.batches, None)


def test_the_printed_quantize_static_call_on_the_users_own_export_passes(outlier, repaired, tmp_path):
    import onnxruntime

    spec = load_spec(outlier[0])
    repair = repaired
    pipeline = build_pipeline(spec, fingerprints=False)
    fixture = load_fixture(spec.fixture_root())
    pixels = torch.stack([pipeline.preprocess(load_image(row.image, exif_transpose=spec.preprocess.exif_transpose))
                          for row in fixture.rows]).numpy()
    exported = tmp_path / "backbone.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(_Pooled(pipeline.backbone).eval(), (torch.from_numpy(pixels[:2]),), str(exported),
                          input_names=["pixel_values"], output_names=["pooled"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "pooled": {0: "batch"}}, dynamo=False)
    budget = cell_tolerance(spec, "float32", quantize="int8")

    def quantized_embeddings(code: str, out: str) -> np.ndarray:
        names = {"model_input": str(exported), "model_output": str(tmp_path / out),
                 "calibration_data_reader": _Reader(pixels)}
        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing" notice
        exec(code, names)  # noqa: S102 - the repair's own code, run as a user would paste it
        session = onnxruntime.InferenceSession(str(tmp_path / out), providers=["CPUExecutionProvider"])
        return session.run(None, {"pixel_values": pixels})[0]

    repaired_out = quantized_embeddings(repair.code(), "repaired.onnx")
    assert compare_arrays(repaired_out, fixture.embeddings, tolerance=budget, cosine=True)
    unrepaired = quantized_embeddings(repair.code().split(", nodes_to_exclude=")[0] + ")", "int8.onnx")
    assert not compare_arrays(unrepaired, fixture.embeddings, tolerance=budget, cosine=True)


def test_choose_repairs_the_failing_int8_cell(outlier):
    _, root = outlier
    matrix = '[matrix]\ndtype = ["float32"]\nbatch_size = [8]\nruntime = ["onnxruntime"]\nquantize = ["none", "int8"]\n'
    spec = load_spec(write_grader_spec(root, extra=matrix, name="choose.toml"))
    choice = choose(spec, device="cpu", repair=True)
    chosen = choice.report.cell(choice.chosen["cpu"]).cell
    assert chosen["runtime"] == "onnxruntime" and chosen["quantize"] == "none"
    [repair] = choice.repairs
    assert repair.quantize == "int8" and repair.runtime == "onnxruntime" and repair.confirmed
    assert len(repair.keep) == 1 and _layer(repair.keep[0])


def test_the_bundled_example_int8_cell_is_honestly_unrepairable(example_spec):
    """Its drift is in the root's own nodes (class token, position embeddings), outside every module group."""
    repair = repair_precision(example_spec, dtype="float32", quantize="int8", runtime="onnxruntime")
    assert not repair.confirmed and repair.keep == () and repair.after is None and repair.tried == 2
    assert repair.before.max_abs > 0.5  # far beyond the 8-bit budget (atol 0.05)
    line = repair_line(repair)
    assert line.startswith("repair pre_logits-cpu-float32-onnxruntime-q_int8-bs8: no module set found")
    assert "even every module group unquantized (float32) does not pass" in line and "quantize_static" not in line


@pytest.mark.parametrize(("options", "message"), [
    ({"quantize": "int8"}, "onnxruntime"),
    ({"quantize": "int8", "runtime": "onnxruntime", "dtype": "bfloat16"}, "float32 cell"),
    ({"quantize": "dynamic_int8", "runtime": "onnxruntime"}, "onnxruntime"),
    ({"runtime": "openvino", "quantize": "int8"}, "openvino"),
])
def test_a_repair_names_the_runtime_its_quantization_needs(example_spec, options, message):
    with pytest.raises(SpecError, match=message):
        repair_precision(example_spec, **{"dtype": "float32", **options})


def test_few_excluded_nodes_are_listed_by_name_unless_parity_s_wrapper_names_them():
    before = Comparison(candidate_shape=(1, 4), reference_shape=(1, 4), tolerance=Tolerance(atol=0.05, rtol=0.05))
    timm = PrecisionRepair("c", "float32", before, keep=("norm",), quantize="int8", runtime="onnxruntime",
                           nodes=("/norm/LayerNormalization",), scopes=("/norm/",))
    assert timm.code().endswith("nodes_to_exclude=['/norm/LayerNormalization'])")
    wrapped = PrecisionRepair("c", "float32", before, keep=("post_layernorm",), quantize="int8", runtime="onnxruntime",
                              nodes=("/model/post_layernorm/LayerNormalization",), scopes=("/post_layernorm/",))
    assert wrapped.code().endswith("if any(scope in node.name for scope in ('/post_layernorm/',))])")
