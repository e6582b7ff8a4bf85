"""Inference Endpoints handler for the photo tagger.

Request: ``{"inputs": <image bytes or PIL image>, "parameters": {"input_biases": [source, scene]}}``.
Response: ``[{"tag": name, "score": logit}, ...]``, one entry per tag.
The model files (config.json, backbone.safetensors, tag_scorer.pth) are in the repository at ``path``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision.transforms import v2

from photo_tags.heads import TagScorer


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        root = Path(path)
        self.config = json.loads((root / "config.json").read_text())
        self.backbone = timm.create_model(self.config["backbone"], pretrained=False,
                                          **self.config["backbone_kwargs"])
        self.backbone.load_state_dict(load_file(root / "backbone.safetensors"), strict=True)
        self.backbone.eval()
        self.scorer = TagScorer(**self.config["scorer_kwargs"])
        scorer_state = torch.load(root / "tag_scorer.pth", map_location="cpu", weights_only=True)
        self.scorer.load_state_dict(scorer_state, strict=True)
        self.scorer.eval()
        size = self.config["image_size"]
        self.transform = v2.Compose([
            v2.Resize(int(size / self.config["crop_pct"]), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.config["mean"], self.config["std"]),
        ])

    @torch.inference_mode()
    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        image = data["inputs"]
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        image = ImageOps.exif_transpose(image).convert("RGB")
        biases = (data.get("parameters") or {}).get("input_biases", [0, 0])
        pixels = self.transform(image)[None]
        embedding = self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
        logits = self.scorer(embedding, torch.tensor([biases]))[0]
        return [{"tag": tag, "score": score} for tag, score in zip(self.config["tags"], logits.tolist())]
