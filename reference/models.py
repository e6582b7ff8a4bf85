"""Model definitions exactly as trained. Inference code must import these, not re-declare them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MultiLabelRegressionNN", "MLPClassifier"]


class MultiLabelRegressionNN(nn.Module):
    """CLIP embedding plus categorical ``input_biases`` → multi-label regression.

    Each categorical input has its own bias-embedding table; the looked-up vectors are
    concatenated to the CLIP embedding before the hidden layers.

    Args:
        embedding_dim: width of the CLIP embedding (1024 for ViT-L/14 pre-logits).
        bias_cardinalities: number of categories of each ``input_biases`` column.
        num_outputs: number of regression targets.
        bias_dim: width of each bias embedding.
        hidden_dims: widths of the hidden layers.
        dropout: dropout after each hidden layer (inactive in ``eval()``).
    """

    def __init__(
        self,
        embedding_dim: int,
        bias_cardinalities: Sequence[int],
        num_outputs: int,
        *,
        bias_dim: int = 8,
        hidden_dims: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.bias_embeddings = nn.ModuleList(nn.Embedding(n, bias_dim) for n in bias_cardinalities)
        layers: list[nn.Module] = []
        width = embedding_dim + bias_dim * len(bias_cardinalities)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(width, num_outputs)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        if embedding.dim() != 2 or embedding.shape[1] != self.embedding_dim:
            raise ValueError(f"embedding must be (B, {self.embedding_dim}), got {tuple(embedding.shape)}")
        if input_biases.shape != (embedding.shape[0], len(self.bias_embeddings)):
            raise ValueError(
                f"input_biases must be (B, {len(self.bias_embeddings)}) to match the embedding batch, "
                f"got {tuple(input_biases.shape)}"
            )
        parts = [embedding] + [table(input_biases[:, i]) for i, table in enumerate(self.bias_embeddings)]
        return self.output(self.mlp(torch.cat(parts, dim=1)))


class MLPClassifier(nn.Module):
    """CLIP embedding → identity logits, trained with CrossEntropy (the verification system's head).

    Args:
        embedding_dim: width of the CLIP embedding (768 for ViT-B/32 ``pooler_output``).
        num_classes: number of identities.
        hidden_dims: widths of the hidden layers.
        dropout: dropout after each hidden layer (inactive in ``eval()``).
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, hidden_dims: Sequence[int] = (256,),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        layers: list[nn.Module] = []
        width = embedding_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.dim() != 2 or embedding.shape[1] != self.embedding_dim:
            raise ValueError(f"embedding must be (B, {self.embedding_dim}), got {tuple(embedding.shape)}")
        return self.classifier(self.mlp(embedding))
