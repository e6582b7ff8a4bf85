"""Export the clip_dnn example to ONNX: backbone pre-logits + head in one graph.

    python examples/onnx/export.py                      # writes examples/onnx/clip_dnn.onnx
    python examples/onnx/export.py --part head -o head.onnx

The graph takes ``pixels`` (B, 3, 336, 336) float32 and ``input_biases`` (B, 2) int64 and gives
``embedding`` (B, 64), the pre-logits feature the head was trained on, and ``outputs`` (B, 5).
Naming the intermediate ``embedding`` lets the gate compare it as its own stage. ``--part head``
exports the head alone (inputs ``embedding`` and ``input_biases``); ``--part backbone`` the
backbone alone (output ``embedding``).

The modules are built the way the service builds them: timm's model definition, the trained
checkpoints loaded with ``strict=True``, ``eval()``.

Exporter: torch 2.14's default (``dynamo=True``, torch.export + onnxscript) names graph values
after the aten ops, so an output called ``embedding`` collides with the value of the head's
``nn.Embedding`` lookup and onnxruntime refuses the file ("Duplicate definition of name
(embedding)"). The TorchScript exporter (``dynamo=False``) keeps the names given here verbatim and
needs only the ``onnx`` package (``pip install 'parity[onnx]'``), no onnxscript.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURE = ROOT / "fixtures" / "clip_dnn"
INPUT_SIZE = 336
BIAS_COLUMNS = 2
EMBEDDING_DIM = 64


def load_modules(fixture: Path = FIXTURE) -> tuple[nn.Module, nn.Module]:
    """The trained backbone and head, loaded strictly, in eval mode."""
    import timm
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))  # reference.models: the head class exactly as trained
    from reference.models import MultiLabelRegressionNN

    backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                 embed_dim=EMBEDDING_DIM, depth=2, num_heads=2)
    backbone.load_state_dict(load_file(fixture / "backbone.safetensors"), strict=True)
    head = MultiLabelRegressionNN(EMBEDDING_DIM, [3, 4], 5, bias_dim=8, hidden_dims=[128, 64], dropout=0.1)
    head.load_state_dict(torch.load(fixture / "dnnV1_model_best.pth", map_location="cpu", weights_only=True),
                         strict=True)
    return backbone.eval(), head.eval()


class BackboneEmbedding(nn.Module):
    """pixels -> the pre-logits embedding (timm ``forward_head(..., pre_logits=True)``), not ``forward()``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)


class EmbeddingAndOutputs(nn.Module):
    """pixels, input_biases -> (embedding, outputs): the whole pipeline with its intermediate exposed."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.embed, self.head = BackboneEmbedding(backbone), head

    def forward(self, pixels: torch.Tensor, input_biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(pixels)
        return embedding, self.head(embedding, input_biases)


def export(backbone: nn.Module, head: nn.Module, path: Path, *, part: str = "both") -> Path:
    """Write ``part`` (``both``, ``backbone`` or ``head``) of the pipeline to ``path`` with a dynamic batch."""
    pixels = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    biases = torch.zeros(2, BIAS_COLUMNS, dtype=torch.long)
    embedding = torch.zeros(2, EMBEDDING_DIM)
    if part == "both":
        module, args, inputs, outputs = EmbeddingAndOutputs(backbone, head), (pixels, biases), \
            ["pixels", "input_biases"], ["embedding", "outputs"]
    elif part == "backbone":
        module, args, inputs, outputs = BackboneEmbedding(backbone), (pixels,), ["pixels"], ["embedding"]
    elif part == "head":
        module, args, inputs, outputs = head, (embedding, biases), ["embedding", "input_biases"], ["outputs"]
    else:
        raise ValueError(f"part must be both, backbone or head, got {part!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notice is known.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
                          opset_version=17, dynamo=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=HERE / "clip_dnn.onnx")
    parser.add_argument("--part", choices=("both", "backbone", "head"), default="both")
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="where the trained checkpoints are")
    args = parser.parse_args(argv)
    backbone, head = load_modules(args.fixture)
    print(export(backbone, head, args.output, part=args.part))
    return 0


if __name__ == "__main__":
    sys.exit(main())
