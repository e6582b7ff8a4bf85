"""The parity gate: run the candidate, compare the record with the fixture, explain what moved."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from parity.judge.stages import STAGE_ORDER, compare_run, stage_tolerance
from parity.explain.fixes import SETTABLE, diff_config, explain_run, toml_value
from parity.store.fixtures import Fixture, check_fixture_inputs, files_version, load_fixture, verify_referenced_checkpoints
from parity.results import CandidateRun, Report, Shard
from parity.runners import run_candidate
from parity.store.sampling import sample_fixture
from parity.store.shards import pack_vectors, part_version, shard_fixture
from parity.spec import Spec


__all__ = ["STAGE_ORDER", "SETTABLE", "run_check", "judge_run", "partial_report", "diff_config", "stage_tolerance", "toml_value"]

Progress = Callable[[int, int], None]


def run_check(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None,
              progress: Progress | None = None, sample: int | None = None,
              shard: tuple[int, int] | None = None) -> Report:
    """Run the gate on ``spec.candidate`` (the spec-built pipeline by default): strict load, weights,
    decode, golden pixels, embeddings, head, outputs, decisions. ``sample``: gate a deterministic
    stratified subset of that many rows (`parity.store.sampling`); the decisions stage states its bound.
    ``shard``: ``(I, N)``: gate shard I of N (`parity.store.shards`) and record which in the report, a
    partial report for `parity.commands.merge`.

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
        if spec.candidate.kind == "spec":  # a configuration that cannot fit the fixture is an error, not drift
            check_fixture_inputs(spec, fixture)
    if fixture is not None and sample is not None:  # a stratified subset of a large fixture (parity.store.sampling)
        fixture = sample_fixture(fixture, sample)
    samples: tuple[tuple[int, str], ...] = ()
    whole = 0
    if fixture is not None and shard is not None:
        whole = len(fixture.rows)
        fixture, picked = shard_fixture(fixture, *shard)
        samples = tuple(zip(picked, fixture.names))
    device_name = device or spec.runtime.device
    if fixture is not None and shard is not None and not fixture.rows:  # nothing to run: say so, stage by stage
        empty = f"no sample falls in shard {shard[0]}/{shard[1]}"
        run = CandidateRun(spec.candidate.kind, unobservable={s: empty for s in STAGE_ORDER if s != "decode"})
    else:
        run = run_candidate(spec, fixture, device=device_name, progress=progress, shard=shard)
    judged = run.reference if run.reference is not None else fixture
    report = judge_run(run, judged, spec, device=device_name)
    if shard is None:
        return report
    if run.shard_rows is not None:  # a runner with samples of its own (a log) sharded them itself
        samples, whole = run.shard_rows, run.shard_of
    return partial_report(report, shard, samples, whole, run, judged, spec)


def partial_report(report: Report, shard: tuple[int, int], samples: Sequence[tuple[int, str]], whole: int,
                   run: CandidateRun, judged: Fixture, spec: Spec) -> Report:
    """``report`` marked as shard I of N: ``samples`` are ``(position, name)`` of its samples among
    ``whole``. Keeps what a merge needs besides the stages, e.g. the shard's embeddings when a
    decision pairs samples that other shards hold."""
    vectors = None
    if spec.decisions.verification_threshold is not None and run.embeddings is not None and \
            np.shape(run.embeddings)[1:] == judged.embeddings.shape[1:]:
        vectors = pack_vectors(run.embeddings, judged.embeddings[list(run.rows)], [judged.names[i] for i in run.rows])
    return replace(report, shard=Shard(
        index=shard[0], count=shard[1], of=whole, rows=tuple(r for r, _ in samples), names=tuple(n for _, n in samples),
        runner=run.runner, version=part_version(files_version(judged.manifest) if "files" in judged.manifest
                                                else str(judged.root), spec.path),
        max_flip_rate=spec.decisions.max_flip_rate, vectors=vectors))


def judge_run(run: CandidateRun, fixture: Fixture, spec: Spec, *, device: str | None = None) -> Report:
    """Compare any runner's record with the fixture and explain the failing stages."""
    stages, diffs = explain_run(compare_run(run, fixture, spec), run, fixture, spec)
    return Report(spec=str(spec.path), fixtures=str(fixture.root), device=device or spec.runtime.device,
                  dtype=spec.runtime.dtype, stages=tuple(stages[s] for s in STAGE_ORDER), config_diffs=diffs,
                  gate=spec.decisions.gate)
