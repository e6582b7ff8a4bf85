"""The one decode -> embed loop: every command that runs the spec's backbone on images runs it here.

Samples are decoded once by the shared loader, preprocessed by the spec's transform, and embedded a
batch at a time (`Pipeline.embed`). The gate's runner, the Ray engine's actors, the logged runner's
reference, freeze, capture, calibration, emulation, the referee, diagnosis probes and the matrix's
cells all call the functions below, so a change to how images become embeddings is made once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.errors import FixtureChangedError, FixtureError, SpecError
from parity.store.fixtures import Fixture, FixtureRow
from parity.store.images import decode_image
from parity.model.pipeline import Pipeline
from parity.store.images import load_image
from parity.libraries import extract_embeddings

__all__ = ["Decoded", "decoded_batches", "BatchResult", "decode_batch", "embed_batch", "batch_rows", "local_batches",
           "decode_workers", "embed_pixels", "embed_images", "embed_rows", "extract_pixels", "extraction_module",
           "extract_deployed"]

Progress = Callable[[int, int], None]


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


DECODE_WORKERS_ENV = "PARITY_DECODE_WORKERS"


def decode_workers() -> int:
    """Threads that decode and preprocess: one per core this process may use, or ``$PARITY_DECODE_WORKERS``
    (1: serial, in the calling thread)."""
    value = os.environ.get(DECODE_WORKERS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise SpecError(f"${DECODE_WORKERS_ENV} = {value!r} is not a whole number of threads") from None
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _sample(step: Callable[[], Any], row: FixtureRow) -> tuple[Any, str | None]:
    """``(step(), None)``, or ``(None, error)`` when ``step`` finds a bad sample.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    try:
        return step(), None
    except FixtureChangedError:
        raise  # not a bad sample: the fixture changed under the run, nothing may be mixed
    except FixtureError as e:
        return None, str(e)
    except Exception as e:  # PIL and the transform raise ValueError, OSError, ... on a bad image: that sample's
        return None, f"preprocessing {row.image} raised {type(e).__name__}: {e}"


def _decode_one(pipeline: Pipeline, row: FixtureRow, exif: bool) -> tuple[Any, str, str | None]:
    """``(staged, conversion, None)`` for one sample (`Pipeline.staged`: what a decode thread may run), or
    ``(None, "", error)`` when it is a bad sample (a refused resize too).

    Raises:
        FixtureChangedError: the fixture changed under the run.
    """
    def stage() -> tuple[Any, str]:
        image, note = decode_image(row.image, exif_transpose=exif)
        return pipeline.staged(image, name=row.image), note

    staged, error = _sample(stage, row)
    return (None, "", error) if error is not None else (*staged, None)


def _collect(pipeline: Pipeline, rows: Sequence[tuple[int, FixtureRow]],
             decoded: Sequence[tuple[Any, str, str | None]], golden: Container[str]) -> tuple[BatchResult, list]:
    """The batch's record and pixels, in fixture order: `Pipeline.finish_pixels` runs here, in the calling thread."""
    result, batch = BatchResult(), []
    for (i, row), (staged, note, error) in zip(rows, decoded):
        if error is None:
            x, error = _sample(lambda: pipeline.finish_pixels(staged), row)  # noqa: B023  (called at once)
        if error is not None:
            result.sample_errors.append((row.name, error))
            continue
        if note:
            result.conversions[row.name] = note
        if row.name in golden:
            result.pixels[row.name] = x if isinstance(x, np.ndarray) else x.numpy()
        batch.append(x)
        result.rows.append(i)
    return result, batch


def decode_batch(pipeline: Pipeline, rows: Sequence[tuple[int, FixtureRow]],
                 golden: Container[str]) -> tuple[BatchResult, list]:
    """Decode and preprocess ``rows`` (fixture index, row) once each: the batch's record and its pixels.

    A sample that does not decode (or whose resize is refused, or whose preprocessing raises) is a
    per-sample error and the others still run; the pixels of samples named in ``golden`` are kept.
    ``pipeline`` is the spec's `Pipeline` (torch pixels) or `parity.model.fast_pixels.NumpyPixels`. One batch
    has no next one to overlap, and its caller (a Ray actor) owns only its share of the cores: it decodes in the
    calling thread.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    batches = _decoded([list(rows)], pipeline, golden, workers=1)
    try:
        return next(batches)[1:]
    finally:
        batches.close()


def _decoded(batches: Iterable[list[tuple[int, FixtureRow]]], pipeline: Pipeline, golden: Container[str], *,
             workers: int | None = None) -> Iterator[tuple[list[tuple[int, FixtureRow]], BatchResult, list]]:
    """``(rows, result, pixels)`` per batch, in order: decoded by `decode_workers` threads, the next batch's
    samples submitted before this one is handed over, so decoding overlaps the caller's inference and at
    most two batches of pixels are held. PIL's decode and resize release the GIL.

    The threads run `Pipeline.staged` (decode, and with the pil backend resize and crop: PIL alone) and
    the calling thread `Pipeline.finish_pixels` (to tensor, normalize): a torch kernel in a decode thread
    would start an OpenMP team of that thread's own (cores x cores threads, each with a stack and an
    allocator arena), and `torch.set_num_threads` in a thread changes the count every later thread starts
    with. numpy pixels are made whole in the threads.
    """
    exif = pipeline.spec.preprocess.exif_transpose
    workers = decode_workers() if workers is None else workers
    if workers == 1:
        for rows in batches:
            yield (rows, *_collect(pipeline, rows, [_decode_one(pipeline, row, exif) for _, row in rows], golden))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="parity-decode")
    try:
        pending = None
        for rows in batches:
            submitted = (rows, [pool.submit(_decode_one, pipeline, row, exif) for _, row in rows])
            if pending is not None:
                yield (pending[0], *_collect(pipeline, pending[0], [f.result() for f in pending[1]], golden))
            pending = submitted
        if pending is not None:
            yield (pending[0], *_collect(pipeline, pending[0], [f.result() for f in pending[1]], golden))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _embed(pipeline: Pipeline, result: BatchResult, batch: list) -> BatchResult:
    import torch  # deferred: this module is imported by runners that must start without torch

    if batch:
        try:
            result.embeddings = embed_pixels(pipeline, torch.stack(batch), batch_size=len(batch))
        except (RuntimeError, ValueError, AssertionError) as e:  # e.g. timm refusing 224 px in a 336 px model
            result.error = f"the backbone raised {type(e).__name__}: {e}"
    return result


def embed_batch(pipeline: Pipeline, rows: Sequence[tuple[int, FixtureRow]], golden: Container[str], *,
                embed: bool = True) -> BatchResult:
    """`decode_batch`, then the backbone on the batch's pixels (skipped when ``embed`` is False).

    A backbone that raises is the batch's ``error``, never an exception: the decode log survives it.

    Raises:
        FixtureChangedError: the fixture changed under the run.
    """
    result, batch = decode_batch(pipeline, rows, golden)
    return _embed(pipeline, result, batch) if embed else result


def batch_rows(fixture: Fixture, batch_size: int) -> Iterator[list[tuple[int, FixtureRow]]]:
    """The fixture's rows in batches of ``batch_size``, in order: every engine batches them this way."""
    total = len(fixture.rows)
    for start in range(0, total, batch_size):
        yield [(i, fixture.rows[i]) for i in range(start, min(start + batch_size, total))]


def decoded_batches(pipeline: Pipeline, fixture: Fixture, decoded: Decoded, *,
                    progress: Progress | None = None) -> Iterator[tuple[list[int], list]]:
    """Every sample decoded once and preprocessed by ``pipeline``, in batches of ``[runtime].batch_size``.

    Yields ``(rows, pixels)`` per batch and records into ``decoded`` as it goes: a sample that does
    not decode (or whose resize is refused) is a per-sample error and the others still run. The
    next batch decodes in worker threads while the caller runs this one.

    Raises:
        FixtureChangedError: the fixture changed under the run (never counted as a bad sample).
    """
    done, total = 0, len(fixture.rows)
    for rows, result, batch in _decoded(batch_rows(fixture, pipeline.spec.runtime.batch_size), pipeline,
                                        fixture.golden_pixels):
        decoded.add(result)
        yield result.rows, batch
        done += len(rows)
        if progress:
            progress(done, total)


def local_batches(pipeline: Pipeline, fixture: Fixture, *,
                  progress: Progress | None = None) -> Iterator[BatchResult]:
    """The local engine: each batch decoded (the next one in worker threads meanwhile), then embedded.

    After a batch whose backbone raised, later batches are decoded but not embedded (the embedding
    stage has failed already).
    """
    done, total, failed = 0, len(fixture.rows), False
    for rows, result, batch in _decoded(batch_rows(fixture, pipeline.spec.runtime.batch_size), pipeline,
                                        fixture.golden_pixels):
        if not failed:
            result = _embed(pipeline, result, batch)
        failed = failed or result.error is not None
        yield result
        done += len(rows)
        if progress:
            progress(done, total)


def embed_pixels(pipeline: Pipeline, pixels, *, batch_size: int | None = None) -> np.ndarray:
    """Embeddings (N, D) float32 for preprocessed pixels: a (N, 3, H, W) tensor or a sequence of (3, H, W)
    tensors, embedded ``batch_size`` (default ``[runtime].batch_size``) at a time."""
    import torch  # deferred: this module is imported by runners that must start without torch

    size = max(1, batch_size or pipeline.spec.runtime.batch_size)
    total = len(pixels)
    if not total:
        return np.zeros((0, 0), np.float32)
    parts = []
    for start in range(0, total, size):
        chunk = pixels[start:start + size]
        parts.append(pipeline.embed(chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))).numpy())
    return np.concatenate(parts)


def embed_images(pipeline: Pipeline, images: Sequence, *, batch_size: int | None = None) -> np.ndarray:
    """Embeddings (N, D) float32 for images (any input `Pipeline.decode` accepts), preprocessed and embedded a
    batch at a time, so only one batch of pixels is held."""
    size = max(1, batch_size or pipeline.spec.runtime.batch_size)
    if not images:
        return np.zeros((0, 0), np.float32)
    return np.concatenate([embed_pixels(pipeline, [pipeline.preprocess(image) for image in images[s:s + size]],
                                        batch_size=size) for s in range(0, len(images), size)])


def embed_rows(pipeline: Pipeline, fixture: Fixture, rows: Sequence[int], *, batch_size: int | None = None,
               exif_transpose: bool | None = None) -> np.ndarray:
    """Embeddings (len(rows), D) for fixture rows, decoded a batch at a time by the shared loader.

    Raises:
        FixtureError: a sample does not decode (these callers measure every row they ask for).
    """
    exif = pipeline.spec.preprocess.exif_transpose if exif_transpose is None else exif_transpose
    size = max(1, batch_size or pipeline.spec.runtime.batch_size)
    rows = list(rows)
    if not rows:
        return np.zeros((0, fixture.embeddings.shape[1]), np.float32)
    return np.concatenate([embed_images(pipeline, [load_image(fixture.rows[i].image, exif_transpose=exif)
                                                   for i in rows[s:s + size]], batch_size=size)
                           for s in range(0, len(rows), size)])


def extract_pixels(model, pixels, modes: Sequence[str], *, library: str, batch_size: int, device: str, dtype,
                   normalize: str = "none", timings: list[float] | None = None) -> dict[str, np.ndarray]:
    """Every extraction mode's embeddings (N, D) float32 from one trunk pass per batch of ``pixels``, for a
    model other than the pipeline's own (a matrix cell's device and dtype copy). The caller holds the
    numerics context (autocast, TF32, attention backend) of the cell.

    Args:
        timings: when given, each batch's wall seconds (transfer in, pass, copy out) are appended to it.
    """
    import time

    import torch  # deferred: see embed_pixels

    chunks: dict[str, list] = {m: [] for m in modes}
    size = max(1, batch_size)
    with torch.inference_mode():
        for start in range(0, len(pixels), size):
            began = time.perf_counter()
            batch = pixels[start:start + size].to(device, dtype)
            for mode, out in extract_embeddings(model, batch, modes, library=library).items():
                chunks[mode].append(out.float().cpu())  # the copy out waits for the device: the batch's end
            if timings is not None:
                timings.append(time.perf_counter() - began)
    embeddings = {m: torch.cat(c) for m, c in chunks.items()}
    if normalize == "l2":
        embeddings = {m: torch.nn.functional.normalize(e, dim=-1) for m, e in embeddings.items()}
    return {m: e.numpy() for m, e in embeddings.items()}


def extraction_module(model, modes: Sequence[str], *, library: str, normalize: str = "none"):
    """``pixels -> (embedding per mode, in modes' order)`` as one ``torch.nn.Module``: what `extract_pixels` takes
    from one trunk pass, in a form a runtime can export or compile (`parity.model.runtimes.deploy`).

    Embeddings come out float32 (l2-normalized after that when ``normalize`` is ``l2``), as `extract_pixels`
    gives them.
    """
    import torch  # deferred: see embed_pixels

    class Extraction(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels):
            out = extract_embeddings(self.model, pixels, list(modes), library=library)
            embeddings = [out[m].float() for m in modes]
            if normalize == "l2":
                embeddings = [torch.nn.functional.normalize(e, dim=-1) for e in embeddings]
            return tuple(embeddings)

    return Extraction().eval()


def extract_deployed(deployed: Callable[..., tuple[np.ndarray, ...]], pixels, modes: Sequence[str], *,
                     batch_size: int, timings: list[float] | None = None,
                     warmed: set[int] | None = None) -> dict[str, np.ndarray]:
    """`extract_pixels` for a deployed `extraction_module` (`parity.model.runtimes.Deployed`): every mode's
    embeddings (N, D) float32 for ``pixels`` (N, 3, H, W), a batch of ``batch_size`` per call.

    Args:
        timings: when given, each batch's wall seconds (the call, inputs in and outputs out) are appended to it.
        warmed: batch lengths the deployment has run already; a batch of a new length is run once untimed
            first (a compiled module compiles, a runtime plans, per input shape) and its length added.
    """
    import time

    array = pixels.numpy() if hasattr(pixels, "numpy") else np.asarray(pixels)
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    size = max(1, batch_size)
    for start in range(0, len(array), size):
        batch = np.ascontiguousarray(array[start:start + size], dtype=np.float32)
        if warmed is not None and len(batch) not in warmed:
            deployed(batch)
            warmed.add(len(batch))
        began = time.perf_counter()
        outputs = deployed(batch)
        if timings is not None:
            timings.append(time.perf_counter() - began)
        for mode, out in zip(modes, outputs):
            chunks[mode].append(out)
    return {m: np.concatenate(c) if c else np.zeros((0, 0), np.float32) for m, c in chunks.items()}
