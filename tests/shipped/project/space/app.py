"""Photo tagging Space: upload a photo, say where it comes from and what it shows, get one score per tag.

    python app.py        # the Gradio UI; the model files sit beside this file

The models are loaded on the first request, so the Space starts at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision import transforms as T

from photo_tags.heads import TagScorer

MODEL_DIR = Path(__file__).resolve().parent


class TagPredictor:
    """Scores one photo: CLIP image features, then the tag scorer with the photo's (source, scene)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.config = json.loads((model_dir / "config.json").read_text())
        self.models: dict[str, torch.nn.Module] = {}
        size = self.config["image_size"]
        self.preprocess = T.Compose([
            T.Resize(int(size / self.config["crop_pct"]), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(self.config["mean"], self.config["std"]),
        ])

    def _load(self) -> None:
        cfg = self.config
        backbone = timm.create_model(cfg["backbone"], pretrained=False, **cfg["backbone_kwargs"])
        backbone.load_state_dict(load_file(self.model_dir / "backbone.safetensors"))
        scorer = TagScorer(**cfg["scorer_kwargs"])
        scorer.load_state_dict(torch.load(self.model_dir / "tag_scorer.pth", map_location="cpu", weights_only=True))
        self.models["backbone"] = backbone.eval()
        self.models["scorer"] = scorer.eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, input_biases: list[int]) -> list[float]:
        if not self.models:
            self._load()
        image = ImageOps.exif_transpose(image).convert("RGB")
        pixels = self.preprocess(image).unsqueeze(0)
        backbone = self.models["backbone"]
        features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        source, scene = input_biases
        logits = self.models["scorer"](features, torch.tensor([[source, scene]]))
        return logits[0].tolist()


predict = TagPredictor(MODEL_DIR)


if __name__ == "__main__":
    import gradio as gr

    gr.Interface(fn=predict, inputs=[gr.Image(type="pil"), gr.JSON(value=[0, 0])], outputs=gr.JSON()).launch()
