"""Capture at the source: fixtures written by the producing code pass the gate and carry provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.commands.capture import capture, git_revision
from parity.commands.check import run_check
from parity.store.checkpoints import read_state_dict
from parity.errors import FixtureError
from parity.store.fixtures import load_fixture
from parity.model.pipeline import build_pipeline
from parity.results import Status
from tests.support.paths import EXAMPLE_FIXTURES, ROOT

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


def test_capture_without_model_name_records_the_transformers_class(tmp_path):
    """A transformers backbone has no timm pretrained_cfg: its class is the name, never "None.None"."""
    pytest.importorskip("transformers")
    from parity.libraries.transformers import describe_preprocess_config
    from parity.spec import load_spec
    from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC

    spec = load_spec(CLASSIFIER_SPEC)
    pipeline = build_pipeline(spec)
    fixture = load_fixture(CLASSIFIER_FIXTURES)
    rows = fixture.rows[:4]
    with capture(tmp_path / "fx", model=pipeline.backbone, library="transformers", extract="pooler_output",
                 checkpoint=spec.backbone.checkpoint, transform=pipeline.transform,
                 preprocess=describe_preprocess_config(spec.backbone.checkpoint / "preprocessor_config.json")) as cap:
        for row in rows:
            cap.add(row.image, embedding=pipeline.embed(pipeline.preprocess(row.image)[None])[0])
        cap.set_outputs(pipeline.run_head(np.stack(cap.embeddings)))
        cap.attach_head(pipeline.head, class_path=spec.head.class_path, kwargs=dict(spec.head.kwargs),
                        checkpoint=spec.head.weights)
    assert load_fixture(tmp_path / "fx").pipeline["backbone"]["model"] == "CLIPVisionModel"
    report = run_check(spec, fixtures=tmp_path / "fx")
    assert report.passed
    assert not [d for d in report.config_diffs if d.field == "backbone.model"]


def test_an_unknown_model_name_is_left_out_not_proposed_as_a_fix(example_spec, tmp_path):
    """A backbone that does not know its name (no pretrained_cfg): the record omits it, no fix proposes it."""
    from parity.libraries import model_name
    from parity.report.console import render_report
    from rich.console import Console

    pipeline = build_pipeline(example_spec)
    pipeline.backbone.pretrained_cfg = {}
    assert model_name(pipeline.backbone, "timm") is None
    fixture = load_fixture(EXAMPLE_FIXTURES)
    with capture(tmp_path / "fx", model=pipeline.backbone, data_config=pipeline.data_config,
                 checkpoint=BACKBONE, model_kwargs=dict(example_spec.backbone.kwargs)) as cap:
        for row in fixture.rows:
            cap.add(row.image, embedding=pipeline.embed(pipeline.preprocess(row.image)[None])[0],
                    input_biases=row.input_biases)
        cap.set_outputs(pipeline.run_head(np.stack(cap.embeddings), [r.input_biases for r in fixture.rows]))
        cap.attach_head(pipeline.head, class_path=example_spec.head.class_path,
                        kwargs=dict(example_spec.head.kwargs), checkpoint=HEAD)
    assert "model" not in load_fixture(tmp_path / "fx").pipeline["backbone"]
    report = run_check(example_spec.replace(preprocess={"interpolation": "bilinear"}), fixtures=tmp_path / "fx")
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "None" not in "".join(line for line in text.splitlines() if "[backbone].model" in line)
    assert "[backbone].model" not in text


def test_capture_pipeline_records_the_callers_script_and_revision(example_spec, tmp_path):
    """capture_pipeline enters capture from inside parity: the provenance is still the calling code's."""
    import subprocess

    repo = tmp_path / "their_project"
    repo.mkdir()
    script = repo / "freeze_training.py"
    script.write_text("def run(pipeline, images, biases, out):\n"
                      "    return capture_pipeline(pipeline, images, out, input_biases=biases)\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "training code"], check=True)
    namespace: dict = {"capture_pipeline": __import__("parity.commands.capture", fromlist=["x"]).capture_pipeline}
    exec(compile(script.read_text(), str(script), "exec"), namespace)  # frames now name their file
    fixture = load_fixture(EXAMPLE_FIXTURES)
    images = [row.image for row in fixture.rows[:2]]
    out = namespace["run"](build_pipeline(example_spec), images, [r.input_biases for r in fixture.rows[:2]],
                           tmp_path / "fx")
    producer = load_fixture(out).manifest["producer"]
    assert producer["script"] == "freeze_training.py"
    assert producer["git_revision"] == git_revision(repo) != git_revision(ROOT)


def test_a_spec_outside_git_lists_no_revision_difference(example_spec, captured, tmp_path):
    from tests.support.specs import write_spec
    from parity.spec import load_spec

    spec = load_spec(write_spec(tmp_path))
    assert git_revision(spec.path) is None and load_fixture(captured).manifest["producer"]["git_revision"]
    report = run_check(spec, fixtures=captured)
    assert report.passed
    assert not [d for d in report.config_diffs if "git_revision" in d.field]
