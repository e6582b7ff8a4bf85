"""`parity check`: exit 0 on parity, 1 on drift, 2 on usage/config errors, with messages that say why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parity.cli import EXIT_DRIFT, EXIT_INTERNAL, EXIT_PASS, EXIT_USAGE, main
from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC, ROOT
from tests.support.specs import reseal, write_spec


def test_check_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--json", str(out)]) == EXIT_PASS
    assert "PARITY: the candidate reproduces the reference." in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["first_failure"] is None
    assert [s["stage"] for s in report["stages"]] == ["load", "weights", "decode", "pixels", "embedding", "head", "outputs", "decisions"]


def test_drift_exits_1_and_names_the_stage(tmp_path, capsys):
    spec = write_spec(tmp_path, {'interpolation = "bicubic"': 'interpolation = "bilinear"'})
    out = tmp_path / "report.json"
    assert main(["check", "--spec", str(spec), "--json", str(out)]) == EXIT_DRIFT
    text = capsys.readouterr().out
    assert "DRIFT WITHOUT DECISION FLIPS: the numbers moved beyond tolerance (first at pixels)" in text
    assert 'Fix: set [preprocess].interpolation = "bicubic"' in text
    assert json.loads(out.read_text())["first_failure"] == "pixels"


def test_missing_spec_exits_2(tmp_path, capsys):
    assert main(["check", "--spec", str(tmp_path / "nope.toml")]) == EXIT_USAGE
    assert f"spec file not found: {tmp_path / 'nope.toml'}. Pass an existing TOML file with --spec." in capsys.readouterr().err


def test_misspelled_field_exits_2(tmp_path, capsys):
    spec = write_spec(tmp_path, {"interpolation =": "interpolaton ="})
    assert main(["check", "--spec", str(spec)]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown field [preprocess].interpolaton. Did you mean 'interpolation'?" in err


def test_row_count_mismatch_exits_2(tmp_path, fixture_copy, capsys):
    meta_path = fixture_copy / "clip_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["rows"].pop()
    meta_path.write_text(json.dumps(meta))
    reseal(fixture_copy)
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--fixtures", str(fixture_copy)]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert f"{fixture_copy / 'clip.npy'} has 17 rows but clip_metadata.json lists 16 samples." in err
    assert "every row of the array must map to one metadata entry" in err


def test_corrupted_fixture_is_refused_with_exit_2(fixture_copy, capsys):
    path = fixture_copy / "clip.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--fixtures", str(fixture_copy)]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert f"checksum mismatch for {path}" in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["chekc"])
    assert exc.value.code == EXIT_USAGE


def test_console_script_exit_code_on_drift(tmp_path):
    """The installed entry point, in a fresh process, as CI runs it."""
    spec = write_spec(tmp_path, {'extract = "pre_logits"': 'extract = "forward"'})
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "check", "--spec", str(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == EXIT_DRIFT, proc.stderr
    assert "DRIFT: first drifted stage: embedding." in proc.stdout


def test_explain_preprocess_names_the_fields_and_measures_images(tmp_path, capsys):
    pytest.importorskip("open_clip")
    out = tmp_path / "explain.json"
    code = main(["explain-preprocess", "timm:vit_base_patch32_clip_quickgelu_224.openai", "open_clip:ViT-B-32-quickgelu",
                 "--images", str(EXAMPLE_FIXTURES / "images" / "coins.png"), "--json", str(out)])
    assert code == EXIT_DRIFT
    text = capsys.readouterr().out
    assert "resize_size" in text and "248" in text and "DIFFERENT: 3 field(s) differ; 1 of 1 images differ." in text
    data = json.loads(out.read_text())
    assert data["identical"] is False
    assert [d["field"] for d in data["differences"]] == ["resize_size", "crop_pct", "convert_rgb"]
    assert data["images"][0]["name"] == "coins.png" and data["images"][0]["max_abs"] > 1


def test_explain_preprocess_of_a_spec_and_its_fixture_is_identical(capsys):
    assert main(["explain-preprocess", str(CLASSIFIER_SPEC), str(CLASSIFIER_FIXTURES)]) == EXIT_PASS
    assert "IDENTICAL: no field differs; 0 of 18 images differ." in capsys.readouterr().out


def test_explain_preprocess_refuses_an_unknown_source(capsys):
    assert main(["explain-preprocess", "tf:resnet", "timm:vit_base_patch32_clip_quickgelu_224.openai"]) == EXIT_USAGE
    assert "unknown preprocessing source prefix 'tf'" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_exception_exits_3_with_one_line(tmp_path, capsys, monkeypatch, debug):
    """An exception parity did not raise on purpose (a defect) is exit 3, never the drift status 1."""
    import parity.commands.check

    def defect(*args, **kwargs):
        raise ZeroDivisionError("division by zero in the user's head")

    monkeypatch.setattr(parity.commands.check, "run_check", defect)
    argv = (["--debug"] if debug else []) + ["check", "--spec", str(EXAMPLE_SPEC)]
    assert main(argv) == EXIT_INTERNAL == 3
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "internal error:" in line)
    assert line.startswith("internal error: ZeroDivisionError: division by zero in the user's head (exit 3")
    assert ("Traceback" in err) is debug
    assert "rerun with parity --debug" in line if not debug else "the traceback is above" in line
