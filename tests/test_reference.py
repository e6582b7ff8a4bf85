"""The bundled example's training side: `make fixtures` reproduces the frozen data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.check import run_check
from parity.checkpoints import read_state_dict
from parity.fixtures import load_fixture
from reference import build_fixtures
from reference.models import MultiLabelRegressionNN
from tests.conftest import CLASSIFIER_FIXTURES, EXAMPLE_FIXTURES


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuilt") / "clip_dnn"
    return build_fixtures.build(out, source=build_fixtures.skimage_data_dir())


def test_rebuild_reproduces_the_shipped_fixture(rebuilt):
    shipped, fresh = load_fixture(EXAMPLE_FIXTURES), load_fixture(rebuilt)
    assert fresh.names == shipped.names
    assert fresh.manifest["pipeline"] == shipped.manifest["pipeline"]
    np.testing.assert_allclose(fresh.embeddings, shipped.embeddings, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fresh.outputs, shipped.outputs, rtol=0, atol=1e-4)
    assert sorted(fresh.golden_pixels) == sorted(shipped.golden_pixels)


def test_rebuilt_fixture_passes_the_gate(rebuilt, example_spec):
    assert run_check(example_spec, fixtures=rebuilt).passed


def test_rebuild_refuses_to_overwrite_without_force(rebuilt, capsys):
    before = (rebuilt / "manifest.json").read_bytes()
    assert build_fixtures.main(["--out", str(rebuilt)]) == 2
    assert "refusing to overwrite frozen fixtures" in capsys.readouterr().err
    assert (rebuilt / "manifest.json").read_bytes() == before


def test_head_weights_load_strictly_and_eval_is_deterministic():
    head = MultiLabelRegressionNN(**build_fixtures.HEAD_KWARGS)
    head.load_state_dict(read_state_dict(EXAMPLE_FIXTURES / "dnnV1_model_best.pth"), strict=True)
    fixture = load_fixture(EXAMPLE_FIXTURES)
    e = torch.from_numpy(fixture.embeddings)
    b = torch.tensor([row.input_biases for row in fixture.rows])
    with torch.no_grad():
        head.eval()
        assert torch.equal(head(e, b), head(e, b))
        np.testing.assert_allclose(head(e, b).numpy(), fixture.outputs, rtol=0, atol=1e-6)
        head.train()  # dropout on: the outputs of two runs differ, which is what the gate must never see
        assert not torch.equal(head(e, b), head(e, b))


def test_head_rejects_mismatched_inputs():
    head = MultiLabelRegressionNN(**build_fixtures.HEAD_KWARGS)
    with pytest.raises(ValueError, match=r"embedding must be \(B, 64\), got \(2, 1, 64\)"):
        head(torch.zeros(2, 1, 64), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_biases must be \(B, 2\)"):
        head(torch.zeros(2, 64), torch.zeros(2, 1, dtype=torch.long))


@pytest.fixture(scope="module")
def rebuilt_classifier(tmp_path_factory):
    pytest.importorskip("transformers")
    from reference import build_clip_mlp

    out = tmp_path_factory.mktemp("rebuilt") / "clip_mlp"
    return build_clip_mlp.build(out, source=build_fixtures.skimage_data_dir())


def test_rebuild_reproduces_the_shipped_classifier_fixture(rebuilt_classifier):
    shipped = load_fixture(CLASSIFIER_FIXTURES)
    fresh = load_fixture(rebuilt_classifier)
    assert fresh.names == shipped.names
    assert fresh.manifest["pipeline"] == shipped.manifest["pipeline"]
    assert fresh.manifest["weights"] == shipped.manifest["weights"]  # bit-identical backbone and head
    np.testing.assert_array_equal(fresh.embeddings, shipped.embeddings)
    np.testing.assert_array_equal(fresh.outputs, shipped.outputs)
    assert fresh.manifest["head_training"]["fixture_accuracy"] == 1.0


def test_classifier_builder_refuses_to_overwrite_without_force(rebuilt_classifier, capsys):
    from reference import build_clip_mlp

    assert build_clip_mlp.main(["--out", str(rebuilt_classifier)]) == 2
    assert "refusing to overwrite frozen fixtures" in capsys.readouterr().err
