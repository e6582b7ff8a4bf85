"""The tag scorer trained on top of the frozen CLIP image tower."""

from __future__ import annotations

import torch
from torch import nn


class TagScorer(nn.Module):
    """CLIP embedding + (source, scene) -> one logit per tag.

    ``input_biases`` is an integer (B, 2) tensor: column 0 the source id, column 1 the scene id.
    """

    def __init__(self, embed_dim: int = 64, n_sources: int = 4, n_scenes: int = 4, context_dim: int = 6,
                 hidden: int = 48, n_tags: int = 4, p_drop: float = 0.2) -> None:
        super().__init__()
        self.source = nn.Embedding(n_sources, context_dim)
        self.scene = nn.Embedding(n_scenes, context_dim)
        self.proj = nn.Linear(embed_dim + 2 * context_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(p_drop)
        self.logits = nn.Linear(hidden, n_tags)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        context = torch.cat([self.source(input_biases[:, 0]), self.scene(input_biases[:, 1])], dim=1)
        hidden = torch.relu(self.norm(self.proj(torch.cat([embedding, context], dim=1))))
        return self.logits(self.drop(hidden))
