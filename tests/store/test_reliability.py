"""Bad input, tampering, interruption, concurrency and numeric properties."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from parity.commands.check import run_check
from parity.errors import FixtureError
from parity.store.fixtures import load_fixture, stage_fixture
from parity.store.images import decode_image
from parity.model.pipeline import build_pipeline
from parity.results import Status
from tests.support.paths import EXAMPLE_FIXTURES, ROOT
from tests.support.specs import reseal

PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pipeline(example_spec):
    return build_pipeline(example_spec)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(EXAMPLE_FIXTURES)


# -- images ----------------------------------------------------------------------------------

def _png(mode: str, size=(20, 10), **save) -> bytes:
    image = Image.new(mode, size)
    if mode == "P":
        image.putpalette([i % 256 for i in range(768)])
        save.setdefault("transparency", 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode != "CMYK" else "JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "cannot decode image"),
    (b"just some text, not an image", "cannot decode image"),
    (_png("RGB", (64, 64))[:60], "cannot decode image"),
    (b"\xff\xd8\xff\xe0" + bytes(40), "cannot decode image"),
])
def test_unreadable_files_raise_a_fixture_error(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(FixtureError, match=message):
        decode_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10,000 pixels: past the warning threshold
    with pytest.raises(FixtureError, match="decompression bomb"):
        decode_image(path)


@pytest.mark.parametrize(("mode", "note"), [
    ("L", "L -> RGB"), ("LA", "LA -> RGB (alpha dropped)"), ("RGBA", "RGBA -> RGB (alpha dropped)"),
    ("P", "P with transparency -> RGBA -> RGB (alpha dropped)"), ("CMYK", "CMYK -> RGB (naive CMYK inversion)"),
    ("I;16", "I;16 -> RGB (16-bit scaled to 8-bit)"), ("RGB", ""),
])
def test_odd_but_valid_modes_are_converted_and_recorded(tmp_path, pipeline, mode, note):
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    path.write_bytes(_png(mode))
    image, recorded = decode_image(path)
    assert image.mode == "RGB" and recorded == note
    assert torch.isfinite(pipeline.preprocess(image)).all()


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 900)])
def test_tiny_and_extreme_aspect_images_preprocess_to_the_model_size(tmp_path, pipeline, size):
    path = tmp_path / "odd.png"
    path.write_bytes(_png("RGB", size))
    pixels = pipeline.preprocess(decode_image(path)[0])
    assert tuple(pixels.shape) == (3, 336, 336) and torch.isfinite(pixels).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(decode_image(path)[0])[0, 0, 0] == 128  # clipping would give 255


def test_an_unreadable_sample_fails_the_gate_and_the_rest_still_run(example_spec, fixture_copy):
    (fixture_copy / "images" / "coins.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    reseal(fixture_copy)
    report = run_check(example_spec, fixtures=fixture_copy)
    decode = report.stage("decode")
    assert decode.status is Status.FAIL and not report.passed
    assert [name for name, _ in decode.sample_errors] == ["coins.png"]
    assert "cannot decode image" in decode.sample_errors[0][1]
    assert report.stage("embedding").status is Status.PASS
    assert report.stage("embedding").comparison.reference_shape == (16, 64)


def test_decode_stage_records_conversions(example_spec):
    decode = run_check(example_spec).stage("decode")
    assert decode.headline == "17/17 decoded, 10 converted to RGB"
    assert "logo.png: RGBA -> RGB (alpha dropped)" in decode.notes


def test_dropout_left_active_is_detected(example_spec):
    report = run_check(example_spec.replace(head={"class_path": "tests.support.heads:DropoutAlwaysOnNN"}))
    assert report.stage("head").status is Status.FAIL
    assert "dropout or another random layer is active" in report.stage("head").headline


def test_nan_in_candidate_outputs_fails(example_spec):
    report = run_check(example_spec.replace(head={"class_path": "tests.support.heads:NanHeadNN"}))
    head = report.stage("head")
    assert head.status is Status.FAIL and head.comparison.nonfinite > 0


# -- fixtures: regeneration ------------------------------------------------------------------

def _write(dest: Path, text: str, *, force: bool = True) -> None:
    with stage_fixture(dest, force=force) as stage:
        (stage.path / "data.txt").write_text(text)


def test_regeneration_keeps_the_previous_version(tmp_path):
    dest = tmp_path / "fx"
    _write(dest, "one", force=False)
    _write(dest, "two")
    assert (dest / "data.txt").read_text() == "two"
    assert (tmp_path / ".fx.previous" / "data.txt").read_text() == "one"
    assert json.loads((dest / "manifest.json").read_text())["files"]["data.txt"]["bytes"] == 3


def test_killed_regeneration_leaves_the_old_fixture_intact(tmp_path):
    dest = tmp_path / "fx"
    _write(dest, "old", force=False)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    script = (
        "import os, signal, sys\n"
        "from parity.store.fixtures import stage_fixture\n"
        f"with stage_fixture({str(dest)!r}, force=True) as stage:\n"
        "    (stage.path / 'data.txt').write_text('half written')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    load = json.loads((dest / "manifest.json").read_text())
    assert load["files"]["data.txt"]["bytes"] == 3


def test_concurrent_regeneration_is_refused(tmp_path):
    import fcntl

    dest = tmp_path / "fx"
    _write(dest, "one", force=False)
    with open(tmp_path / ".fx.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FixtureError, match="another process is regenerating"):
            _write(dest, "two")
    assert (dest / "data.txt").read_text() == "one"


# -- concurrency of the gate suites ------------------------------------------------------------

def _outcomes(*args: str) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/parity/test_gate.py", "-q", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line][-1]
    counts = {}
    for part in summary.strip("= ").split(" in ")[0].split(", "):
        number, word = part.split()
        counts[word] = int(number)
    return counts


def test_xdist_gives_the_same_verdicts_as_a_serial_run():
    assert _outcomes("-n", "2") == _outcomes() == {"passed": 9}


# -- properties ------------------------------------------------------------------------------

@PROPERTY
@given(st.permutations(list(range(17))), st.integers(min_value=1, max_value=17))
def test_batch_composition_does_not_move_a_sample(pipeline, fixture, order, size):
    rows = order[:size]
    pixels = torch.stack([pipeline.preprocess(fixture.rows[i].image) for i in rows])
    got = pipeline.embed(pixels).numpy()
    np.testing.assert_allclose(got, fixture.embeddings[rows], rtol=1.3e-6, atol=1e-5)


@PROPERTY
@given(st.permutations(list(range(17))))
def test_permuting_a_batch_permutes_the_head_outputs(pipeline, fixture, order):
    biases = np.array([row.input_biases for row in fixture.rows])
    straight = pipeline.run_head(fixture.embeddings, biases).numpy()
    permuted = pipeline.run_head(fixture.embeddings[order], biases[order]).numpy()
    np.testing.assert_allclose(permuted, straight[order], rtol=1.3e-6, atol=1e-6)


@PROPERTY
@given(
    st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "I;16"]),
    st.integers(min_value=1, max_value=48),
    st.integers(min_value=1, max_value=48),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_preprocessing_never_produces_nan(pipeline, tmp_path_factory, mode, width, height, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        channels = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "P": 1}[mode]
        data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(data[..., 0] if channels == 1 else data, mode="L" if channels == 1 else mode)
        if mode == "P":
            image = image.convert("P")
    path = tmp_path_factory.mktemp("prop") / "image.png"
    image.save(path)
    assert torch.isfinite(pipeline.preprocess(decode_image(path)[0])).all()


@PROPERTY
@given(st.floats(min_value=1e-7, max_value=1.0), st.floats(min_value=1.0, max_value=100.0))
def test_verdicts_are_monotone_in_tolerance(fixture, atol, factor):
    from parity.judge.arrays import compare_arrays
    from parity.results import Tolerance

    noisy = fixture.embeddings + np.float32(1e-4) * np.sign(fixture.embeddings)
    tight = compare_arrays(noisy, fixture.embeddings, tolerance=Tolerance(atol=atol, rtol=0.0))
    loose = compare_arrays(noisy, fixture.embeddings, tolerance=Tolerance(atol=atol * factor, rtol=0.0))
    assert loose.mismatched <= tight.mismatched
    assert not tight.passed or loose.passed
    swapped = compare_arrays(fixture.embeddings, noisy, tolerance=Tolerance(atol=atol, rtol=0.0), cosine=True)
    forward = compare_arrays(noisy, fixture.embeddings, tolerance=Tolerance(atol=atol, rtol=0.0), cosine=True)
    assert swapped.max_abs == forward.max_abs and swapped.min_cosine == pytest.approx(forward.min_cosine)


# -- fixtures: crash consistency, injected at every step ---------------------------------------

WRITE_STEPS = ("staged", "manifest-written", "sealed", "between-renames", "swapped")


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.tmp-*")) + sorted(
        p.name for p in (parent / name).glob(".manifest.json.*"))


def _regenerate_in_child(dest: Path, text: str, fault: str) -> subprocess.CompletedProcess:
    script = (
        "from parity.store.fixtures import stage_fixture\n"
        f"with stage_fixture({str(dest)!r}, force=True) as stage:\n"
        f"    (stage.path / 'data.txt').write_text({text!r})\n"
    )
    env = {**os.environ, "PARITY_FAULT_AT": fault, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=120, capture_output=True)


def _data(dest: Path) -> str:
    from parity.store.fixtures import _read_manifest, _read_verified

    manifest = _read_manifest(dest)  # sealed, and every file verifies
    return _read_verified(dest, "data.txt", manifest["files"]["data.txt"]).decode()


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_a_regeneration_killed_at_any_step_is_recovered_by_the_next_reader(tmp_path, step):
    from parity.store.fixtures import recover_fixture

    dest = tmp_path / "fx"
    _write(dest, "old", force=False)
    proc = _regenerate_in_child(dest, "new", step)
    assert proc.returncode == 99, proc.stderr.decode()  # the injected fault, not an error
    recover_fixture(dest)  # what load_fixture and every writer do first
    # Killed before the swap: the old version; after the manifest of the new one is sealed: either
    # is acceptable, never neither, never a mix.
    expected = {"staged": {"old"}, "manifest-written": {"old"}, "sealed": {"old"},
                "between-renames": {"new", "old"}, "swapped": {"new"}}[step]
    assert _data(dest) in expected
    assert _leftovers(tmp_path, "fx") == []
    _write(dest, "after")  # and the next regeneration works
    assert _data(dest) == "after"


def test_a_kill_between_the_renames_rolls_forward_to_the_sealed_new_version(tmp_path):
    dest = tmp_path / "fx"
    _write(dest, "old", force=False)
    assert _regenerate_in_child(dest, "new", "between-renames").returncode == 99
    assert not dest.exists()  # the state the kill leaves
    from parity.store.fixtures import load_fixture as load  # the reader recovers on its own

    with pytest.raises(FixtureError, match="does not list"):  # a toy fixture, but present and verified
        load(dest)
    assert _data(dest) == "new" and _leftovers(tmp_path, "fx") == []


def test_a_kill_while_the_manifest_is_updated_keeps_the_old_manifest(fixture_copy):
    before = (fixture_copy / "manifest.json").read_bytes()
    script = ("from parity.store.fixtures import update_manifest\n"
              f"update_manifest({str(fixture_copy)!r}, 'calibration', {{'float64': {{}}}}, merge=True)\n")
    env = {**os.environ, "PARITY_FAULT_AT": "manifest-written", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=120, capture_output=True)
    assert proc.returncode == 99, proc.stderr.decode()
    assert any(fixture_copy.glob(".manifest.json.*"))  # the half-written temp file
    load_fixture(fixture_copy)
    assert (fixture_copy / "manifest.json").read_bytes() == before
    assert not any(fixture_copy.glob(".manifest.json.*"))


def test_a_regeneration_holds_its_lock_from_start_to_end(tmp_path):
    dest = tmp_path / "fx"
    _write(dest, "one", force=False)
    with stage_fixture(dest, force=True) as stage:
        (stage.path / "data.txt").write_text("two")
        script = ("from parity.store.fixtures import stage_fixture\n"
                  f"with stage_fixture({str(dest)!r}, force=True) as s:\n"
                  "    (s.path / 'data.txt').write_text('three')\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 1 and "another process is regenerating" in proc.stderr
    assert _data(dest) == "two"


def test_concurrent_manifest_updates_all_survive(fixture_copy):
    script = ("import sys, time\n"
              "from parity.store.fixtures import update_manifest\n"
              "start = float(sys.argv[2])\n"
              "time.sleep(max(0.0, start - time.time()))\n"
              f"update_manifest({str(fixture_copy)!r}, 'calibration', {{sys.argv[1]: {{'writer': sys.argv[1]}}}}, "
              "merge=True)\n")
    start = str(__import__("time").time() + 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, f"w{i}", start], cwd=ROOT, env=env) for i in range(6)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    assert sorted(load_fixture(fixture_copy).manifest["calibration"]) == [f"w{i}" for i in range(6)]


def test_concurrent_calibrations_of_two_dtypes_both_survive(fixture_copy):
    script = ("import sys\n"
              "from parity.commands.calibrate import Run, calibrate\n"
              "from parity.spec import load_spec\n"
              f"spec = load_spec({str(ROOT / 'specs' / 'clip_dnn.toml')!r})\n"
              "calibrate(spec.replace(runtime={'dtype': sys.argv[1]}), "
              f"fixtures={str(fixture_copy)!r}, runs=[Run(17, 1)])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, dtype], cwd=ROOT, env=env)
             for dtype in ("float32", "float64")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert sorted(load_fixture(fixture_copy).manifest["calibration"]) == ["float32", "float64"]


def _regenerate_with_other_data(root: Path) -> None:
    """Swap in a new version of ``root`` whose embeddings (and one image) differ, as a regeneration would."""
    with stage_fixture(root, force=True) as stage:
        shutil.copytree(root, stage.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        embeddings = np.load(root / "clip.npy")
        np.save(stage.path / "clip.npy", embeddings + np.float32(0.5))
        (stage.path / "images" / "coins.png").write_bytes(_png("RGB", (40, 40)))
        manifest = json.loads((root / "manifest.json").read_text())
        stage.manifest.update({k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")})


def test_calibration_racing_a_regeneration_writes_nothing(example_spec, fixture_copy, monkeypatch):
    from parity.commands import calibrate as calibration
    from parity.errors import FixtureChangedError

    def regenerate_midway(done, total):
        if done == 1:
            _regenerate_with_other_data(fixture_copy)

    with pytest.raises(FixtureChangedError):
        calibration.calibrate(example_spec, fixtures=fixture_copy, runs=[calibration.Run(17, 1), calibration.Run(4, 1)],
                              progress=regenerate_midway)
    assert "calibration" not in load_fixture(fixture_copy).manifest


def test_check_racing_a_regeneration_never_mixes_versions(example_spec, fixture_copy, monkeypatch):
    from parity.commands import check
    from parity.errors import FixtureChangedError

    real = check.load_fixture

    def load_then_regenerate(root):
        loaded = real(root)
        _regenerate_with_other_data(fixture_copy)  # the tree changes after the arrays were read
        return loaded

    monkeypatch.setattr(check, "load_fixture", load_then_regenerate)
    with pytest.raises(FixtureChangedError, match="changed after its fixture was verified"):
        check.run_check(example_spec, fixtures=fixture_copy)


# -- service logs: streamed ----------------------------------------------------------------------

# The peak is this process's own (VmHWM, reset first): ru_maxrss of a child can carry the RSS of the worker
# that started it.
_LOG_SCRIPT = """
import sys
from pathlib import Path
Path("/proc/self/clear_refs").write_text("5")
from parity.errors import FixtureError
from parity.store.fixtures import load_logged_samples
try:
    logged = load_logged_samples(sys.argv[1])
    print("rows", len(logged.rows), logged.outputs.shape)
except FixtureError as e:
    print("error", e)
peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
print("maxrss", int(peak.split()[1]) * 1024)
"""


@pytest.mark.parametrize("bad_line", [199_998])
def test_a_200k_line_log_is_read_in_bounded_memory_and_bad_lines_are_named(tmp_path, bad_line):
    image = str((EXAMPLE_FIXTURES / "images" / "chelsea.png").resolve())
    good = json.dumps({"image": image, "input_biases": [0, 1], "outputs": [0.125] * 5}) + "\n"
    with open(tmp_path / "service.jsonl", "w") as f:
        for line in range(1, 200_001):
            f.write(good if line != bad_line else good.replace("[0, 1]", "[0, 1, 2]"))
    proc = subprocess.run([sys.executable, "-c", _LOG_SCRIPT, str(tmp_path / "service.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    if bad_line is None:
        assert "rows 200000 (200000, 5)" in proc.stdout
    else:
        assert f"line {bad_line}: 3 input_biases, but earlier lines have 2" in proc.stdout
    peak = int(proc.stdout.split("maxrss ")[1])
    assert peak < 2 << 30, f"{peak / 2**30:.2f} GiB"


# -- verdicts on bad input -----------------------------------------------------------------------

def test_a_decode_failure_is_not_called_acceptable_by_the_decisions_gate(example_spec, fixture_copy):
    from parity.report.console import verdict_line

    (fixture_copy / "images" / "coins.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    reseal(fixture_copy)
    report = run_check(example_spec.replace(decisions={"gate": "decisions"}), fixtures=fixture_copy)
    line = verdict_line(report)
    assert not report.passed and "would accept" not in line and "Accepted" not in line
    assert "decode" in line


def test_an_absent_backbone_checkpoint_is_said_and_fails_the_weights_stage(example_spec):
    report = run_check(example_spec.replace(backbone={"checkpoint": None}))
    assert "no [backbone].checkpoint, so no weights were loaded" in report.stage("load").headline
    weights = report.stage("weights")
    assert weights.status is Status.FAIL and not report.passed
    assert weights.headline.startswith("no checkpoint loaded for backbone (")


def test_diagnosis_leaves_unreadable_samples_out_of_its_probes_and_names_them(example_spec, fixture_copy):
    from parity.commands.diagnose import diagnose

    (fixture_copy / "images" / "coins.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    reseal(fixture_copy)
    result = diagnose(example_spec.replace(preprocess={"interpolation": "bilinear"}), fixtures=fixture_copy)
    (excluded,) = [n for n in result.notes if n.startswith("excluded from the probes")]
    assert "coins.png" in excluded and "cannot decode" in excluded
    assert "coins.png" not in result.affected and result.total == 16
    assert [c.toml() for c in result.fix] == ['[preprocess].interpolation = "bicubic"']
    # The gate still fails on the unreadable sample with the fix: never "confirmed", and said why.
    assert not result.confirmed
    (why,) = [n for n in result.notes if "every readable sample passes" in n]
    assert "still fails" in why and "1 sample(s) cannot be decoded" in why
