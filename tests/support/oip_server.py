"""A user's model served by KServe's ModelServer over the Open Inference Protocol V2, for the oip runner's tests.

Written apart from the bundled examples: the user's repository (`user_repo`) holds its own head
(``mlcore.heads:PhotoQuality``: source and scene embeddings, BatchNorm, SiLU, over the example's
test backbone), its weights, a fixture frozen from a spec of that pipeline (`freeze`), and
``serve/scorer.py`` (`write_server`, or one of its `BUGS` injected),
a KServe model server that takes encoded photos (``BYTES``) and their context (``INT64``) and answers
``FP32`` quality scores and the embedding; the same script serves a second model that takes pixels.
`served` runs such a script with ``python -m`` on a free 127.0.0.1 port, waits for
``/v2/health/ready`` and stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC
from tests.support.http_service import free_port

MODEL, PIXELS_MODEL = "photo-quality", "photo-quality-pixels"
# The fixture's samples: RGB, L, RGBA, a JPEG, an EXIF-rotated photo; chelsea.png's pixels are stored.
IMAGES = ("astronaut.png", "camera.png", "chelsea.png", "rocket.jpg", "logo.png", "page.png",
          "chelsea_exif_rotated.png", "coffee.png")
GOLDEN = ("chelsea.png",)

HEADS = '''
import torch
from torch import nn


class PhotoQuality(nn.Module):
    """Five quality scores from a photo's embedding and its (source, scene) context."""

    def __init__(self, width: int = 64, sources: int = 3, scenes: int = 4, context: int = 4, hidden: int = 32):
        super().__init__()
        self.source = nn.Embedding(sources, context)
        self.scene = nn.Embedding(scenes, context)
        self.trunk = nn.Sequential(nn.Linear(width + 2 * context, hidden), nn.BatchNorm1d(hidden), nn.SiLU())
        self.scores = nn.Linear(hidden, 5)

    def forward(self, embedding, context):
        where = torch.cat([self.source(context[:, 0]), self.scene(context[:, 1])], dim=1)
        return self.scores(self.trunk(torch.cat([embedding, where], dim=1)))
'''

SCORER = '''"""Photo quality over KServe: an encoded photo and its (source, scene) in, five scores and the embedding out."""

import base64
import io

import timm
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision import transforms

from mlcore.heads import PhotoQuality

BACKBONE = "{backbone}"
HEAD = "weights/quality.pth"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class QualityModel(Model):
    """Takes encoded photos (BYTES, base64 in JSON) and their context (INT64 [N, 2])."""

    image = {{"name": "photo", "datatype": "BYTES", "shape": [-1]}}

    def __init__(self, name):
        super().__init__(name)
        self.load()

    def load(self):
        self.backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                          embed_dim=64, depth=2, num_heads=2)
        self.backbone.load_state_dict(load_file(BACKBONE), strict=True)
        self.head = PhotoQuality()
        self.head.load_state_dict(torch.load(HEAD, weights_only=True), strict=True)
        self.backbone.eval()
        self.head.eval()
        self.prepare = transforms.Compose([
            transforms.Resize(336, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(336),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])
        self.ready = True

    def get_input_types(self):
        return [self.image, {{"name": "context", "datatype": "INT64", "shape": [-1, 2]}}]

    def get_output_types(self):
        return [{{"name": "quality", "datatype": "FP32", "shape": [-1, 5]}},
                {{"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}}]

    def pixels(self, request):
        photos = []
        for data in request.get_input_by_name("photo").data:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(base64.b64decode(data))))
            image = image.convert("RGB")
            photos.append(self.prepare(image))
        return torch.stack(photos)

    async def predict(self, request: InferRequest, headers=None, response_headers=None) -> InferResponse:
        with torch.inference_mode():
            pixels = self.pixels(request)
            context = torch.as_tensor(request.get_input_by_name("context").as_numpy(), dtype=torch.long)
            embedding = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
            quality = self.head(embedding, context)
        return InferResponse(request.id, self.name, [
            InferOutput("quality", list(quality.shape), "FP32", quality.numpy()),
            InferOutput("embedding", list(embedding.shape), "FP32", embedding.numpy()),
        ])


class QualityPixelsModel(QualityModel):
    """The same model for clients that preprocess: pixels FP32 [N, 3, 336, 336]."""

    image = {{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 336, 336]}}

    def pixels(self, request):
        return torch.as_tensor(request.get_input_by_name("pixels").as_numpy())


if __name__ == "__main__":
    ModelServer().start([QualityModel("{model}"), QualityPixelsModel("{pixels_model}")])
'''

# Each bug: (the clean line, the line with the bug); the script is otherwise the same.
BUGS = {
    # The server decodes to BGR (as cv2.imdecode does) and feeds that to an RGB-trained backbone.
    "bgr": ('            image = image.convert("RGB")\n',
            '            image = Image.merge("RGB", image.convert("RGB").split()[::-1])\n'),
    # The server applies a softmax the trained head does not.
    "softmax": ("            quality = self.head(embedding, context)\n",
                "            quality = torch.softmax(self.head(embedding, context), dim=1)\n"),
}


def user_repo(root: Path) -> Path:
    """The user's repository in ``root``: the head package and its trained weights (no fixture yet: `freeze`)."""
    import torch

    (root / "mlcore").mkdir(parents=True)
    (root / "mlcore" / "__init__.py").write_text("")
    (root / "mlcore" / "heads.py").write_text(HEADS)
    (root / "serve").mkdir()
    (root / "weights").mkdir()
    namespace: dict = {}
    exec(compile(HEADS, str(root / "mlcore" / "heads.py"), "exec"), namespace)
    torch.manual_seed(7)
    head = namespace["PhotoQuality"]().train()
    with torch.no_grad():
        for _ in range(4):  # running statistics away from their initial values
            sources, scenes = torch.randint(0, 3, (16,)), torch.randint(0, 4, (16,))
            head(torch.randn(16, 64) * 2 + 0.5, torch.stack([sources, scenes], 1))
    torch.save(head.eval().state_dict(), root / "weights" / "quality.pth")
    return root


def freeze(repo: Path) -> Path:
    """The fixture the training side would freeze: the user's spec pipeline over `IMAGES` (their input_biases)."""
    from parity.store.fixtures import load_fixture
    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline
    from parity.spec import load_spec

    spec = load_spec(quality_spec(repo, "", name="reference.toml"))  # imports mlcore from the repository
    rows = {row.name: row for row in load_fixture(EXAMPLE_FIXTURES).rows}
    return capture_pipeline(build_pipeline(spec), [rows[name].image for name in IMAGES], repo / "fixtures" / "quality",
                            input_biases=[rows[name].input_biases for name in IMAGES], golden=GOLDEN)


def quality_spec(repo: Path, candidate: str, name: str = "parity.toml") -> Path:
    """The user's spec: the example's backbone and preprocessing, the user's head and fixture, and ``candidate``."""
    text = EXAMPLE_SPEC.read_text().split("[matrix]")[0]
    text = text.replace('"../fixtures/clip_dnn/backbone.safetensors"', f'"{EXAMPLE_FIXTURES / "backbone.safetensors"}"')
    text = text.replace('fixtures = "../fixtures/clip_dnn"', 'fixtures = "fixtures/quality"')
    text = text.replace('name = "clip_dnn"', 'name = "quality"')
    text = text.replace('class = "reference.models:MultiLabelRegressionNN"', 'class = "mlcore.heads:PhotoQuality"')
    text = text.replace('weights = "../fixtures/clip_dnn/dnnV1_model_best.pth"', 'weights = "weights/quality.pth"')
    kwargs = next(line for line in text.splitlines() if line.startswith("kwargs = { embedding_dim"))
    text = text.replace(kwargs, "kwargs = {}")
    path = repo / name
    path.write_text(text + (f"\n[candidate]\n{candidate}" if candidate else ""))
    return path


def write_server(repo: Path, bug: str | None = None) -> str:
    """``serve/scorer.py`` (``scorer_BUG.py`` with one of `BUGS`); returns its module name for ``python -m``."""
    source = SCORER.format(backbone=EXAMPLE_FIXTURES / "backbone.safetensors", model=MODEL, pixels_model=PIXELS_MODEL)
    module = "scorer"
    if bug is not None:
        clean, buggy = BUGS[bug]
        assert source.count(clean) == 1, clean
        source, module = source.replace(clean, buggy), f"scorer_{bug}"
    (repo / "serve" / f"{module}.py").write_text(source)
    return f"serve.{module}"


# KServe's RESTServer binds 0.0.0.0 with no option; the tests keep the server on the loopback.
LOOPBACK = '''
import runpy
import sys

import kserve.model_server
from kserve.protocol.rest.server import RESTServer


class LoopbackRESTServer(RESTServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


kserve.model_server.RESTServer = LoopbackRESTServer
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


class Server:
    """A started server process: its base URL, its log, and the process to stop."""

    def __init__(self, repo: Path, module: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        (repo / "_loopback.py").write_text(LOOPBACK)
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "_loopback.py", module, "--http_port", str(self.port), "--enable_grpc", "false"],
                cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)

    def model(self, name: str = MODEL) -> str:
        return f"{self.base}/v2/models/{name}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Returns once ``/v2/health/ready`` says ready; raises with the log's tail when it does not in time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/v2/health/ready", timeout=2) as answer:
                    if json.loads(answer.read()).get("ready"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the KServe server on port {self.port} did not become ready "
                                   f"(exit status {self.process.poll()}):\n{tail}")
            time.sleep(0.2)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        """Terminated (SIGTERM: uvicorn's graceful shutdown), killed if it is still running after 20 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def served(repo: Path, *modules: str, meanwhile: Callable[[], object] | None = None) -> Iterator[list[Server]]:
    """Each module's ``python -m`` server started at once on its own free 127.0.0.1 port, ready, then stopped.

    ``meanwhile`` runs while the servers start (they take seconds to import and load).
    """
    servers: list[Server] = []
    try:
        for module in modules:
            servers.append(Server(repo, module, repo / f"{module}.log"))
        if meanwhile is not None:
            meanwhile()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:  # all told to stop first: each takes a moment to shut down
            server.terminate()
        for server in servers:
            server.stop()


@contextlib.contextmanager
def stub_model(metadata: dict, infer: Callable[[dict, dict], tuple[int, dict]]) -> Iterator[str]:
    """A stand-in V2 server on 127.0.0.1 (stdlib): ``GET`` answers ``metadata``, ``POST .../infer`` answers
    ``infer(request, headers)`` as ``(status, body)``; yields the model's address. For what KServe will not do."""
    from http.server import BaseHTTPRequestHandler

    from tests.support.http_service import answer, serving

    name = metadata.get("name", "stub")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            found = self.path == f"/v2/models/{name}"
            answer(self, 200 if found else 404, json.dumps(metadata if found else {"error": "no model"}).encode())

        def do_POST(self) -> None:  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            status, body = infer(request, dict(self.headers))
            answer(self, status, json.dumps(body).encode())

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as port:
        yield f"http://127.0.0.1:{port}/v2/models/{name}"
