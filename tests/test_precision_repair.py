"""Mixed-precision repair: a failing bfloat16 cell passes once the named modules are kept in float32."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from parity.commands.repair import module_groups, repair_precision
from parity.errors import SpecError
from parity.model.batches import embed_rows
from parity.model.pipeline import build_pipeline
from parity.report.console import repair_line
from parity.spec import load_spec
from parity.store.fixtures import load_fixture
from tests.conftest import EXAMPLE_FIXTURES, EXAMPLE_SPEC, reseal


def _offset_arithmetic(module, inputs, output):
    """A module that is exact in float32 and lossy in bfloat16: values shifted by 6e4 and back."""
    return (output * 100 + 6e4 - 6e4) / 100


def test_a_failing_bfloat16_cell_is_repaired_by_keeping_the_named_module_in_float32(tmp_path, monkeypatch):
    import timm

    original = timm.create_model

    def create_model(*args, **kwargs):
        model = original(*args, **kwargs)
        if hasattr(model, "norm"):
            model.norm.register_forward_hook(_offset_arithmetic)
        return model

    monkeypatch.setattr(timm, "create_model", create_model)
    fixtures = tmp_path / "fixture"
    shutil.copytree(EXAMPLE_FIXTURES, fixtures)
    spec = load_spec(EXAMPLE_SPEC)
    fixture = load_fixture(fixtures)
    reference = embed_rows(build_pipeline(spec, device="cpu", fingerprints=False), fixture, range(len(fixture.rows)))
    np.save(fixtures / "clip.npy", reference.astype(np.float32))
    reseal(fixtures)
    repair = repair_precision(spec, dtype="bfloat16", fixtures=fixtures, samples=4)
    assert not repair.before and repair.confirmed and repair.after
    assert repair.keep == ("norm",)
    assert "model.norm.float()" in repair.code()
    assert "keep `norm` in float32, confirmed" in repair_line(repair)


def test_groups_follow_data_order_and_only_reduced_precisions_are_repaired(example_spec):
    groups = module_groups(build_pipeline(example_spec, device="cpu", fingerprints=False).backbone)
    assert groups.index("patch_embed") < groups.index("blocks.0") < groups.index("blocks.1") < groups.index("norm")
    with pytest.raises(SpecError, match="bfloat16"):
        repair_precision(example_spec, dtype="float32")
