"""Gating the code that ships: the Space's predict function and the Inference Endpoints handlers.

Each injected bug goes into a copy of the shipped file in ``tmp_path`` (beside a link to the
bundled fixtures, so the copy finds its weights where the original does).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.commands.check import run_check
from parity.cli import main
from parity.results import Status, Verdict
from parity.spec import CandidateSpec, load_spec, parse_candidate
from tests.support.paths import ROOT

SPACE = ROOT / "examples" / "hf_space"
ENDPOINT = ROOT / "examples" / "hf_endpoint"
ENDPOINT_MLP = ROOT / "examples" / "hf_endpoint_clip_mlp"
MEAN, STD = "[0.48145466, 0.4578275, 0.40821073]", "[0.26862954, 0.26130258, 0.27577711]"

# The head re-declared in the shipped code with ReLU where the trained class has GELU: same keys.
RELU_HEAD = '''from torch import nn


class MultiLabelRegressionNN(nn.Module):
    def __init__(self, embedding_dim, bias_cardinalities, num_outputs, *, bias_dim=8, hidden_dims=(128, 64),
                 dropout=0.1):
        super().__init__()
        self.bias_embeddings = nn.ModuleList(nn.Embedding(n, bias_dim) for n in bias_cardinalities)
        layers, width = [], embedding_dim + bias_dim * len(bias_cardinalities)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(width, num_outputs)

    def forward(self, embedding, input_biases):
        parts = [embedding] + [table(input_biases[:, i]) for i, table in enumerate(self.bias_embeddings)]
        return self.output(self.mlp(torch.cat(parts, dim=1)))'''


def _bugs(self: str, indent: str) -> dict[str, dict[str, str]]:
    """Text replacements injecting each bug; ``self`` is ``self.`` in the handler, ``""`` in the app."""
    return {
        "forward": {f"embedding = {self}backbone.forward_head({self}backbone.forward_features(pixels), pre_logits=True)":
                    f"embedding = {self}backbone(pixels)"},
        "bilinear": {f"{self}transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, "
                     f"model={self}backbone))":
                     f"{self}transform = T.Compose([T.Resize(336, interpolation=T.InterpolationMode.BILINEAR), "
                     f"T.CenterCrop(336), T.ToTensor(), T.Normalize({MEAN}, {STD})])",
                     "import timm\n": "import timm\nfrom torchvision import transforms as T\n"},
        "relu": {"from reference.models import MultiLabelRegressionNN": RELU_HEAD},
        "no_eval": {f"{indent if self else ''}{self}head.eval()\n": ""},  # the handler's is in __init__
        "gray_stacked": {
            f'{indent}image = ImageOps.exif_transpose(image).convert("RGB")\n':
            f'{indent}image = ImageOps.exif_transpose(image)\n'
            f'{indent}if image.mode == "L":  # grayscale: the one channel normalised, stacked to three\n'
            f'{indent}    image = Image.merge("RGB", [image] * 3)\n'
            f'{indent}    pixels = {self}transform(image)[:1].repeat(3, 1, 1).unsqueeze(0)\n'
            f'{indent}else:\n'
            f'{indent}    pixels = {self}transform(image.convert("RGB")).unsqueeze(0)\n',
            f"{indent}pixels = {self}transform(image).unsqueeze(0)\n": "",
            **({} if self else {"from PIL import ImageOps": "from PIL import Image, ImageOps"})},
        "no_exif": {'ImageOps.exif_transpose(image).convert("RGB")': 'image.convert("RGB")'},
    }


APP_BUGS, HANDLER_BUGS = _bugs("", "    "), _bugs("self.", "        ")


def _copy(tmp_path: Path, source: Path, name: str, replacements: dict[str, str]) -> Path:
    """``source``'s folder copied to ``tmp_path/examples/<folder>`` with ``name`` edited; the spec beside it."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    folder = tmp_path / "examples" / source.name
    shutil.copytree(source, folder)
    text = (folder / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{old!r} not in {name}"
        text = text.replace(old, new)
    (folder / name).write_text(text)
    return folder / "parity.toml"


@pytest.fixture(scope="module")
def shipped_reports():
    """The shipped app and handler, gated once for the module."""
    return {kind: run_check(load_spec(folder / "parity.toml")) for kind, folder in
            (("python", SPACE), ("endpoint_handler", ENDPOINT))}


@pytest.mark.parametrize("kind", ["python", "endpoint_handler"])
def test_the_shipped_app_and_handler_pass_with_every_inner_stage_observed(shipped_reports, kind):
    report = shipped_reports[kind]
    assert report.passed, report
    for stage in ("weights", "decode", "pixels", "embedding", "head", "outputs", "decisions"):
        assert report.stage(stage).status is Status.PASS, report.stage(stage)
    assert "45 tensors bit-identical" in report.stage("weights").headline
    load = report.stage("load")
    assert load.status is Status.SKIP and load.headline.startswith("not observable: ")


def test_the_clip_mlp_handler_passes_and_the_slow_processor_drifts_without_flips(tmp_path):
    assert run_check(load_spec(ENDPOINT_MLP / "parity.toml")).passed
    spec = _copy(tmp_path, ENDPOINT_MLP, "handler.py", {
        "from transformers import CLIPImageProcessor, CLIPVisionModel":
        "from transformers import CLIPImageProcessorPil as CLIPImageProcessor, CLIPVisionModel"})
    report = run_check(load_spec(spec))
    assert report.verdict is Verdict.DRIFT_NO_FLIPS
    assert report.first_failure.stage == "pixels"
    assert report.stage("weights").status is Status.PASS
    assert report.stage("decisions").status is Status.PASS


def _gate(kind: str, spec: Path):
    """The report, and for the app the diagnosis too (it runs the gate first): one gate per copy."""
    from parity.commands.diagnose import diagnose_candidate

    if kind == "python":
        diagnosis = diagnose_candidate(load_spec(spec), samples=2)
        return diagnosis.report, diagnosis
    return run_check(load_spec(spec)), None


def _drifting_pixels(report) -> list[str]:
    return [s.name for s in report.stage("pixels").comparison.worst if s.max_abs > 1e-3]


@pytest.mark.parametrize("kind,source,name,bugs", [
    ("python", SPACE, "app.py", APP_BUGS), ("endpoint_handler", ENDPOINT, "handler.py", HANDLER_BUGS)],
    ids=["app", "handler"])
class TestInjectedBugs:
    """Each bug in a copy of the app and of the handler; the app's copies are also diagnosed."""

    def test_forward_instead_of_pre_logits_is_a_per_sample_error_naming_the_app_message(
            self, tmp_path, kind, source, name, bugs, capsys):
        report, diagnosis = _gate(kind, _copy(tmp_path, source, name, bugs["forward"]))
        decode = report.stage("decode")
        assert report.first_failure.stage == "decode" and not report.passed
        assert len(decode.sample_errors) == 17
        sample, message = decode.sample_errors[0]
        assert sample == "astronaut.png"
        assert "raised ValueError: embedding must be (B, 64), got (1, 768)" in message
        if diagnosis is not None:
            assert diagnosis.causes[0].change.toml() == '[backbone].extract = "forward"'
            assert diagnosis.confirmed

    def test_bilinear_resize_drifts_at_pixels(self, tmp_path, kind, source, name, bugs):
        report, diagnosis = _gate(kind, _copy(tmp_path, source, name, bugs["bilinear"]))
        assert report.first_failure.stage == "pixels"
        assert report.stage("weights").status is Status.PASS
        (finding, *_) = report.stage("pixels").findings
        assert finding.detector == "pixels.interpolation" and "bilinear" in finding.cause
        assert finding.fix.startswith("Change the shipped code") and "bicubic" in finding.fix
        if diagnosis is not None:  # the gate named the cause: the diagnosis leads with it, and confirms its spec twin
            assert diagnosis.report.cause == finding and diagnosis.candidate == kind
            assert [c.change.toml() for c in diagnosis.causes] == ['[preprocess].interpolation = "bilinear"']
            assert diagnosis.confirmed

    def test_head_with_relu_for_gelu_passes_weights_fails_head_and_names_the_structure(
            self, tmp_path, kind, source, name, bugs):
        report = run_check(load_spec(_copy(tmp_path, source, name, bugs["relu"])))
        assert report.stage("weights").status is Status.PASS
        assert report.stage("embedding").status is Status.PASS
        head = report.stage("head")
        assert report.first_failure.stage == "head" and head.status is Status.FAIL
        assert any("head.structure.mlp.2" in note and "GELU" in note and "ReLU" in note for note in head.notes), head

    def test_forgotten_eval_is_nondeterministic_at_the_head(self, tmp_path, kind, source, name, bugs):
        report = run_check(load_spec(_copy(tmp_path, source, name, bugs["no_eval"])))
        head = report.stage("head")
        assert report.first_failure.stage == "head"
        assert "differ between two identical calls" in head.headline and ".eval()" in head.headline

    def test_grayscale_stacked_drifts_only_the_grayscale_images(self, tmp_path, kind, source, name, bugs):
        report, diagnosis = _gate(kind, _copy(tmp_path, source, name, bugs["gray_stacked"]))
        assert report.first_failure.stage == "pixels"
        assert _drifting_pixels(report) == ["camera.png"]  # the one grayscale golden image
        if diagnosis is not None:
            assert diagnosis.pattern.startswith("only images with a single channel (grayscale) drift")
            assert not diagnosis.confirmed

    def test_ignored_exif_drifts_only_the_exif_image(self, tmp_path, kind, source, name, bugs):
        report, diagnosis = _gate(kind, _copy(tmp_path, source, name, bugs["no_exif"]))
        assert report.first_failure.stage == "pixels"
        assert _drifting_pixels(report) == ["chelsea_exif_rotated.png"]
        assert report.stage("pixels").findings[0].detector == "pixels.exif"
        if diagnosis is not None:
            assert diagnosis.affected == ("chelsea_exif_rotated.png",)
            assert diagnosis.report.cause.detector == "pixels.exif"


def test_a_per_sample_error_exits_1_without_a_traceback(tmp_path, capsys):
    spec = _copy(tmp_path, SPACE, "app.py", APP_BUGS["forward"])
    assert main(["check", "--spec", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert "astronaut.png" in out and "embedding must be (B, 64), got (1, 768)" in out


def test_cli_candidate_replaces_the_spec_candidate(tmp_path, monkeypatch, capsys):
    spec = _copy(tmp_path, SPACE, "app.py", APP_BUGS["no_exif"])
    monkeypatch.chdir(spec.parent)
    # The reference spec names no candidate; --candidate gates the app beside it.
    plain = spec.parent / "reference.toml"
    plain.write_text(spec.read_text().split("[candidate]")[0])
    assert load_spec(plain).candidate.kind == "spec"
    assert main(["check", "--spec", str(plain), "--candidate", "python:app:predict"]) == 1
    assert "chelsea_exif_rotated.png" in capsys.readouterr().out
    assert main(["diagnose", "--spec", str(plain), "--candidate", "python:app:predict"]) == 1
    out = capsys.readouterr().out
    assert "cause: the shipped code" in out.lower() and "EXIF" in out and "exif_transpose" in out


def test_an_app_that_cannot_start_fails_the_load_stage(tmp_path):
    spec = _copy(tmp_path, SPACE, "app.py", {"hidden_dims=[128, 64]": "hidden_dims=[256, 64]"})
    report = run_check(load_spec(spec))
    load = report.stage("load")
    assert load.status is Status.FAIL and "importing app:predict raised RuntimeError" in load.headline
    assert "size mismatch" in load.headline


def test_an_app_without_recognisable_modules_still_gates_its_outputs(tmp_path, example_spec):
    """Outputs from a plain lookup table (no torch module): the inner stages say why they are not observable."""
    from parity.store.fixtures import load_fixture

    fixture = load_fixture(example_spec.fixture_root())
    rows = {row.image.name: fixture.outputs[i].tolist() for i, row in enumerate(fixture.rows)}
    (tmp_path / "lookup.py").write_text(f"TABLE = {rows!r}\n\n\ndef scores(path):\n"
                                        "    return {'scores': TABLE[path.rsplit('/', 1)[-1]]}\n")
    candidate = CandidateSpec(kind="python", target="lookup:scores", inputs=("image_path",), output_key="scores",
                              python_path=tmp_path)
    report = run_check(dataclasses.replace(example_spec, candidate=candidate))
    assert report.passed
    for stage in ("weights", "pixels", "embedding", "head"):
        result = report.stage(stage)
        assert result.status is Status.SKIP and "not observable: " in result.headline, result
    assert "no torch module reachable" in report.stage("embedding").headline
    assert report.stage("outputs").status is Status.PASS


def test_parse_candidate_resolves_paths_against_the_current_directory(tmp_path):
    handler = parse_candidate("endpoint_handler:handler.py", base=tmp_path)
    assert handler.target == str(tmp_path / "handler.py")
    assert parse_candidate("python:app:predict", base=tmp_path).python_path == tmp_path


def test_endpoint_bytes_requests_are_the_file_bytes(tmp_path, example_spec):
    from parity.store.fixtures import load_fixture
    from parity.runners.endpoint import request

    row = load_fixture(example_spec.fixture_root()).rows[1]
    body = request(row, "bytes")
    assert body["inputs"] == row.image.read_bytes()
    assert body["parameters"] == {"input_biases": list(row.input_biases)}
    assert np.asarray(request(row, None)["inputs"]).shape[:2] == (512, 512)


# -- pytest in a user's repository ----------------------------------------------------------------

USER_APP = '''"""A user's own service: torchvision preprocessing, a model object holding both parts."""
from pathlib import Path

import timm
import torch
from PIL import ImageOps
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms

WEIGHTS = Path({weights!r})


class Head(nn.Module):  # the trained architecture, declared here rather than imported
    def __init__(self):
        super().__init__()
        self.bias_embeddings = nn.ModuleList([nn.Embedding(3, 8), nn.Embedding(4, 8)])
        self.mlp = nn.Sequential(nn.Linear(80, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(128, 64), nn.LayerNorm(64), nn.GELU(), nn.Dropout(0.1))
        self.output = nn.Linear(64, 5)

    def forward(self, embedding, biases):
        looked_up = [table(biases[:, i]) for i, table in enumerate(self.bias_embeddings)]
        return self.output(self.mlp(torch.cat([embedding, *looked_up], dim=1)))


class Scorer:
    def __init__(self):
        self.backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                          embed_dim=64, depth=2, num_heads=2).eval()
        self.backbone.load_state_dict(load_file(WEIGHTS / "backbone.safetensors"), strict=True)
        self.head = Head().eval()
        self.head.load_state_dict(torch.load(WEIGHTS / "dnnV1_model_best.pth", weights_only=True), strict=True)
        self.prepare = transforms.Compose([
            transforms.Resize(336, interpolation=transforms.InterpolationMode.{interpolation}),
            transforms.CenterCrop(336), transforms.ToTensor(),
            transforms.Normalize({mean}, {std})])

    def __call__(self, path, biases):
        from PIL import Image

        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        with torch.no_grad():
            tokens = self.backbone.forward_features(self.prepare(image)[None])
            embedding = self.backbone.forward_head(tokens, pre_logits=True)
            return {{"scores": self.head(embedding, torch.tensor([biases]))}}


scorer = Scorer()


def score(path, biases):
    return scorer(path, biases)
'''


@pytest.mark.parametrize("interpolation,outcome", [("BICUBIC", {"passed": 8, "skipped": 1}),
                                                   ("BILINEAR", {"passed": 4, "failed": 4, "skipped": 1})],
                         ids=["parity", "drift"])
def test_a_user_repository_gates_its_own_app_with_one_test_line(pytester, interpolation, outcome):
    weights = ROOT / "fixtures" / "clip_dnn"
    pytester.makefile(".py", app=USER_APP.format(weights=str(weights), interpolation=interpolation, mean=MEAN,
                                                 std=STD))
    spec = (ROOT / "specs" / "clip_dnn.toml").read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    spec = spec.replace('name = "clip_dnn"', 'name = "scorer"').split("# Deployment choices")[0]
    spec += ('\n[candidate]\npython = "app:score"\ninputs = ["image_path", "input_biases"]\n'
             'output_key = "scores"\n')
    pytester.makefile(".toml", parity=spec)
    pytester.makeini("[pytest]\nparity_spec = parity.toml\n")
    pytester.makepyfile(test_service="def test_parity(parity_gate):\n    parity_gate.assert_parity()\n")
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(**outcome)
    result.stdout.fnmatch_lines(["*test_parity?scorer-load? SKIPPED*", "*test_parity?scorer-weights? PASSED*"])
    if interpolation == "BILINEAR":
        result.stdout.fnmatch_lines(["*test_parity?scorer-pixels? FAILED*", "*test_parity?scorer-gate? FAILED*",
                                     "*DriftError: pixels: FAIL*"])


def test_modules_are_found_through_a_closure_inside_a_wrapper_whatever_their_weights(example_spec):
    """A head with untrained weights inside a wrapper module, reachable only through a closure cell."""
    import torch

    from parity.store.fixtures import load_fixture
    from parity.runners.app import function_roots, reachable_modules, recognise
    from reference.models import MultiLabelRegressionNN

    fixture = load_fixture(example_spec.fixture_root())
    wrapper = torch.nn.Module()
    wrapper.head = MultiLabelRegressionNN(64, [3, 4], 5)
    wrapper.extra = torch.nn.Linear(2, 2)

    def make(model):
        def predict(image):
            return model(image)
        return predict

    found = recognise(reachable_modules(function_roots(make(wrapper), "predict")), fixture)
    assert found.modules["head"] is wrapper.head and found.where["head"] == "model.head"
    assert "no torch module reachable" in found.missing["backbone"]


def test_an_app_built_with_gelu_for_quickgelu_is_localised_to_the_first_activation(tmp_path):
    """Same weights, same pixels, another activation class: diagnose names the model and the layer."""
    spec = _copy(tmp_path, SPACE, "app.py", {'"vit_large_patch14_clip_quickgelu_336.openai"':
                                             '"vit_large_patch14_clip_336.openai"'})
    from parity.commands.diagnose import diagnose_candidate

    diagnosis = diagnose_candidate(load_spec(spec), samples=2)
    report = diagnosis.report
    assert report.stage("weights").status is Status.PASS and report.stage("pixels").status is Status.PASS
    assert report.first_failure.stage == "embedding"
    assert any("QuickGELU" in note and "GELU" in note for note in report.stage("embedding").notes)
    assert diagnosis.causes[0].change.toml() == '[backbone].model = "vit_large_patch14_clip_336.openai"'
    assert diagnosis.layer is not None and diagnosis.layer.module == "blocks.0.mlp.act"
