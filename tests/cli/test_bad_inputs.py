"""A corpus of bad inputs, generated here: every one ends in a clear error with the right exit status.

Across images, specs, fixtures, checkpoints, service logs and command-line arguments: no
traceback, no silent pass (exit 0), no hang (each case under a time limit), bounded memory
(the address space capped at 2 GiB above the imports, peak RSS checked with ``resource``).
The command-line cases share one process per group (`tests.support.bad_input_runner`), since
importing torch costs more than most cases; two more run as ``python -m parity.cli`` itself.
"""

from __future__ import annotations

import functools
import io
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from parity.errors import FixtureError
from tests.support.paths import CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC, ROOT
from tests.support.bad_input_runner import CASE_SECONDS
from tests.support.corpus import Case as CorpusCase, run_corpus
from tests.support.specs import reseal

MEMORY_LIMIT = 2 << 30
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# Round one's cases run at the runner's default time limit (the first import of torch and timm is theirs).
Case = functools.partial(CorpusCase, seconds=CASE_SECONDS)


# -- builders ----------------------------------------------------------------------------------

def _fixture(tmp: Path, edit_files: Callable[[Path], None] | None = None, edit_manifest=None, *,
             seal: bool = True) -> Path:
    root = Path(shutil.copytree(EXAMPLE_FIXTURES, tmp / "fixture"))
    if edit_files:
        edit_files(root)
    if seal:
        reseal(root, edit_manifest)
    return root


def _sealed(root: Path, edit) -> Path:
    """Edit the manifest and recompute only its own seal (the file checksums stay as edited)."""
    from parity.store.fixtures import MANIFEST_DIGEST, manifest_digest

    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _check(root: Path, *extra: str) -> list[str]:
    return ["check", "--spec", str(EXAMPLE_SPEC), "--fixtures", str(root), *extra]


def _meta(edit) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        meta = json.loads((root / "clip_metadata.json").read_text())
        edit(meta)
        (root / "clip_metadata.json").write_text(json.dumps(meta))
    return apply


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header declares ``width`` x ``height`` and whose data is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


BAD_IMAGES = {
    # name in the fixture -> (bytes, what the decode stage must say)
    "astronaut.png": (lambda: _encoded(Image.new("RGB", (1, 20000)), "PNG"), "aspect ratio is too extreme"),
    "brick.png": (lambda: _encoded(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)), "TIFF"),
                  "mode F (32-bit float)"),
    "camera.png": (lambda: _encoded(Image.fromarray(np.arange(-32, 32, dtype=np.int32).reshape(8, 8)), "TIFF"),
                   "mode I (32-bit integer)"),
    "chelsea.png": (lambda: _encoded(Image.new("RGB", (64, 64)), "PNG")[:70], "cannot decode image"),
    "clock_motion.png": (lambda: b"", "cannot decode image"),
    "coffee.png": (lambda: b"a text file with an image's name\n", "cannot decode image"),
    "coins.png": (lambda: _png_header(20000, 20000), "decompression bomb"),
}


def _bad_images(root: Path) -> None:
    for name, (content, _) in BAD_IMAGES.items():
        (root / "images" / name).write_bytes(content())


def _nan_pixels(root: Path) -> None:
    from safetensors.numpy import load_file, save_file

    pixels = load_file(str(root / "pixels.safetensors"))
    first = sorted(pixels)[0]
    pixels[first] = pixels[first].copy()
    pixels[first][0, 0, 0] = np.nan
    save_file(pixels, str(root / "pixels.safetensors"))


def _huge_npy(root: Path) -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 10**6)}
    with open(root / "clip.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 4096)


def _spec(tmp: Path, replacements: dict[str, str], *, raw: bytes | None = None) -> Path:
    from tests.support.specs import write_spec

    path = write_spec(tmp, replacements)
    if raw is not None:
        path.write_bytes(raw)
    return path


def _head_spec(tmp: Path, class_path: str) -> list[str]:
    return ["check", "--spec", str(_spec(tmp, {'"reference.models:MultiLabelRegressionNN"': f'"{class_path}"'}))]


def _classifier_spec(tmp: Path, edit_backbone: Callable[[Path], None]) -> list[str]:
    backbone = Path(shutil.copytree(CLASSIFIER_SPEC.parent.parent / "fixtures" / "clip_mlp" / "backbone",
                                    tmp / "backbone"))
    edit_backbone(backbone)
    text = CLASSIFIER_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    text = text.replace(f'checkpoint = "{ROOT / "fixtures"}/clip_mlp/backbone"', f'checkpoint = "{backbone}"')
    path = tmp / "classifier.toml"
    path.write_text(text)
    return ["check", "--spec", str(path)]


def _config_field(backbone: Path) -> None:
    config = json.loads((backbone / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (backbone / "config.json").write_text(json.dumps(config))


def _zip_bomb(tmp: Path) -> list[str]:
    path = tmp / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(512):  # 512 MiB declared, a few hundred KiB on disk
                member.write(block)
    return ["inspect", str(path)]


def _pickled_code(tmp: Path) -> list[str]:
    import argparse

    import torch

    path = tmp / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1.0), "state_dict": {}}, path)
    return ["inspect", str(path)]


def _garbage_safetensors(tmp: Path) -> list[str]:
    path = tmp / "x.safetensors"
    path.write_bytes(b"\x08\0\0\0\0\0\0\0{garbage")
    return ["inspect", str(path)]


def _log(tmp: Path, lines: list, *, suffix: str = ".jsonl", raw: bytes | None = None) -> list[str]:
    image = str((EXAMPLE_FIXTURES / "images" / "chelsea.png").resolve())
    path = tmp / f"service{suffix}"
    if raw is not None:
        path.write_bytes(raw.replace(b"IMAGE", image.encode()))
    else:
        path.write_text("".join(json.dumps(line).replace("IMAGE", image) + "\n" for line in lines))
    return ["diagnose", "--spec", str(EXAMPLE_SPEC), "--logged", str(path)]


def _ok_line(**fields) -> dict:
    return {"image": "IMAGE", "input_biases": [0, 1], "outputs": [0.1, 0.2, 0.3, 0.4, 0.5], **fields}


def _truncated_image_log(tmp: Path) -> list[str]:
    (tmp / "broken.png").write_bytes(_encoded(Image.new("RGB", (64, 64)), "PNG")[:70])
    return _log(tmp, [_ok_line(), _ok_line(image="broken.png")])


# -- the corpus ----------------------------------------------------------------------------------

IMAGES = [
    Case("seven unreadable or dangerous images in one fixture", lambda t: _check(_fixture(t, _bad_images)),
         expect=(1,), says=tuple(says for _, says in BAD_IMAGES.values())),
]

SPECS = [
    Case("spec not UTF-8", lambda t: ["check", "--spec", str(_spec(t, {}, raw=b"name = \"\xff\xfe\"\n"))],
         says=("not UTF-8",)),
    Case("spec not TOML", lambda t: ["check", "--spec", str(_spec(t, {}, raw=b"[backbone\n"))], says=("not valid TOML",)),
    Case("spec nested too deeply", lambda t: ["check", "--spec", str(_spec(t, {}, raw=b"a = " + b"[" * 50000 + b"]" * 50000))],
         says=("candidate.toml",)),
    Case("head class ':Head'", lambda t: _head_spec(t, ":Head"), says=("[head].class must be",)),
    Case("head class '.m:Head'", lambda t: _head_spec(t, ".m:Head"), says=("[head].class must be",)),
    Case("head module raises at import", lambda t: _head_spec(t, "raising_head:Head"), says=("importing 'raising_head'",),
         sys_path=["MODULES"]),
    Case("head module has a SyntaxError", lambda t: _head_spec(t, "broken_head:Head"), says=("SyntaxError",),
         sys_path=["MODULES"]),
    Case("head class is not an nn.Module", lambda t: _head_spec(t, "plain_head:Head"),
         says=("not a torch.nn.Module subclass",), sys_path=["MODULES"]),
    Case("head constructor raises", lambda t: _head_spec(t, "picky_head:Head"), says=("raised ValueError",),
         sys_path=["MODULES"]),
    Case("head kwargs with a negative width", lambda t: ["check", "--spec", str(_spec(
        t, {"bias_dim = 8": "bias_dim = -8"}))], says=("[head].",)),
    Case("crop_pct = 1e-9", lambda t: ["check", "--spec", str(_spec(t, {"crop_pct = 1.0": "crop_pct = 1e-9"}))],
         says=("crop_pct",)),
    Case("huge input_size", lambda t: ["check", "--spec", str(_spec(
        t, {"input_size = [3, 336, 336]": "input_size = [3, 100000, 100000]"}))], says=("too large",)),
    Case("mean holds nan", lambda t: ["check", "--spec", str(_spec(
        t, {"mean = [0.48145466": "mean = [nan"}))], says=("3 finite numbers",)),
    Case("std holds inf", lambda t: ["check", "--spec", str(_spec(
        t, {"std = [0.26862954": "std = [inf"}))], says=("3 finite numbers",)),
    Case("[runtime].device garbage", lambda t: ["check", "--spec", str(_spec(
        t, {'device = "cpu"': 'device = "cudaXYZ"'}))], says=("not accepted",)),
    Case("--device garbage", lambda t: ["check", "--spec", str(EXAMPLE_SPEC), "--device", "garbage"],
         says=("not accepted",)),
]

FIXTURES = [
    Case("manifest dtype edited", lambda t: _check(_fixture(t, lambda r: (r / "manifest.json").write_text(
        (r / "manifest.json").read_text().replace('"dtype": "float32"', '"dtype": "float16"')), seal=False)),
        says=("fails its own checksum",)),
    Case("manifest is a list", lambda t: _check(_fixture(t, lambda r: (r / "manifest.json").write_text("[1, 2]"),
                                                         seal=False)), says=("expected a JSON object",)),
    Case("manifest nested too deeply", lambda t: _check(_fixture(
        t, lambda r: (r / "manifest.json").write_text("[" * 100000 + "]" * 100000), seal=False)), says=("nests",)),
    Case("manifest file entry is a string", lambda t: _check(_fixture(
        t, edit_manifest=lambda m: m["files"].update({"clip.npy": "abc"}))), says=("must be an object",)),
    Case("manifest bytes negative", lambda t: _check(_sealed(
        _fixture(t), lambda m: m["files"]["outputs.npy"].update(bytes=-1))), says=("non-negative integer",)),
    Case("manifest size differs from the file", lambda t: _check(_sealed(
        _fixture(t), lambda m: m["files"]["outputs.npy"].update(bytes=12))), says=("size mismatch",)),
    Case("manifest schema_version a string", lambda t: _check(_fixture(
        t, edit_manifest=lambda m: m.update(schema_version="1"))), says=("schema_version",)),
    Case("clip.npy not listed", lambda t: _check(_fixture(
        t, edit_manifest=lambda m: m["files"].pop("clip.npy"))), says=("does not list clip.npy",)),
    Case("pixels.safetensors not listed", lambda t: _check(_fixture(
        t, edit_manifest=lambda m: m["files"].pop("pixels.safetensors"))), says=("does not list pixels.safetensors",)),
    Case("NaN in golden pixels", lambda t: _check(_fixture(t, _nan_pixels)), says=("NaN or infinite",)),
    Case(".npy declares a huge shape", lambda t: _check(_fixture(t, _huge_npy)), says=("declares shape",)),
    Case("corrupt pixels.safetensors", lambda t: _check(_fixture(
        t, lambda r: (r / "pixels.safetensors").write_bytes(b"\xff" * 64))), says=("not a valid safetensors file",)),
    Case("metadata rows is a string", lambda t: _check(_fixture(t, _meta(lambda m: m.update(rows="abc")))),
         says=("'rows' list",)),
    Case("metadata row is a list", lambda t: _check(_fixture(t, _meta(lambda m: m["rows"].__setitem__(2, [1])))),
         says=("row 2 must be a JSON object",)),
    Case("metadata nested too deeply", lambda t: _check(_fixture(
        t, lambda r: (r / "clip_metadata.json").write_text("[" * 100000 + "]" * 100000))), says=("nests",)),
    Case("ragged input_biases", lambda t: _check(_fixture(
        t, _meta(lambda m: m["rows"][3].update(input_biases=[1])))), says=("every row needs the same number",)),
    Case("missing input_biases", lambda t: _check(_fixture(
        t, _meta(lambda m: m["rows"][3].pop("input_biases")))), says=("has no 'input_biases'",)),
    Case("float input_biases", lambda t: _check(_fixture(
        t, _meta(lambda m: m["rows"][3].update(input_biases=[1.7, 0])))), says=("list of integers",)),
    Case("image outside the fixture", lambda t: _check(_fixture(
        t, _meta(lambda m: m["rows"][0].update(image="../outside.png")))), says=("outside the fixture directory",)),
    Case("fixture directory missing", lambda t: _check(t / "nowhere"), says=("not found",)),
    Case("fixture path is a file", lambda t: _check(Path(shutil.copy(EXAMPLE_SPEC, t / "file"))), says=("not found",)),
]

CHECKPOINTS = [
    Case("zip .pth declaring 512 MiB", _zip_bomb, says=("compressed",)),
    Case("pickle that needs code", _pickled_code, expect=(1, 2), says=("weights_only",)),
    Case("garbage .safetensors", _garbage_safetensors, says=("cannot read checkpoint",)),
    Case("inspect --kwargs '[1,2]'", lambda t: ["inspect", str(EXAMPLE_FIXTURES / "dnnV1_model_best.pth"), "--class",
                                                "reference.models:MultiLabelRegressionNN", "--kwargs", "[1, 2]"],
         says=("kwargs must be a mapping",)),
    Case("inspect --kwargs not JSON", lambda t: ["inspect", str(EXAMPLE_FIXTURES / "dnnV1_model_best.pth"), "--class",
                                                 "reference.models:MultiLabelRegressionNN", "--kwargs", "{nope"],
         says=("not valid JSON",)),
    Case("transformers config.json field wrongly typed", lambda t: _classifier_spec(t, _config_field),
         says=("transformers",)),
    Case("transformers directory without config.json",
         lambda t: _classifier_spec(t, lambda b: (b / "config.json").unlink()), says=("has no config.json",)),
]

LOGS = [
    Case("log image not a string", lambda t: _log(t, [_ok_line(image=3)]), says=("line 1: 'image' must be",)),
    Case("log input_biases a string", lambda t: _log(t, [_ok_line(), _ok_line(input_biases="0,1")]),
         says=("line 2: 'input_biases' must be a list of integers",)),
    Case("log input_biases missing on one line", lambda t: _log(t, [_ok_line(), {
        k: v for k, v in _ok_line().items() if k != "input_biases"}]), says=("line 2: 'input_biases' is missing",)),
    Case("log input_biases floats", lambda t: _log(t, [_ok_line(input_biases=[1.7, 0])]), says=("list of integers",)),
    Case("log input_biases width", lambda t: _log(t, [_ok_line(), _ok_line(input_biases=[0, 1, 2])]),
         says=("line 2: 3 input_biases",)),
    Case("log embedding width", lambda t: _log(t, [_ok_line(embedding=[0.0] * 64), _ok_line(embedding=[0.0] * 63)]),
         says=("line 2: 'embedding' has 63 values",)),
    Case("log unreadable image", _truncated_image_log, says=("line 2: cannot decode image",)),
    Case("log NUL bytes in CSV", lambda t: _log(t, [], suffix=".csv", raw=b"image,outputs\nIMAGE,\"[0.1]\"\n\0\0,x\n"),
         says=("not valid CSV",)),
    Case("log not UTF-8", lambda t: _log(t, [], raw=b'{"image": "IMAGE", "outputs": [1.0]}\n\xff\xfe\n'),
         says=("not UTF-8",)),
    Case("log empty", lambda t: _log(t, []), says=("holds no samples",)),
]

CLI = [
    Case("--json into a missing directory", lambda t: ["check", "--spec", str(EXAMPLE_SPEC), "--json",
                                                       "/nonexistent_dir/r.json"], says=("does not exist",)),
    Case("calibrate --margin inf", lambda t: ["calibrate", "--spec", str(EXAMPLE_SPEC), "--fixtures",
                                              str(_fixture(t)), "--margin", "inf"], says=("margin must be",)),
    Case("calibrate --margin nan", lambda t: ["calibrate", "--spec", str(EXAMPLE_SPEC), "--fixtures",
                                              str(_fixture(t)), "--margin", "nan"], says=("margin must be",)),
    Case("calibrate --margin 1e9", lambda t: ["calibrate", "--spec", str(EXAMPLE_SPEC), "--fixtures",
                                              str(_fixture(t)), "--margin", "1e9"], says=("margin must be",)),
    Case("--spec missing", lambda t: ["check", "--spec", str(t / "missing.toml")], says=("spec file not found",)),
    Case("unknown command", lambda t: ["launch"], says=("invalid choice",)),
]

MODULES = {
    "raising_head": "raise RuntimeError('configuration server unreachable')\n",
    "broken_head": "def Head(:\n",
    "plain_head": "def Head(**kwargs):\n    return kwargs\n",
    "picky_head": ("import torch\n\nclass Head(torch.nn.Module):\n"
                   "    def __init__(self, **kwargs):\n        super().__init__()\n"
                   "        raise ValueError('embedding_dim must be positive')\n"),
}
GROUPS = {"images+specs+checkpoints": IMAGES + SPECS + CHECKPOINTS, "fixtures+logs+cli": FIXTURES + LOGS + CLI}


# The case tables of both rounds of the corpus, by module (a path under tests/): each entry is one kind of bad input.
CORPUS_TABLES = {
    "cli/test_bad_inputs.py": ("BAD_IMAGES", "SPECS", "FIXTURES", "CHECKPOINTS", "LOGS", "CLI"),
    "cli/test_bad_inputs_round2.py": ("LOG_CASES", "HOSTILE"),
    "store/test_bad_inputs.py": ("FREEZE_TARGETS", "FREEZE_INPUTS", "CHECKS"),
    "runners/test_bad_inputs.py": ("CASES",),
}


def test_the_corpus_is_broad():
    """At least 100 kinds over both rounds (counted from the modules' case tables, without importing them)."""
    import ast

    kinds = {}
    for module, tables in CORPUS_TABLES.items():
        tree = ast.parse((ROOT / "tests" / module).read_text())
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id in tables:
                value = node.value
                kinds[f"{module}:{target.id}"] = len(value.keys) if isinstance(value, ast.Dict) else len(value.elts)
    assert set(kinds) == {f"{m}:{t}" for m, ts in CORPUS_TABLES.items() for t in ts}, kinds
    assert len(BAD_IMAGES) + len(SPECS) + len(FIXTURES) + len(CHECKPOINTS) + len(LOGS) + len(CLI) >= 40
    assert sum(kinds.values()) >= 100, kinds


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_bad_input_ends_in_a_clear_error(tmp_path, group):
    problems = run_corpus(GROUPS[group], tmp_path, modules=MODULES, peak_rss=MEMORY_LIMIT)
    assert not problems, "\n\n".join(problems)


def _cap_memory() -> None:
    # torch maps a few GiB of address space at import; 6 GiB leaves it ~2 GiB to allocate.
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30 if hard == resource.RLIM_INFINITY else min(6 << 30, hard), hard))


@pytest.mark.parametrize(("argv", "says"), [
    (["check", "--spec", str(EXAMPLE_SPEC), "--json", "/nonexistent_dir/r.json"], "does not exist"),
    (["calibrate", "--spec", str(EXAMPLE_SPEC), "--margin", "inf", "--dry-run"], "margin must be"),
])
def test_the_command_line_itself_exits_2_without_a_traceback(argv, says):
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=_cap_memory)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and says in proc.stderr
    assert "PARITY" not in proc.stdout


# -- generated inputs, in process ---------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return Path(shutil.copytree(EXAMPLE_FIXTURES, tmp_path_factory.mktemp("fuzz") / "clip_dnn"))


@FUZZ
@given(key=st.sampled_from(["schema_version", "files", "calibration", "pipeline", "weights", "producer"]), value=JSON)
def test_any_manifest_value_loads_or_is_refused_as_a_fixture_error(pristine, tmp_path_factory, key, value):
    from parity.commands.calibrate import calibrated_tolerance
    from parity.store.fixtures import load_fixture

    root = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("m") / "fx"))
    reseal(root, lambda m: m.update({key: value}))
    try:
        fixture = load_fixture(root)
        for stage in ("embedding", "outputs"):
            calibrated_tolerance(dict(fixture.manifest), stage, "float32")
    except FixtureError:
        pass


@FUZZ
@given(row=st.integers(0, 16), field_name=st.sampled_from(["image", "input_biases", "labels", "row"]), value=JSON)
def test_any_metadata_value_loads_or_is_refused_as_a_fixture_error(pristine, tmp_path_factory, row, field_name, value):
    from parity.store.fixtures import load_fixture

    root = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("r") / "fx"))
    _meta(lambda m: m["rows"][row].update({field_name: value}))(root)
    reseal(root)
    try:
        fixture = load_fixture(root)
    except FixtureError:
        return
    assert all(type(b) is int for r in fixture.rows for b in r.input_biases)  # never truncated floats


@FUZZ
@given(lines=st.lists(st.dictionaries(st.sampled_from(["image", "input_biases", "embedding", "outputs"]), JSON,
                                      max_size=4), min_size=1, max_size=4))
def test_any_log_line_loads_or_is_refused_as_a_fixture_error(tmp_path_factory, lines):
    from parity.store.fixtures import load_logged_samples

    path = tmp_path_factory.mktemp("log") / "service.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        load_logged_samples(path)
    except FixtureError:
        pass


@FUZZ
@given(content=st.binary(max_size=256) | st.builds(lambda cut: _encoded(Image.new("RGB", (16, 16)), "PNG")[:cut],
                                                      st.integers(0, 80)))
def test_any_bytes_decode_or_are_refused_as_a_fixture_error(tmp_path_factory, content):
    from parity.store.images import decode_image

    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(content)
    try:
        image, _ = decode_image(path)
    except FixtureError:
        return
    assert image.mode == "RGB"


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


@FUZZ
@given(values=st.lists(st.tuples(FLOATS, FLOATS), min_size=1, max_size=12),
       rtol=st.floats(0, 1e3) | st.just(math.inf))
def test_comparison_terminates_on_any_numbers(values, rtol):
    from parity.judge.arrays import compare_arrays
    from parity.results import Tolerance

    cand = np.array([[a for a, _ in values]])
    ref = np.array([[b for _, b in values]])
    result = compare_arrays(cand, ref, tolerance=Tolerance(atol=0.0, rtol=rtol), cosine=True)
    finite = np.isfinite(cand) & np.isfinite(ref)
    assert result.nonfinite >= int((~np.isfinite(np.abs(cand - ref))).sum())
    if finite.all() and np.isfinite(rtol * np.abs(ref)).all():
        assert (np.abs(cand - ref) <= result.required_atol + rtol * np.abs(ref)).all()
