"""Heads as users write them, independent of reference/models.py: each is captured and gated.

BatchNorm (a 0-dim ``num_batches_tracked`` buffer), scalar parameters and buffers,
non-persistent buffers and tied weights must go through fingerprinting, `capture_pipeline`,
`run_check` and the CLI like any other head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from parity.commands.check import run_check
from parity.store.checkpoints import fingerprint
from parity.cli import EXIT_PASS, main
from parity.store.fixtures import load_fixture
from parity.model.pipeline import build_pipeline
from parity.results import Status
from parity.commands.capture import capture_pipeline
from tests.support.heads import WIDTH, BatchNormHead, trained_head
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import write_spec


class ScalarHead(nn.Module):
    """A 0-dim learnable temperature and a 0-dim persistent buffer."""

    def __init__(self, embedding_dim: int = WIDTH, num_outputs: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_outputs)
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("offset", torch.tensor(0.25))

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embedding) / self.temperature + self.offset


class NonPersistentBufferHead(nn.Module):
    """A buffer left out of the state_dict (recomputed at construction), used in forward()."""

    def __init__(self, embedding_dim: int = WIDTH, num_outputs: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_outputs)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, num_outputs), persistent=False)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embedding) * self.scale


class TiedHead(nn.Module):
    """Two layers sharing one weight (two state_dict keys, one storage), as tied embeddings are."""

    def __init__(self, embedding_dim: int = WIDTH) -> None:
        super().__init__()
        self.project = nn.Linear(embedding_dim, embedding_dim, bias=False)
        self.unproject = nn.Linear(embedding_dim, embedding_dim, bias=False)
        self.unproject.weight = self.project.weight

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor | None = None) -> torch.Tensor:
        return self.unproject(torch.tanh(self.project(embedding)))[:, :5]


HEADS = {
    "batchnorm": BatchNormHead,
    "scalars": ScalarHead,
    "non_persistent_buffer": NonPersistentBufferHead,
    "tied_weights": TiedHead,
}


@pytest.fixture(scope="module", params=sorted(HEADS))
def captured_head(request, tmp_path_factory):
    """(spec, fixture directory) for one user head, frozen by `capture_pipeline` over the example images."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    weights = folder / "head.pth"
    torch.save(trained_head(HEADS[name]).state_dict(), weights)  # torch.save keeps tied tensors' shared storage
    spec_path = write_spec(folder, {
        'class = "reference.models:MultiLabelRegressionNN"': f'class = "{HEADS[name].__module__}:{HEADS[name].__name__}"',
        f'weights = "{EXAMPLE_FIXTURES}/dnnV1_model_best.pth"': f'weights = "{weights}"',
        "kwargs = { embedding_dim = 64, bias_cardinalities = [3, 4], num_outputs = 5, bias_dim = 8, "
        "hidden_dims = [128, 64], dropout = 0.1 }": "kwargs = {}",
    })
    from parity.spec import load_spec

    spec = load_spec(spec_path)
    reference = load_fixture(EXAMPLE_FIXTURES)
    images = [row.image for row in reference.rows[:4]]
    out = capture_pipeline(build_pipeline(spec), images, folder / "fixture",
                           input_biases=[row.input_biases for row in reference.rows[:4]], golden=[images[0].name])
    return spec, out


def test_fingerprint_covers_zero_dim_tensors():
    head = trained_head(BatchNormHead)
    prints = fingerprint(head.state_dict())
    assert set(prints) == set(head.state_dict())
    before = prints["bn.num_batches_tracked"]
    head.bn.num_batches_tracked += 1
    assert fingerprint(head.state_dict())["bn.num_batches_tracked"] != before
    scalar = ScalarHead()
    assert fingerprint({"t": scalar.temperature}) != fingerprint({"t": scalar.temperature.reshape(1)})


def test_user_head_is_captured_and_passes_the_gate(captured_head):
    spec, out = captured_head
    manifest = load_fixture(out).manifest
    recorded = set(manifest["weights"]["head"]["tensors"])
    head = build_pipeline(spec).head
    assert recorded == set(head.state_dict())  # non-persistent buffers are not weights; tied keys both are
    report = run_check(spec, fixtures=out)
    assert report.passed, [s.headline for s in report.stages]
    assert report.stage("weights").status is Status.PASS
    assert report.stage("head").status is Status.PASS


def test_user_head_drift_is_caught(captured_head, tmp_path):
    spec, out = captured_head
    state = torch.load(spec.head.weights, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    # Not a constant shift: the backbone's layer-normed embeddings sum to about 0, which would cancel it.
    # In place, so that tied keys (one storage) change together.
    state[name].add_(0.05 * torch.randn(state[name].shape, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "changed.pth"
    torch.save(state, path)
    report = run_check(spec.replace(head={"weights": path}), fixtures=out)
    assert not report.passed
    assert report.stage("weights").status is Status.FAIL
    assert report.stage("head").status is Status.FAIL


def test_user_head_through_the_cli(captured_head, capsys):
    spec, out = captured_head
    assert main(["check", "--spec", str(spec.path), "--fixtures", str(out)]) == EXIT_PASS
    assert "PARITY" in capsys.readouterr().out


def test_tied_weights_are_fingerprinted_under_both_names():
    prints = fingerprint(trained_head(TiedHead).state_dict())
    assert prints["project.weight"] == prints["unproject.weight"]
    assert np.isfinite(trained_head(TiedHead)(torch.zeros(1, WIDTH)).detach().numpy()).all()
