"""The parity gate: run the candidate, compare the record with the fixture, explain what moved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from parity.comparator import STAGE_ORDER, compare_run, stage_tolerance
from parity.explain import SETTABLE, diff_config, explain_run, toml_value
from parity.fixtures import Fixture, load_fixture, verify_referenced_checkpoints
from parity.results import CandidateRun, Report
from parity.runners import run_candidate
from parity.sampling import sample_fixture
from parity.spec import Spec


__all__ = ["STAGE_ORDER", "SETTABLE", "run_check", "judge_run", "diff_config", "stage_tolerance", "toml_value"]

Progress = Callable[[int, int], None]


def run_check(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None,
              progress: Progress | None = None, sample: int | None = None) -> Report:
    """Run the gate on ``spec.candidate`` (the spec-built pipeline by default): strict load, weights,
    decode, golden pixels, embeddings, head, outputs, decisions. ``sample``: gate a deterministic
    stratified subset of that many rows (`parity.sampling`); the decisions stage states its bound.

    Raises:
        SpecError: no fixtures given, or the spec cannot be built into a pipeline.
        FixtureError: the fixture is missing, tampered with, or inconsistent.
        CheckpointError: a checkpoint cannot be read at all.
    """
    # A replayed service log needs no fixture: without one, the spec's pipeline is the reference.
    replay = spec.candidate.kind == "logged" and fixtures is None and spec.fixtures is None
    fixture = None if replay else load_fixture(spec.fixture_root(fixtures))
    if fixture is not None:
        verify_referenced_checkpoints(fixture)
    if fixture is not None and sample is not None:  # a stratified subset of a large fixture (parity.sampling)
        fixture = sample_fixture(fixture, sample)
    device_name = device or spec.runtime.device
    run = run_candidate(spec, fixture, device=device_name, progress=progress)
    return judge_run(run, run.reference if run.reference is not None else fixture, spec, device=device_name)


def judge_run(run: CandidateRun, fixture: Fixture, spec: Spec, *, device: str | None = None) -> Report:
    """Compare any runner's record with the fixture and explain the failing stages."""
    stages, diffs = explain_run(compare_run(run, fixture, spec), run, fixture, spec)
    return Report(spec=str(spec.path), fixtures=str(fixture.root), device=device or spec.runtime.device,
                  dtype=spec.runtime.dtype, stages=tuple(stages[s] for s in STAGE_ORDER), config_diffs=diffs,
                  gate=spec.decisions.gate)
