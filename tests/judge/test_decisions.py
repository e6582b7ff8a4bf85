"""Margin-aware decisions: a flip at a near-tie is reported, a flip outside the noise band fails."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from parity.commands.check import judge_run, run_check
from parity.judge.decisions import argmax_flips, threshold_flips, verification_flips
from parity.errors import SpecError
from parity.judge.flip_rate import describe_bound, flip_rate_bound, samples_for_rate
from parity.model.pipeline import build_pipeline
from parity.store.fixtures import FixtureRow, load_fixture
from parity.results import Status
from parity.runners import run_candidate
from parity.store.sampling import row_strata, sample_fixture, stratified_rows
from parity.spec import parse_spec
from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC

BILINEAR = {"preprocess": {"interpolation": "bilinear"}}


@pytest.fixture(scope="module")
def moved(example_spec):
    """The reference output that the bilinear drift moves most, and by how much."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    pipeline = build_pipeline(example_spec.replace(**BILINEAR))
    got = pipeline.predict([row.image for row in fixture.rows], [row.input_biases for row in fixture.rows]).numpy()
    delta = got - fixture.outputs
    index = np.unravel_index(np.abs(delta).argmax(), delta.shape)
    return float(fixture.outputs[index]), float(delta[index]), f"{fixture.rows[index[0]].name}[{index[1]}]"


def test_flip_of_a_near_tie_is_reported_not_failed(example_spec, moved):
    reference, delta, label = moved
    band = 1e-5  # the float32 outputs budget
    threshold = reference + np.sign(delta) * band / 2  # the reference sits within the band, the candidate crosses
    decisions = run_check(example_spec.replace(**BILINEAR, decisions={"threshold": threshold})).stage("decisions")
    assert decisions.status is Status.PASS
    assert decisions.decisions[0].near_ties == (label,) and decisions.decisions[0].flips == ()
    assert decisions.headline.startswith("threshold: 0 flip(s), 1 near-tie(s)")


def test_flip_outside_the_noise_band_fails(example_spec, moved):
    reference, delta, label = moved
    decisions = run_check(example_spec.replace(**BILINEAR, decisions={"threshold": reference + delta / 2})).stage("decisions")
    assert decisions.status is Status.FAIL and label in decisions.decisions[0].flips


def test_clean_candidate_flips_nothing(example_spec):
    decisions = run_check(example_spec).stage("decisions")
    assert decisions.status is Status.PASS and decisions.decisions[0].flips == decisions.decisions[0].near_ties == ()


def test_without_a_threshold_the_stage_skips(example_spec):
    assert run_check(example_spec.replace(decisions={"threshold": None})).stage("decisions").status is Status.SKIP


# -- properties of the decision metrics --------------------------------------------------------

logits = st.integers(2, 6).flatmap(lambda n: st.integers(2, 5).flatmap(
    lambda k: arrays(np.float32, (n, k), elements=st.floats(-10, 10, width=32))))
noise = st.floats(0, 1e-3)


@settings(max_examples=60, deadline=None)
@given(logits, noise, st.randoms(use_true_random=False))
def test_decision_metrics_see_no_flip_against_themselves_and_ignore_row_order(ref, scale, rnd):
    names = [f"s{i}" for i in range(len(ref))]
    for flips in (argmax_flips(ref, ref, 0.0, names), threshold_flips(0.0, ref, ref, 0.0, names),
                  verification_flips(0.5, ref, ref, 0.0, names)):
        assert flips.flips == flips.near_ties == ()
    got = ref + np.float32(scale) * np.sign(ref)
    order = list(range(len(ref)))
    rnd.shuffle(order)
    for metric in (lambda g, r, n: argmax_flips(g, r, 1e-4, n), lambda g, r, n: verification_flips(0.3, g, r, 1e-4, n)):
        a, b = metric(got, ref, names), metric(got[order], ref[order], [names[i] for i in order])
        assert len(a.flips) == len(b.flips) and len(a.near_ties) == len(b.near_ties) and a.total == b.total


@settings(max_examples=60, deadline=None)
@given(logits, st.floats(0, 1))
def test_a_wider_band_turns_flips_into_near_ties_never_the_reverse(ref, band):
    names = [f"s{i}" for i in range(len(ref))]
    got = ref[:, ::-1].copy()  # reversed logits: top-1 moves wherever there is a unique maximum
    narrow, wide = argmax_flips(got, ref, band, names), argmax_flips(got, ref, band * 2 + 0.1, names)
    assert set(wide.flips) <= set(narrow.flips)
    assert len(wide.flips) + len(wide.near_ties) == len(narrow.flips) + len(narrow.near_ties)
    assert 0.0 <= narrow.max_probability_error <= 1.0


# -- flip-rate bounds (Clopper–Pearson) and stratified samples ---------------------------------

def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def _upper_bound_by_bisection(k: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided Clopper–Pearson upper bound from its definition: the p at which P(X <= k) = 1 - confidence."""
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        # The CDF falls as p grows: above the bound, seeing k or fewer flips is too unlikely.
        low, high = (mid, high) if _binomial_cdf(k, n, mid) > 1 - confidence else (low, mid)
    return (low + high) / 2


@pytest.mark.parametrize("flips,total", [(0, 300), (2, 1000), (5, 50)])
def test_flip_rate_bound_matches_the_clopper_pearson_definition(flips, total):
    assert flip_rate_bound(flips, total) == pytest.approx(_upper_bound_by_bisection(flips, total), rel=1e-9)


def test_flip_rate_statement_reads_as_the_release_sentence():
    assert describe_bound(0, 300, flip_rate_bound(0, 300)) == \
        "0 flips in 300 samples: flip rate below 1.0 % at 95 % confidence"
    assert flip_rate_bound(0, 0) == 1.0 and flip_rate_bound(7, 7) == 1.0
    assert flip_rate_bound(0, samples_for_rate(0.01)) <= 0.01 < flip_rate_bound(0, samples_for_rate(0.01) - 1)
    with pytest.raises(ValueError):
        flip_rate_bound(3, 2)


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.01"])
def test_max_flip_rate_is_validated(tmp_path, value):
    data = tomllib.loads(EXAMPLE_SPEC.read_text())
    data["decisions"]["max_flip_rate"] = value
    with pytest.raises(SpecError, match="max_flip_rate"):
        parse_spec(data, path=tmp_path / "spec.toml")


def test_max_flip_rate_gates_on_the_bound_with_the_numbers(example_spec):
    """One candidate run, judged under two budgets: the bound on 17 samples is about 16 %."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    run = run_candidate(example_spec, fixture)
    outputs = fixture.outputs.size
    strict = judge_run(run, fixture, example_spec.replace(decisions={"max_flip_rate": 0.01})).stage("decisions")
    bound = flip_rate_bound(0, outputs)
    assert strict.status is Status.FAIL and strict.decisions[0].flip_rate_bound == pytest.approx(bound)
    assert f"threshold: 0 flips in {outputs} outputs: flip rate below {100 * bound:.1f} % at 95 % confidence" \
        in strict.notes
    assert any(f"the flip-rate bound {100 * bound:.2f} % exceeds [decisions].max_flip_rate = 1 %" in note
               and f"at least {samples_for_rate(0.01)} outputs" in note for note in strict.notes)
    loose = judge_run(run, fixture, example_spec.replace(decisions={"max_flip_rate": 0.1})).stage("decisions")
    assert loose.status is Status.PASS


def _rows(tmp_path):
    """An independent layout: grey, RGB, palette and RGBA images, rotated EXIF, portrait and landscape,
    one categorical input bias and a class label, many rows per stratum."""
    from PIL import Image

    rows = []
    modes = ["RGB", "L", "P", "RGBA"]
    for i in range(40):
        size = (64, 32) if i % 3 == 0 else (32, 64) if i % 3 == 1 else (40, 40)
        image = Image.new(modes[i % 4] if i % 7 else "RGB", size)
        path = tmp_path / f"sample_{i:02d}.png"
        exif = Image.Exif()
        if i == 13:
            exif[0x0112] = 6
        image.save(path, exif=exif)
        rows.append(FixtureRow(f"sample_{i:02d}.png", path, (i % 5,), (float(i % 2), 0.25 * i)))
    return tuple(rows)


def test_stratified_sample_is_deterministic_and_covers_every_stratum(tmp_path):
    rows = _rows(tmp_path)
    strata = row_strata(rows)
    names = [row.name for row in rows]
    assert {"labels[0]", "input_biases[0]", "mode", "exif_orientation", "aspect"} <= set(strata[0])
    assert "labels[1]" not in strata[0]  # a continuous label is not a stratum
    present = {item for s in strata for item in s.items()}
    picked = stratified_rows(strata, names, 12)
    assert len(picked) == 12 == len(set(picked))
    assert {item for i in picked for item in strata[i].items()} == present
    assert stratified_rows(row_strata(rows), names, 12) == picked  # same sample on a second call
    shuffled = list(reversed(range(len(rows))))  # and whatever the row order
    again = stratified_rows([strata[i] for i in shuffled], [names[i] for i in shuffled], 12)
    assert sorted(names[shuffled[i]] for i in again) == sorted(names[i] for i in picked)
    with pytest.raises(SpecError, match=r"smallest sample that covers them has \d+ rows"):
        stratified_rows(strata, names, 3)


def test_cli_sample_states_the_bound_for_the_sample(tmp_path):
    from parity.cli import main

    out = tmp_path / "report.json"
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--sample", "9", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    decisions = next(s for s in report["stages"] if s["stage"] == "decisions")
    assert decisions["decisions"][0]["total"] == 9 * 5  # 9 samples, 5 outputs each
    bound = flip_rate_bound(0, 45)
    assert f"threshold: 0 flips in 45 outputs: flip rate below {100 * bound:.1f} % at 95 % confidence" \
        in decisions["text"]
    assert "sampled 9 of 17 samples, stratified by" in decisions["text"]
    sampled = sample_fixture(load_fixture(EXAMPLE_FIXTURES), 9)
    assert [row.name for row in sampled.rows] == sampled.manifest["sampled"]["rows"]
