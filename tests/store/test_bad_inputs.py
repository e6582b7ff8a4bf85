"""Bad inputs, round two, for what writes and reads fixtures: `freeze --force` replaces only a fixture parity
wrote and never writes one that `check` refuses; `calibrate` absorbs noise, never a drift; a checkpoint
replaced under a running check is a changed fixture, not drift; sealed manifests of the wrong shape, freeze
inputs out of bounds, matrix axes beyond the spec's bounds and head inputs that cannot fit are errors that
name what to fix (exit 2), never a traceback or a verdict.

The command-line cases run in one process (`tests.support.bad_input_runner`, each under an alarm), and every
byte that existed before a case is checked to be where it was after it (`tests.support.corpus`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.cli import main
from parity.errors import FixtureError, ParityError
from parity.store.fixtures import METADATA, load_fixture, stage_fixture
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import reseal, write_spec
from tests.support.corpus import Case, run_corpus, snapshot, unwritable_directory

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# What a sealed manifest can hold: JSON has no NaN or infinity, and sealing refuses them.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
GELU = {'"vit_large_patch14_clip_quickgelu_336.openai"': '"vit_large_patch14_clip_336.openai"'}
HEAD = EXAMPLE_FIXTURES / "dnnV1_model_best.pth"


# -- builders ----------------------------------------------------------------------------------

def _copy_fixture(t: Path, name: str = "fixture") -> Path:
    return Path(shutil.copytree(EXAMPLE_FIXTURES, t / name))


def _sealed(t: Path, edit) -> Path:
    """A copy of the example fixture whose manifest ``edit`` changed, sealed again."""
    root = _copy_fixture(t)
    reseal(root, edit)
    return root


def _metadata(t: Path, edit, *, raw: tuple[str, str] | None = None) -> Path:
    """The example's metadata with each row edited by ``edit(row)``; ``raw``: a text replacement after that."""
    data = json.loads((EXAMPLE_FIXTURES / METADATA).read_text())
    for row in data["rows"]:
        edit(row)
    text = json.dumps(data)
    if raw is not None:
        assert raw[0] in text
        text = text.replace(raw[0], raw[1], 1)
    path = t / "meta.json"
    path.write_text(text)
    return path


def _freeze(t: Path, *extra: str, metadata: Path | None = None, embeddings: Path | None = None,
            images: Path | None = None, out: Path | None = None, spec: Path | None = None) -> list[str]:
    """``parity freeze`` of the example's own artifacts (its spec, embeddings, metadata and images)."""
    return ["freeze", "--spec", str(spec or write_spec(t)), "--embeddings", str(embeddings or EXAMPLE_FIXTURES / "clip.npy"),
            "--metadata", str(metadata or EXAMPLE_FIXTURES / METADATA), "--images", str(images or EXAMPLE_FIXTURES),
            "--out", str(out or t / "out"), "--golden", "1", *extra]


def _over_good(t: Path, **given) -> list[str]:
    """Freeze bad inputs with --force over a good fixture, which must stay as it was."""
    return _freeze(t, "--force", out=_copy_fixture(t, "good"), **given)


def _user_folder(t: Path) -> Path:
    folder = t / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("the only copy\n")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder


def _images_folder(t: Path) -> Path:
    shutil.copytree(EXAMPLE_FIXTURES / "images", t / "data" / "images")
    return t / "data"


def _with_notes(t: Path) -> Path:
    root = _copy_fixture(t)
    (root / "notes.txt").write_text("what I found when I looked at these images\n")
    return root


def _linked(t: Path) -> Path:
    (t / "link").symlink_to(_copy_fixture(t), target_is_directory=True)
    return t / "link"


def _raw(t: Path, content: bytes, name: str = "clip.npy") -> Path:
    path = t / name
    path.write_bytes(content)
    return path


def _huge_header(t: Path) -> Path:
    """An .npy whose header declares 10^12 rows of 64 float32 values; the file holds 64 bytes of data."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return _raw(t, buffer.getvalue() + bytes(64))


def _head_order(order: str):
    return lambda t: ["check", "--spec", str(write_spec(t, {"dropout = 0.1 }": f"dropout = 0.1 }}\ninput_biases_order = {order}"}))]


# -- the command-line corpus ------------------------------------------------------------------

FREEZE_TARGETS = [
    Case("freeze --force over a folder of the user's files",
         lambda t: _freeze(t, "--force", out=_user_folder(t)), says=("is not a fixture parity wrote", "Nothing was changed")),
    Case("freeze --force over the --images folder",
         lambda t: _freeze(t, "--force", images=_images_folder(t), out=t / "data"), says=("is the --images folder",)),
    Case("freeze --force over a folder holding the embeddings", lambda t: _freeze(
        t, "--force", embeddings=Path(shutil.copy(EXAMPLE_FIXTURES / "clip.npy", _user_folder(t) / "clip.npy")),
        out=t / "mine"), says=("holds the embeddings",)),
    Case("freeze --force over a regular file", lambda t: _freeze(t, "--force", out=_raw(t, b"mine", "out.txt")),
         says=("is a file, not a fixture directory",)),
    Case("freeze --force over a fixture that holds the user's notes", lambda t: _freeze(t, "--force", out=_with_notes(t)),
         says=("does not list (notes.txt)",)),
    Case("freeze --force through a symbolic link", lambda t: _freeze(t, "--force", out=_linked(t)),
         says=("is a symbolic link",)),
    Case("freeze --out in an unwritable directory", lambda t: _freeze(t, out=unwritable_directory(t) / "out"),
         says=("not writable",)),
]

FREEZE_INPUTS = [
    Case("freeze labels NaN, over a good fixture",
         lambda t: _over_good(t, metadata=_metadata(t, lambda r: r["labels"].__setitem__(0, float("nan"))))
         , says=("must be finite numbers", "'nan'")),
    Case('freeze labels "inf", over a good fixture',
         lambda t: _over_good(t, metadata=_metadata(t, lambda r: r["labels"].__setitem__(1, "inf"))),
         says=("must be finite numbers", "'inf'")),
    Case("freeze labels 1e400, over a good fixture", lambda t: _over_good(
        t, metadata=_metadata(t, lambda r: r["labels"].__setitem__(2, 12345.5), raw=("12345.5", "1e400"))),
         says=("must be finite numbers",)),
    Case("freeze metadata with a 70 MB field, over a good fixture", lambda t: _over_good(
        t, metadata=_metadata(t, lambda r: r.update(note="x") if r["row"] else r.update(note="x" * (70 << 20)))),
         says=("'note' of row 0", "MiB a fixture's metadata may hold")),
    Case("freeze metadata nested 100000 deep", lambda t: _freeze(t, metadata=_raw(t, b"[" * 100_000 + b"]" * 100_000, "meta.json")),
         says=("nests too deeply",)),
    Case("freeze input_biases -1", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r["input_biases"].__setitem__(0, -1))), says=("column 0 holds -1..-1", "never negative")),
    Case("freeze input_biases 99", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r["input_biases"].__setitem__(1, 99))), says=("column 1 holds 99..99", "has 4 rows")),
    Case("freeze input_biases 1e300", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r["input_biases"].__setitem__(0, 1e300))), says=("1e+300, which is no category index",)),
    Case("freeze with 1 input_biases column for a head of 2", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r.update(input_biases=r["input_biases"][:1]))), says=("cannot take the mapped input_biases", "got (17, 1)")),
    Case("freeze with 3 input_biases columns for a head of 2", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r.update(input_biases=[*r["input_biases"], 0]))), says=("cannot take the mapped input_biases", "got (17, 3)")),
    Case("freeze without input_biases for a head that takes them", lambda t: _freeze(t, metadata=_metadata(
        t, lambda r: r.pop("input_biases"))), says=("carry no input_biases", "--map input_biases=")),
    Case("freeze a zero-byte clip.npy", lambda t: _freeze(t, embeddings=_raw(t, b"")),
         says=("cannot read embeddings", "not a valid .npy file")),
    Case("freeze a clip.npy whose header declares 10^12 rows", lambda t: _freeze(t, embeddings=_huge_header(t)),
         says=("declares shape (1000000000000, 64)",)),
]

CHECKS = [
    Case("manifest pipeline a string", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures", str(_sealed(t, lambda m: m.update(pipeline="timm")))],
         says=("'pipeline' must be an object, got str",)),
    Case("manifest weights.head.tensors a list", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures",
        str(_sealed(t, lambda m: m["weights"]["head"].update(tensors=["a", "b"])))],
         says=("'weights.head.tensors' must be an object, got list",)),
    Case("manifest weights a list", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures", str(_sealed(t, lambda m: m.update(weights=[1])))],
         says=("'weights' must be an object",)),
    Case("manifest producer a string", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures", str(_sealed(t, lambda m: m.update(producer="me")))],
         says=("'producer' must be an object",)),
    Case("manifest backbone library a list", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures",
        str(_sealed(t, lambda m: m["pipeline"]["backbone"].update(library=["timm"])))],
         says=("'pipeline.backbone.library' must be a string",)),
    Case("manifest backbone structure a list", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures",
        str(_sealed(t, lambda m: m["pipeline"]["backbone"].update(structure=[])))],
         says=("'pipeline.backbone.structure' must be an object",)),
    Case("fixture rows with input_biases []", lambda t: [
        "check", "--spec", str(write_spec(t)), "--fixtures", str(_edited_rows(t, lambda r: r.update(input_biases=[])))],
         says=("carry no input_biases (every row has [])", "freeze the fixture again")),
    Case("[head].input_biases_order of 1 for 2 columns", _head_order("[0]"),
         says=("input_biases_order = [0] reorders 1 columns", "carry 2 input_biases per row")),
    Case("[head].input_biases_order of 3 for 2 columns", _head_order("[2, 0, 1]"),
         says=("reorders 3 columns", "permutation of 0..1")),
    Case("matrix --axis crop_pct=1e-9", lambda t: ["matrix", "--spec", str(write_spec(t)), "--axis", "crop_pct=1e-9"],
         says=("crop_pct values must be numbers in [0.05, 1]", "got 1e-09")),
    Case("[matrix] crop_pct = [1e-9]", lambda t: ["matrix", "--spec", str(write_spec(
        t, {"[matrix]\n": "[matrix]\ncrop_pct = [1e-9]\n"}))], says=("crop_pct values must be numbers in [0.05, 1]",)),
    Case("calibrate a candidate with GELU for the fixture's QuickGELU", lambda t: [
        "calibrate", "--spec", str(write_spec(t, GELU)), "--fixtures", str(_copy_fixture(t))],
         says=("calibrate measures the noise of the reference configuration", "backbone.activation",
               "nothing was measured or written")),
    Case("inspect a safetensors file named .pth", lambda t: [
        "inspect", str(Path(shutil.copy(EXAMPLE_FIXTURES / "backbone.safetensors", t / "backbone.pth")))],
         expect=(0,), says=("patch_embed",)),
]


def _edited_rows(t: Path, edit) -> Path:
    root = _copy_fixture(t)
    data = json.loads((root / METADATA).read_text())
    for row in data["rows"]:
        edit(row)
    (root / METADATA).write_text(json.dumps(data))
    reseal(root)
    return root


@pytest.mark.parametrize("group", ["freeze", "check"])
def test_every_bad_input_ends_in_a_clear_error_and_destroys_nothing(group, tmp_path):
    cases = FREEZE_TARGETS + FREEZE_INPUTS if group == "freeze" else CHECKS
    problems = run_corpus(cases, tmp_path)
    assert not problems, "\n\n".join(problems)


# -- freeze: a fixture is written only when it would load -----------------------------------------

def test_a_fixture_that_would_not_load_is_never_swapped_in(tmp_path):
    good = _copy_fixture(tmp_path, "good")
    before = snapshot(good)
    with pytest.raises(FixtureError, match=r"refusing to write .*good: the fixture would not load .*'labels' must "
                                           r"be a list of finite numbers\)\.\nNothing was written"):
        with stage_fixture(good, force=True) as stage:
            shutil.copytree(good, stage.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
            data = json.loads((good / METADATA).read_text())
            data["rows"][3]["labels"][0] = float("nan")  # what a writer without freeze's own checks would write
            (stage.path / METADATA).write_text(json.dumps(data))
            manifest = json.loads((good / "manifest.json").read_text())
            stage.manifest.update({k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")})
    assert snapshot(good) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".good.tmp-", ".good.previous"))]  # nothing aside


def test_every_file_of_a_written_fixture_has_one_mode(tmp_path):
    """pixels.safetensors was written 0600 (safetensors makes its files private) while the others were 0644."""
    umask = os.umask(0o022)
    try:
        with stage_fixture(tmp_path / "fx") as stage:
            shutil.copytree(EXAMPLE_FIXTURES, stage.path, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("manifest.json"))
            (stage.path / "pixels.safetensors").chmod(0o600)
            manifest = json.loads((EXAMPLE_FIXTURES / "manifest.json").read_text())
            stage.manifest.update({k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")})
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "fx").rglob("*")}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} | {stat.S_IMODE((tmp_path / "fx").stat().st_mode)} \
        == {0o755}


# -- a checkpoint replaced under a running check --------------------------------------------------

def _other_head(path: Path) -> None:
    state = torch.load(HEAD, weights_only=True)
    state["mlp.0.bias"] = state["mlp.0.bias"] + 0.25
    torch.save(state, path)


def _regenerate_head_only(root: Path) -> None:
    """A regeneration in which only the head changed: a new checkpoint, its outputs and its manifest record."""
    from parity.store.fixtures import sha256_file

    with stage_fixture(root, force=True) as stage:
        shutil.copytree(root, stage.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        _other_head(stage.path / HEAD.name)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["weights"]["head"]["sha256"] = sha256_file(stage.path / HEAD.name)
        stage.manifest.update({k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")})


@pytest.mark.parametrize("where", ["copied into the fixture", "referenced beside it"])
def test_a_head_replaced_while_check_runs_is_a_changed_fixture_not_a_weights_failure(where, tmp_path, monkeypatch,
                                                                                     capsys):
    from parity.commands import check

    root = _copy_fixture(tmp_path)
    if where == "copied into the fixture":
        head = root / HEAD.name
        replace = lambda: _regenerate_head_only(root)  # noqa: E731
        says = "was regenerated while this ran"
    else:  # as freeze references it: outside the fixture, by path and sha256
        head = Path(shutil.move(root / HEAD.name, tmp_path / HEAD.name))

        def reference(manifest):
            manifest["weights"]["head"].update(file=f"../{HEAD.name}", referenced=True, bytes=head.stat().st_size)
            del manifest["files"][HEAD.name]
        reseal(root, reference)
        replace = lambda: _other_head(head)  # noqa: E731
        says = "changed after the fixture"
    spec = write_spec(tmp_path, {f'"{HEAD}"': f'"{head}"'})
    assert main(["check", "--spec", str(spec), "--fixtures", str(root)]) == 0  # as it was, it passes
    real = check.verify_referenced_checkpoints

    def verify_then_replace(fixture):
        real(fixture)
        replace()  # after the fixture and its checkpoints were verified, before the candidate loads its weights

    monkeypatch.setattr(check, "verify_referenced_checkpoints", verify_then_replace)
    capsys.readouterr()
    assert main(["check", "--spec", str(spec), "--fixtures", str(root)]) == 2
    captured = capsys.readouterr()
    err = captured.err.replace("\n", " ")
    assert "FixtureChangedError" in err and says in err and "head checkpoint" in err, err
    assert "weights" not in captured.out and "Traceback" not in err


# -- checkpoints are read by their bytes, not their names --------------------------------------------

def test_a_safetensors_file_named_pth_is_read_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    from parity.store.checkpoints import read_checkpoint

    renamed = Path(shutil.copy(EXAMPLE_FIXTURES / "backbone.safetensors", tmp_path / "backbone.pth"))
    state, expected = read_checkpoint(renamed), load_file(EXAMPLE_FIXTURES / "backbone.safetensors")
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    # A pickle is still read by torch.load, and a file that is neither is named as unreadable, not as a pickle.
    assert read_checkpoint(HEAD).keys() == torch.load(HEAD, weights_only=True).keys()
    (tmp_path / "junk.pth").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ParityError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")


# -- any sealed manifest: refused at load, or every reader of it works ------------------------------

def _paths(value, prefix=()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            if prefix or key not in ("files", "manifest_sha256", "schema_version"):
                found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        found += [p for i, inner in enumerate(value[:2]) for p in _paths(inner, (*prefix, i))]
    return found


def _read_everything(fixture) -> None:
    """What the gate reads from a manifest besides running models: config records, structures, numerics, budgets,
    checkpoint records."""
    from parity.explain.fixes import diff_config
    from parity.store.fixtures import verify_referenced_checkpoints
    from parity.libraries import canonical_names, describe_record
    from parity.model.numerics import reduced_precision
    from parity.judge.tolerance import calibrated_tolerance, reference_dtype

    verify_referenced_checkpoints(fixture)
    pipeline, producer = fixture.pipeline, fixture.manifest.get("producer", {})
    recorded = dict(pipeline, versions=producer.get("versions", {}))
    diff_config(recorded, copy.deepcopy(recorded))
    backbone = pipeline.get("backbone", {})
    if "structure" in backbone:
        canonical_names(backbone["structure"], backbone.get("library", "timm"))
    if pipeline.get("preprocess"):
        describe_record(pipeline["preprocess"], source="fuzz")
    reduced_precision(producer.get("numerics"))
    reference_dtype(fixture)
    for stage in ("embedding", "outputs"):
        calibrated_tolerance(dict(fixture.manifest), stage, "float32")
    for entry in fixture.manifest.get("weights", {}).values():
        dict(entry.get("tensors", {}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, list[tuple]]:
    root = Path(shutil.copytree(EXAMPLE_FIXTURES, tmp_path_factory.mktemp("pristine") / "clip_dnn"))
    return root, [p for p in _paths(json.loads((root / "manifest.json").read_text())) if p]


@FUZZ
@given(where=st.integers(0, 10**6), value=JSON)
def test_any_sealed_manifest_is_refused_at_load_or_read_without_error(pristine, tmp_path_factory, where, value):
    root, paths = pristine
    path = paths[where % len(paths)]
    fixture_dir = Path(shutil.copytree(root, tmp_path_factory.mktemp("m") / "fx"))

    def edit(manifest):
        holder = manifest
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value
    reseal(fixture_dir, edit)
    try:
        fixture = load_fixture(fixture_dir)
    except FixtureError:
        return
    try:
        _read_everything(fixture)
    except ParityError:
        pass


def test_a_damaged_fixture_is_still_replaceable_but_nothing_else_is(tmp_path):
    """--force rebuilds a fixture whose seal no longer verifies (the fix its own errors recommend)."""
    from parity.store.fixtures import check_replaceable

    root = _copy_fixture(tmp_path)
    (root / "manifest.json").write_text((root / "manifest.json").read_text().replace('"clip_dnn"', '"edited"'))
    with pytest.raises(FixtureError, match="fails its own checksum"):
        load_fixture(root)
    check_replaceable(root)
    (root / "manifest.json").write_text("{}")
    with pytest.raises(FixtureError, match="is not a fixture parity wrote"):
        check_replaceable(root)


def test_a_processor_config_with_a_zero_crop_size_is_a_spec_error_not_drift(tmp_path, capsys):
    """``crop_size`` 0 in the transformers processor config: exit 2 naming the field, before any image is run."""
    from parity.cli import main
    from tests.support.paths import CLASSIFIER_SPEC, ROOT

    backbone = shutil.copytree(ROOT / "fixtures" / "clip_mlp" / "backbone", tmp_path / "backbone")
    config = json.loads((backbone / "preprocessor_config.json").read_text())
    config["crop_size"] = {"height": 0, "width": 224}
    (backbone / "preprocessor_config.json").write_text(json.dumps(config))
    text = CLASSIFIER_SPEC.read_text().replace('"../fixtures/clip_mlp/backbone"', f'"{backbone}"')
    spec = tmp_path / "spec.toml"
    spec.write_text(text.replace('"../fixtures/', f'"{ROOT / "fixtures"}/'))
    assert main(["check", "--spec", str(spec)]) == 2
    out = capsys.readouterr()
    said = out.out + out.err
    assert "crop_size" in said and "positive integer" in said and "Traceback" not in said
