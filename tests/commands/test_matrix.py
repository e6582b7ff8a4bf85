"""Variant matrices: the right cells pass, work is shared across cells, runs are deterministic."""

from __future__ import annotations

import pytest
import torch

from parity.errors import SpecError
from parity.preprocess.transform import Preprocess
from parity.results import Status
from parity.spec import default_tolerance
from parity.commands.matrix import expand_matrix, parse_axes, run_matrix

FP32 = default_tolerance("embedding", "float32")
WIDE = {
    "extract": ["pre_logits", "forward", "cls", "mean_tokens"],
    "interpolation": ["bicubic", "bilinear"],
    "resize_backend": ["pil", "tensor"],
    "mean_std": ["openai_clip", "imagenet"],
    "dtype": ["float32", "float64", "bfloat16"],
    "device": ["cpu"],
}


def test_exactly_the_reference_configuration_passes_at_fp32_tolerance(example_spec):
    report = run_matrix(example_spec, axes=WIDE, tolerance=FP32)
    assert len(report.cells) == 96
    passing = {r.cell.id for r in report.cells if r.status is Status.PASS}
    # float64 is the same configuration computed more exactly: within the float32 reference's own noise
    assert passing == {f"{mode}-bicubic-pil-openai_clip-cpu-{dtype}"
                       for mode in ("pre_logits", "cls") for dtype in ("float32", "float64")}
    assert report.reproducing("extract") == ["pre_logits", "cls"]
    assert ("cls", "pre_logits") in report.equivalent_modes


@pytest.mark.parametrize(("axis", "values", "drifting"), [
    ("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"], ["bilinear", "nearest", "lanczos"]),
    ("resize_backend", ["pil", "tensor", "tensor_noaa"], ["tensor", "tensor_noaa"]),
    ("mean_std", ["openai_clip", "imagenet", "inception"], ["imagenet", "inception"]),
    ("channel_order", ["rgb", "bgr"], ["bgr"]),
    ("value_scale", ["unit", "byte"], ["byte"]),
    ("crop_pct", [1.0, 0.875], [0.875]),
    ("dtype", ["float32", "bfloat16", "autocast_bfloat16"], ["bfloat16", "autocast_bfloat16"]),
])
def test_every_probe_away_from_the_reference_drifts(example_spec, axis, values, drifting):
    report = run_matrix(example_spec, axes={axis: values, "device": ["cpu"]}, tolerance=FP32)
    assert [v for v in values if v not in report.reproducing(axis)] == drifting


def test_work_is_shared_across_cells(example_spec, monkeypatch):
    model_calls, geometry_calls = [], []
    original_geometry = Preprocess.geometry

    def count_geometry(self, image):
        geometry_calls.append(1)
        return original_geometry(self, image)

    monkeypatch.setattr(Preprocess, "geometry", count_geometry)
    import timm.models.vision_transformer as vit

    original_features = vit.VisionTransformer.forward_features

    def count_features(self, x):
        model_calls.append(x.shape[0])
        return original_features(self, x)

    monkeypatch.setattr(vit.VisionTransformer, "forward_features", count_features)
    axes = {"extract": ["pre_logits", "forward", "cls", "mean_tokens"], "interpolation": ["bicubic", "bilinear"],
            "channel_order": ["rgb", "bgr"], "device": ["cpu"]}
    report = run_matrix(example_spec, axes=axes)
    assert len(report.cells) == 16
    # one trunk pass per (pixels, dtype): 2 interpolations x 2 channel orders, all 17 images each
    assert sum(model_calls) == 4 * 17
    # geometry once per image per interpolation; channel order reuses it
    assert len(geometry_calls) == 2 * 17


def test_matrix_is_deterministic(example_spec):
    axes = {"interpolation": ["bicubic", "bilinear"], "device": ["cpu"]}
    first, second = (run_matrix(example_spec, axes=axes) for _ in range(2))
    assert [r.comparison for r in first.cells] == [r.comparison for r in second.cells]


def test_cuda_cells_skip_with_a_reason_on_cpu(example_spec):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    report = run_matrix(example_spec, axes={"device": ["cpu", "cuda"]})
    skipped = [r for r in report.cells if r.status is Status.SKIP]
    assert [r.cell.id for r in skipped] == ["pre_logits-bicubic-pil-cuda-float32"]
    assert skipped[0].reason == "CUDA is not available on this machine"
    assert report.passed


def test_cell_ids_and_deployment_flags(example_spec):
    cells = expand_matrix(example_spec, {"extract": ["pre_logits", "forward"], "dtype": ["float32", "bfloat16"]})
    assert [(c.id, c.deployment) for c in cells] == [
        ("pre_logits-bicubic-pil-cpu-float32", True),
        ("pre_logits-bicubic-pil-cpu-bfloat16", True),
        ("forward-bicubic-pil-cpu-float32", False),
        ("forward-bicubic-pil-cpu-bfloat16", False),
    ]


@pytest.mark.parametrize(("table", "message"), [
    ({"extrct": ["cls"]}, "unknown matrix axis 'extrct'. Accepted axes: extract, interpolation"),
    ({"interpolation": ["bicubc"]}, "interpolation = 'bicubc' is not accepted. Accepted values: bicubic, bilinear"),
    ({"crop_pct": [1.5]}, "crop_pct values must be numbers in [0.05, 1]"),
    ({"dtype": "float32"}, "matrix axis dtype must be a non-empty list, got 'float32'"),
    ({"tf32": ["yes"]}, "tf32 = 'yes' is not accepted. Accepted values: False, True"),
    ({"runtime": ["tensorrt"]}, "runtime = 'tensorrt' is not accepted. Accepted values: eager, compile, onnxruntime, "
                                "openvino"),
    ({"quantize": ["int4"]}, "quantize = 'int4' is not accepted. Accepted values: none, dynamic_int8, int8"),
    ({"threads": [0]}, "threads values must be whole numbers in [1, 1024], got 0"),
    ({"threads": [1.5]}, "threads values must be whole numbers in [1, 1024], got 1.5"),
    ({"threads": [True]}, "threads values must be whole numbers in [1, 1024], got True"),
    ({"threads": ["2"]}, "threads values must be whole numbers in [1, 1024], got '2'"),
])
def test_bad_axes_are_refused_with_the_accepted_values(table, message):
    with pytest.raises(SpecError) as exc:
        parse_axes(table, where="m")
    assert message in str(exc.value)


def test_matrix_cli(capsys, monkeypatch):
    from parity.cli import main
    from tests.support.paths import EXAMPLE_SPEC

    monkeypatch.setenv("COLUMNS", "80")  # a CI log: stdout is no terminal, whatever its environment says
    assert main(["matrix", "--spec", str(EXAMPLE_SPEC), "--axis", "extract=pre_logits,forward",
                 "--axis", "device=cpu", "--axis", "dtype=float32"]) == 0
    out = capsys.readouterr().out
    assert "p95 ms" in out and "flip bound" in out and "…" not in out  # every column whole, none cut
    assert "extract: reproduces the reference with pre_logits; drifts with forward" in out
    assert "MATRIX: every deployment cell reproduces the reference." in out
    assert main(["matrix", "--spec", str(EXAMPLE_SPEC), "--axis", "extract"]) == 2


def test_matrix_fails_when_the_deployment_cell_drifts(example_spec):
    report = run_matrix(example_spec.replace(preprocess={"interpolation": "bilinear"}),
                        axes={"device": ["cpu"], "interpolation": ["bicubic", "bilinear"]})
    assert not report.passed
    assert report.cell("pre_logits-bilinear-pil-cpu-float32").cell.deployment
    assert report.reproducing("interpolation") == ["bicubic"]
