"""load_fixture refuses tampered or inconsistent fixtures; stage_fixture writes them atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.errors import FixtureError
from parity.store.fixtures import MANIFEST_DIGEST, SCHEMA_VERSION, load_fixture, manifest_digest, stage_fixture
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import reseal

EXAMPLE = EXAMPLE_FIXTURES


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A private copy of the bundled fixture that a test may tamper with."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "clip_dnn"))


def _reseal(root: Path) -> None:
    """Recompute the manifest's sha256s and seal so that a deliberate edit passes the checksum checks."""
    reseal(root)


def _edit_json(path: Path, edit) -> None:
    """Edit a JSON file; a manifest is resealed (its own digest recomputed, the file checksums kept)."""
    data = json.loads(path.read_text())
    edit(data)
    if path.name == "manifest.json":
        data[MANIFEST_DIGEST] = manifest_digest(data)
    path.write_text(json.dumps(data))


def _error(root: Path) -> str:
    with pytest.raises(FixtureError) as info:
        load_fixture(root)
    return str(info.value)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _staging_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.is_dir() and ".tmp-" in p.name]


def test_bundled_example_loads():
    fixture = load_fixture(EXAMPLE)
    meta = json.loads((EXAMPLE / "clip_metadata.json").read_text())
    stored = np.load(EXAMPLE / "clip.npy")
    rows = len(meta["rows"])
    assert stored.shape == (rows, 1, 64)  # the training artifact's layout
    assert len(fixture.rows) == rows
    assert fixture.embeddings.shape == (rows, 64)
    assert fixture.embeddings.dtype == np.float32
    np.testing.assert_array_equal(fixture.embeddings, stored[:, 0, :])
    assert fixture.outputs.shape[0] == rows
    assert fixture.names == [Path(row["image"]).name for row in meta["rows"]]
    assert all(row.image.is_file() for row in fixture.rows)
    assert set(fixture.golden_pixels) == set(fixture.manifest["golden_pixels"])
    assert "chelsea_exif_rotated.png" in fixture.golden_pixels


def test_one_changed_byte_is_a_checksum_mismatch(copy):
    data = bytearray((copy / "clip.npy").read_bytes())
    data[-1] ^= 0x01
    (copy / "clip.npy").write_bytes(bytes(data))
    message = _error(copy)
    assert message.startswith(f"checksum mismatch for {copy / 'clip.npy'}: manifest.json records sha256 ")
    assert "FORCE=1" in message


def test_manifest_entry_outside_the_directory_is_refused(copy):
    outside = copy.parent / "outside.bin"
    outside.write_bytes(b"not part of the fixture")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    _edit_json(copy / "manifest.json", lambda m: m["files"].update({"../outside.bin": {"sha256": digest}}))
    message = _error(copy)
    assert message.startswith(f"{copy / 'manifest.json'}: ")
    assert "'../outside.bin'" in message and "outside the fixture directory" in message


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    assert _error(copy).startswith(f"{copy} has no manifest.json: not a parity fixture directory.")


def test_missing_directory(tmp_path):
    assert _error(tmp_path / "nope") == f"fixture directory not found: {tmp_path / 'nope'}"


def test_wrong_schema_version(copy):
    _edit_json(copy / "manifest.json", lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    message = _error(copy)
    assert message.startswith(f"{copy / 'manifest.json'}: schema_version {SCHEMA_VERSION + 1}")
    assert f"reads {SCHEMA_VERSION})" in message


def test_metadata_rows_must_match_the_array_rows(copy):
    rows = np.load(copy / "clip.npy").shape[0]
    _edit_json(copy / "clip_metadata.json", lambda m: m["rows"].pop())
    _reseal(copy)
    assert _error(copy).startswith(
        f"{copy / 'clip.npy'} has {rows} rows but clip_metadata.json lists {rows - 1} samples."
    )


def test_duplicate_image_names_are_refused(copy):
    """Names are basenames: the same file name in another folder is still a duplicate."""
    name = Path(json.loads((copy / "clip_metadata.json").read_text())["rows"][0]["image"]).name
    _edit_json(copy / "clip_metadata.json", lambda m: m["rows"][1].update(image=f"other/{name}"))
    _reseal(copy)
    assert _error(copy) == f"{copy / 'clip_metadata.json'}: row 1 repeats image name {name!r}"


def test_nan_in_embeddings_is_refused(copy):
    embeddings = np.load(copy / "clip.npy")
    embeddings[5, 0, 3] = np.nan
    np.save(copy / "clip.npy", embeddings)
    _reseal(copy)
    assert _error(copy) == f"{copy / 'clip.npy'}: embeddings has non-finite values (first at row 5)"


def test_image_outside_the_fixture_is_a_fixture_error(copy, tmp_path):
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copy(copy / "images" / "astronaut.png", elsewhere)
    _edit_json(copy / "clip_metadata.json", lambda m: m["rows"][0].update(image=str(elsewhere)))
    _reseal(copy)
    assert "has no checksum in manifest.json" in _error(copy)


def test_stage_fixture_writes_a_manifest_with_sha256_per_file(tmp_path):
    dest = tmp_path / "fx"
    with stage_fixture(dest) as stage:
        (stage.path / "a.txt").write_text("alpha")
        (stage.path / "sub").mkdir()
        (stage.path / "sub" / "b.bin").write_bytes(b"\x00\x01")
        stage.manifest["name"] = "demo"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["name"] == "demo"
    assert manifest["files"] == {
        "a.txt": {"sha256": hashlib.sha256(b"alpha").hexdigest(), "bytes": 5},
        "sub/b.bin": {"sha256": hashlib.sha256(b"\x00\x01").hexdigest(), "bytes": 2},
    }
    assert _staging_leftovers(tmp_path) == []


def test_stage_fixture_refuses_an_existing_destination(tmp_path):
    dest = tmp_path / "fx"
    dest.mkdir()
    (dest / "keep.txt").write_text("frozen")
    with pytest.raises(FixtureError, match="refusing to overwrite frozen fixtures") as info:
        with stage_fixture(dest):
            pytest.fail("the body must not run")
    assert "FORCE=1" in str(info.value)
    assert _tree(dest) == {"keep.txt": b"frozen"}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["fx"]


def test_stage_fixture_with_force_replaces_the_destination(tmp_path):
    dest = tmp_path / "fx"
    with stage_fixture(dest) as stage:
        (stage.path / "old.txt").write_text("old")
    with stage_fixture(dest, force=True) as stage:
        (stage.path / "new.txt").write_text("new")
    assert sorted(_tree(dest)) == [".gitignore", "manifest.json", "new.txt"]
    assert _staging_leftovers(tmp_path) == []
    # Only a fixture parity wrote: a directory of someone else's files is refused and kept as it was.
    other = tmp_path / "other"
    other.mkdir()
    (other / "old.txt").write_text("old")
    with pytest.raises(FixtureError, match="is not a fixture parity wrote"):
        with stage_fixture(other, force=True) as stage:
            (stage.path / "new.txt").write_text("new")
    assert sorted(_tree(other)) == ["old.txt"] and _staging_leftovers(tmp_path) == []


def test_an_error_while_staging_leaves_the_destination_untouched(tmp_path):
    dest = Path(shutil.copytree(EXAMPLE, tmp_path / "clip_dnn"))
    before = _tree(dest)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_fixture(dest, force=True) as stage:
            (stage.path / "clip.npy").write_bytes(b"half written")
            raise RuntimeError("boom")
    assert _tree(dest) == before
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["clip_dnn"]


def test_non_numeric_outputs_are_a_fixture_error(copy):
    rows = np.load(copy / "outputs.npy").shape[0]
    np.save(copy / "outputs.npy", np.full((rows, 5), "x"))
    _reseal(copy)
    assert "outputs.npy" in _error(copy)
