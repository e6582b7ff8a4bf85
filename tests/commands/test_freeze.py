"""`parity freeze`: a user's existing artifacts, in their own layout, become a fixture the gate passes.

The artifacts are made here as a user's training project would have made them: its own head
(with BatchNorm, written below, independent of reference/models.py), its own metadata field
names, images in another folder than the metadata, clip.npy extracted by the training-time
pipeline. The backbone is the bundled tiny timm ViT-L/14@336 (reduced width and depth).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from parity.cli import main
from parity.errors import FixtureError, SpecError
from parity.store.fixtures import load_fixture
from parity.commands.freeze import FieldMap, freeze, parse_field_map, read_metadata, read_rows_array, select_golden
from parity.model.pipeline import build_pipeline
from parity.spec import load_spec
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.training_project import IMAGES, SITES, SiteGradeHead, write_training_spec

MAP = ["--map", "image=file", "--map", "input_biases=site", "--map", "labels=grade"]


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(project), "-c", "user.name=user", "-c", "user.email=user@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A training project: data/photos/*, models/head.pth, artifacts/clip.npy + clip_metadata.json, in git."""
    root = tmp_path_factory.mktemp("user_project")
    photos = root / "data" / "photos"
    photos.mkdir(parents=True)
    for name in IMAGES:
        shutil.copyfile(EXAMPLE_FIXTURES / "images" / name, photos / name)
    torch.manual_seed(7)
    head = SiteGradeHead()
    head.train()
    for _ in range(5):  # moves BatchNorm's running statistics, so eval mode differs from train mode
        head(torch.randn(8, 64) * 3 + 1, torch.randint(0, 3, (8, 1)))
    (root / "models").mkdir()
    torch.save(head.state_dict(), root / "models" / "head.pth")
    spec = write_training_spec(root)
    pipeline = build_pipeline(load_spec(spec))
    embeddings = np.stack([pipeline.embed(pipeline.preprocess(photos / n)[None])[0].numpy() for n in IMAGES])
    (root / "artifacts").mkdir()
    np.save(root / "artifacts" / "clip.npy", embeddings[:, None, :])  # (N, 1, D), as training saved it
    rows = [{"file": f"photos/{n}", "site": s, "grade": round(0.25 * i, 2), "note": f"batch {i}", "reviewed": i % 2 == 0}
            for i, (n, s) in enumerate(zip(IMAGES, SITES))]
    (root / "artifacts" / "clip_metadata.json").write_text(json.dumps(rows, indent=1))
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "training artifacts")
    return root


def freeze_cli(project: Path, out: Path, *extra: str, spec: Path | None = None,
               embeddings: Path | None = None, metadata: Path | None = None) -> int:
    return main(["freeze", "--spec", str(spec or project / "training.toml"),
                 "--embeddings", str(embeddings or project / "artifacts" / "clip.npy"),
                 "--metadata", str(metadata or project / "artifacts" / "clip_metadata.json"),
                 "--images", str(project / "data"), "--out", str(out), *extra])


def check_cli(spec: Path, fixture: Path) -> int:
    return main(["check", "--spec", str(spec), "--fixtures", str(fixture)])


def test_freeze_user_layout_with_batchnorm_head_passes_check(project, tmp_path, capsys):
    out = tmp_path / "fixtures" / "site_grade"
    assert freeze_cli(project, out, *MAP) == 0
    printed = capsys.readouterr().out
    assert "FROZEN" in printed
    assert check_cli(project / "training.toml", out) == 0
    assert "PARITY" in capsys.readouterr().out

    fixture = load_fixture(out)
    manifest = fixture.manifest
    # Provenance is the user's repository, not parity's.
    assert manifest["producer"]["git_revision"] == git(project, "rev-parse", "HEAD")
    assert manifest["producer"]["script"] == "parity freeze"
    # The stored embeddings are taken as they are (the fixture keeps the training layout).
    stored = np.load(project / "artifacts" / "clip.npy")
    np.testing.assert_array_equal(np.load(out / "clip.npy"), stored)
    # Mapped fields, and the user's other fields typed as they came.
    meta = json.loads((out / "clip_metadata.json").read_text())
    assert meta["mapping"] == {"image": "file", "input_biases": ["site"], "labels": ["grade"]}
    assert [r.input_biases for r in fixture.rows] == [(s,) for s in SITES]
    assert fixture.rows[3].labels == (0.75,)
    assert meta["rows"][2]["fields"] == {"note": "batch 2", "reviewed": True}
    # Golden pixels cover the EXIF-rotated, RGBA and grayscale images.
    assert {"chelsea_exif_rotated.png", "logo.png", "brick.png"} <= set(fixture.golden_pixels)
    assert len(fixture.golden_pixels) == 4
    # Checkpoints are referenced, with sha256 and fingerprints, not copied.
    head = manifest["weights"]["head"]
    assert head["referenced"] is True
    assert (out / head["file"]).resolve() == (project / "models" / "head.pth").resolve()
    assert len(head["tensors"]["norm.num_batches_tracked"]) == 64  # the 0-dim BatchNorm buffer is fingerprinted
    # The fixture's own .gitignore keeps a manifest's temporary files out of a commit; it is no data file.
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        ".gitignore", "clip.npy", "clip_metadata.json", "manifest.json", "outputs.npy", "pixels.safetensors"]
    assert ".gitignore" not in json.loads((out / "manifest.json").read_text())["files"]
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o666 & ~umask}  # pixels too
    # Outputs are the head's in eval mode on the stored embeddings.
    pipeline = build_pipeline(load_spec(project / "training.toml"))
    expected = pipeline.run_head(stored[:, 0, :], fixture.biases()).numpy()
    np.testing.assert_allclose(fixture.outputs, expected, atol=1e-6)


def test_declared_preprocessing_that_did_not_make_the_embeddings_is_refused(project, tmp_path, capsys):
    spec = write_training_spec(tmp_path, interpolation="bilinear", head=project / "models" / "head.pth")
    out = tmp_path / "never"
    assert freeze_cli(project, out, *MAP, spec=spec) == 1
    printed = capsys.readouterr().out
    assert "REFUSED" in printed
    assert '[preprocess].interpolation = "bicubic" (the spec has "bilinear")' in printed
    assert 'Fix: set [preprocess].interpolation = "bicubic"' in printed
    assert "reproduces the stored embeddings" in printed
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no staging left behind


def test_csv_metadata_and_flat_embeddings(project, tmp_path):
    """(N, D) embeddings and CSV metadata; CSV cells stay strings, indices and labels are parsed."""
    flat = tmp_path / "clip_flat.npy"
    np.save(flat, np.load(project / "artifacts" / "clip.npy")[:, 0, :])
    table = tmp_path / "meta.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "hospital", "score", "comment"])
        for i, (name, site) in enumerate(zip(IMAGES, SITES)):
            writer.writerow([f"photos/{name}", site, 0.5 * i, f"c{i}"])
    out = tmp_path / "fixture"
    result = freeze(load_spec(project / "training.toml"), embeddings=flat, metadata=table, images=project / "data",
                    out=out, field_map=parse_field_map(["image=path", "input_biases=hospital", "labels=score"]))
    assert result and result.samples == len(IMAGES)
    fixture = load_fixture(out)
    assert [r.input_biases for r in fixture.rows] == [(s,) for s in SITES]
    assert fixture.rows[1].labels == (0.5,)
    assert json.loads((out / "clip_metadata.json").read_text())["rows"][4]["fields"] == {"comment": "c4"}
    assert np.load(out / "clip.npy").shape == (len(IMAGES), 1, 64)
    assert check_cli(project / "training.toml", out) == 0


def test_json_object_holding_one_list(project, tmp_path):
    rows = json.loads((project / "artifacts" / "clip_metadata.json").read_text())
    wrapped = tmp_path / "meta.json"
    wrapped.write_text(json.dumps({"dataset": "v3", "samples": rows}))
    got = read_metadata(wrapped, project / "data", FieldMap(image="file", input_biases=("site",)))
    assert [r.image.name for r in got] == list(IMAGES)
    assert got[0].fields == {"grade": 0.0, "note": "batch 0", "reviewed": True}
    assert got[0].labels == ()


@pytest.mark.parametrize("rows, words", [(7, "7 rows but clip_metadata.json lists 6 (more embeddings"),
                                         (5, "5 rows but clip_metadata.json lists 6 (fewer embeddings")])
def test_row_count_mismatch_is_a_usage_error(project, tmp_path, capsys, rows, words):
    stored = np.load(project / "artifacts" / "clip.npy")
    changed = tmp_path / "clip.npy"
    np.save(changed, np.concatenate([stored, stored[:1]])[:rows])
    assert freeze_cli(project, tmp_path / "out", *MAP, embeddings=changed) == 2
    err = capsys.readouterr().err
    assert words in err and "row i of the embeddings must be metadata entry i" in err
    assert not (tmp_path / "out").exists()


def test_embeddings_are_read_without_unpickling_and_in_a_known_layout(tmp_path):
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(FixtureError, match="cannot read embeddings"):
        read_rows_array(pickled, what="embeddings", rows=2, metadata="meta.json")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((2, 2, 8), np.float32))
    with pytest.raises(FixtureError, match=r"must be \(N, 1, D\) or \(N, D\), got shape \(2, 2, 8\)"):
        read_rows_array(wide, what="embeddings", rows=2, metadata="meta.json")
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((2, 8), np.int64))
    with pytest.raises(FixtureError, match="must be a floating-point"):
        read_rows_array(ints, what="embeddings", rows=2, metadata="meta.json")


def test_unmapped_image_field_names_the_field_and_the_flag(project, tmp_path, capsys):
    assert freeze_cli(project, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "row 0 has no field 'image'" in err and "--map image=FIELD" in err and "'file'" in err


def test_mapped_field_missing_from_a_row_is_named(project, tmp_path, capsys):
    rows = json.loads((project / "artifacts" / "clip_metadata.json").read_text())
    del rows[3]["site"]
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(rows))
    assert freeze_cli(project, tmp_path / "out", *MAP, metadata=meta) == 2
    err = capsys.readouterr().err
    assert "row 3 has no field 'site' (--map input_biases=site)" in err


def test_parse_field_map_refuses_unknown_roles():
    assert parse_field_map(["image=f", "input_biases=a, b"]) == FieldMap("f", ("a", "b"), None)
    with pytest.raises(SpecError, match="expected one of image=FIELD"):
        parse_field_map(["biases=a"])
    with pytest.raises(SpecError, match="the image path is one field"):
        parse_field_map(["image=a,b"])


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_unreadable_image_is_named(project, tmp_path, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(project / "data", data)
    broken = data / "photos" / "coins.png"
    if damage == "garbage":
        broken.write_bytes(b"not a png at all")
    else:
        broken.unlink()
    code = main(["freeze", "--spec", str(project / "training.toml"), "--embeddings",
                 str(project / "artifacts" / "clip.npy"), "--metadata", str(project / "artifacts" / "clip_metadata.json"),
                 "--images", str(data), "--out", str(tmp_path / "out"), *MAP])
    assert code == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert str(broken) in err
    assert ("cannot decode image" if damage == "garbage" else "not found") in err
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_force_and_force_replaces_only_a_fixture(project, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert freeze_cli(project, out, *MAP) == 2
    assert "already exists" in capsys.readouterr().err
    assert freeze_cli(project, out, *MAP, "--force", "--golden", "1") == 2  # the user's folder, not a fixture
    assert "is not a fixture parity wrote" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and not p.name.endswith(".lock")] == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    fixture = tmp_path / "fixture"
    assert freeze_cli(project, fixture, *MAP, "--golden", "2") == 0
    assert freeze_cli(project, fixture, *MAP, "--force", "--golden", "1") == 0
    assert load_fixture(fixture).golden_pixels.keys() == {"chelsea_exif_rotated.png"}


def test_outputs_from_file_are_checked_against_the_head(project, tmp_path, capsys):
    pipeline = build_pipeline(load_spec(project / "training.toml"))
    stored = np.load(project / "artifacts" / "clip.npy")[:, 0, :]
    outputs = pipeline.run_head(stored, np.array(SITES)[:, None]).numpy()
    good, bad = tmp_path / "outputs.npy", tmp_path / "outputs_train_mode.npy"
    np.save(good, outputs)
    np.save(bad, outputs + 0.1)
    assert freeze_cli(project, tmp_path / "ok", *MAP, "--outputs", str(good)) == 0
    np.testing.assert_array_equal(load_fixture(tmp_path / "ok").outputs, outputs)
    assert freeze_cli(project, tmp_path / "refused", *MAP, "--outputs", str(bad)) == 1
    assert "does not reproduce" in capsys.readouterr().out
    assert not (tmp_path / "refused").exists()


@pytest.fixture
def own_head(project, tmp_path) -> tuple[Path, Path]:
    """A spec whose head checkpoint is a private copy, and a fixture frozen from it (referenced)."""
    (tmp_path / "models").mkdir()
    shutil.copyfile(project / "models" / "head.pth", tmp_path / "models" / "head.pth")
    spec = write_training_spec(tmp_path)
    out = tmp_path / "fixture"
    assert freeze_cli(project, out, *MAP, "--golden", "2", spec=spec) == 0
    return spec, out


def test_missing_referenced_checkpoint_is_a_usage_error_at_check_time(own_head, capsys):
    spec, out = own_head
    (spec.parent / "models" / "head.pth").unlink()
    capsys.readouterr()
    assert check_cli(spec, out) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "the head checkpoint this fixture references is missing" in err and "--copy-checkpoints" in err


def test_changed_referenced_checkpoint_is_a_usage_error_at_check_time(own_head, capsys):
    spec, out = own_head
    path = spec.parent / "models" / "head.pth"
    state = torch.load(path, weights_only=True)
    state["mlp.3.bias"] += 1e-3
    torch.save(state, path)
    capsys.readouterr()
    assert check_cli(spec, out) == 2
    assert "has changed since it was frozen" in capsys.readouterr().err.replace("\n", "")


def test_copy_checkpoints_keeps_them_inside_the_fixture(project, tmp_path):
    out = tmp_path / "fixture"
    assert freeze_cli(project, out, *MAP, "--golden", "1", "--copy-checkpoints") == 0
    weights = load_fixture(out).manifest["weights"]
    assert weights["head"]["file"] == "head.pth" and "referenced" not in weights["head"]
    assert weights["backbone"]["file"] == "backbone.safetensors"
    assert (out / "head.pth").is_file() and (out / "backbone.safetensors").is_file()


def test_golden_selection_covers_exif_alpha_grayscale_and_shape():
    paths = [EXAMPLE_FIXTURES / "images" / n for n in ("astronaut.png", "rocket.jpg", "logo.png", "moon.png", "page.png")]
    # rocket: non-square; logo: RGBA; moon: grayscale; no EXIF-tagged image here.
    assert select_golden(paths, 3) == [1, 2, 3]
    assert select_golden(paths, 10) == [0, 1, 2, 3, 4]


# -- input_biases mapped in the wrong order: a usage error naming the column -----------------------

class SiteScannerHead(nn.Module):
    """A head with two category tables of different sizes: the site (3) and the scanner model (7)."""

    def __init__(self, embedding_dim: int = 64) -> None:
        super().__init__()
        self.site = nn.Embedding(3, 4)
        self.scanner = nn.Embedding(7, 4)
        self.out = nn.Linear(embedding_dim + 8, 2)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([embedding, self.site(input_biases[:, 0]), self.scanner(input_biases[:, 1])], dim=1))


@pytest.fixture
def two_tables(project, tmp_path) -> tuple[Path, Path]:
    """A spec whose head takes (site, scanner), and metadata holding both fields."""
    torch.manual_seed(3)
    torch.save(SiteScannerHead().state_dict(), tmp_path / "scanner_head.pth")
    spec = write_training_spec(tmp_path, head=tmp_path / "scanner_head.pth")
    spec.write_text(spec.read_text().replace(f"{SiteGradeHead.__module__}:SiteGradeHead", f"{__name__}:SiteScannerHead")
                    .replace("embedding_dim = 64, sites = 3, outputs = 2 }", "embedding_dim = 64 }"))
    rows = json.loads((project / "artifacts" / "clip_metadata.json").read_text())
    for i, row in enumerate(rows):
        row["scanner"] = (2 * i + 1) % 7  # 1, 3, 5, 0, 2, 4: beyond the site table's 3 rows
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(rows))
    return spec, meta


def test_swapped_input_biases_columns_are_a_usage_error_with_the_order_that_fits(project, two_tables, tmp_path, capsys):
    spec, meta = two_tables
    code = freeze_cli(project, tmp_path / "out", "--map", "image=file", "--map", "input_biases=scanner,site",
                      spec=spec, metadata=meta)
    assert code == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "column 0 (scanner) holds 0..5" in err and "has 3 rows (indices 0..2)" in err
    assert "Fix: the columns look swapped: --map input_biases=site,scanner" in err
    assert not (tmp_path / "out").exists()
    assert freeze_cli(project, tmp_path / "out", "--map", "image=file", "--map", "input_biases=site,scanner",
                      "--golden", "1", spec=spec, metadata=meta) == 0
    assert check_cli(spec, tmp_path / "out") == 0


def test_input_biases_the_head_cannot_take_are_a_usage_error_even_when_its_tables_do_not_map_to_columns(
        project, two_tables, tmp_path, capsys):
    spec, meta = two_tables
    code = freeze_cli(project, tmp_path / "out", "--map", "image=file", "--map", "input_biases=site", "--golden", "1",
                      spec=spec, metadata=meta)
    assert code == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "the spec's head cannot take the mapped input_biases" in err and "column 0: 0..2" in err
    assert "Fix: map (--map input_biases=...) the fields the head was trained on" in err


# -- golden images of several shapes (a processor without a centre crop) ----------------------------

NO_CROP = {"do_center_crop": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
           "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 56}}


def test_golden_pixels_of_several_shapes_are_compared_image_by_image(project, tmp_path, capsys):
    """transformers' processor keeping the aspect ratio (no centre crop) before a timm ViT that takes any size:
    frozen and checked; each golden image is compared with its own reference (exit 3 before)."""
    pytest.importorskip("transformers")
    (tmp_path / "no_crop.json").write_text(json.dumps(NO_CROP))
    spec = write_training_spec(tmp_path, head=project / "models" / "head.pth")
    # timm's ViT at any input size: its position embeddings resampled, the last patch padded.
    text = spec.read_text().replace("num_heads = 2 }",
                                    "num_heads = 2, dynamic_img_size = true, dynamic_img_pad = true }")
    start, end = text.index("[preprocess]"), text.index("[head]")
    spec.write_text(text[:start] + '[preprocess]\nlibrary = "transformers"\nconfig = "no_crop.json"\n\n' + text[end:]
                    + "\n[runtime]\nbatch_size = 1\n")
    pipeline = build_pipeline(load_spec(spec))
    photos = project / "data" / "photos"
    shapes = {n: tuple(pipeline.preprocess(photos / n).shape) for n in IMAGES}
    assert len(set(shapes.values())) > 2
    stored = np.stack([pipeline.embed(pipeline.preprocess(photos / n)[None])[0].numpy() for n in IMAGES])
    np.save(tmp_path / "clip.npy", stored)
    out = tmp_path / "fixture"
    assert freeze_cli(project, out, *MAP, "--golden", "4", spec=spec, embeddings=tmp_path / "clip.npy") == 0
    golden = load_fixture(out).golden_pixels
    assert len({p.shape for p in golden.values()}) > 1
    assert check_cli(spec, out) == 0
    from parity.commands.check import run_check

    pixels = run_check(load_spec(spec), fixtures=out).stage("pixels")
    assert pixels.headline == "4 golden images of several shapes, compared image by image"
    assert pixels.comparison.max_abs == 0.0 and pixels.comparison.total == sum(p.size for p in golden.values())


def test_one_golden_image_of_another_shape_is_that_images_failure():
    from parity.judge.stages import _pixels_stage
    from parity.results import Status, Tolerance

    rng = np.random.default_rng(0)
    reference = {name: rng.random(shape, dtype=np.float32)
                 for name, shape in (("wide.png", (3, 4, 6)), ("tall.png", (3, 6, 4)), ("square.png", (3, 4, 4)))}
    tolerance = Tolerance(atol=1e-5, rtol=1.3e-6)
    same = _pixels_stage(dict(reference), reference, tolerance)
    assert same.status is Status.PASS and same.comparison.total == 72 + 72 + 48
    moved = dict(reference)
    moved["tall.png"] = reference["tall.png"][:, :, :3]  # a crop one column narrower
    moved["wide.png"] = reference["wide.png"] + 1e-3
    stage = _pixels_stage(moved, reference, tolerance)
    assert stage.status is Status.FAIL
    assert stage.headline == "1 of 3 golden images have another shape than the reference's"
    assert stage.notes == ("tall.png: pixels [3, 6, 3], the reference's [3, 6, 4]",)
    assert stage.comparison.worst[0].name == "wide.png" and stage.comparison.total == 72 + 48
