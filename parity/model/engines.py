"""Who runs the fixture's batches: this process (``local``) or a Ray cluster (``ray``), one record either way."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from parity.model.batches import BatchResult, local_batches
from parity.model.pipeline import Pipeline
from parity.store.fixtures import Fixture

__all__ = ["fixture_batches"]


def fixture_batches(pipeline: Pipeline, fixture: Fixture, *,
                    progress: Callable[[int, int], None] | None = None) -> Iterator[BatchResult]:
    """Every sample of ``fixture`` through the one batch loop, on the engine ``[runtime].engine`` names."""
    if pipeline.spec.runtime.engine == "ray":
        from parity.model.ray_engine import ray_batches  # deferred: starts (or joins) Ray

        return ray_batches(pipeline, fixture, progress=progress)
    return local_batches(pipeline, fixture, progress=progress)
