"""Calibration: measure the reference pipeline's own numeric noise and derive the gate's budgets from it.

The perturbations must not count as drift: batch of one, the spec's batch size, shuffled
batches, one thread versus all, repeated runs. Each run is compared with the frozen
reference; the worst error, times a safety margin, with a floor so a bit-exact pipeline
still gets a usable budget, becomes the tolerance.

Only noise may be absorbed. The spec must be the configuration the fixture records (its
precision aside: calibrating another dtype declares that precision acceptable), and the error
must be rounding: a float64 run of the spec's pipeline (`parity.numerics.referee`) must put the fixture
within the rounding of that computation. A systematic difference (another activation, resize,
checkpoint) is refused, never turned into a budget.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.explain.fixes import diff_config
from parity.judge.arrays import compare_arrays
from parity.errors import FixtureError, SpecError
from parity.libraries import backbone_weights
from parity.model.pipeline import build_pipeline
from parity.numerics.emulate import add_emulated_noise, probe_rows
from parity.numerics.referee import referee
from parity.store.fixtures import (Fixture, cached_sha256, check_fixture_inputs, data_version, files_version, load_fixture,
                             update_manifest)
from parity.model.batches import embed_images
from parity.store.images import load_image
from parity.results import Calibration, Run, Tolerance
from parity.spec import Spec
from parity.judge.tolerance import MAX_COSINE_GAP, MAX_MARGIN, MAX_RELATIVE_NOISE, calibrated_tolerance, calibration_budget

__all__ = ["Run", "Calibration", "calibrate", "calibrated_tolerance", "check_margin", "DEFAULT_MARGIN",
           "MAX_MARGIN", "MAX_RELATIVE_NOISE", "MAX_COSINE_GAP"]

DEFAULT_MARGIN = 4.0
_REFEREE_ROWS = 4  # samples the float64 referee runs on: spread over the fixture, and as many of the worst


@contextlib.contextmanager
def _threads(n: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(pipeline, fixture: Fixture, run: Run, order: Sequence[int]) -> dict[str, np.ndarray]:
    embeddings = np.zeros_like(fixture.embeddings)
    exif = pipeline.spec.preprocess.exif_transpose
    with _threads(run.threads):
        images = [load_image(fixture.rows[i].image, exif_transpose=exif) for i in order]
        embeddings[order] = embed_images(pipeline, images, batch_size=run.batch_size)
        biases = fixture.biases()
        outputs = pipeline.run_head(embeddings, biases).numpy()
        head = pipeline.run_head(fixture.embeddings[order], biases[order]).numpy()[np.argsort(order)]
    return {"embedding": embeddings, "head": head, "outputs": outputs}


def calibrate(spec: Spec, *, fixtures: str | Path | None = None, margin: float = DEFAULT_MARGIN,
              runs: Sequence[Run] | None = None, write: bool = True,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Run the spec's pipeline (the reference configuration) under each perturbation and record the noise.

    Raises:
        SpecError: a margin below 1, or no fixtures.
    """
    check_margin(margin)
    root = spec.fixture_root(fixtures)
    fixture = load_fixture(root)
    version = data_version(root)  # the budget is stored only into the version it was measured on
    if version != files_version(fixture.manifest):
        raise FixtureError(f"{root} was regenerated while it was being loaded; run the calibration again")
    check_fixture_inputs(spec, fixture)
    _check_reference_configuration(spec, fixture)
    pipeline = build_pipeline(spec, fingerprints=False)
    _check_recorded_configuration(spec, pipeline, fixture)
    n, cores = len(fixture.rows), os.cpu_count() or 1
    runs = tuple(runs or (Run(1, cores), Run(spec.runtime.batch_size, cores), Run(spec.runtime.batch_size, cores, True),
                          Run(spec.runtime.batch_size, 1), Run(spec.runtime.batch_size, cores)))
    rng = np.random.default_rng(0)
    worst = {stage: {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0 if stage == "embedding" else None,
                     "per_sample": np.zeros(n)} for stage in ("embedding", "head", "outputs")}
    exact = Tolerance(atol=0.0, rtol=0.0)
    first: dict[str, np.ndarray] = {}
    total: dict[str, np.ndarray] = {}
    spread = dict.fromkeys(worst, 0.0)
    for done, run in enumerate(runs, start=1):
        order = rng.permutation(n) if run.shuffled else np.arange(n)
        measured = _run(pipeline, fixture, run, order)
        for stage, want in (("embedding", fixture.embeddings), ("head", fixture.outputs), ("outputs", fixture.outputs)):
            got = measured[stage]
            c = compare_arrays(got, want, tolerance=exact, cosine=stage == "embedding")
            w = worst[stage]
            w["max_abs"], w["max_rel"] = max(w["max_abs"], c.max_abs), max(w["max_rel"], c.max_rel)
            if c.min_cosine is not None:
                w["min_cosine"] = min(w["min_cosine"], c.min_cosine)
            w["per_sample"] = np.maximum(w["per_sample"], np.abs(got - want).max(axis=1))
            # What every run shares (the offset from the fixture) and what the perturbations move (the spread).
            first.setdefault(stage, got)
            total[stage] = total.get(stage, 0.0) + got.astype(np.float64)
            spread[stage] = max(spread[stage], _largest(got - first[stage]))
        if progress:
            progress(done, len(runs))
    scale = {"embedding": fixture.embeddings, "head": fixture.outputs, "outputs": fixture.outputs}
    noise = {stage: {**{k: float(v) if v is not None else None for k, v in w.items() if k != "per_sample"},
                     "scale": float(np.abs(scale[stage]).max(initial=0.0)),
                     "offset": _largest(total[stage] / len(runs) - scale[stage]), "spread": spread[stage],
                     "per_sample": {fixture.rows[i].name: float(v) for i, v in enumerate(w["per_sample"])}}
             for stage, w in worst.items()}
    for stage, judged in _referee(spec, fixture, worst["embedding"]["per_sample"]).items():
        noise[stage]["referee"] = judged
    # a reference made in TF32/autocast: add its emulated spread
    noise, emulation = add_emulated_noise(noise, pipeline, fixture, spec)
    result = Calibration(device=str(pipeline.device), dtype=spec.runtime.dtype, runs=runs, margin=margin, noise=noise,
                         emulation=emulation)
    for stage in noise:
        calibration_budget(result.to_manifest()[result.dtype], stage, result.dtype, source=f"calibration of {root}")
    if write:
        # Merged under the fixture's lock: a concurrent calibration of another dtype keeps its entry.
        update_manifest(root, "calibration", result.to_manifest(), merge=True, version=version)
    return result


def _largest(values: np.ndarray) -> float:
    return float(np.abs(values).max(initial=0.0))


def _identity_order(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """A head record with ``input_biases_order`` the identity written as no order (what it stands for)."""
    order = record.get("input_biases_order")
    if order is not None and list(order) == list(range(len(order))):
        return {**record, "input_biases_order": None}
    return record


def _check_reference_configuration(spec: Spec, fixture: Fixture) -> None:
    """Refuse checkpoints other than those the fixture records: their difference is no noise.

    Raises:
        SpecError: a checkpoint of the spec has another sha256 than the fixture's record of it.
    """
    weights = fixture.manifest.get("weights", {})
    for part, path in (("backbone", backbone_weights(spec)), ("head", spec.head.weights)):
        recorded = weights.get(part, {}).get("sha256")
        if path is None or recorded is None or not Path(path).is_file():
            continue  # loading names a missing file; a fixture without a record has nothing to hold it to
        actual = cached_sha256(Path(path))
        if actual != recorded:
            raise SpecError(
                f"calibrate measures the noise of the reference configuration, but {spec.path} loads another {part} "
                f"checkpoint than the fixture records: {path} has sha256 {actual}, the fixture {recorded}.\n"
                f"Fix: point the spec's {part} at the checkpoint the fixture was made with (the weights stage of "
                "`parity check` names the tensors that differ); nothing was measured or written.")


def _check_recorded_configuration(spec: Spec, pipeline: Any, fixture: Fixture) -> None:
    """Refuse a spec whose pipeline differs from the one the fixture records, its precision and device aside.

    Raises:
        SpecError: the differing fields, reference and spec values.
    """
    recorded = {k: v for k, v in fixture.pipeline.items() if k in ("backbone", "preprocess", "head")}
    described = {k: v for k, v in pipeline.describe().items() if k in recorded}
    for side in (recorded, described):
        if "head" in side:
            side["head"] = _identity_order(side["head"])
    diffs = diff_config(recorded, described)
    if diffs:
        shown = "; ".join(f"{d.field}: reference {d.reference!r}, spec {d.candidate!r}" for d in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise SpecError(
            f"calibrate measures the noise of the reference configuration (the pipeline the fixture records), but "
            f"{spec.path} differs from it: {shown}{more}.\n"
            "Why: the budget would absorb this difference, and a candidate with it would then pass the gate.\n"
            "Fix: calibrate with the reference spec (only [runtime] may differ: another dtype declares that precision "
            "acceptable); nothing was measured or written.")


def _referee(spec: Spec, fixture: Fixture, per_sample: np.ndarray) -> dict[str, dict[str, Any]]:
    """The float64 referee on samples spread over the fixture and those that moved most: the error must be rounding.

    Returns:
        Per judged stage: the samples, the fixture's RMSE against the float64 run, each rounded run's, and the
        rounding that covers it.

    Raises:
        SpecError: the error is beyond every rounding of the spec's computation (systematic), with the numbers.
    """
    worst = [int(i) for i in np.argsort(-per_sample, kind="stable")[:_REFEREE_ROWS]]
    rows = sorted(set(probe_rows(fixture, _REFEREE_ROWS)) | set(worst))
    verdict = referee(spec, fixture=fixture.subset(rows), samples=len(rows))
    judged = {}
    for stage in verdict.stages:
        rounding = {label: error for label, error in stage.rounding}
        judged[stage.stage] = {"samples": len(rows), "reference_rmse": stage.reference_error, "rounding": rounding,
                               "explained_by": stage.explained_by}
        if stage.explained_by is None:
            words = ", ".join(f"{label} {error:.2e}" for label, error in stage.rounding) or stage.reason
            raise SpecError(
                f"calibrate refuses to absorb a systematic difference: on {len(rows)} samples ("
                f"{', '.join(verdict.samples)}), the fixture's {stage.stage} differs from a float64 run of "
                f"{spec.path}'s pipeline by RMSE {stage.reference_error:.2e}, beyond what rounding of that computation "
                f"gives ({words}; rounding covers at most {stage.multiplier:g}x that + {stage.tol / 10:g}).\n"
                "Why: noise differs from run to run and sample to sample; this error is the same computation "
                "difference every time (another activation, resize, weights or data), and a budget wide enough "
                "for it would pass a candidate that has it.\n"
                "Fix: calibrate with the spec the fixture was made with (`parity diagnose` names the change), or "
                "rebuild the fixture; nothing was written.")
    return judged


def check_margin(margin: object) -> float:
    """``margin`` if it is a finite number in [1, `MAX_MARGIN`].

    Raises:
        SpecError: anything else (NaN, inf, below 1, above the maximum, not a number).
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
            or not 1 <= margin <= MAX_MARGIN:
        raise SpecError(
            f"margin must be a finite number between 1 and {MAX_MARGIN:g}, got {margin!r}: below 1 the reference "
            "fails its own noise, a larger one would let real drift pass"
        )
    return float(margin)
