"""`parity init` on a repository written apart from the bundled examples: the spec it scaffolds passes the gate
once its TODOs are set, and nothing else is edited.

The repository (built in a temporary folder) is a small team's own: a head with BatchNorm and a site
embedding in ``mlcore/heads.py``, saved in a training checkpoint beside its hyperparameters; a timm CLIP
ViT-B/16 backbone at reduced width and depth, created in the app from constants (so that the model
name cannot be read from the code); metadata as CSV with its own field names, embeddings extracted
with timm's own API; a ``deploy/app.py`` with ``predict``, a root ``handler.py``, a FastAPI service and
a Gradio Blocks app.
"""

from __future__ import annotations

import csv
import re
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.commands.init import init_spec
from parity.errors import SpecError
from parity.libraries import CallSite, guess_backbones
from parity.spec import load_spec

MODEL = "vit_base_patch16_clip_224.openai"
BACKBONE_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 3}
SITES = (0, 2, 1, 1, 0, 2)

HEADS = '''
"""Scoring heads."""
import torch
from torch import nn


class SiteScorer(nn.Module):
    """Batch-normalised embedding and a learned site vector, then an MLP with BatchNorm."""

    def __init__(self, embedding_dim: int = 512, sites: int = 8, hidden: int = 32, outputs: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        self.norm = nn.BatchNorm1d(embedding_dim)
        self.site = nn.Embedding(sites, 4)
        self.body = nn.Sequential(nn.Linear(embedding_dim + 4, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, outputs))

    def forward(self, embedding, input_biases):
        return self.body(torch.cat([self.norm(embedding), self.site(input_biases[:, 0])], dim=1))
'''

APP = '''
"""The service's model code."""
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from mlcore.heads import SiteScorer

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_base_patch16_clip_224.openai"
BACKBONE_KWARGS = dict(embed_dim=48, depth=2, num_heads=3)

backbone = timm.create_model(BACKBONE, pretrained=False, **BACKBONE_KWARGS)
backbone.load_state_dict(load_file(ROOT / "checkpoints" / "backbone.safetensors"), strict=True)
backbone.eval()
saved = torch.load(ROOT / "checkpoints" / "scorer_best.pt", map_location="cpu", weights_only=True)
head = SiteScorer(**saved["hparams"])
head.load_state_dict(saved["state_dict"], strict=True)
head.eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))


def scores(image, site):
    with torch.inference_mode():
        pixels = transform(image.convert("RGB")).unsqueeze(0)
        embedding = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        return head(embedding, torch.tensor([[int(s) for s in site]]))[0]


def predict(image, site):
    return scores(image, site).tolist()
'''

HANDLER = '''
from deploy.app import scores


class EndpointHandler:
    def __init__(self, path=""):
        self.path = path

    def __call__(self, data):
        site = data.get("parameters", {}).get("input_biases", [0])
        return scores(data["inputs"], site).tolist()
'''

SERVICE = '''
import io

from fastapi import FastAPI, File, UploadFile
from PIL import Image

from deploy.app import predict

api = FastAPI()


@api.post("/v1/score")
async def score(file: UploadFile = File(...)):
    return {"scores": predict(Image.open(io.BytesIO(await file.read())), [0])}
'''

SPACE = '''
import gradio as gr

from deploy.app import predict

with gr.Blocks() as demo:
    image = gr.Image(type="pil")
'''


def _images(folder: Path) -> list[str]:
    """Photos of several sizes and modes, drawn from a seeded generator."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    names = []
    for i, (w, h) in enumerate([(320, 240), (200, 260), (224, 224), (300, 180), (260, 260), (240, 320)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
        pixels = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        name = f"shot_{i}.jpg" if i % 2 else f"shot_{i}.png"
        image.save(folder / name, quality=90) if name.endswith(".jpg") else (
            image.convert("L") if i == 4 else image).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The team's repository, with training artifacts made by its own code paths (timm's API, not parity's)."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("scoring_repo")
    (root / "mlcore").mkdir()
    (root / "mlcore" / "__init__.py").write_text("")
    (root / "mlcore" / "heads.py").write_text(HEADS)
    (root / "deploy").mkdir()
    (root / "deploy" / "app.py").write_text(APP)
    (root / "deploy" / "service.py").write_text(SERVICE)
    (root / "deploy" / "space.py").write_text(SPACE)
    (root / "handler.py").write_text(HANDLER)
    (root / "checkpoints").mkdir()
    torch.manual_seed(11)
    backbone = timm.create_model(MODEL, pretrained=False, **BACKBONE_KWARGS).eval()
    save_file(backbone.state_dict(), root / "checkpoints" / "backbone.safetensors")
    sys.path.insert(0, str(root))
    try:
        from mlcore.heads import SiteScorer

        hparams = {"embedding_dim": 48, "sites": 3, "hidden": 16, "outputs": 3}
        head = SiteScorer(**hparams).train()
        for _ in range(4):  # moves BatchNorm's running statistics away from their initial values
            head(torch.randn(8, 48) * 2 + 0.5, torch.randint(0, 3, (8, 1)))
        torch.save({"state_dict": head.state_dict(), "hparams": hparams, "epoch": 7},
                   root / "checkpoints" / "scorer_best.pt")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == "mlcore"]:
            del sys.modules[name]
    names = _images(root / "data" / "images")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.open(root / "data" / "images" / n).convert("RGB")) for n in names])
        embeddings = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True).numpy()
    (root / "artifacts").mkdir()
    np.save(root / "artifacts" / "embeddings.npy", embeddings)
    with open(root / "data" / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "site", "quality", "split"])
        for i, (name, site) in enumerate(zip(names, SITES)):
            writer.writerow([f"images/{name}", site, round(0.1 * i, 2), "val" if i % 3 else "train"])
    return root


@pytest.fixture
def clean_modules():
    """The repository's packages are imported by check; another test's copies must not be found instead."""
    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] in ("mlcore", "deploy")]:
            del sys.modules[name]

    forget()
    yield
    forget()


def _set_todo(text: str, key: str, value: str) -> str:
    """What a user does: replace the one TODO line of ``key`` with a value, nothing else."""
    pattern = re.compile(rf"^{re.escape(key)} = \"TODO: .*\"$", re.M)
    assert len(pattern.findall(text)) == 1, f"no single TODO line for {key}"
    return pattern.sub(f"{key} = {value}", text)


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line.strip())[1:] for line in output.splitlines()
            if line.strip().startswith(("parity freeze ", "parity check "))]
