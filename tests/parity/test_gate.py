"""The release gate: run with ``pytest tests/parity --parity-spec SPEC [--parity-fixtures DIR]``."""

from __future__ import annotations

import pytest

from parity.commands.check import STAGE_ORDER
from parity.errors import DriftError
from parity.report.console import format_stage, verdict_line
from parity.results import Status


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_stage_parity(parity_report, stage: str) -> None:
    result = parity_report.stage(stage)
    if result.status is Status.SKIP:
        pytest.skip(f"{stage}: {result.headline}")
    if result.status is Status.FAIL:
        if parity_report.passed:  # [decisions].gate = "decisions" and no decision flipped
            pytest.xfail(f"{stage} drifted; accepted because no decision flipped:\n{format_stage(result)}")
        raise DriftError(format_stage(result))


def test_gate_passes(parity_report) -> None:
    if not parity_report.passed:
        raise DriftError(verdict_line(parity_report))
