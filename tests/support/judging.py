"""Judging a hand-made candidate record the way the gate does, with chosen stages forced to fail."""

from __future__ import annotations

from dataclasses import replace

from parity.judge.stages import compare_run
from parity.numerics.emulate import gate_budgets
from parity.results import CandidateRun, StageResult, Status
from parity.spec import Spec
from parity.store.fixtures import Fixture


def judged(run: CandidateRun, fixture: Fixture, spec: Spec, *, failing: tuple[str, ...] = ()) -> dict[str, StageResult]:
    """The comparator's stages for ``run``, with the ``failing`` stages forced to FAIL."""
    stages = compare_run(run, fixture, spec, budgets=gate_budgets(spec, fixture))
    return {name: replace(result, status=Status.FAIL) if name in failing else result
            for name, result in stages.items()}
