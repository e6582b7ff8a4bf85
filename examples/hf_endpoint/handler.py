"""A Hugging Face Inference Endpoints handler for the clip_dnn model.

Request: ``{"inputs": <PIL image or image bytes>, "parameters": {"input_biases": [source, scene]}}``.
Response: the five scores, as a list.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from reference.models import MultiLabelRegressionNN


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        weights = Path(path).resolve().parents[1] / "fixtures" / "clip_dnn"
        self.backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                          embed_dim=64, depth=2, num_heads=2)
        self.backbone.load_state_dict(load_file(weights / "backbone.safetensors"), strict=True)
        self.backbone.eval()
        self.head = MultiLabelRegressionNN(embedding_dim=64, bias_cardinalities=[3, 4], num_outputs=5, bias_dim=8,
                                           hidden_dims=[128, 64], dropout=0.1)
        state = torch.load(weights / "dnnV1_model_best.pth", map_location="cpu", weights_only=True)
        self.head.load_state_dict(state, strict=True)
        self.head.eval()
        self.transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=self.backbone))

    def __call__(self, data: dict[str, Any]) -> list[float]:
        image = data["inputs"]
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        image = ImageOps.exif_transpose(image).convert("RGB")
        biases = (data.get("parameters") or {}).get("input_biases", [0, 0])
        pixels = self.transform(image).unsqueeze(0)
        with torch.inference_mode():
            embedding = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
            scores = self.head(embedding, torch.tensor([biases], dtype=torch.long))
        return scores[0].tolist()
