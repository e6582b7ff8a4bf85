"""Reference numerics: recorded at capture, emulated on the gate's machine (TF32, autocast), and budgeted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity.commands.calibrate import Run, calibrate
from parity.commands.check import run_check
from parity.commands.diagnose import diagnose
from parity.numerics.emulate import ReducedPrecisionMode, emulate_reference, round_mantissa
from parity.store.fixtures import MANIFEST, load_fixture
from parity.model.numerics import probe_numerics, reduced_precision
from parity.model.pipeline import build_pipeline
from parity.numerics.referee import judge, multiplier, referee
from parity.report.console import render_text
from parity.results import Status
from parity.commands.capture import capture_pipeline
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import reseal

# What a GPU extraction with PyTorch's defaults records: cuDNN convolutions in TF32, matmuls in float32.
A100 = {"device": "cuda", "device_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
        "cudnn_allow_tf32": True, "matmul_allow_tf32": False, "float32_matmul_precision": "highest"}
REASON = "reference made on CUDA with cuDNN TF32; budget from TF32 emulation"


def _nearest_even(x: np.ndarray, bits: int) -> np.ndarray:
    """Rounding to ``bits`` explicit mantissa bits computed independently, in float64 with numpy's half-to-even."""
    mantissa, exponent = np.frexp(x.astype(np.float64))  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return np.ldexp(np.round(mantissa * 2.0 ** (bits + 1)), exponent - (bits + 1)).astype(np.float32)


@pytest.mark.parametrize("bits", [10, 7])
def test_round_mantissa_is_round_to_nearest_even(bits):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-6, 6, 20000)).astype(np.float32)
    halves = np.float32(1.0) + np.arange(8, dtype=np.float32) * np.float32(2.0 ** -(bits + 1))  # exact ties
    x = np.concatenate([x, halves, -halves])
    assert np.array_equal(round_mantissa(torch.from_numpy(x), bits).numpy(), _nearest_even(x, bits))
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    assert torch.equal(round_mantissa(special, bits)[:2], special[:2]) and round_mantissa(special, bits)[2].isnan()


class _ConvBnHead(torch.nn.Module):
    """A model written for this test: convolution, BatchNorm, a linear layer and a bare matmul."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)
        self.proj = torch.nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1)) @ self.proj


def test_mode_rounds_the_operands_of_convolutions_and_matmuls_only():
    torch.manual_seed(0)
    model = _ConvBnHead().eval()
    x = torch.randn(2, 3, 8, 8)
    r = round_mantissa
    with torch.no_grad():
        h = model.bn(F.conv2d(r(x), r(model.conv.weight), model.conv.bias)).flatten(1)
        both = r(F.linear(r(h), r(model.fc.weight), model.fc.bias)) @ r(model.proj)
        conv_only = F.linear(h, model.fc.weight, model.fc.bias) @ model.proj
        with ReducedPrecisionMode(conv="tf32", matmul="tf32"):
            assert torch.equal(model(x), both)
        with ReducedPrecisionMode(conv="tf32"):
            assert torch.equal(model(x), conv_only)
        assert not torch.equal(model(x), conv_only)  # the emulation does change the numbers
        with emulate_reference({"autocast": "bfloat16"}):
            assert model(x).dtype == torch.bfloat16


def test_reduced_precision_reads_the_record():
    assert reduced_precision(A100) == {"conv": "tf32"}
    assert reduced_precision({**A100, "matmul_allow_tf32": True}) == {"conv": "tf32", "matmul": "tf32"}
    assert reduced_precision({**A100, "float32_matmul_precision": "medium"})["matmul"] == "bfloat16"
    assert reduced_precision({**A100, "compute_capability": "7.0"}) == {}  # Volta has no TF32
    assert reduced_precision({**A100, "device": "cpu"}) == {}
    assert reduced_precision({"device": "cpu", "autocast_dtype": "bfloat16"}) == {"autocast": "bfloat16"}
    assert reduced_precision(None) == {}


def test_probe_records_every_field_of_the_numeric_environment():
    record = probe_numerics("cpu", batch_size=8)
    assert set(record) >= {"device", "device_name", "torch", "cuda", "cudnn", "matmul_allow_tf32", "cudnn_allow_tf32",
                           "float32_matmul_precision", "sdpa_backends", "autocast_dtype", "batch_size", "threads",
                           "cpu_capability"}
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"] == torch.get_num_threads() and record["batch_size"] == 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe_numerics("cpu")["autocast_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def tf32_fixture(example_spec, tmp_path_factory):
    """The bundled example's reference re-made on the CPU with TF32 convolutions emulated, recorded as made on an A100."""
    source = load_fixture(EXAMPLE_FIXTURES)
    out = tmp_path_factory.mktemp("tf32") / "clip_dnn_tf32"
    with emulate_reference({"conv": "tf32"}):
        capture_pipeline(build_pipeline(example_spec), [row.image for row in source.rows], out,
                         input_biases=[row.input_biases for row in source.rows], golden=list(source.golden_pixels),
                         numerics=A100)
    return out


@pytest.fixture(scope="module")
def without_environment(tf32_fixture, tmp_path_factory):
    """The same fixture, its numeric environment removed from the manifest."""
    out = shutil.copytree(tf32_fixture, tmp_path_factory.mktemp("bare") / "clip_dnn_tf32")
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["producer"]["numerics"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    reseal(out)
    return out


def test_tf32_reference_passes_the_default_gate_and_the_report_names_why(example_spec, tf32_fixture):
    manifest = json.loads((tf32_fixture / MANIFEST).read_text())
    assert manifest["producer"]["numerics"]["device_name"] == "NVIDIA A100-SXM4-80GB"
    assert manifest["producer"]["numerics"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    report = run_check(example_spec, fixtures=tf32_fixture)
    assert report.passed, render_text(report)
    embedding = report.stage("embedding").comparison
    assert embedding.tolerance.origin.startswith(REASON) and embedding.tolerance.atol > 1e-5
    assert embedding.max_abs > 1e-5  # beyond float32's default: the emulated budget is what passes it
    assert f"tolerances: default for float32; {REASON} on 8 probe samples, x4 margin" in render_text(report)
    assert ("numerics.device", "cuda", "cpu") in {(d.field, d.reference, d.candidate) for d in report.config_diffs}


CATALOGUE = {
    "bilinear": {"preprocess": {"interpolation": "bilinear"}},
    "gelu-for-quickgelu": {"backbone": {"model": "vit_large_patch14_clip_336.openai"}},
    "forward-for-pre_logits": {"backbone": {"extract": "forward"}},
    "imagenet-mean-std": {"preprocess": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}},
}


@pytest.mark.parametrize("change", CATALOGUE.values(), ids=CATALOGUE.keys())
def test_catalogue_drifts_still_fail_under_the_emulated_budget(example_spec, tf32_fixture, change):
    report = run_check(example_spec.replace(**change), fixtures=tf32_fixture)
    assert not report.passed
    embedding = report.stage("embedding")
    assert embedding.status is Status.FAIL  # the embeddings drift beyond the widened budget, not only the pixels
    assert embedding.comparison.tolerance.origin.startswith(REASON)


def test_without_the_environment_record_the_same_fixture_fails(example_spec, without_environment):
    report = run_check(example_spec, fixtures=without_environment)
    assert not report.passed and report.first_failure.stage == "embedding"
    assert report.stage("embedding").comparison.tolerance.origin == "default for float32"


def test_calibration_adds_the_emulated_spread_and_says_so(example_spec, tf32_fixture, tmp_path):
    fixtures = shutil.copytree(tf32_fixture, tmp_path / "calibrated")
    result = calibrate(example_spec, fixtures=fixtures, runs=[Run(8, 1)])
    assert result.emulation == REASON
    report = run_check(example_spec, fixtures=fixtures)
    origin = report.stage("embedding").comparison.tolerance.origin
    assert origin.startswith("calibrated on cpu/float32, 1 runs") and origin.endswith(f"{REASON}, x4 margin")
    assert report.passed, render_text(report)


# -- the float64 referee ----------------------------------------------------------------------

def test_referee_rule_is_same_with_fp64_ref():
    """``error <= multiplier * rounding + tol / 10``, RMSE against float64, on arrays made for this test."""
    rng = np.random.default_rng(1)
    exact = rng.standard_normal((40, 32))
    rounded = exact + rng.standard_normal(exact.shape) * 1e-4  # a legitimately rounded run
    noisy_reference = exact + rng.standard_normal(exact.shape) * 2e-4  # rounding of the same size
    changed_reference = exact + 0.01 * np.tanh(exact)  # another computation
    assert multiplier(exact.size, "float32") == 2.0 and multiplier(999, "float32") == 3.0
    assert multiplier(exact.size, "bfloat16") == 3.0
    call = judge("embedding", noisy_reference, exact, [("plain", "float32", exact), ("low", "float32", rounded)])
    assert call.explained_by == "low" and call.multiplier == 2.0
    assert call.reference_error == pytest.approx(np.sqrt(np.mean((noisy_reference - exact) ** 2)))
    assert judge("embedding", changed_reference, exact, [("low", "float32", rounded)]).explained_by is None
    assert judge("embedding", exact[:, :8], exact, [("low", "float32", rounded)]).reason.startswith("shapes differ")


def test_referee_tells_a_changed_computation_from_rounding(example_spec):
    gelu = referee(example_spec.replace(**CATALOGUE["gelu-for-quickgelu"]), fixtures=EXAMPLE_FIXTURES)
    assert gelu.verdict == "computation" and not gelu.explained
    assert all(s.reference_error > 3 * max(e for _, e in s.rounding) for s in gelu.stages)
    bf16 = referee(example_spec.replace(runtime={"dtype": "bfloat16"}), fixtures=EXAMPLE_FIXTURES)
    assert bf16.verdict == "rounding" and {s.explained_by for s in bf16.stages} == {"candidate bfloat16"}


def test_cli_referee_calls_an_unrecorded_tf32_reference_rounding(example_spec, without_environment, tmp_path, capsys):
    from parity.cli import main
    from tests.support.specs import write_spec

    spec = write_spec(tmp_path)
    out = tmp_path / "report.json"
    status = main(["check", "--spec", str(spec), "--fixtures", str(without_environment), "--referee", "float64",
                   "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 1  # the referee informs; the gate still fails without the environment record
    assert "REFEREE: the difference is explained by rounding (the reference's TF32 convolutions and TF32 matmuls)" \
        in " ".join(printed.split())
    data = json.loads(out.read_text())
    assert data["referee"]["verdict"] == "rounding" and not data["passed"]
    assert [s["explained_by"] for s in data["referee"]["stages"]] == \
        ["reference TF32 convolutions and TF32 matmuls"] * 2


def test_diagnose_names_reduced_precision_numerics_and_proposes_recording_them(example_spec, without_environment):
    result = diagnose(example_spec, fixtures=without_environment)
    assert result.drift and not result.fix
    signature = result.notes[0].partition(", not of a pipeline change")[0]
    assert "reduced-precision reference numerics" in signature
    assert "TF32 convolutions" in signature and "TF32 matmuls" in signature
    assert result.notes[1].startswith("Fix: record the reference's numeric environment")
