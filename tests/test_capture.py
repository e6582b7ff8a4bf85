"""Capture at the source: fixtures written by the producing code pass the gate and carry provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.source import capture, git_revision
from parity.check import run_check
from parity.checkpoints import read_state_dict
from parity.errors import FixtureError
from parity.fixtures import load_fixture
from parity.pipeline import build_pipeline
from parity.results import Status
from tests.conftest import EXAMPLE_FIXTURES, ROOT

HEAD = EXAMPLE_FIXTURES / "dnnV1_model_best.pth"
BACKBONE = EXAMPLE_FIXTURES / "backbone.safetensors"


@pytest.fixture(scope="module")
def captured(example_spec, tmp_path_factory):
    """The example's reference data re-captured through the API, as a training script would."""
    pipeline = build_pipeline(example_spec)
    fixture = load_fixture(EXAMPLE_FIXTURES)
    out = tmp_path_factory.mktemp("captured") / "fixture"
    with capture(out, model=pipeline.backbone, model_name=example_spec.backbone.model,
                 model_kwargs=dict(example_spec.backbone.kwargs), data_config=pipeline.data_config,
                 transform=pipeline.transform, checkpoint=BACKBONE) as cap:
        for row in fixture.rows:
            pixels = pipeline.preprocess(row.image)
            cap.add(row.image, embedding=pipeline.embed(pixels[None])[0], input_biases=row.input_biases,
                    pixels=pixels if row.name == "chelsea.png" else None)
        cap.set_outputs(pipeline.run_head(np.stack([e for e in cap.embeddings]),
                                          [row.input_biases for row in fixture.rows]))
        cap.attach_head(pipeline.head, class_path=example_spec.head.class_path,
                        kwargs=dict(example_spec.head.kwargs), checkpoint=HEAD)
    return out


def test_captured_fixture_passes_the_gate(example_spec, captured):
    report = run_check(example_spec, fixtures=captured)
    assert report.passed
    assert report.stage("weights").status is Status.PASS
    assert report.stage("pixels").comparison.reference_shape == (1, 3, 336, 336)


def test_captured_fixture_carries_provenance(captured):
    manifest = load_fixture(captured).manifest
    producer = manifest["producer"]
    assert producer["git_revision"] == git_revision(ROOT)
    assert producer["transform"].startswith("Preprocess(geometric=(Resize(size=336, interpolation=bicubic")
    assert {"torch", "timm", "numpy", "pillow"} <= set(producer["versions"])
    assert manifest["pipeline"]["backbone"]["activation"] == ["QuickGELU"]
    assert manifest["pipeline"]["backbone"]["extract"] == "pre_logits"
    assert manifest["weights"]["head"]["file"] == "dnnV1_model_best.pth"
    assert len(manifest["weights"]["head"]["sha256"]) == 64
    assert manifest["pipeline"]["preprocess"]["interpolation"] == "bicubic"


def test_a_changed_checkpoint_file_is_listed_even_when_the_weights_match(example_spec, captured, tmp_path):
    path = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in read_state_dict(HEAD).items()}, path)
    report = run_check(example_spec.replace(head={"weights": path, "key_map": {"module.": ""}}), fixtures=captured)
    assert report.passed
    fields = {d.field for d in report.config_diffs}
    assert "provenance.head_checkpoint_sha256" in fields


def test_a_changed_preprocessing_field_is_listed(example_spec, captured):
    report = run_check(example_spec.replace(preprocess={"interpolation": "bilinear"}), fixtures=captured)
    assert any(d.field == "preprocess.interpolation" and d.candidate == "bilinear" for d in report.config_diffs)


def test_capture_refuses_bad_samples(tmp_path):
    image = EXAMPLE_FIXTURES / "images" / "chelsea.png"
    with pytest.raises(FixtureError, match="two samples are named 'chelsea.png'"):
        with capture(tmp_path / "a") as cap:
            cap.add(image, embedding=[1.0, 2.0])
            cap.add(image, embedding=[1.0, 2.0])
    with pytest.raises(FixtureError, match="has a 3-d embedding, the first sample 2-d"):
        with capture(tmp_path / "b") as cap:
            cap.add(image, embedding=[1.0, 2.0])
            cap.add(EXAMPLE_FIXTURES / "images" / "coins.png", embedding=[1.0, 2.0, 3.0])
    with pytest.raises(FixtureError, match="non-finite embedding"):
        with capture(tmp_path / "c") as cap:
            cap.add(image, embedding=[float("nan")])
    with pytest.raises(FixtureError, match="no samples were added"):
        with capture(tmp_path / "d"):
            pass
    assert not any((tmp_path / name).exists() for name in "abcd")
