"""A photo-labelling Gradio Space written apart from the bundled examples, and the reference it is gated against.

The reference reuses the shipped photo tagger's builders (`tests.shipped.reference`: a tiny seeded
timm CLIP tower, images of every mode a user uploads, the fixture frozen by `capture_pipeline`)
with a head of its own, `LabelHead` (LayerNorm in, a joint (source, scene) table, BatchNorm with
running statistics of its own). The Space (`APP`) serves it as Spaces do: ``gr.Blocks`` with an
image, a number and a dropdown in, a ``gr.Label`` of sigmoid scores out. A bug is injected by a
text replacement in the written ``app.py`` (`write_app`), nothing else changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from tests.shipped.reference import (backbone_tables, IMAGES, SEED, freeze_shipped)

LABELS = ("portrait", "landscape", "document", "night")
HEAD_CLASS = "tests.support.gradio_apps:LabelHead"
HEAD_KWARGS = {"embed_dim": 64, "n_sources": 4, "n_scenes": 4, "hidden": 32, "n_labels": len(LABELS)}
# The clean Space's [candidate] options: three input components, a Label of sigmoid scores.
OPTIONS = ('inputs = ["image", "input_biases.0", "input_biases.1"]\n'
           f"labels = {json.dumps(list(LABELS))}\n"
           'postprocess = "sigmoid"\ntimeout = 60.0\n')

# The Space's bugs, each one text replacement in app.py.
BGR = {"    pixels = prepare(image)": "    image = Image.merge(\"RGB\", image.split()[::-1])\n"
                                      "    pixels = prepare(image)"}
DOUBLE_SIGMOID = {"scores = torch.sigmoid(logits)[0]": "scores = torch.sigmoid(torch.sigmoid(logits))[0]"}
LABEL_ORDER = {'zip(CONFIG["labels"], scores)': 'zip(sorted(CONFIG["labels"]), scores)'}


class LabelHead(nn.Module):
    """A CLIP embedding and (source, scene) -> one logit per label."""

    def __init__(self, embed_dim: int = 64, n_sources: int = 4, n_scenes: int = 4, hidden: int = 32,
                 n_labels: int = 4) -> None:
        super().__init__()
        self.n_scenes = n_scenes
        self.norm_in = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, hidden)
        self.context = nn.Embedding(n_sources * n_scenes, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, n_labels)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        joint = input_biases[:, 0] * self.n_scenes + input_biases[:, 1]
        hidden = self.bn(self.proj(self.norm_in(embedding)) + self.context(joint))
        return self.out(nn.functional.silu(hidden))


APP = '''"""Photo labeller: upload a photo, say where it comes from and what scene it shows, get a score per label."""

import json
from pathlib import Path

import gradio as gr
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from tests.support.gradio_apps import LabelHead

MODEL_DIR = Path("{model_dir}")
CONFIG = json.loads((MODEL_DIR / "config.json").read_text())

backbone = timm.create_model(CONFIG["backbone"], pretrained=False, **CONFIG["backbone_kwargs"])
backbone.load_state_dict(load_file(MODEL_DIR / "backbone.safetensors"))
backbone.eval()
head = LabelHead(**CONFIG["head_kwargs"])
head.load_state_dict(torch.load(MODEL_DIR / "label_head.pth", map_location="cpu", weights_only=True))
head.eval()
prepare = T.Compose([
    T.Resize(int(CONFIG["image_size"] / CONFIG["crop_pct"]), interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(CONFIG["image_size"]),
    T.ToTensor(),
    T.Normalize(CONFIG["mean"], CONFIG["std"]),
])


@torch.no_grad()
def label(image: Image.Image, source: int, scene: int) -> dict[str, float]:
    pixels = prepare(image).unsqueeze(0)
    features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
    logits = head(features, torch.tensor([[int(source), int(scene)]]))
    scores = torch.sigmoid(logits)[0]
    return {{name: float(score) for name, score in zip(CONFIG["labels"], scores)}}


with gr.Blocks(title="Photo labeller") as demo:
    with gr.Row():
        photo = gr.Image(type="pil", label="Photo")
        with gr.Column():
            source = gr.Number(value=0, precision=0, label="Source")
            scene = gr.Dropdown(choices=[0, 1, 2, 3], value=0, label="Scene")
    scores = gr.Label(num_top_classes=len(CONFIG["labels"]), label="Labels")
    gr.Button("Label").click(label, inputs=[photo, source, scene], outputs=scores, api_name="predict")

if __name__ == "__main__":
    demo.launch()
'''


@dataclass(frozen=True)
class Reference:
    """The model files the Space loads, the frozen fixture, and the reference spec's text."""

    model_dir: Path
    fixture: Path
    spec: str

    def spec_text(self, candidate: str) -> str:
        """The reference spec with ``candidate`` as the body of its ``[candidate]`` table."""
        return f"{self.spec}\n[candidate]\n{candidate}"


def reference_spec(model_dir: Path, fixture: Path) -> str:
    """How the training job made its embeddings and outputs (logits), as a parity spec."""
    return f"""name = "photo_labels"
fixtures = "{fixture}"

{backbone_tables(model_dir, extract=None)}
[head]
class = "{HEAD_CLASS}"
weights = "{model_dir / 'label_head.pth'}"
kwargs = {{ {", ".join(f"{key} = {value}" for key, value in HEAD_KWARGS.items())} }}

# The label shown first is the top-scoring one.
[decisions]
argmax = true
"""


def _head() -> LabelHead:
    """Seeded weights and running statistics of its own: the eval-mode BatchNorm is not an identity."""
    torch.manual_seed(SEED + 1)
    head = LabelHead(**HEAD_KWARGS)
    with torch.no_grad():
        head.bn.running_mean.uniform_(-0.3, 0.3)
        head.bn.running_var.uniform_(0.5, 2.0)
        head.out.weight.mul_(3.0)
    return head.eval()


def build_reference(root: Path) -> Reference:
    """Model files, images and the frozen fixture under ``root``."""
    model_dir, fixture, _ = freeze_shipped(
        root, files="model", head=_head(), head_file="label_head.pth",
        config={"labels": LABELS, "head_kwargs": HEAD_KWARGS}, spec=reference_spec,
        biases=[[source, scene] for _, _, source, scene in IMAGES])
    return Reference(model_dir=model_dir, fixture=fixture, spec=reference_spec(model_dir, fixture))


def write_app(reference: Reference, folder: Path, replacements: Mapping[str, str] | None = None,
              candidate: str | None = None) -> Path:
    """``folder/app.py`` (the Space, each replaced text occurring exactly once) and ``folder/parity.toml``
    with ``candidate`` as its ``[candidate]`` (default: the launched app); returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = APP.format(model_dir=reference.model_dir)
    for old, new in (replacements or {}).items():
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in app.py, expected once"
        text = text.replace(old, new)
    (folder / "app.py").write_text(text)
    spec = folder / "parity.toml"
    spec.write_text(reference.spec_text(candidate if candidate is not None else
                                        'gradio_app = "app.py:demo"\n' + OPTIONS))
    return spec


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``folder/app.py``'s demo, imported under a name of its own and served on a free 127.0.0.1 port; its URL.

    Stopped on leaving. Analytics are off (GRADIO_ANALYTICS_ENABLED=False) while it is imported and served.
    """
    from tests.support.http_service import free_port

    with mock.patch.dict(os.environ, {"GRADIO_ANALYTICS_ENABLED": "False"}):
        name = f"photo_labeller_{abs(hash(str(folder)))}"
        module_spec = importlib.util.spec_from_file_location(name, folder / "app.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        demo = module.demo
        for attempt in range(3):  # a port taken meanwhile, or a server slower to start than gradio waits (5 s)
            port = free_port()
            try:
                demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                            quiet=True, show_error=True, ssr_mode=False)
                break
            except OSError:
                if attempt == 2:
                    raise
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close(verbose=False)
            sys.modules.pop(name, None)
