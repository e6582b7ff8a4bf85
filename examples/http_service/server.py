"""A small HTTP service for the clip_dnn example (FastAPI + uvicorn), gated by parity's url runner.

    pip install 'parity[service]'
    python examples/http_service/server.py --port 8000        # serves http://127.0.0.1:8000/predict
    parity check --spec examples/http_service/parity.toml      # in another shell

``POST /predict`` takes the image file's bytes either as ``multipart/form-data`` (file field
``image``, optional form field ``input_biases`` holding a JSON array) or as JSON
``{"image": "<base64>", "input_biases": [0, 2]}``, and answers ``{"outputs": [...]}``.
``GET /health`` answers once the model is loaded.

The predictor is what a deploy would write by hand: timm's model definition with the trained
checkpoint loaded ``strict=True``, the pre-logits feature (not ``forward()``), the head class
imported from the training code, timm's eval transform with the training preprocessing, EXIF
orientation applied before the RGB conversion. ``CLIP_DNN_INTERPOLATION`` (default ``bicubic``)
changes the resize filter, to show what the gate says about a service deployed with another.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import sys
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL_DIR = Path(os.environ.get("CLIP_DNN_MODEL_DIR", ROOT / "fixtures" / "clip_dnn"))
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class Predictor:
    """image bytes + input_biases -> the head's outputs, one sample at a time."""

    def __init__(self, model_dir: Path = MODEL_DIR, *, interpolation: str = "bicubic") -> None:
        import timm
        from safetensors.torch import load_file

        sys.path.insert(0, str(ROOT))  # the head class exactly as trained
        from reference.models import MultiLabelRegressionNN

        self.backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                          embed_dim=64, depth=2, num_heads=2)
        self.backbone.load_state_dict(load_file(model_dir / "backbone.safetensors"), strict=True)
        self.backbone.eval()
        self.head = MultiLabelRegressionNN(64, [3, 4], 5, bias_dim=8, hidden_dims=[128, 64], dropout=0.1)
        self.head.load_state_dict(torch.load(model_dir / "dnnV1_model_best.pth", map_location="cpu",
                                             weights_only=True), strict=True)
        self.head.eval()
        self.transform = timm.data.create_transform(input_size=(3, 336, 336), interpolation=interpolation,
                                                    crop_pct=1.0, crop_mode="center", mean=MEAN, std=STD)

    def __call__(self, data: bytes, input_biases: list[int]) -> list[float]:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        pixels = self.transform(image).unsqueeze(0)
        with torch.inference_mode():
            embedding = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
            outputs = self.head(embedding, torch.tensor([input_biases], dtype=torch.long))
        return outputs[0].tolist()


def create_app(predictor: Predictor | None = None):
    """The FastAPI application around one predictor (loaded here unless given)."""
    predictor = predictor or Predictor(interpolation=os.environ.get("CLIP_DNN_INTERPOLATION", "bicubic"))
    app = FastAPI(title="clip_dnn")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, list[float]]:
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise HTTPException(400, "multipart body needs a file field 'image'")
                data = await upload.read()
                biases = json.loads(form.get("input_biases") or "[]")
            else:
                body = await request.json()
                data = base64.b64decode(body["image"], validate=True)
                biases = body.get("input_biases", [])
            return {"outputs": predictor(data, [int(b) for b in biases])}
        except HTTPException:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error, UnidentifiedImageError) as e:
            raise HTTPException(400, f"bad request: {type(e).__name__}: {e}") from e

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the clip_dnn example on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
