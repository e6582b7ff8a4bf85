"""Heads written apart from reference/models.py: ones that do not match the trained weights (the strict-load
tests), and a BatchNorm head with non-default running statistics (captured and gated like any other)."""

from __future__ import annotations

import torch
from torch import nn

from reference.models import MultiLabelRegressionNN


class CustomDNN(nn.Module):
    """A simplified inference-time head: embedding only, no bias-embedding layers."""

    def __init__(self, input_dim: int = 64, hidden_dim: int = 128, num_outputs: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_outputs)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(embedding)))


class ReluRegressionNN(MultiLabelRegressionNN):
    """The trained head re-declared with ReLU for GELU: identical keys, different function."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for i, layer in enumerate(self.mlp):
            if isinstance(layer, nn.GELU):
                self.mlp[i] = nn.ReLU()


class DropoutAlwaysOnNN(MultiLabelRegressionNN):
    """The trained head with dropout forced on in forward(): eval() cannot switch it off."""

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.dropout(embedding, p=0.5, training=True), input_biases)


class NanHeadNN(MultiLabelRegressionNN):
    """The trained head with one output poisoned by NaN."""

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        out = super().forward(embedding, input_biases)
        return torch.cat([out[:, :-1], torch.full_like(out[:, -1:], float("nan"))], dim=1)


WIDTH = 64  # the example backbone's pre_logits width


class BatchNormHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear; ignores the input_biases."""

    def __init__(self, embedding_dim: int = WIDTH, hidden: int = 32, num_outputs: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embedding_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_outputs)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(embedding))))


def trained_head(cls: type[nn.Module]) -> nn.Module:
    """A head with non-default state: a few train-mode passes move BatchNorm's running statistics."""
    torch.manual_seed(7)
    head = cls()
    head.train()
    with torch.no_grad():
        for _ in range(3):
            head(torch.randn(16, WIDTH))
    return head.eval()
