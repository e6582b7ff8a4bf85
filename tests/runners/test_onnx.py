"""The onnx runner: an exported graph is gated like the spec's own pipeline, stage by stage."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from parity.commands.check import run_check
from parity.cli import EXIT_PASS, EXIT_USAGE, main
from parity.results import Status
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_SPEC, ROOT
from tests.support.specs import write_spec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

_spec = importlib.util.spec_from_file_location("onnx_export_example", ROOT / "examples" / "onnx" / "export.py")
export_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_example)


def onnx_spec(directory: Path, model: Path, extra: str = "", base: Path | None = None) -> Path:
    """A copy of a bundled spec that gates ``model``: the example's by default."""
    if base is None:
        path = write_spec(directory, name="onnx.toml")
    else:
        path = directory / "onnx.toml"
        path.write_text(base.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/'))
    path.write_text(path.read_text() + f'\n[candidate]\nonnx = "{model}"\n{extra}')
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    backbone, head = export_example.load_modules()
    return export_example.export(backbone, head, tmp_path_factory.mktemp("onnx") / "clip_dnn.onnx")


def test_the_exported_example_passes_at_the_float32_budget(exported, tmp_path):
    report = run_check(load_spec(onnx_spec(tmp_path, exported)))
    assert report.passed, report.first_failure
    embedding, outputs = report.stage("embedding"), report.stage("outputs")
    assert embedding.status is Status.PASS and embedding.comparison.total > 0
    assert embedding.comparison.tolerance.origin == "default for float32"  # no widened budget
    assert outputs.status is Status.PASS and report.stage("decisions").status is Status.PASS
    assert report.stage("pixels").status is Status.PASS  # the spec's preprocessing feeds the graph
    # A whole-pipeline graph hides its weights and the head's own input: reported, never passed.
    for stage in ("load", "weights", "head"):
        assert report.stage(stage).status is Status.SKIP
        assert report.stage(stage).headline.startswith("not observable: ")
    assert "folds and renames initializers" in report.stage("weights").headline


@pytest.mark.parametrize("part, tensor, first", [("backbone", "norm.weight", "embedding"),
                                                 ("head", "output.bias", "outputs")])
def test_an_export_with_one_weight_changed_fails(part, tensor, first, tmp_path):
    backbone, head = export_example.load_modules()
    module = {"backbone": backbone, "head": head}[part]
    with torch.no_grad():
        module.get_parameter(tensor)[0] += 0.05
    model = export_example.export(backbone, head, tmp_path / "changed.onnx")
    report = run_check(load_spec(onnx_spec(tmp_path, model)))
    assert not report.passed
    assert report.first_failure.stage == first
    assert report.stage("weights").status is Status.SKIP  # not observable, so never a false PASS
    if first == "outputs":
        assert report.stage("embedding").status is Status.PASS


def test_a_head_only_export_runs_behind_the_spec_backbone(tmp_path):
    backbone, head = export_example.load_modules()
    model = export_example.export(backbone, head, tmp_path / "head.onnx", part="head")
    report = run_check(load_spec(onnx_spec(tmp_path, model)))
    assert report.passed, report.first_failure
    # The head is fed the reference embeddings; the backbone is the spec's, loaded strictly and fingerprinted.
    assert report.stage("head").status is Status.PASS and report.stage("head").comparison.total > 0
    assert report.stage("weights").status is Status.PASS
    assert report.stage("load").status is Status.PASS


def test_a_backbone_only_export_runs_with_the_spec_head(tmp_path):
    backbone, head = export_example.load_modules()
    model = export_example.export(backbone, head, tmp_path / "backbone.onnx", part="backbone")
    report = run_check(load_spec(onnx_spec(tmp_path, model)))
    assert report.passed, report.first_failure
    assert report.stage("embedding").status is Status.PASS and report.stage("head").status is Status.PASS


class _Classifier(torch.nn.Module):
    """Wraps the transformers example's head so the export takes one input and names its output."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def _export_classifier_head(spec, path: Path, *, nudge: float = 0.0) -> Path:
    """The clip_mlp head (no input_biases) exported with a fixed batch of 1 and an output named 'logits'."""
    from parity.model.pipeline import load_head

    head = load_head(spec, device=torch.device("cpu"), fingerprints=False)[0]
    with torch.no_grad():
        head.classifier.weight[0, 0] += nudge
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice (examples/onnx/export.py)
        warnings.simplefilter("ignore")
        torch.onnx.export(_Classifier(head).eval(), (torch.zeros(1, spec.head.kwargs["embedding_dim"]),), str(path),
                          input_names=["features"], output_names=["logits"], opset_version=17, dynamo=False)
    return path


def test_a_classifier_head_with_a_fixed_batch_and_another_output_name(tmp_path):
    """The transformers example: no input_biases input, batch fixed at 1, outputs read by output_key."""
    spec = load_spec(CLASSIFIER_SPEC)
    model = _export_classifier_head(spec, tmp_path / "mlp.onnx")
    report = run_check(load_spec(onnx_spec(tmp_path, model, 'output_key = "logits"\n', base=CLASSIFIER_SPEC)))
    assert report.passed, report.first_failure
    assert report.stage("head").status is Status.PASS

    moved = _export_classifier_head(spec, tmp_path / "moved.onnx", nudge=3.0)
    report = run_check(load_spec(onnx_spec(tmp_path, moved, 'output_key = "logits"\n', base=CLASSIFIER_SPEC)))
    assert not report.passed
    assert report.stage("embedding").status is Status.PASS  # the spec's transformers backbone
    assert report.first_failure.stage == "head"


def test_cli_exit_status_for_pass_drift_and_a_missing_or_wrong_graph(exported, tmp_path, capsys):
    assert main(["check", "--spec", str(onnx_spec(tmp_path, exported))]) == EXIT_PASS

    assert main(["check", "--spec", str(onnx_spec(tmp_path, tmp_path / "absent.onnx"))]) == EXIT_USAGE
    assert "absent.onnx not found" in capsys.readouterr().err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert main(["check", "--spec", str(onnx_spec(tmp_path, garbage))]) == EXIT_USAGE
    assert "onnxruntime cannot load" in capsys.readouterr().err
    spec = load_spec(CLASSIFIER_SPEC)
    two_outputs = _export_classifier_head(spec, tmp_path / "mlp.onnx")
    assert main(["check", "--spec", str(onnx_spec(tmp_path, two_outputs, 'output_key = "scores"\n',
                                                  base=CLASSIFIER_SPEC))]) == EXIT_USAGE
    assert "'scores' is not an output" in capsys.readouterr().err
