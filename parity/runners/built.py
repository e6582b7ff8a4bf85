"""The spec-built pipeline as a runner: decode, preprocess, backbone, head, each sample once.

The batches come from the one loop (`parity.model.batches`), run in this process or by the Ray engine
(`parity.model.engines.fixture_batches`); this module turns them into the record the judge reads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from parity.model.batches import Decoded
from parity.model.engines import fixture_batches
from parity.model.pipeline import Pipeline, build_pipeline
from parity.results import CandidateRun
from parity.spec import Spec
from parity.store.checkpoints import StrictLoadError
from parity.store.fixtures import Fixture

__all__ = ["run", "run_spec", "run_pipeline", "run_head_twice"]

Progress = Callable[[int, int], None]


def run_spec(spec: Spec, fixture: Fixture, *, device: str | None = None,
             progress: Progress | None = None) -> CandidateRun:
    """Build the spec's pipeline (strict load) and run it over every fixture sample."""
    try:
        pipeline = build_pipeline(spec, device=device or spec.runtime.device)
    except StrictLoadError as e:
        return CandidateRun("spec", load_failure=e.key_diff)
    return run_pipeline(pipeline, fixture, progress=progress)


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """The runner entry point for the spec-built pipeline (``[candidate]`` absent)."""
    return run_spec(spec, fixture, device=device, progress=progress)


def run_head_twice(pipeline: Pipeline, embeddings: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, bool]:
    """The head's outputs and whether a second identical call gave the same (eval mode is deterministic)."""
    outputs = pipeline.run_head(embeddings, biases).numpy()
    again = pipeline.run_head(embeddings, biases).numpy()
    return outputs, bool(np.array_equal(outputs, again, equal_nan=True))


def run_pipeline(pipeline: Pipeline, fixture: Fixture, *, progress: Progress | None = None) -> CandidateRun:
    """Every sample decoded once, golden pixels kept, embeddings batched; then the head.

    ``[runtime].engine`` picks who runs the batches: this process (``local``) or a Ray cluster
    (``ray``, `parity.model.ray_engine`); both give the same record. A sample that does not
    decode is a per-sample error and the others still run; a backbone that raises fails the
    embedding stage without losing the decode log.
    """
    decoded = Decoded()
    chunks: list[np.ndarray] = []
    errors: dict[str, str] = {}
    for result in fixture_batches(pipeline, fixture, progress=progress):
        decoded.add(result)
        if result.error is not None:
            errors.setdefault("embedding", result.error)  # the first batch's error, in fixture order
        elif result.embeddings is not None:
            chunks.append(result.embeddings)
    rows = decoded.rows

    nondeterministic: list[str] = []
    head_outputs = outputs = None
    embeddings = None if "embedding" in errors else (
        np.concatenate(chunks) if chunks else np.zeros((0, fixture.embeddings.shape[1]), np.float32))
    try:
        head_outputs, same = run_head_twice(pipeline, fixture.embeddings, fixture.biases())
        if not same:
            nondeterministic.append("head")
    except (RuntimeError, ValueError, IndexError) as e:
        errors["head"] = f"the head raised {type(e).__name__}: {e}"
    if embeddings is not None and embeddings.shape[1:] == fixture.embeddings.shape[1:] and rows:
        try:
            outputs, same = run_head_twice(pipeline, embeddings, fixture.biases(rows))
            if not same:
                nondeterministic.append("outputs")
        except (RuntimeError, ValueError, IndexError) as e:
            errors["outputs"] = f"the head raised {type(e).__name__}: {e}"
    return CandidateRun(
        "spec", description=pipeline.describe(), fingerprints=pipeline.fingerprints,
        modules={"backbone": pipeline.backbone, "head": pipeline.head}, rows=tuple(rows),
        sample_errors=tuple(decoded.sample_errors), conversions=decoded.conversions, pixels=decoded.pixels,
        embeddings=embeddings,
        head_outputs=head_outputs, outputs=outputs, nondeterministic=tuple(nondeterministic), errors=errors,
        unloaded=() if pipeline.spec.backbone.checkpoint is not None else ("backbone",),
    )
