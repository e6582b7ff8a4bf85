"""Deploying a module to a runtime: onnxruntime and OpenVINO reproduce the eager module, quantization stays
within its own budget, and combinations that cannot run are refused with the reason."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from parity.errors import DeployError
from parity.model import runtimes
from parity.model.runtimes import RUNTIMES, deploy, refusal

# float32 graphs in another runtime: the same arithmetic, reordered (fused conv + BatchNorm, other GEMM kernels)
FLOAT32_MAX_ABS = 1e-4
# int8 on this head's outputs (values of order 1): quantization noise, not a broken graph
INT8_MAX_ABS = 0.25


class ConvHead(nn.Module):
    """Not the bundled example: a small conv net with BatchNorm, taking pixels and an integer bias column, giving
    a pooled feature and a score per class (a head deployed the way a backbone is)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                                      nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.bias = nn.Embedding(4, 32)
        self.classify = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, pixels: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.features(pixels).mean(dim=(2, 3)) + self.bias(bias)
        return feature, self.classify(feature)


@pytest.fixture(scope="module")
def head() -> ConvHead:
    torch.manual_seed(0)
    module = ConvHead()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        for norm in (module.features[1], module.features[4]):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
    return module.eval()


def _inputs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 3, 20, 20)).astype(np.float32), rng.integers(0, 4, size=count)


def _eager(head: ConvHead, pixels: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        return tuple(o.numpy() for o in head(torch.from_numpy(pixels), torch.from_numpy(bias)))


EXAMPLE = tuple(torch.from_numpy(a) for a in _inputs(2, seed=1))


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime", "openvino"])
def test_exported_runtimes_reproduce_the_eager_module(head, runtime):
    deployed = deploy(head, runtime, EXAMPLE, threads=1)
    assert deployed.runtime == runtime and deployed.load_s >= 0 and deployed.threads == 1
    for count in (1, 5):  # the batch axis is dynamic: other batch sizes than the example's
        pixels, bias = _inputs(count, seed=count)
        outputs, reference = deployed(pixels, bias), _eager(head, pixels, bias)
        assert [o.shape for o in outputs] == [r.shape for r in reference]
        assert all(o.dtype == np.float32 for o in outputs)
        assert max(float(np.abs(o - r).max()) for o, r in zip(outputs, reference)) <= FLOAT32_MAX_ABS


def test_threads_reach_the_runtime(head, monkeypatch):
    import onnxruntime

    seen = []
    original = onnxruntime.InferenceSession

    def session(path, options, **kwargs):
        seen.append((options.intra_op_num_threads, options.inter_op_num_threads))
        return original(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    deploy(head, "onnxruntime", EXAMPLE, threads=2)
    assert seen == [(2, 1)]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_differs_from_float32_within_its_budget(head, runtime):
    calibration = [_inputs(8, seed=s) for s in range(4)]
    deployed = deploy(head, runtime, EXAMPLE, quantize="int8", calibration=calibration)
    pixels, bias = _inputs(16, seed=99)
    differences = [float(np.abs(o - r).max()) for o, r in zip(deployed(pixels, bias), _eager(head, pixels, bias))]
    assert FLOAT32_MAX_ABS < max(differences) <= INT8_MAX_ABS


def test_torch_dynamic_int8_quantizes_the_linear_layers(head):
    deployed = deploy(head, "eager", EXAMPLE, quantize="dynamic_int8")
    pixels, bias = _inputs(16, seed=7)
    feature, scores = deployed(pixels, bias)
    reference = _eager(head, pixels, bias)
    assert float(np.abs(feature - reference[0]).max()) <= FLOAT32_MAX_ABS  # convolutions stay float32
    assert FLOAT32_MAX_ABS < float(np.abs(scores - reference[1]).max()) <= INT8_MAX_ABS
    assert isinstance(head.classify[0], nn.Linear) and type(head.classify[0]) is nn.Linear  # the module is not changed


@pytest.mark.parametrize(("runtime", "options", "reason"), [
    ("tensorrt", {}, "runtime 'tensorrt' is not one of eager, compile, onnxruntime, openvino"),
    ("eager", {"quantize": "int8"}, "quantize = int8 is made by onnxruntime.quantization for runtime onnxruntime or "
                                    "openvino, not eager"),
    ("onnxruntime", {"quantize": "dynamic_int8"}, "made by torch for runtime eager or compile, not onnxruntime"),
    ("onnxruntime", {"precision": "bfloat16"}, "onnxruntime runs the exported float32 graph"),
    ("openvino", {"device": "cuda"}, "openvino runs the exported graph on CPU here"),
    ("openvino", {"precision": "autocast_float16"}, "OpenVINO's inference precision is one of float32"),
])
def test_combinations_that_cannot_run_are_refused_with_the_reason(runtime, options, reason):
    assert reason in refusal(runtime, options.get("quantize", "none"), device=options.get("device", "cpu"),
                             precision=options.get("precision"))


def test_deploy_raises_the_refusal_before_any_export(head, monkeypatch):
    monkeypatch.setattr(runtimes, "_export", lambda *a: pytest.fail("exported a refused combination"))
    with pytest.raises(DeployError, match="not eager"):
        deploy(head, "eager", EXAMPLE, quantize="int8")
    assert set(RUNTIMES) == {"eager", "compile", "onnxruntime", "openvino"}


def test_a_missing_runtime_names_the_extra_that_installs_it(head, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(DeployError, match=r"pip install 'parity\[deploy\]'"):
        deploy(head, "openvino", EXAMPLE)


def test_export_files_are_removed_unless_a_workdir_is_given(head, tmp_path, monkeypatch):
    made = []
    original = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(original(dir=tmp_path, prefix=kwargs.get("prefix")))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    deploy(head, "onnxruntime", EXAMPLE)
    assert len(made) == 1 and not (tmp_path / made[0]).exists()
    made.clear()
    kept = tmp_path / "kept"
    deploy(head, "onnxruntime", EXAMPLE, quantize="int8", workdir=kept)
    assert {p.name for p in kept.iterdir()} == {"model.onnx", "model.int8.onnx"}


def test_a_compiler_failure_is_a_deploy_error_with_its_message(head, monkeypatch):
    def broken(module, **kwargs):
        def call(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong compiler log")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(DeployError) as error:
        deploy(head, "compile", EXAMPLE)
    assert str(error.value) == "torch.compile failed: RuntimeError: InductorError: CppCompileError: C++ compile error"


@pytest.mark.slow
def test_compile_reproduces_the_eager_module(head):
    deployed = deploy(head, "compile", EXAMPLE)
    assert deployed.load_s > 0  # the first call compiled
    pixels, bias = _inputs(2, seed=3)
    outputs, reference = deployed(pixels, bias), _eager(head, pixels, bias)
    assert max(float(np.abs(o - r).max()) for o, r in zip(outputs, reference)) <= FLOAT32_MAX_ABS


def test_int8_leaves_the_excluded_modules_nodes_unquantized(head, tmp_path):
    """`exclude` finds a module's nodes by the exporter's scopes (a Sequential's blocks scoped twice)."""
    import onnx

    calibration = [_inputs(8, seed=s) for s in range(2)]
    deployed = deploy(head, "onnxruntime", EXAMPLE, quantize="int8", calibration=calibration,
                      exclude=["features.0", "classify"], workdir=tmp_path)
    conv, classify = deployed.excluded
    assert conv.module == "features.0" and conv.prefix == "/features/features.0/"
    assert conv.path == (("features", "features"), ("features.0", "features.0"))
    assert conv.nodes == ("/features/features.0/Conv",)
    assert classify.prefix == "/classify/" and "/classify/classify.0/Gemm" in classify.nodes
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inputs = {n.name: set(n.input) for n in graph.node}
    assert not inputs["/features/features.0/Conv"] & dequantized  # float32 in, as exported
    assert inputs["/features/features.3/Conv"] & dequantized  # the other convolution is quantized
    pixels, bias = _inputs(16, seed=5)
    partial = max(float(np.abs(o - r).max()) for o, r in zip(deployed(pixels, bias), _eager(head, pixels, bias)))
    assert partial <= INT8_MAX_ABS


def test_exclude_is_refused_without_int8_or_for_an_unknown_module(head):
    from parity.errors import SpecError

    with pytest.raises(SpecError, match="quantize = none"):
        deploy(head, "onnxruntime", EXAMPLE, exclude=["features.0"])
    with pytest.raises(SpecError, match="no module of the deployed module: blocks.0"):
        deploy(head, "onnxruntime", EXAMPLE, quantize="int8", exclude=["blocks.0"])
