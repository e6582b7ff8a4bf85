"""Candidates gated as they ship: answers by label, nested JSON, top-k lists, an UploadFile service with form fields.

Each candidate is written here from a template; the injected run differs from the clean one by the bug alone.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import parity.runners.http as http_runner
from parity.commands.check import run_check
from parity.cli import EXIT_USAGE, main
from parity.results import Status
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_SPEC, ROOT
from tests.support.http_service import url_spec

MLP = ROOT / "fixtures" / "clip_mlp"
DNN = ROOT / "fixtures" / "clip_dnn"
CLASSES = json.loads((MLP / "clip_metadata.json").read_text())["class_names"]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(http_runner, "BACKOFF", 0.01)


def classifier_spec(directory: Path, candidate: str) -> Path:
    text = CLASSIFIER_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    path = directory / "gate.toml"
    path.write_text(text + "\n[candidate]\n" + textwrap.dedent(candidate))
    return path


# -- a python app answering {label: logit} ------------------------------------------------------

LABEL_APP = f'''
import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel

WEIGHTS = "{MLP}"
NAMES = {CLASSES!r}


class IdentityHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1))
        self.classifier = nn.Linear(128, 6)

    def forward(self, x):
        return self.classifier(self.mlp(x))


processor = CLIPImageProcessor.from_pretrained(WEIGHTS + "/backbone")
encoder = CLIPVisionModel.from_pretrained(WEIGHTS + "/backbone").eval()
head = IdentityHead()
head.load_state_dict(torch.load(WEIGHTS + "/mlp_classifier.pth", weights_only=True), strict=True)
head.eval()


@torch.inference_mode()
def classify(image):
    pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    logits = head(encoder(pixel_values=pixels).pooler_output)[0].tolist()
    names = list(NAMES)
    return {{name: score for name, score in zip(names, logits)}}
'''


def test_a_label_dict_app_reads_its_order_from_the_fixture_metadata(tmp_path):
    (tmp_path / "label_app.py").write_text(LABEL_APP)
    report = run_check(load_spec(classifier_spec(tmp_path, 'python = "label_app:classify"\n')))
    assert report.passed, report.first_failure
    assert report.stage("outputs").comparison.total == 18 * 6

    # The bug: two labels swapped in the answer. The head is right; the answer's mapping is not.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "label_app.py").write_text(LABEL_APP.replace("names = list(NAMES)",
                                                        "names = list(NAMES); names[0], names[1] = names[1], names[0]"))
    report = run_check(load_spec(classifier_spec(bad, 'python = "label_app:classify"\n')))
    assert report.stage("head").status is Status.PASS
    assert report.first_failure.stage == "outputs"


# -- an Inference Endpoints handler answering a top-3 [{"label", "score"}] ------------------------

HANDLER = f'''
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel

from label_app import IdentityHead

WEIGHTS = "{MLP}"


class EndpointHandler:
    def __init__(self, path=""):
        self.processor = CLIPImageProcessor.from_pretrained(WEIGHTS + "/backbone", resample=Image.BICUBIC)
        self.encoder = CLIPVisionModel.from_pretrained(WEIGHTS + "/backbone").eval()
        self.head = IdentityHead()
        self.head.load_state_dict(torch.load(WEIGHTS + "/mlp_classifier.pth", weights_only=True), strict=True)
        self.head.eval()
        self.names = {CLASSES!r}

    @torch.inference_mode()
    def __call__(self, data):
        pixels = self.processor(images=data["inputs"].convert("RGB"), return_tensors="pt")["pixel_values"]
        scores = self.head(self.encoder(pixel_values=pixels).pooler_output)[0]
        ranked = sorted(zip(self.names, scores.tolist()), key=lambda pair: -pair[1])[:3]
        return [{{"label": name, "score": score}} for name, score in ranked]
'''


def _handler_dir(root: Path, source: str) -> Path:
    root.mkdir(exist_ok=True)
    (root / "label_app.py").write_text(LABEL_APP)
    (root / "handler.py").write_text(source)
    return root


def test_a_top_k_handler_is_judged_on_the_labels_it_lists(tmp_path):
    labels = json.dumps(CLASSES)
    folder = _handler_dir(tmp_path / "clean", HANDLER)
    report = run_check(load_spec(classifier_spec(folder, f'endpoint_handler = "handler.py"\nlabels = {labels}\n')))
    assert report.passed, report.first_failure
    notes = [n for stage in report.stages for n in stage.notes]
    assert any("54 of 108 scores compared" in n for n in notes), notes  # 18 samples, top 3 of 6 labels

    # The bug: a bilinear resize in the deployed processor. The pixels stage names it.
    folder = _handler_dir(tmp_path / "bilinear", HANDLER.replace("resample=Image.BICUBIC", "resample=Image.BILINEAR"))
    report = run_check(load_spec(classifier_spec(folder, f'endpoint_handler = "handler.py"\nlabels = {labels}\n')))
    assert report.first_failure.stage == "pixels"


def test_an_unreadable_answer_is_not_called_the_handler_raising(tmp_path):
    folder = _handler_dir(tmp_path, HANDLER.replace('"score": score', '"probability": score'))
    report = run_check(load_spec(classifier_spec(folder, 'endpoint_handler = "handler.py"\n')))
    message = report.stage("decode").sample_errors[0][1]
    assert message.startswith("parity could not read what the handler returned"), message
    assert "raised" not in message


# -- a FastAPI service: file: UploadFile, form fields, a bearer token, nested JSON or an HF list ---

SERVICE = '''
import io
import os

import timm
import torch
from fastapi import Depends, FastAPI, Form, Header, HTTPException, UploadFile
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision import transforms

from reference.models import MultiLabelRegressionNN

LABELS = ["aesthetic", "sharpness", "exposure", "clutter", "warmth"]


def build(weights):
    backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                 embed_dim=64, depth=2, num_heads=2)
    backbone.load_state_dict(load_file(f"{weights}/backbone.safetensors"), strict=True)
    head = MultiLabelRegressionNN(64, [3, 4], 5, bias_dim=8, hidden_dims=[128, 64], dropout=0.1)
    head.load_state_dict(torch.load(f"{weights}/dnnV1_model_best.pth", weights_only=True), strict=True)
    prepare = transforms.Compose([
        transforms.Resize(336, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(336),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    backbone.eval(), head.eval()

    def authorised(authorization: str = Header("")):
        if authorization != "Bearer " + os.environ["SERVICE_TOKEN"]:
            raise HTTPException(401, "bad token " + authorization)

    app = FastAPI(dependencies=[Depends(authorised)])

    @torch.inference_mode()
    def score(data, source, scene):
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        features = backbone.forward_head(backbone.forward_features(prepare(image)[None]), pre_logits=True)
        return head(features, torch.tensor([[source, scene]]))[0].tolist()

    @app.post("/v1/score")
    async def nested(file: UploadFile, source: int = Form(), scene: int = Form()):
        return {"model": "dnn", "predictions": [{"scores": score(await file.read(), source, scene)}]}

    @app.post("/v1/pipeline")
    async def pipeline(file: UploadFile, source: int = Form(), scene: int = Form()):
        values = score(await file.read(), source, scene)
        return sorted(({"label": k, "score": v} for k, v in zip(LABELS, values)), key=lambda d: -d["score"])

    return app
'''


def _service(tmp_path: Path, source: str):
    import importlib.util
    import sys

    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    path = tmp_path / "scoring_service.py"
    path.write_text(source)
    sys.path.insert(0, str(ROOT))
    try:
        module_spec = importlib.util.spec_from_file_location(f"scoring_service_{abs(hash(tmp_path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module.build(DNN)


UPLOAD = ('field = "file"\nform = { source = "input_biases.0", scene = "input_biases.1" }\n'
          'headers = { Authorization = "env:PARITY_TEST_BEARER" }\n')


@pytest.mark.parametrize("route, read", [("/v1/score", 'output_key = "predictions.0.scores"\n'),
                                         ("/v1/pipeline", "")])
def test_an_upload_file_service_with_form_fields_and_a_token(route, read, tmp_path, monkeypatch):
    from tests.support.http_service import uvicorn_service

    monkeypatch.setenv("SERVICE_TOKEN", "s3cret-value")
    monkeypatch.setenv("PARITY_TEST_BEARER", "Bearer s3cret-value")
    with uvicorn_service(_service(tmp_path, SERVICE)) as url:
        url = url.replace("/predict", route)
        report = run_check(load_spec(url_spec(tmp_path, url, UPLOAD + read)))
        assert report.passed, report.first_failure
        assert report.stage("outputs").comparison.total == 17 * 5

        monkeypatch.setenv("PARITY_TEST_BEARER", "Bearer wrong-s3cret-value")  # the service echoes it back
        report = run_check(load_spec(url_spec(tmp_path, url, UPLOAD + read)))
        message = report.stage("decode").sample_errors[0][1]
        assert "HTTP 401" in message and "s3cret" not in message, message

    # The bug: the service resizes bilinearly. The outputs stage, the only one a service shows, fails.
    with uvicorn_service(_service(tmp_path, SERVICE.replace("BICUBIC", "BILINEAR"))) as url:
        monkeypatch.setenv("PARITY_TEST_BEARER", "Bearer s3cret-value")
        report = run_check(load_spec(url_spec(tmp_path, url.replace("/predict", route), UPLOAD + read)))
    assert report.first_failure.stage == "outputs"


def test_a_header_from_an_unset_variable_is_a_usage_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PARITY_TEST_BEARER", raising=False)
    spec = url_spec(tmp_path, "http://127.0.0.1:9/predict", UPLOAD)
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    assert "PARITY_TEST_BEARER" in capsys.readouterr().err
