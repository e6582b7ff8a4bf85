"""HTTP service for the photo tagger (FastAPI).

    uvicorn server:app --host 127.0.0.1 --port 8000     # from this folder; the model files sit beside it

``POST /v1/tags`` takes ``multipart/form-data``: the photo in file field ``image`` and, optionally,
``input_biases`` (a JSON array ``[source, scene]``). It answers ``{"logits": [...], "tags": [...]}``,
the tags being those with a positive logit.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import timm
import torch
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file
from torchvision import transforms as T

from photo_tags.heads import TagScorer

MODEL_DIR = Path(__file__).resolve().parent


class TaggingModel:
    """Bytes in, logits out; preprocessing in PIL and numpy, as in the team's notebooks."""

    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        self.tags: list[str] = cfg["tags"]
        self.mean = np.asarray(cfg["mean"], dtype=np.float32)
        self.std = np.asarray(cfg["std"], dtype=np.float32)
        size = cfg["image_size"]
        resize = int(size / cfg["crop_pct"])
        self.geometry = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
        self.backbone = timm.create_model(cfg["backbone"], pretrained=False, **cfg["backbone_kwargs"])
        self.backbone.load_state_dict(load_file(model_dir / "backbone.safetensors"), strict=True)
        self.backbone.eval()
        self.scorer = TagScorer(**cfg["scorer_kwargs"])
        self.scorer.load_state_dict(torch.load(model_dir / "tag_scorer.pth", map_location="cpu", weights_only=True),
                                    strict=True)
        self.scorer.eval()

    def pixels(self, image: Image.Image) -> torch.Tensor:
        image = self.geometry(ImageOps.exif_transpose(image).convert("RGB"))
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]

    @torch.inference_mode()
    def logits(self, data: bytes, input_biases: list[int]) -> list[float]:
        with Image.open(io.BytesIO(data)) as image:
            pixels = self.pixels(image)
        embedding = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
        logits = self.scorer(embedding, torch.tensor([input_biases]))[0]
        return logits.tolist()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.model = TaggingModel(MODEL_DIR)
    yield


app = FastAPI(title="photo-tags", lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/tags")
def tag(image: UploadFile = File(...), input_biases: str = Form("[0, 0]")) -> dict[str, list]:
    model: TaggingModel = app.state.model
    try:
        biases = [int(b) for b in json.loads(input_biases)]
        logits = model.logits(image.file.read(), biases)
    except (ValueError, TypeError, UnidentifiedImageError) as e:
        raise HTTPException(400, f"bad request: {e}") from e
    return {"logits": logits, "tags": [t for t, v in zip(model.tags, logits) if v > 0]}
