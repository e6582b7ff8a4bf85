"""Calibration: measure the reference pipeline's own numeric noise and derive the gate's budgets from it.

The perturbations must not count as drift: batch of one, the spec's batch size, shuffled
batches, one thread versus all, repeated runs. Each run is compared with the frozen
reference; the worst error, times a safety margin, with a floor so a bit-exact pipeline
still gets a usable budget, becomes the tolerance.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from parity.compare import compare_arrays
from parity.errors import FixtureError, SpecError
from parity.fixtures import Fixture, data_version, files_version, load_fixture, update_manifest
from parity.images import load_image
from parity.results import Calibration, Run, Tolerance
from parity.spec import Spec
from parity.tolerance import MAX_COSINE_GAP, MAX_MARGIN, MAX_RELATIVE_NOISE, calibrated_tolerance, calibration_budget

__all__ = ["Run", "Calibration", "calibrate", "calibrated_tolerance", "check_margin", "DEFAULT_MARGIN",
           "MAX_MARGIN", "MAX_RELATIVE_NOISE", "MAX_COSINE_GAP"]

DEFAULT_MARGIN = 4.0


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
        embeddings[order] = pipeline.embed_images(images, batch_size=run.batch_size)
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
    from parity.pipeline import build_pipeline

    check_margin(margin)
    root = spec.fixture_root(fixtures)
    fixture = load_fixture(root)
    version = data_version(root)  # the budget is stored only into the version it was measured on
    if version != files_version(fixture.manifest):
        raise FixtureError(f"{root} was regenerated while it was being loaded; run the calibration again")
    pipeline = build_pipeline(spec, fingerprints=False)
    n, cores = len(fixture.rows), os.cpu_count() or 1
    runs = tuple(runs or (Run(1, cores), Run(spec.runtime.batch_size, cores), Run(spec.runtime.batch_size, cores, True),
                          Run(spec.runtime.batch_size, 1), Run(spec.runtime.batch_size, cores)))
    rng = np.random.default_rng(0)
    worst = {stage: {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0 if stage == "embedding" else None,
                     "per_sample": np.zeros(n)} for stage in ("embedding", "head", "outputs")}
    exact = Tolerance(atol=0.0, rtol=0.0)
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
        if progress:
            progress(done, len(runs))
    scale = {"embedding": fixture.embeddings, "head": fixture.outputs, "outputs": fixture.outputs}
    noise = {stage: {**{k: float(v) if v is not None else None for k, v in w.items() if k != "per_sample"},
                     "scale": float(np.abs(scale[stage]).max(initial=0.0)),
                     "per_sample": {fixture.rows[i].name: float(v) for i, v in enumerate(w["per_sample"])}}
             for stage, w in worst.items()}
    from parity.emulate import add_emulated_noise  # a reference made in TF32/autocast: add its emulated spread

    noise, emulation = add_emulated_noise(noise, pipeline, fixture, spec)
    result = Calibration(device=str(pipeline.device), dtype=spec.runtime.dtype, runs=runs, margin=margin, noise=noise,
                         emulation=emulation)
    for stage in noise:
        calibration_budget(result.to_manifest()[result.dtype], stage, result.dtype, source=f"calibration of {root}")
    if write:
        # Merged under the fixture's lock: a concurrent calibration of another dtype keeps its entry.
        update_manifest(root, "calibration", result.to_manifest(), merge=True, version=version)
    return result


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
