"""The pytest plugin, exercised through inline pytest sessions (one per option)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import CLASSIFIER_SPEC, EXAMPLE_SPEC, ROOT
from tests.support.specs import write_spec

GATE = (ROOT / "tests" / "parity" / "test_gate.py").read_text()


@pytest.fixture(scope="module")
def loaded_modules(example_spec) -> None:
    """Import everything the gate imports lazily, before any inline session runs.

    Inline sessions drop the modules they imported when they end; dropping and
    re-importing torch's extension modules crashes the interpreter.
    """
    from parity.commands.check import run_check

    run_check(example_spec)


@pytest.fixture
def gate(pytester: pytest.Pytester, loaded_modules) -> pytest.Pytester:
    pytester.makepyfile(test_gate=GATE)
    return pytester


def test_parity_spec_option_runs_the_gate(gate):
    result = gate.runpytest("--parity-spec", str(EXAMPLE_SPEC))
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines(["*parity report*", "*PARITY: the candidate reproduces the reference.*"])


def test_drifted_spec_fails_the_stages_that_moved(gate, tmp_path: Path):
    spec = write_spec(tmp_path, {'interpolation = "bicubic"': 'interpolation = "bilinear"'})
    result = gate.runpytest("--parity-spec", str(spec))
    result.assert_outcomes(passed=5, failed=4)
    result.stdout.fnmatch_lines([
        "*DriftError: pixels: FAIL - drifted beyond tolerance*",
        '*Fix: set [[]preprocess].interpolation = "bicubic"*',
        "*DriftError: DRIFT WITHOUT DECISION FLIPS: the numbers moved beyond tolerance (first at pixels)*",
    ])


def test_parity_fixtures_option_overrides_the_spec(gate, tmp_path: Path):
    result = gate.runpytest("--parity-spec", str(EXAMPLE_SPEC), "--parity-fixtures", str(tmp_path / "missing"))
    result.assert_outcomes(errors=9)
    result.stdout.fnmatch_lines([f"*FixtureError: fixture directory not found: {tmp_path / 'missing'}*"])


def test_parity_device_cuda_skips_without_a_gpu(gate):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the skip path is for CPU-only machines")
    result = gate.runpytest("--parity-spec", str(EXAMPLE_SPEC), "--parity-device", "cuda", "-rs")
    result.assert_outcomes(skipped=9)
    result.stdout.fnmatch_lines(["*--parity-device cuda: CUDA is not available on this machine*"])


def test_without_a_spec_the_gate_skips_with_a_reason(gate):
    result = gate.runpytest("-rs")
    result.assert_outcomes(skipped=9)
    result.stdout.fnmatch_lines(["*no parity spec: pass --parity-spec SPEC*"])


def test_ini_parity_spec_is_the_default(gate):
    gate.makeini(f"[pytest]\nparity_spec = {EXAMPLE_SPEC}\n")
    gate.runpytest().assert_outcomes(passed=9)


MATRIX = (ROOT / "tests" / "parity" / "test_matrix.py").read_text()


def test_matrix_suite_has_one_test_per_cell_with_readable_ids(pytester, loaded_modules):
    pytester.makepyfile(test_matrix=MATRIX)
    result = pytester.runpytest("--parity-spec", str(EXAMPLE_SPEC), "-v")
    result.stdout.fnmatch_lines([
        "*test_embedding_parity[[]pre_logits-bicubic-pil-cpu-float32[]] PASSED*",
        "*test_embedding_parity[[]pre_logits-bicubic-pil-cuda-float32[]] SKIPPED*",
        "*test_embedding_parity[[]forward-bicubic-pil-cpu-float32[]] XFAIL*",
        "*parity matrix*",
        "*extract: reproduces the reference with pre_logits, cls; drifts with forward, mean_tokens*",
    ])
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] + outcomes["xfailed"] + outcomes["skipped"] == 64


def test_a_drifted_deployment_cell_fails_the_matrix_suite(pytester, loaded_modules, tmp_path):
    pytester.makepyfile(test_matrix=MATRIX)
    spec = write_spec(tmp_path, {'interpolation = "bicubic"': 'interpolation = "bilinear"',
                                 'interpolation = ["bicubic", "bilinear"]': 'interpolation = ["bilinear"]'})
    result = pytester.runpytest("--parity-spec", str(spec))
    result.stdout.fnmatch_lines(["*DriftError: deployment cell pre_logits-bilinear-pil-cpu-float32 does not "
                                 "reproduce the reference*"])
    assert result.parseoutcomes()["failed"] >= 1


def test_importing_the_package_and_plugin_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, parity, parity.plugin; assert 'torch' not in sys.modules, 'torch imported'; print(parity.__all__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "capture" in proc.stdout


def test_a_decisions_gate_marks_moved_stages_xfail(gate, tmp_path: Path):
    pytest.importorskip("transformers")
    from parity.commands.check import run_check
    from parity.spec import load_spec

    classifier = CLASSIFIER_SPEC
    run_check(load_spec(classifier))  # import transformers before the inline session (see loaded_modules)
    text = classifier.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    spec = tmp_path / "slow.toml"
    spec.write_text(text.replace('processor = "fast"', 'processor = "slow"')
                        .replace("verification_threshold = 0.6418", 'verification_threshold = 0.6418\ngate = "decisions"'))
    result = gate.runpytest("--parity-spec", str(spec), "-rx")
    result.assert_outcomes(passed=6, xfailed=3)
    result.stdout.fnmatch_lines(["*DRIFT WITHOUT DECISION FLIPS: the numbers moved beyond tolerance (first at pixels)*",
                                 "*XFAIL*test_stage_parity[[]pixels[]] - pixels drifted; accepted because no decision "
                                 "flipped*"])


def test_a_ci_matrix_of_pytest_jobs_gates_shards_that_merge(gate, tmp_path: Path):
    from parity.cli import EXIT_PASS, main

    for i in (1, 2):
        result = gate.runpytest("--parity-spec", str(CLASSIFIER_SPEC), "--parity-shard", f"{i}/2",
                                "--parity-report", str(tmp_path / f"shard{i}"))
        result.assert_outcomes(passed=9)
        result.stdout.fnmatch_lines([f"*SHARD {i}/2 (* of 18 samples*PARITY*"])
    parts = [str(tmp_path / f"shard{i}" / "report.json") for i in (1, 2)]
    assert main(["merge", *parts, "--json", str(tmp_path / "merged.json")]) == EXIT_PASS
