"""Calibration: budgets from the reference's own noise pass benign perturbations and fail every drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parity.commands.calibrate import Run, calibrate
from parity.commands.check import run_check
from parity.errors import SpecError
from parity.store.fixtures import load_fixture
from parity.results import Status, Tolerance
from tests.support.drifts import DRIFTS


@pytest.fixture(scope="module")
def calibrated(example_spec, tmp_path_factory):
    import shutil

    from tests.support.paths import EXAMPLE_FIXTURES

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

    from tests.support.paths import EXAMPLE_FIXTURES

    root = shutil.copytree(EXAMPLE_FIXTURES, tmp_path / "clip_dnn")
    bf16 = example_spec.replace(runtime={"dtype": "bfloat16"})
    assert not run_check(bf16, fixtures=root).passed
    calibrate(bf16, fixtures=root, runs=[Run(8, 2), Run(1, 1)])
    assert run_check(bf16, fixtures=root).passed
    assert not run_check(example_spec.replace(runtime={"dtype": "float16"}), fixtures=root).passed


@pytest.mark.parametrize("margin", [0.5, float("inf"), float("nan"), 1e9, -4.0])
def test_margins_outside_one_to_the_maximum_are_refused(example_spec, margin):
    with pytest.raises(SpecError, match="margin must be a finite number between 1 and 100"):
        calibrate(example_spec, margin=margin, write=False)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda e: e.update(margin=float("inf")), "margin = inf is not a finite number"),
    (lambda e: e.update(margin=1e6), "margin = 1000000.0 is not a finite number in [1, 100]"),
    (lambda e: e["noise"]["embedding"].update(max_abs=float("nan")), "embedding max_abs = nan"),
    (lambda e: e["noise"]["outputs"].update(max_abs=50.0), "outputs budget (atol 200) is too large to be numeric noise"),
    (lambda e: e["noise"]["embedding"].update(min_cosine=0.5), "is too large to be numeric noise"),
    (lambda e: e.update(noise="loud"), "must be an object with 'noise'"),
])
def test_stored_budgets_are_validated_when_read(calibrated, edit, message):
    import copy

    from parity.commands.calibrate import calibrated_tolerance
    from parity.errors import FixtureError

    manifest = copy.deepcopy(dict(load_fixture(calibrated).manifest))
    edit(manifest["calibration"]["float32"])
    with pytest.raises(FixtureError) as info:
        for stage in ("embedding", "head", "outputs"):
            calibrated_tolerance(manifest, stage, "float32")
    assert message in str(info.value)


def test_a_resealed_oversized_budget_fails_the_check_with_an_error(example_spec, calibrated, tmp_path):
    import shutil

    from parity.errors import FixtureError
    from tests.support.specs import reseal

    root = Path(shutil.copytree(calibrated, tmp_path / "edited"))
    reseal(root, lambda m: m["calibration"]["float32"].update(margin=100.0) or
           m["calibration"]["float32"]["noise"]["outputs"].update(max_abs=1.0))
    with pytest.raises(FixtureError, match="too large to be numeric noise"):
        run_check(example_spec, fixtures=root)


def test_an_edited_manifest_is_refused_before_anything_is_read(calibrated, tmp_path):
    import shutil

    from parity.errors import FixtureError

    root = Path(shutil.copytree(calibrated, tmp_path / "edited"))
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.replace('"dtype": "float32"', '"dtype": "float16"'))
    with pytest.raises(FixtureError, match="manifest.json fails its own checksum"):
        load_fixture(root)


def test_calibrate_cli_dry_run_writes_nothing(example_spec, fixture_copy, capsys):
    from parity.cli import main
    from tests.support.paths import EXAMPLE_SPEC

    before = (fixture_copy / "manifest.json").read_text()
    assert main(["calibrate", "--spec", str(EXAMPLE_SPEC), "--fixtures", str(fixture_copy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out
    # What the budgets absorb, and the evidence that it is noise.
    assert "absorbed (embedding): at most " in out and "(offset of the runs' mean)" in out
    assert "float64 referee on 8 samples: rounding (float32 rounding: fixture RMSE" in out
    assert (fixture_copy / "manifest.json").read_text() == before
    assert "calibration" not in json.loads(before)
    assert run_check(example_spec, fixtures=fixture_copy).stage("embedding").status is Status.PASS


# -- calibration absorbs noise, never a drift ------------------------------------------------------

def test_a_drifted_candidate_is_refused_not_absorbed(example_spec, fixture_copy):
    """GELU for the fixture's QuickGELU used to be calibrated into an atol of 0.07, and the next check passed."""
    gelu = example_spec.replace(**DRIFTS["gelu-for-quickgelu"][0])
    before = (fixture_copy / "manifest.json").read_bytes()
    with pytest.raises(SpecError) as info:
        calibrate(gelu, fixtures=fixture_copy, runs=[Run(8, 1)])
    message = str(info.value)
    assert "calibrate measures the noise of the reference configuration" in message
    assert "backbone.activation: reference ['QuickGELU'], spec ['GELU']" in message
    assert (fixture_copy / "manifest.json").read_bytes() == before
    assert not run_check(gelu, fixtures=fixture_copy).passed


def test_a_systematic_error_under_the_reference_configuration_is_refused(example_spec, fixture_copy):
    """The spec is the recorded one, but the fixture's embeddings carry one offset on every sample (another
    version of the data): the same error in every run, far beyond the rounding of the computation."""
    import numpy as np

    from tests.support.specs import reseal

    stored = np.load(fixture_copy / "clip.npy")
    offset = np.random.default_rng(0).standard_normal(stored.shape[-1]).astype(np.float32) * np.float32(2e-3)
    np.save(fixture_copy / "clip.npy", stored + offset)
    reseal(fixture_copy)
    before = (fixture_copy / "manifest.json").read_bytes()
    with pytest.raises(SpecError) as info:
        calibrate(example_spec, fixtures=fixture_copy, runs=[Run(8, 1)])
    message = str(info.value)
    assert "refuses to absorb a systematic difference" in message and "the fixture's embedding differs" in message
    assert "float32 rounding" in message and "nothing was written" in message
    assert (fixture_copy / "manifest.json").read_bytes() == before
