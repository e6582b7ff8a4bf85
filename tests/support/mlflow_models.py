"""A style tagger shipped as an MLflow pyfunc model, written apart from the bundled examples and the photo tagger.

The training side: the photo tagger's tiny timm CLIP tower and images (`tests.shipped.reference`) under
`StyleHead` (LayerNorm on the embedding, a learned embedding of the photo's source, BatchNorm, GELU;
one ``input_biases`` column), frozen into a fixture by `parity.commands.capture.capture_pipeline`. The
deployment: `MODEL_CODE`, a models-from-code ``PythonModel`` that decodes the image bytes itself,
preprocesses with torchvision's functional API and numpy, re-declares the head and answers a
DataFrame of sigmoid scores by style; saved with ``mlflow.pyfunc.save_model`` and a signature whose
image column is ``binary``. A bug is a text replacement in a copy of `MODEL_CODE` (`BUGS`), the only
change between a clean and an injected model.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tests.shipped.reference import (backbone_tables, IMAGES, freeze_shipped)
from tests.support.http_service import free_port

SEED = 3
STYLES = ("minimal", "vivid", "vintage")
HEAD_KWARGS = {"embed_dim": 64, "n_sources": 4, "source_dim": 5, "hidden": 40, "n_styles": len(STYLES)}
HEAD_CLASS = "tests.support.mlflow_models:StyleHead"
# A served model that has not answered /ping within this many seconds failed to start.
SERVE_TIMEOUT = 90.0


class StyleHead(nn.Module):
    """CLIP embedding + the photo's source id -> one logit per style (the training code's class)."""

    def __init__(self, embed_dim: int = 64, n_sources: int = 4, source_dim: int = 5, hidden: int = 40,
                 n_styles: int = 3) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(embed_dim)
        self.source = nn.Embedding(n_sources, source_dim)
        self.hidden = nn.Linear(embed_dim + source_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, n_styles)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm_in(embedding), self.source(input_biases[:, 0])], dim=1)
        return self.out(nn.functional.gelu(self.bn(self.hidden(x))))


# The model as its team ships it: mlflow.pyfunc.save_model(python_model=<this file>, artifacts=...).
MODEL_CODE = '''"""Style tagger: scores a photo for each style from its bytes and its source id."""

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import timm
import torch
import torchvision.transforms.functional as TF
from mlflow.models import set_model
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn


class StyleHead(nn.Module):
    def __init__(self, embed_dim=64, n_sources=4, source_dim=5, hidden=40, n_styles=3):
        super().__init__()
        self.norm_in = nn.LayerNorm(embed_dim)
        self.source = nn.Embedding(n_sources, source_dim)
        self.hidden = nn.Linear(embed_dim + source_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, n_styles)

    def forward(self, embedding, input_biases):
        x = torch.cat([self.norm_in(embedding), self.source(input_biases[:, 0])], dim=1)
        return self.out(nn.functional.gelu(self.bn(self.hidden(x))))


class StyleTagger(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.styles = list(config["styles"])
        self.size = config["image_size"]
        self.resize = int(config["image_size"] / config["crop_pct"])
        self.mean = np.asarray(config["mean"], dtype=np.float32)
        self.std = np.asarray(config["std"], dtype=np.float32)
        self.encoder = timm.create_model(config["backbone"], pretrained=False, **config["backbone_kwargs"])
        self.encoder.load_state_dict(load_file(context.artifacts["backbone"]), strict=True)
        self.encoder.eval()
        self.head = StyleHead(**config["head_kwargs"])
        state = torch.load(context.artifacts["head"], map_location="cpu", weights_only=True)
        self.head.load_state_dict(state, strict=True)
        self.head.eval()

    def _pixels(self, data):
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        image = TF.center_crop(TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BICUBIC), self.size)
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(((rgb - self.mean) / self.std).transpose(2, 0, 1)))

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        pixels = torch.stack([self._pixels(bytes(data)) for data in model_input["image"]])
        sources = torch.as_tensor(np.asarray(model_input["source"], dtype=np.int64))[:, None]
        embedding = self.encoder.forward_head(self.encoder.forward_features(pixels), pre_logits=True)
        scores = torch.sigmoid(self.head(embedding, sources))
        return pd.DataFrame(scores.numpy(), columns=self.styles)


set_model(StyleTagger())
'''

# Bugs as they get into a model's code: name -> {old: new}, each old text occurring once in MODEL_CODE.
BUGS: dict[str, dict[str, str]] = {
    "bgr": {"rgb = np.asarray(image, dtype=np.float32) / 255.0":
            "rgb = np.asarray(image, dtype=np.float32)[..., ::-1] / 255.0  # BGR, as cv2.imdecode gives"},
    "softmax": {"scores = torch.sigmoid(self.head(embedding, sources))":
                "scores = torch.softmax(self.head(embedding, sources), dim=1)"},
    "columns_reversed": {"columns=self.styles)": "columns=self.styles[::-1])"},
}


@dataclass(frozen=True)
class StyleReference:
    """The training side's files: backbone and head weights, the config the model reads, the images, the fixture."""

    root: Path
    files: Path
    fixture: Path
    images: tuple[Path, ...]

    def spec_text(self, candidate: str = "") -> str:
        """The reference spec (absolute paths), with ``candidate`` appended as the body of ``[candidate]``."""
        return _reference_spec(self.files, self.fixture) + (f"\n[candidate]\n{candidate}" if candidate else "")

    def write_spec(self, folder: Path, candidate: str, name: str = "parity.toml") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(self.spec_text(candidate))
        return path


def _reference_spec(files: Path, fixture: Path) -> str:
    return f"""name = "style_tags"
fixtures = "{fixture}"

{backbone_tables(files)}
[head]
class = "{HEAD_CLASS}"
weights = "{files / 'style_head.pth'}"
kwargs = {{ {', '.join(f'{k} = {v}' for k, v in HEAD_KWARGS.items())} }}

# A style is shown when its probability (the model's sigmoid, [candidate].postprocess) is above one half.
[decisions]
threshold = 0.5

[runtime]
device = "cpu"
batch_size = 8
"""


def _head() -> StyleHead:
    """Seeded weights and BatchNorm statistics away from the identity, so that every layer matters."""
    torch.manual_seed(SEED)
    head = StyleHead(**HEAD_KWARGS)
    with torch.no_grad():
        head.norm_in.weight.uniform_(0.5, 1.5)
        head.norm_in.bias.uniform_(-0.2, 0.2)
        head.bn.running_mean.uniform_(-0.3, 0.3)
        head.bn.running_var.uniform_(0.5, 2.0)
        head.bn.weight.uniform_(0.5, 1.5)
        head.out.weight.mul_(3.0)
    return head.eval()


def build_style_reference(root: Path) -> StyleReference:
    """The training side's files under ``root`` and its frozen fixture."""
    files, fixture, images = freeze_shipped(
        root, files="files", head=_head(), head_file="style_head.pth",
        config={"styles": STYLES, "head_kwargs": HEAD_KWARGS}, spec=_reference_spec,
        biases=[[source] for _, _, source, _ in IMAGES])
    return StyleReference(root, files, fixture, images)


def save_style_model(reference: StyleReference, folder: Path, replacements: Mapping[str, str] | None = None) -> Path:
    """``folder/model``: `MODEL_CODE` with ``replacements`` made, saved by ``mlflow.pyfunc.save_model``."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    folder.mkdir(parents=True, exist_ok=True)
    code = MODEL_CODE
    for old, new in (replacements or {}).items():
        assert code.count(old) == 1, f"{old!r} occurs {code.count(old)} times in the model's code, expected once"
        code = code.replace(old, new)
    source = folder / "style_tagger.py"
    source.write_text(code)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image"), ColSpec("long", "source")]))
    artifacts = {name: str(reference.files / file) for name, file in
                 (("backbone", "backbone.safetensors"), ("head", "style_head.pth"), ("config", "config.json"))}
    # Requirements named, so that saving does not import the code to infer them.
    mlflow.pyfunc.save_model(str(folder / "model"), python_model=str(source), artifacts=artifacts, signature=signature,
                             pip_requirements=["mlflow", "torch", "timm", "torchvision", "pillow", "pandas"])
    return folder / "model"


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def served(models: Sequence[Path], logs: Path) -> Iterator[Callable[[], list[str]]]:
    """``mlflow models serve --env-manager local`` for each model on a free 127.0.0.1 port, all started at once.

    Yields ``ready()``, which waits until each server answers ``/ping`` and returns their ``/invocations`` URLs
    (so that the servers start while other work goes on); on exit every server is stopped, its whole process
    group (the CLI and the uvicorn it runs).

    Raises:
        RuntimeError: from ``ready()``: a server exited, or did not answer within `SERVE_TIMEOUT` seconds of the
            call (its log is quoted).
    """
    bin_dir = str(Path(sys.executable).parent)  # the CLI runs `uvicorn` from PATH
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    started: list[tuple[subprocess.Popen, str, Path]] = []

    def ready() -> list[str]:
        deadline = time.monotonic() + SERVE_TIMEOUT
        for process, url, log in started:
            while not _ping(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"mlflow models serve for {url} did not start within {SERVE_TIMEOUT:g} s:\n"
                                       f"{tail}")
                time.sleep(0.2)
        return [f"{url}/invocations" for _, url, _ in started]

    try:
        for i, model in enumerate(models):
            port, log = free_port(), logs / f"serve-{i}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
                     "--host", "127.0.0.1", "--port", str(port)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            started.append((process, f"http://127.0.0.1:{port}", log))
        yield ready
    finally:
        for process, _, _ in started:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """End the server's process group (started as a session of its own: the CLI and its uvicorn), politely first."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group did not stop
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)
