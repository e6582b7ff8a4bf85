"""Calibration: budgets from the reference's own noise pass benign perturbations and fail every drift."""

from __future__ import annotations

import json

import pytest
import torch

from parity.calibrate import Run, calibrate
from parity.check import run_check
from parity.errors import SpecError
from parity.fixtures import load_fixture
from parity.results import Status, Tolerance
from tests.test_diagnose import DRIFTS


@pytest.fixture(scope="module")
def calibrated(example_spec, tmp_path_factory):
    import shutil

    from tests.conftest import EXAMPLE_FIXTURES

    root = shutil.copytree(EXAMPLE_FIXTURES, tmp_path_factory.mktemp("calibrated") / "clip_dnn")
    calibrate(example_spec, fixtures=root)
    return root


def test_calibration_is_recorded_without_breaking_checksums(calibrated):
    entry = load_fixture(calibrated).manifest["calibration"]["float32"]
    assert entry["margin"] == 4.0 and len(entry["runs"]) == 5 and set(entry["noise"]) == {"embedding", "head", "outputs"}
    assert "batch 1, " in entry["runs"][0] and "1 thread(s)" in entry["runs"][3]
    assert set(entry["noise"]["embedding"]["per_sample"]) == {row.name for row in load_fixture(calibrated).rows}


def test_clean_candidate_passes_with_another_batch_size_and_thread_count(example_spec, calibrated):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_check(example_spec.replace(runtime={"batch_size": 3}), fixtures=calibrated)
    finally:
        torch.set_num_threads(previous)
    assert report.passed
    tolerance = report.stage("embedding").comparison.tolerance
    assert tolerance.origin.startswith("calibrated on cpu/float32, 5 runs (batch 1, ")
    assert tolerance.origin.endswith("x4 margin")


@pytest.mark.parametrize("change", [c for c, _ in DRIFTS.values()], ids=list(DRIFTS))
def test_every_diagnosed_drift_still_fails_under_calibrated_budgets(example_spec, calibrated, change):
    assert not run_check(example_spec.replace(**change), fixtures=calibrated).passed


def test_explicit_spec_tolerance_wins(example_spec, calibrated):
    explicit = Tolerance(atol=1e-3, rtol=0.0, min_cosine=0.99, origin="spec")
    report = run_check(example_spec.replace(tolerances={"embedding": explicit}), fixtures=calibrated)
    assert report.stage("embedding").comparison.tolerance.origin == "spec"


def test_calibrating_a_precision_declares_it_acceptable(example_spec, tmp_path):
    import shutil

    from tests.conftest import EXAMPLE_FIXTURES

    root = shutil.copytree(EXAMPLE_FIXTURES, tmp_path / "clip_dnn")
    bf16 = example_spec.replace(runtime={"dtype": "bfloat16"})
    assert not run_check(bf16, fixtures=root).passed
    calibrate(bf16, fixtures=root, runs=[Run(8, 2), Run(1, 1)])
    assert run_check(bf16, fixtures=root).passed
    assert not run_check(example_spec.replace(runtime={"dtype": "float16"}), fixtures=root).passed


def test_margin_below_one_is_refused(example_spec):
    with pytest.raises(SpecError, match="margin must be >= 1"):
        calibrate(example_spec, margin=0.5, write=False)


def test_calibrate_cli_dry_run_writes_nothing(example_spec, fixture_copy, capsys):
    from parity.cli import main
    from tests.conftest import EXAMPLE_SPEC

    before = (fixture_copy / "manifest.json").read_text()
    assert main(["calibrate", "--spec", str(EXAMPLE_SPEC), "--fixtures", str(fixture_copy), "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    assert (fixture_copy / "manifest.json").read_text() == before
    assert "calibration" not in json.loads(before)
    assert run_check(example_spec, fixtures=fixture_copy).stage("embedding").status is Status.PASS
