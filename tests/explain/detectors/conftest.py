"""The two bundled fixtures and specs (timm- and transformers-described preprocessing), loaded once."""

from __future__ import annotations

import pytest

from tests.support.paths import CLASSIFIER_FIXTURES, CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC


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
