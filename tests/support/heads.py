"""Head classes that do not match the trained weights, for the strict-load tests."""

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
