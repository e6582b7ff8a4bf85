"""Calibration: measure the reference pipeline's own numeric noise and derive the gate's budgets from it.

The perturbations must not count as drift: batch of one, the spec's batch size, shuffled
batches, one thread versus all, repeated runs. Each run is compared with the frozen
reference; the worst error, times a safety margin, with a floor so a bit-exact pipeline
still gets a usable budget, becomes the tolerance.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.compare import compare_arrays
from parity.errors import SpecError
from parity.fixtures import Fixture, load_fixture, update_manifest
from parity.images import load_image
from parity.results import Tolerance
from parity.spec import Spec

__all__ = ["Run", "Calibration", "calibrate", "calibrated_tolerance", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 4.0
# Below this the budget is the floor: a few float32 ulps of a unit-scale value.
FLOOR = {"atol": 1e-6, "cosine_gap": 1e-7}


@dataclass(frozen=True)
class Run:
    """One perturbation of the reference pipeline."""

    batch_size: int
    threads: int
    shuffled: bool = False

    def describe(self) -> str:
        return f"batch {self.batch_size}{' shuffled' if self.shuffled else ''}, {self.threads} thread(s)"


@dataclass(frozen=True)
class Calibration:
    """Measured noise per stage, and the budgets derived from it."""

    device: str
    dtype: str
    runs: tuple[Run, ...]
    margin: float
    noise: dict[str, dict[str, Any]]
    emulation: str | None = None  # why the noise includes an emulated reference's numerics (parity.emulate)

    def to_manifest(self) -> dict[str, Any]:
        entry = {"device": self.device, "margin": self.margin, "runs": [r.describe() for r in self.runs],
                 "noise": self.noise}
        return {self.dtype: {**entry, "emulation": self.emulation} if self.emulation else entry}


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

    if margin < 1:
        raise SpecError(f"margin must be >= 1 (a budget below the measured noise would fail the reference), got {margin}")
    root = spec.fixture_root(fixtures)
    fixture = load_fixture(root)
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
    noise = {stage: {**{k: v for k, v in w.items() if k != "per_sample"},
                     "per_sample": {fixture.rows[i].name: float(v) for i, v in enumerate(w["per_sample"])}}
             for stage, w in worst.items()}
    from parity.emulate import add_emulated_noise  # a reference made in TF32/autocast: add its emulated spread

    noise, emulation = add_emulated_noise(noise, pipeline, fixture, spec)
    result = Calibration(device=str(pipeline.device), dtype=spec.runtime.dtype, runs=runs, margin=margin, noise=noise,
                         emulation=emulation)
    if write:
        recorded = dict(fixture.manifest.get("calibration", {}))
        recorded.update(result.to_manifest())
        update_manifest(root, "calibration", recorded)
    return result


def calibrated_tolerance(manifest: dict, stage: str, dtype: str) -> Tolerance | None:
    """The budget a calibration recorded for ``stage`` at ``dtype``: noise × margin, never below the floor."""
    entry = manifest.get("calibration", {}).get(dtype)
    if not entry or stage not in entry.get("noise", {}):
        return None
    noise, margin = entry["noise"][stage], float(entry["margin"])
    cosine = noise.get("min_cosine")
    origin = (f"calibrated on {entry['device']}/{dtype}, {len(entry['runs'])} runs "
              f"({'; '.join(entry['runs'])}), x{margin:g} margin")
    if entry.get("emulation"):
        origin += f"; {entry['emulation']}, x{margin:g} margin"
    return Tolerance(
        atol=max(noise["max_abs"] * margin, FLOOR["atol"]),
        rtol=0.0,
        min_cosine=None if cosine is None else 1.0 - max((1.0 - cosine) * margin, FLOOR["cosine_gap"]),
        origin=origin,
    )
