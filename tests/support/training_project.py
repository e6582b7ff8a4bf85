"""A user's training project, written apart from the bundled examples: its own head (BatchNorm and a site
embedding), its own metadata field names, and the spec its training pipeline is described by."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests.support.paths import EXAMPLE_FIXTURES

IMAGES = ("astronaut.png", "brick.png", "chelsea_exif_rotated.png", "coins.png", "logo.png", "rocket.jpg")
SITES = (0, 2, 1, 2, 0, 1)


class SiteGradeHead(nn.Module):
    """A user's head: batch-normalised embedding plus a site embedding, an MLP with BatchNorm."""

    def __init__(self, embedding_dim: int = 64, sites: int = 3, outputs: int = 2) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(embedding_dim)
        self.site = nn.Embedding(sites, 4)
        self.mlp = nn.Sequential(nn.Linear(embedding_dim + 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, outputs))

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm(embedding), self.site(input_biases[:, 0])], dim=1))


SPEC = """\
name = "site_grade"

[backbone]
library = "timm"
model = "vit_large_patch14_clip_quickgelu_336.openai"
kwargs = {{ embed_dim = 64, depth = 2, num_heads = 2 }}
checkpoint = "{backbone}"
extract = "pre_logits"

[preprocess]
interpolation = "{interpolation}"
crop_pct = 1.0
crop_mode = "center"
input_size = [3, 336, 336]
mean = [0.48145466, 0.4578275, 0.40821073]
std = [0.26862954, 0.26130258, 0.27577711]

[head]
class = "tests.support.training_project:SiteGradeHead"
weights = "{head}"
kwargs = {{ embedding_dim = 64, sites = 3, outputs = 2 }}
"""


def write_training_spec(project: Path, *, interpolation: str = "bicubic", head: Path | None = None,
                        name: str = "training.toml") -> Path:
    """The project's spec in ``project``: the example's shrunk backbone, ``SiteGradeHead`` from ``head``."""
    path = project / name
    path.write_text(SPEC.format(backbone=EXAMPLE_FIXTURES / "backbone.safetensors", interpolation=interpolation,
                                head=head or project / "models" / "head.pth"))
    return path
