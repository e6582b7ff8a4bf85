"""A Gradio-style Space for the clip_dnn model: ``predict(image, input_biases)`` -> five scores.

Gradio is only needed to serve it (``python app.py``); importing this module needs torch and timm.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from PIL import ImageOps
from safetensors.torch import load_file

from reference.models import MultiLabelRegressionNN

WEIGHTS = Path(__file__).resolve().parents[2] / "fixtures" / "clip_dnn"
LABELS = ["aesthetic", "sharpness", "exposure", "clutter", "warmth"]

# timm's ViT-L/14@336 CLIP definition at the width the example was trained with.
backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                             embed_dim=64, depth=2, num_heads=2)
backbone.load_state_dict(load_file(WEIGHTS / "backbone.safetensors"), strict=True)
backbone.eval()

head = MultiLabelRegressionNN(embedding_dim=64, bias_cardinalities=[3, 4], num_outputs=5, bias_dim=8,
                              hidden_dims=[128, 64], dropout=0.1)
head.load_state_dict(torch.load(WEIGHTS / "dnnV1_model_best.pth", map_location="cpu", weights_only=True), strict=True)
head.eval()

# The model's own eval transform: resize, centre crop, normalise, as timm resolves it.
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))


def predict(image, input_biases):
    """Scores for one uploaded image and its ``input_biases`` (source, scene)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    pixels = transform(image).unsqueeze(0)
    with torch.inference_mode():
        embedding = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        scores = head(embedding, torch.tensor([list(input_biases)], dtype=torch.long))
    return scores[0].tolist()


if __name__ == "__main__":
    import gradio as gr

    gr.Interface(fn=predict, inputs=[gr.Image(type="pil"), gr.JSON(value=[0, 0])], outputs=gr.JSON()).launch()
