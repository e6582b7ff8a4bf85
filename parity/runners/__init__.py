"""Runners turn a candidate into one `CandidateRun` record of what it observed per stage.

The comparator (`parity.judge.stages`) judges any record the same way, whatever produced it. Each
kind of candidate (`parity.spec.CANDIDATE_KINDS`, plus ``spec`` for the spec-built pipeline) has
one runner module exposing ``run(spec, fixture, *, device, progress) -> CandidateRun``. A runner
whose samples are the candidate's own (a service log) declares ``OWN_SAMPLES = True``, takes
``shard=(I, N)`` and records the positions it ran in ``CandidateRun.shard_rows``; every other
runner is handed the fixture already restricted to the shard.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from parity.errors import SpecError
from parity.store.fixtures import Fixture
from parity.results import CandidateRun
from parity.runners.built import run_pipeline, run_spec
from parity.spec import Spec

__all__ = ["RUNNERS", "run_candidate", "run_pipeline", "run_spec"]

# kind -> module holding its ``run``; imported only when that kind is gated.
RUNNERS = {
    "spec": "parity.runners.built",
    "python": "parity.runners.python_app",
    "endpoint_handler": "parity.runners.endpoint",
    "onnx": "parity.runners.onnx",
    "url": "parity.runners.http",
    "oip": "parity.runners.oip",
    "logged": "parity.runners.logged",
    "mlflow_model": "parity.runners.mlflow",
    "gradio": "parity.runners.gradio",
    "gradio_app": "parity.runners.gradio",
}


def run_candidate(spec: Spec, fixture: Fixture | None, *, device: str | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  shard: tuple[int, int] | None = None) -> CandidateRun:
    """Run what ``spec.candidate`` names (the spec-built pipeline by default) over the fixture.

    ``shard``: ``(I, N)`` when ``fixture`` was restricted to shard I of N; a runner with samples of
    its own runs that shard of them.
    """
    kind = spec.candidate.kind
    if kind not in RUNNERS:
        raise SpecError(f"no runner for candidate kind {kind!r}; known: {', '.join(RUNNERS)}")
    module = importlib.import_module(RUNNERS[kind])
    if shard is not None and getattr(module, "OWN_SAMPLES", False):
        return module.run(spec, fixture, device=device, progress=progress, shard=shard)
    return module.run(spec, fixture, device=device, progress=progress)
