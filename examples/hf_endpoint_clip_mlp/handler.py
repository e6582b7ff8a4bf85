"""A Hugging Face Inference Endpoints handler for the clip_mlp identity classifier.

Request: ``{"inputs": <PIL image or image bytes>}``. Response: ``{"logits": [...], "label": <name>}``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from transformers import CLIPImageProcessor, CLIPVisionModel

from reference.models import MLPClassifier


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        weights = Path(path).resolve().parents[1] / "fixtures" / "clip_mlp"
        self.processor = CLIPImageProcessor.from_pretrained(weights / "backbone")
        self.model = CLIPVisionModel.from_pretrained(weights / "backbone")
        self.model.eval()
        self.classifier = MLPClassifier(embedding_dim=64, num_classes=6, hidden_dims=[128], dropout=0.1)
        state = torch.load(weights / "mlp_classifier.pth", map_location="cpu", weights_only=True)
        self.classifier.load_state_dict(state, strict=True)
        self.classifier.eval()
        self.labels = json.loads((weights / "clip_metadata.json").read_text())["class_names"]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data["inputs"]
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        image = ImageOps.exif_transpose(image).convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            embedding = self.model(pixel_values=inputs["pixel_values"]).pooler_output
            logits = self.classifier(embedding)[0]
        return {"logits": logits.tolist(), "label": self.labels[int(logits.argmax())]}
