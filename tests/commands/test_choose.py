"""Deployment choices with their cost: every matrix cell is timed, a batch-size axis catches outputs that
depend on their batch-mates, and `parity choose` names the fastest passing cell per device."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from parity.cli import main
from parity.commands.choose import choose, pareto_front
from parity.commands.matrix import run_matrix
from parity.errors import SpecError
from parity.model.batches import embed_rows
from parity.model.pipeline import build_pipeline
from parity.report.console import document, render_text
from parity.report.html import render_html
from parity.report.markdown import render_markdown
from parity.results import Status
from parity.spec import load_spec, parse_axes
from parity.store.fixtures import load_fixture
from tests.support.hooked_models import hook_final_norm
from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC
from tests.support.specs import replace_reference, write_spec

CPU = {"device": ["cpu"], "dtype": ["float32"]}


def _normalise_over_the_batch(module, inputs, output):
    """The shipped bug: features scaled by the norm of the whole batch's tensor, not each image's own."""
    return output / output.norm() * 10.0


def _mix_over_the_batch(patch: pytest.MonkeyPatch) -> None:
    """Every timm model built while ``patch`` holds ends its trunk with a norm over the whole batch."""
    hook_final_norm(patch, _normalise_over_the_batch)


@pytest.fixture(scope="module")
def mixing_fixture(tmp_path_factory):
    """A fixture whose reference is the batch-mixing model run one image at a time."""
    fixtures = tmp_path_factory.mktemp("batch_mixing") / "fixture"
    shutil.copytree(EXAMPLE_FIXTURES, fixtures)
    spec = load_spec(EXAMPLE_SPEC)
    fixture = load_fixture(fixtures)
    with pytest.MonkeyPatch.context() as patch:
        _mix_over_the_batch(patch)
        pipeline = build_pipeline(spec, device="cpu", fingerprints=False)
        reference = embed_rows(pipeline, fixture, range(len(fixture.rows)), batch_size=1)
    replace_reference(fixtures, pipeline, reference)
    return fixtures


@pytest.fixture
def batch_mixing(mixing_fixture, monkeypatch):
    """A backbone whose trunk ends in a norm over the whole batch, and its batch-size-1 reference: the
    batch-size-1 deployment reproduces it, batched ones do not."""
    _mix_over_the_batch(monkeypatch)
    return load_spec(EXAMPLE_SPEC), mixing_fixture


def test_a_norm_over_the_batch_fails_the_batch_axis_and_is_named(batch_mixing):
    spec, fixtures = batch_mixing
    report = run_matrix(spec, fixtures=fixtures, axes={**CPU, "batch_size": [1, 8]})
    by_size = {r.cell["batch_size"]: r for r in report.cells}
    assert by_size[1].status is Status.PASS
    assert by_size[8].status is Status.FAIL
    assert by_size[8].reason.startswith("batch dependence")
    assert not by_size[8].batch_comparison
    assert report.reproducing("batch_size") == [1]
    # Without 1 among the values the batch-size-1 run still happens, apart, to name the cause.
    alone = run_matrix(spec, fixtures=fixtures, axes={**CPU, "batch_size": [4]})
    assert [r.status for r in alone.cells] == [Status.FAIL]
    assert "batch dependence" in alone.cells[0].reason
    text = render_text(report, width=220)
    assert "batch dependence" in text and "bs8" in text


def test_choose_picks_the_batch_size_that_passes(batch_mixing):
    spec, fixtures = batch_mixing
    choice = choose(spec, fixtures=fixtures, device="cpu")
    assert choice.passed
    chosen = choice.report.cell(choice.chosen["cpu"])
    assert chosen.status is Status.PASS and chosen.cell["batch_size"] == 1
    assert all(r.cell["batch_size"] == 1 for r in choice.report.cells if r.status is Status.PASS)


def test_every_cell_carries_its_cost_and_timing_never_changes_a_verdict(example_spec):
    once = run_matrix(example_spec, axes={**CPU, "batch_size": [1, 4]})
    twice = run_matrix(example_spec, axes={**CPU, "batch_size": [1, 4]}, repeat=2)
    for a, b in zip(once.cells, twice.cells):
        assert a.status is b.status is Status.PASS  # the clean model: batch-size independent within budget
        assert a.comparison.max_abs == b.comparison.max_abs
    for result in twice.cells:
        cost = result.cost
        assert cost.batch_size == result.cell["batch_size"] and cost.repeat == 2 and cost.images == 17
        assert 0 < cost.latency_p50_ms <= cost.latency_p95_ms
        assert cost.throughput > 0 and cost.load_s >= 0 and cost.peak_rss_mb > 0 and cost.cuda_peak_mb is None
    data = document(twice)
    assert data["cells"][0]["cost"]["latency_p50_ms"] > 0 and "warm-up" in data["cost_note"]
    for text in (render_markdown(data), render_html(data), render_text(twice, width=220)):
        assert "p50 ms" in text and "img/s" in text


def test_batch_size_axis_values_are_checked():
    assert parse_axes({"batch_size": [1, 8.0]}, where="t") == {"batch_size": (1, 8)}
    for bad in ([0], [2.5], [True], ["8"], [10 ** 6]):
        with pytest.raises(SpecError, match="batch_size"):
            parse_axes({"batch_size": bad}, where="t")


def test_pareto_front_keeps_cells_no_other_beats_on_both():
    from parity.commands.choose import pareto_front as front
    from parity.results import Cell, CellCost, CellResult, Comparison, Tolerance

    def cell(name, ms, err):
        comparison = Comparison((1, 1), (1, 1), Tolerance(1.0, 0.0), max_abs=err)
        cost = CellCost(1, 1, 1, ms, ms, 1.0, 0.0, 1.0)
        return CellResult(Cell((("device", "cpu"),), name, True), Status.PASS, comparison, cost=cost)

    assert front([cell("a", 1, 0.1), cell("b", 2, 0.01), cell("c", 3, 0.1), cell("d", 1, 0.1)]) == ("a", "b", "d")
    assert pareto_front is front
    # the flip-rate bound is a third measure: a slower, no closer cell with fewer flips stays on the front
    fast, careful = cell("fast", 1, 0.1), cell("careful", 2, 0.1)
    fast, careful = replace(fast, flip_bound=0.3), replace(careful, flip_bound=0.05)
    assert front([fast, careful, replace(cell("worse", 3, 0.1), flip_bound=0.05)]) == ("fast", "careful")


def test_choose_cli_exit_codes_and_json(tmp_path, capsys):
    # the spec's [matrix] deployment axes replace the default set
    spec = write_spec(tmp_path, {'dtype = ["float32", "bfloat16"]': 'dtype = ["float32"]\nbatch_size = [1, 4]'})
    out = tmp_path / "choice.json"
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CHOSEN" in printed and "pareto" in printed
    data = json.loads(out.read_text())
    assert data["kind"] == "choice" and data["passed"]
    chosen = data["chosen"]["cpu"]
    assert any(row["cell"] == chosen and row["verdict"] == "PASS" and row["chosen"] for row in data["rows"])
    # a budget no cell meets: nothing is chosen, exit 1
    assert {row["cell"].split("-")[-1] for row in data["rows"]} == {"bs1", "bs4"}
    assert main(["choose", "--spec", str(spec), "--device", "cpu", "--budget-ms", "1e-9"]) == 1
    assert "NONE PASSES" in capsys.readouterr().out
    assert main(["choose", "--spec", str(EXAMPLE_SPEC), "--budget-ms", "-1"]) == 2
    assert "--budget-ms" in capsys.readouterr().err


def test_cuda_cells_skip_with_a_reason_on_cpu(example_spec):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    choice = choose(example_spec, device="cuda")
    assert not choice.passed and choice.chosen == {"cuda": None}
    assert {r.reason for r in choice.report.cells} == {"CUDA is not available on this machine"}

