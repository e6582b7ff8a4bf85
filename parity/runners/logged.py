"""A service's request log as the candidate: replay what it logged (``[candidate] logged = "requests.jsonl"``).

The log is what `parity.store.fixtures.load_logged_samples` reads (JSONL or CSV rows with ``image``,
``input_biases`` and ``embedding`` and/or ``outputs``). Its rows are matched to the fixture's by
image name, and a match must be the same file (sha256): the fixture is then the reference. When
the log holds images the fixture does not (or there is no fixture), the spec's pipeline produces
the reference for the logged images, as ``parity diagnose --logged`` does. Either way the
comparator judges the record, so tolerances, ``[decisions]`` and the verdicts apply.

A log shows only what the service wrote down: load, weights, pixels and the head (and the
embedding or the outputs when not logged) are reported as not observable.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import numpy as np

from parity.errors import FixtureError
from parity.model.pipeline import build_pipeline
from parity.store.fixtures import Fixture, load_logged_samples
from parity.results import CandidateRun
from parity.store.images import decode_image
from parity.store.shards import shard_fixture
from parity.spec import Spec

__all__ = ["run", "match_rows", "spec_reference"]

Progress = Callable[[int, int], None]

UNOBSERVABLE = "a service log holds only what the service logged"
OWN_SAMPLES = True  # the log's rows are the samples: a shard is taken of them (parity.store.shards)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def match_rows(logged: Fixture, fixture: Fixture | None) -> list[int] | None:
    """The fixture row of every logged row (same name, same bytes), or ``None`` if any has none."""
    if fixture is None:
        return None
    by_name = {row.name: i for i, row in enumerate(fixture.rows)}
    digests: dict[int, str] = {}
    matched = []
    for row in logged.rows:
        i = by_name.get(row.name)
        if i is None:
            return None
        if i not in digests:
            digests[i] = _digest(fixture.rows[i].image)
        if row.image.resolve() != fixture.rows[i].image.resolve() and _digest(row.image) != digests[i]:
            return None  # same name, another image
        matched.append(i)
    return matched


def _require_biases(log: Path, logged: Fixture, fixture: Fixture, outputs: bool) -> None:
    """A logged output is the answer to a request, and with a head that takes ``input_biases`` the
    request includes them: a log that does not say them cannot be matched to the fixture's samples.

    Raises:
        FixtureError: the log has outputs but no input_biases, and the fixture's samples have some.
    """
    width = len(fixture.rows[0].input_biases) if fixture.rows else 0
    if outputs and width and logged.rows and not logged.rows[0].input_biases:
        raise FixtureError(f"{log}: the logged requests have no input_biases (missing or []), but the fixture's "
                           f"samples carry {width} each and the head's outputs depend on them: log each request's "
                           "input_biases with its outputs, or log only embeddings")


def spec_reference(spec: Spec, logged: Fixture, *, device: str | None = None,
                   progress: Progress | None = None) -> tuple[Fixture, list[int], list[tuple[str, str]]]:
    """The spec pipeline's embeddings and outputs on the logged images, as a fixture to judge the log against.

    Returns:
        the reference (one row per logged row; a row the spec could not decode holds NaN), the
        rows it holds values for, and ``(name, why)`` for the others.

    Raises:
        CheckpointError: the spec's checkpoints do not load strictly (no reference without them).
        FixtureError: the spec's pipeline cannot embed the images or run its head on the logged input_biases.
    """
    import torch

    pipeline = build_pipeline(spec, device=device or spec.runtime.device, fingerprints=False)
    exif, size, total = spec.preprocess.exif_transpose, spec.runtime.batch_size, len(logged.rows)
    rows: list[int] = []
    failed: list[tuple[str, str]] = []
    embeddings: list[np.ndarray] = []
    for start in range(0, total, size):
        batch = []
        for i in range(start, min(start + size, total)):
            try:
                image, _ = decode_image(logged.rows[i].image, exif_transpose=exif)
                batch.append(pipeline.pixels(image, name=logged.rows[i].image))
            except FixtureError as e:
                failed.append((logged.rows[i].name, f"the spec cannot decode it for the reference: {e}"))
                continue
            rows.append(i)
        if batch:
            try:
                embeddings.append(pipeline.embed(torch.stack(batch)).numpy())
            except (RuntimeError, ValueError, AssertionError) as e:
                raise FixtureError(f"the spec's backbone cannot embed the logged images: {e}") from e
        if progress:
            progress(min(start + size, total), total)
    embedded = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    try:
        outputs = pipeline.run_head(embedded, logged.biases(rows)).numpy() if rows else np.zeros((0, 0), np.float32)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # TypeError: a head called without its biases
        if logged.outputs.shape[1] == 0:  # the log holds embeddings only: no outputs to compare with
            outputs = np.zeros((len(rows), 0), np.float32)
        else:
            raise FixtureError(f"the spec's head cannot run on the logged samples ({type(e).__name__}: {e})"
                               + ("; the log has no input_biases: log each request's input_biases"
                                  if not logged.biases().shape[1] else "")) from e

    def full(values: np.ndarray) -> np.ndarray:
        out = np.full((total, values.shape[1]), np.nan, np.float32)
        out[rows] = values
        return out

    reference = Fixture(root=logged.root, manifest={"pipeline": pipeline.describe()}, rows=logged.rows,
                        embeddings=full(embedded), outputs=full(outputs))
    return reference, rows, failed


def run(spec: Spec, fixture: Fixture | None, *, device: str | None = None,
        progress: Progress | None = None, shard: tuple[int, int] | None = None) -> CandidateRun:
    """The logged values as a candidate record, against the fixture or against the spec's pipeline.

    ``shard``: ``(I, N)``: only the logged rows in shard I of N (`parity.store.shards`) are replayed.
    """
    log = Path(spec.candidate.target)
    logged = load_logged_samples(log)
    positions, population = None, len(logged.rows)
    if shard is not None:
        logged, positions = shard_fixture(logged, *shard)
        if not logged.rows:
            empty = f"no logged sample falls in shard {shard[0]}/{shard[1]}"
            return CandidateRun("logged", unobservable={s: empty for s in ("load", "weights", "pixels", "embedding",
                                                                           "head", "outputs")},
                                reference=replace(logged, embeddings=np.zeros((0, 0), np.float32),
                                                  outputs=np.zeros((0, 0), np.float32)),
                                shard_rows=(), shard_of=population)
    has = {"embedding": logged.embeddings.shape[1] > 0, "outputs": logged.outputs.shape[1] > 0}
    unobservable = {stage: UNOBSERVABLE for stage in ("load", "weights", "pixels", "head")}
    unobservable.update({stage: f"{UNOBSERVABLE}; it has no '{stage}'" for stage, there in has.items() if not there})
    matched = match_rows(logged, fixture)
    sample_errors: list[tuple[str, str]] = []
    if matched is not None:
        _require_biases(log, logged, fixture, has["outputs"])
        reference = None
        keep = []
        for j, i in enumerate(matched):
            got, want = logged.rows[j].input_biases, fixture.rows[i].input_biases
            if got and got != want:
                sample_errors.append((logged.rows[j].name, f"logged with input_biases {list(got)}, the fixture's "
                                                           f"are {list(want)}: not the same request"))
            else:
                keep.append(j)
        rows = [matched[j] for j in keep]
        source = f"fixture {fixture.root}"
    else:
        reference, keep, sample_errors = spec_reference(spec, logged, device=device, progress=progress)
        rows = keep
        outside = sum(1 for row in logged.rows if fixture is None or row.name not in fixture.names)
        source = (f"the spec's pipeline on the logged images ({outside} of {len(logged.rows)} not in the fixture)"
                  if fixture is not None else "the spec's pipeline on the logged images (no fixture)")
    return CandidateRun(
        "logged", description={"candidate": {"logged": str(log), "reference": source}}, rows=tuple(rows),
        sample_errors=tuple(sample_errors),
        embeddings=logged.embeddings[keep] if has["embedding"] else None,
        outputs=logged.outputs[keep] if has["outputs"] else None,
        unobservable=unobservable, reference=reference,
        shard_rows=None if positions is None else tuple(zip(positions, (r.name for r in logged.rows))), shard_of=population,
    )
