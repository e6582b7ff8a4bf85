"""Reference numerics declared at freeze: embeddings made on a GPU with TF32 become a fixture the gate budgets for.

The training project is a user's own (its BatchNorm head, its field names: tests/support/training_project.py);
its embeddings were made with TF32 convolutions and matmuls, as an Ampere GPU with ``allow_tf32`` makes them,
emulated here by rounding every convolution and matmul operand to TF32 (`parity.numerics.emulate`), so that the
suite runs on any CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.cli import main
from parity.numerics.emulate import emulate_reference
from parity.store.fixtures import load_fixture
from parity.model.numerics import reduced_precision
from parity.model.pipeline import build_pipeline
from parity.spec import REFERENCE_NUMERICS, load_spec
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.training_project import IMAGES, SITES, SiteGradeHead, write_training_spec

MAP = ["--map", "image=file", "--map", "input_biases=site"]


@pytest.fixture(scope="module")
def tf32_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tf32_project")
    photos = root / "data" / "photos"
    photos.mkdir(parents=True)
    for name in IMAGES:
        shutil.copyfile(EXAMPLE_FIXTURES / "images" / name, photos / name)
    torch.manual_seed(11)
    (root / "models").mkdir()
    torch.save(SiteGradeHead().state_dict(), root / "models" / "head.pth")
    pipeline = build_pipeline(load_spec(write_training_spec(root)))
    with emulate_reference({"conv": "tf32", "matmul": "tf32"}):
        embeddings = np.stack([pipeline.embed(pipeline.preprocess(photos / n)[None])[0].numpy() for n in IMAGES])
    (root / "artifacts").mkdir()
    np.save(root / "artifacts" / "clip.npy", embeddings)
    rows = [{"file": f"photos/{n}", "site": s} for n, s in zip(IMAGES, SITES)]
    (root / "artifacts" / "clip_metadata.json").write_text(json.dumps(rows))
    return root


def freeze(project: Path, out: Path, *extra: str, spec: Path | None = None) -> int:
    return main(["freeze", "--spec", str(spec or project / "training.toml"),
                 "--embeddings", str(project / "artifacts" / "clip.npy"),
                 "--metadata", str(project / "artifacts" / "clip_metadata.json"),
                 "--images", str(project / "data"), "--out", str(out), *MAP, *extra])


def test_tf32_embeddings_are_refused_as_reduced_precision_not_as_an_undescribed_pipeline(tf32_project, tmp_path,
                                                                                         capsys):
    assert freeze(tf32_project, tmp_path / "out") == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert "REFUSED" in out
    assert "The embeddings look made in reduced precision (TF32?)" in out
    assert "Pass --numerics tf32 (or set [reference] numerics = \"tf32\"" in out
    assert "the spec does not describe how they were made" not in out
    assert not (tmp_path / "out").exists()


def test_declared_tf32_is_recorded_and_the_gate_budgets_for_it(tf32_project, tmp_path, capsys):
    out = tmp_path / "fixture"
    assert freeze(tf32_project, out, "--numerics", "tf32") == 0
    printed = capsys.readouterr().out
    assert "reference numerics: tf32" in printed and "TF32 emulation on 4 golden images" in printed
    numerics = load_fixture(out).manifest["producer"]["numerics"]
    assert numerics["declared"] == "tf32" and reduced_precision(numerics) == {"conv": "tf32", "matmul": "tf32"}
    assert main(["check", "--spec", str(tf32_project / "training.toml"), "--fixtures", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    embedding = next(s for s in json.loads((tmp_path / "r.json").read_text())["stages"] if s["stage"] == "embedding")
    assert "budget from TF32 emulation" in embedding["comparison"]["tolerance"]["origin"]


def test_reference_numerics_in_the_spec_is_the_same_declaration(tf32_project, tmp_path):
    spec = write_training_spec(tmp_path, head=tf32_project / "models" / "head.pth")
    spec.write_text(spec.read_text() + '\n[reference]\nnumerics = "tf32"\n')
    assert load_spec(spec).reference.numerics == "tf32"
    assert freeze(tf32_project, tmp_path / "fixture", spec=spec) == 0
    assert load_fixture(tmp_path / "fixture").manifest["producer"]["numerics"]["declared"] == "tf32"


def test_a_freeze_without_a_declaration_records_no_numerics_it_cannot_know(tf32_project, tmp_path):
    """This machine's numerics are not where the embeddings were made: nothing is recorded unless declared."""
    plain = tmp_path / "plain"
    shutil.copytree(tf32_project, plain)
    pipeline = build_pipeline(load_spec(plain / "training.toml"))
    photos = plain / "data" / "photos"
    np.save(plain / "artifacts" / "clip.npy",
            np.stack([pipeline.embed(pipeline.preprocess(photos / n)[None])[0].numpy() for n in IMAGES]))
    assert freeze(plain, tmp_path / "fixture", spec=plain / "training.toml") == 0
    assert "numerics" not in load_fixture(tmp_path / "fixture").manifest["producer"]


def test_unknown_numerics_are_refused_with_the_accepted_values(tf32_project, tmp_path, capsys):
    spec = write_training_spec(tmp_path, head=tf32_project / "models" / "head.pth")
    spec.write_text(spec.read_text() + '\n[reference]\nnumerics = "fp8"\n')
    assert freeze(tf32_project, tmp_path / "out", spec=spec) == 2
    assert "[reference].numerics = 'fp8' is not accepted. Accepted values: " + ", ".join(REFERENCE_NUMERICS) \
        in capsys.readouterr().err.replace("\n", "")
    with pytest.raises(SystemExit) as exit_info:
        freeze(tf32_project, tmp_path / "out", "--numerics", "fp8")
    assert exit_info.value.code == 2


@pytest.mark.parametrize("edit", [lambda e: e * 1.001, lambda e: e + 1e-3], ids=["rescaled", "shifted"])
def test_a_small_systematic_change_is_not_called_reduced_precision(tf32_project, tmp_path, capsys, edit):
    """Within a TF32 emulation's budget, but a rescaling or a shift: no precision makes that, so no TF32 claim."""
    changed = tmp_path / "project"
    shutil.copytree(tf32_project, changed)
    pipeline = build_pipeline(load_spec(changed / "training.toml"))
    photos = changed / "data" / "photos"
    plain = np.stack([pipeline.embed(pipeline.preprocess(photos / n)[None])[0].numpy() for n in IMAGES])
    np.save(changed / "artifacts" / "clip.npy", edit(plain))
    assert freeze(changed, tmp_path / "out", spec=changed / "training.toml") == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "reduced precision" not in out and "--numerics" not in out
