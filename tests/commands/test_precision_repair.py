"""Mixed-precision repair: a failing bfloat16 cell passes once the named modules are kept in float32."""

from __future__ import annotations

import shutil

import pytest

from parity.commands.choose import choose
from parity.commands.repair import module_groups, repair_precision
from parity.errors import SpecError
from parity.model.batches import embed_rows
from parity.model.pipeline import build_pipeline
from parity.report.console import repair_line
from parity.spec import load_spec
from parity.store.fixtures import load_fixture
from tests.support.hooked_models import hook_final_norm
from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC
from tests.support.specs import replace_reference, write_spec


def _offset_arithmetic(module, inputs, output):
    """A module that is exact in float32 and lossy in bfloat16: values shifted by 6e4 and back."""
    return (output * 100 + 6e4 - 6e4) / 100


def _lossy_norm(patch: pytest.MonkeyPatch) -> None:
    """Every timm model built while ``patch`` holds ends its trunk's final norm with `_offset_arithmetic`."""
    hook_final_norm(patch, _offset_arithmetic)


@pytest.fixture(scope="module")
def lossy_fixture(tmp_path_factory):
    """A fixture whose reference is the lossy-norm model in float32."""
    fixtures = tmp_path_factory.mktemp("lossy") / "fixture"
    shutil.copytree(EXAMPLE_FIXTURES, fixtures)
    fixture = load_fixture(fixtures)
    with pytest.MonkeyPatch.context() as patch:
        _lossy_norm(patch)
        pipeline = build_pipeline(load_spec(EXAMPLE_SPEC), device="cpu", fingerprints=False)
        reference = embed_rows(pipeline, fixture, range(len(fixture.rows)))
    replace_reference(fixtures, pipeline, reference)
    return fixtures


def test_a_failing_bfloat16_cell_is_repaired_by_keeping_the_named_module_in_float32(lossy_fixture, monkeypatch):
    _lossy_norm(monkeypatch)
    repair = repair_precision(load_spec(EXAMPLE_SPEC), dtype="bfloat16", fixtures=lossy_fixture, samples=4)
    assert not repair.before and repair.confirmed and repair.after
    assert repair.keep == ("norm",)
    assert repair.code().startswith("kept = [copy.deepcopy(model.norm)]; model.to(torch.bfloat16); ")
    assert "; model.norm = kept[0]" in repair.code()
    assert "keep `norm` in float32, confirmed" in repair_line(repair)


def test_choose_repairs_the_bfloat16_cell_it_could_not_choose(lossy_fixture, monkeypatch, tmp_path):
    _lossy_norm(monkeypatch)
    spec = load_spec(write_spec(tmp_path, {'dtype = ["float32", "bfloat16"]': 'dtype = ["bfloat16"]\nbatch_size = [8]'}))
    choice = choose(spec, fixtures=lossy_fixture, device="cpu", repair=True)
    assert not choice.passed and choice.chosen == {"cpu": None}
    [repair] = choice.repairs
    assert repair.dtype == "bfloat16" and repair.keep == ("norm",) and repair.confirmed


def test_groups_follow_data_order_and_only_reduced_precisions_are_repaired(example_spec):
    groups = module_groups(build_pipeline(example_spec, device="cpu", fingerprints=False).backbone)
    assert groups.index("patch_embed") < groups.index("blocks.0") < groups.index("blocks.1") < groups.index("norm")
    with pytest.raises(SpecError, match="bfloat16"):
        repair_precision(example_spec, dtype="float32")
