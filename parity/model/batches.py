"""The spec-built pipeline as a runner: decode, preprocess, backbone, head, each sample once."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity.store.checkpoints import StrictLoadError
from parity.errors import FixtureChangedError, FixtureError
from parity.store.fixtures import Fixture, FixtureRow
from parity.store.images import decode_image
from parity.model.pipeline import Pipeline, build_pipeline
from parity.results import CandidateRun
from parity.spec import Spec

__all__ = ["run", "run_spec", "run_pipeline", "run_head_twice", "Decoded", "decoded_batches", "BatchResult",
           "decode_batch", "embed_batch", "batch_rows", "local_batches"]

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

    def add(self, batch: BatchResult) -> None:
        """Record one batch's decoding, in fixture order."""
        self.rows += batch.rows
        self.sample_errors += batch.sample_errors
        self.conversions.update(batch.conversions)
        self.pixels.update(batch.pixels)


@dataclass
class BatchResult:
    """One batch of samples decoded, preprocessed and (unless told not to) embedded: the unit of work
    both engines share, so a batch gives the same record whichever engine ran it.

    ``rows`` are the fixture rows that decoded, in order; ``embeddings`` are theirs (None when the
    batch was not embedded or the backbone raised, then ``error`` says what it raised).
    """

    rows: list[int] = field(default_factory=list)
    sample_errors: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, str] = field(default_factory=dict)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: np.ndarray | None = None
    error: str | None = None


def decode_batch(pipeline: Pipeline, rows: Sequence[tuple[int, FixtureRow]],
                 golden: Container[str]) -> tuple[BatchResult, list]:
    """Decode and preprocess ``rows`` (fixture index, row) once each: the batch's record and its pixels.

    A sample that does not decode (or whose resize is refused) is a per-sample error and the others
    still run; the pixels of samples named in ``golden`` are kept.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    exif = pipeline.spec.preprocess.exif_transpose
    result, batch = BatchResult(), []
    for i, row in rows:
        try:
            image, note = decode_image(row.image, exif_transpose=exif)
            x = pipeline.pixels(image, name=row.image)  # a resize refused for its size is this sample's error too
        except FixtureChangedError:
            raise  # not a bad sample: the fixture changed under the run, nothing may be mixed
        except FixtureError as e:
            result.sample_errors.append((row.name, str(e)))
            continue
        if note:
            result.conversions[row.name] = note
        if row.name in golden:
            result.pixels[row.name] = x.numpy()
        batch.append(x)
        result.rows.append(i)
    return result, batch


def embed_batch(pipeline: Pipeline, rows: Sequence[tuple[int, FixtureRow]], golden: Container[str], *,
                embed: bool = True) -> BatchResult:
    """`decode_batch`, then the backbone on the batch's pixels (skipped when ``embed`` is False).

    A backbone that raises is the batch's ``error``, never an exception: the decode log survives it.

    Raises:
        FixtureChangedError: the fixture changed under the run.
    """
    import torch

    result, batch = decode_batch(pipeline, rows, golden)
    if batch and embed:
        try:
            result.embeddings = pipeline.embed(torch.stack(batch)).numpy()
        except (RuntimeError, ValueError, AssertionError) as e:  # e.g. timm refusing 224 px in a 336 px model
            result.error = f"the backbone raised {type(e).__name__}: {e}"
    return result


def batch_rows(fixture: Fixture, batch_size: int) -> Iterator[list[tuple[int, FixtureRow]]]:
    """The fixture's rows in batches of ``batch_size``, in order: every engine batches them this way."""
    total = len(fixture.rows)
    for start in range(0, total, batch_size):
        yield [(i, fixture.rows[i]) for i in range(start, min(start + batch_size, total))]


def decoded_batches(pipeline: Pipeline, fixture: Fixture, decoded: Decoded, *,
                    progress: Progress | None = None) -> Iterator[tuple[list[int], list]]:
    """Every sample decoded once and preprocessed by ``pipeline``, in batches of ``[runtime].batch_size``.

    Yields ``(rows, pixels)`` per batch and records into ``decoded`` as it goes: a sample that does
    not decode (or whose resize is refused) is a per-sample error and the others still run.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    done, total = 0, len(fixture.rows)
    for rows in batch_rows(fixture, pipeline.spec.runtime.batch_size):
        result, batch = decode_batch(pipeline, rows, fixture.golden_pixels)
        decoded.add(result)
        yield result.rows, batch
        done += len(rows)
        if progress:
            progress(done, total)


def local_batches(pipeline: Pipeline, fixture: Fixture, *,
                  progress: Progress | None = None) -> Iterator[BatchResult]:
    """The local engine: `embed_batch` on each batch in turn, in this process.

    After a batch whose backbone raised, later batches are decoded but not embedded (the embedding
    stage has failed already).
    """
    done, total, failed = 0, len(fixture.rows), False
    for rows in batch_rows(fixture, pipeline.spec.runtime.batch_size):
        result = embed_batch(pipeline, rows, fixture.golden_pixels, embed=not failed)
        failed = failed or result.error is not None
        yield result
        done += len(rows)
        if progress:
            progress(done, total)


def run_pipeline(pipeline: Pipeline, fixture: Fixture, *, progress: Progress | None = None) -> CandidateRun:
    """Every sample decoded once, golden pixels kept, embeddings batched; then the head.

    ``[runtime].engine`` picks who runs the batches: this process (``local``) or a Ray cluster
    (``ray``, `parity.model.ray_engine`); both give the same record. A sample that does not
    decode is a per-sample error and the others still run; a backbone that raises fails the
    embedding stage without losing the decode log.
    """
    if pipeline.spec.runtime.engine == "ray":
        # deferred: ray_engine imports this module back (cycle)
        from parity.model.ray_engine import ray_batches

        batches = ray_batches(pipeline, fixture, progress=progress)
    else:
        batches = local_batches(pipeline, fixture, progress=progress)
    decoded = Decoded()
    chunks: list[np.ndarray] = []
    errors: dict[str, str] = {}
    for result in batches:
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
