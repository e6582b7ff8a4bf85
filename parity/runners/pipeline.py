"""The spec-built pipeline as a runner: decode, preprocess, backbone, head, each sample once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from parity.checkpoints import StrictLoadError
from parity.errors import FixtureChangedError, FixtureError
from parity.fixtures import Fixture
from parity.images import decode_image
from parity.pipeline import Pipeline, build_pipeline
from parity.results import CandidateRun
from parity.spec import Spec

__all__ = ["run", "run_spec", "run_pipeline", "run_head_twice", "Decoded", "decoded_batches"]

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


@dataclass
class Decoded:
    """What decoding the fixture's samples found: the rows that decoded, per-sample errors, conversions,
    and the golden samples' pixels as the spec's preprocessing made them."""

    rows: list[int] = field(default_factory=list)
    sample_errors: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, str] = field(default_factory=dict)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)


def decoded_batches(pipeline: Pipeline, fixture: Fixture, decoded: Decoded, *,
                    progress: Progress | None = None) -> Iterator[tuple[list[int], list]]:
    """Every sample decoded once and preprocessed by ``pipeline``, in batches of ``[runtime].batch_size``.

    Yields ``(rows, pixels)`` per batch and records into ``decoded`` as it goes: a sample that does
    not decode (or whose resize is refused) is a per-sample error and the others still run.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    exif = pipeline.spec.preprocess.exif_transpose
    size, total = pipeline.spec.runtime.batch_size, len(fixture.rows)
    for start in range(0, total, size):
        batch, batch_rows = [], []
        for i in range(start, min(start + size, total)):
            row = fixture.rows[i]
            try:
                image, note = decode_image(row.image, exif_transpose=exif)
                x = pipeline.pixels(image, name=row.image)  # a resize refused for its size is this sample's error too
            except FixtureChangedError:
                raise  # not a bad sample: the fixture changed under the run, nothing may be mixed
            except FixtureError as e:
                decoded.sample_errors.append((row.name, str(e)))
                continue
            if note:
                decoded.conversions[row.name] = note
            if row.name in fixture.golden_pixels:
                decoded.pixels[row.name] = x.numpy()
            batch.append(x)
            batch_rows.append(i)
        decoded.rows += batch_rows
        yield batch_rows, batch
        if progress:
            progress(min(start + size, total), total)


def run_pipeline(pipeline: Pipeline, fixture: Fixture, *, progress: Progress | None = None) -> CandidateRun:
    """Every sample decoded once, golden pixels kept, embeddings batched; then the head.

    A sample that does not decode is a per-sample error and the others still run; a backbone
    that raises fails the embedding stage without losing the decode log.
    """
    import torch

    decoded = Decoded()
    chunks: list[np.ndarray] = []
    errors: dict[str, str] = {}
    for _, batch in decoded_batches(pipeline, fixture, decoded, progress=progress):
        if batch and "embedding" not in errors:
            try:
                chunks.append(pipeline.embed(torch.stack(batch)).numpy())
            except (RuntimeError, ValueError, AssertionError) as e:  # e.g. timm refusing 224 px in a 336 px model
                errors["embedding"] = f"the backbone raised {type(e).__name__}: {e}"
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
