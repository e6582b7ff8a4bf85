"""The two bundled fixtures and specs (timm- and transformers-described preprocessing), loaded once,
and a way to judge a hand-made candidate record the way the gate does."""

from __future__ import annotations

from dataclasses import replace

import pytest

from parity.numerics.emulate import gate_budgets
from parity.judge.stages import compare_run
from parity.results import CandidateRun, Status
from tests.conftest import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC


def judged(run: CandidateRun, fixture, spec, *, failing: tuple[str, ...] = ()):
    """The comparator's stages for ``run``, with the ``failing`` stages forced to FAIL."""
    stages = compare_run(run, fixture, spec, budgets=gate_budgets(spec, fixture))
    return {name: replace(result, status=Status.FAIL) if name in failing else result
            for name, result in stages.items()}


@pytest.fixture(scope="session")
def dnn():
    """(fixture, spec) of clip_dnn: a timm data config (bicubic, crop_pct 1.0, 336, PIL)."""
    from parity.store.fixtures import load_fixture
    from parity.spec import load_spec

    return load_fixture(EXAMPLE_FIXTURES), load_spec(EXAMPLE_SPEC)


@pytest.fixture(scope="session")
def mlp():
    """(fixture, spec) of clip_mlp: a transformers CLIPImageProcessor (fast, shortest_edge 224)."""
    from parity.store.fixtures import load_fixture
    from parity.spec import load_spec

    return load_fixture(CLASSIFIER_FIXTURES), load_spec(CLASSIFIER_SPEC)
