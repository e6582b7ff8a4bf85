"""The Ray engine (``[runtime].engine = "ray"``): the spec-built pipeline's batches over a Ray cluster.

Ray Data runs decode → preprocess → backbone → extract: one dataset item per local batch (the same
rows, in the same order, as the local engine), ``map_batches`` with a fixed pool of `EmbedActor`
actors that each build the pipeline once (one model per actor, one GPU each when the spec's device
is CUDA and the cluster has GPUs), and the results stream back to the driver in fixture order. Each
actor calls the same `parity.model.batches.embed_batch` as the local engine, so per-sample
decode errors, conversions, golden pixels and a failing backbone are recorded exactly as they are
locally; on one machine with the same torch thread count the embeddings are bit-identical.

Workers read the fixture's images by path (checked against the manifest's sha256 as locally) and
build the model from the spec's checkpoint paths: on a multi-node cluster both must be readable at
the same paths on every node, and parity with the same libraries installed there.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from parity.errors import CheckpointError, FixtureChangedError, SpecError
from parity.store.fixtures import Fixture, FixturePath, FixtureRow
from parity.model.pipeline import Pipeline, build_pipeline
from parity.model.batches import BatchResult, batch_rows, embed_batch
from parity.spec import Spec

__all__ = ["ray_batches", "ray_session", "EmbedActor", "import_ray", "check_reachable", "RAY_EXTRA",
           "RAY_CLIENT_EXTRA"]

Progress = Callable[[int, int], None]

# The optional extra that installs Ray Data, as named in pyproject.toml.
RAY_EXTRA = "ray"
# Ray's own extra for ``ray://`` addresses (Ray Client, over gRPC).
RAY_CLIENT_EXTRA = "ray[client]"
# Joining a cluster: Ray itself retries an unreachable address for minutes; parity tries a TCP
# connection this many times, each bounded, before it hands the address to Ray.
CONNECT_ATTEMPTS, CONNECT_TIMEOUT, CONNECT_BACKOFF = 3, 2.0, 0.5

# One batch's rows as plain values (a FixturePath's sha256 does not survive pickling): (index, name, path, sha256).
_Row = tuple[int, str, str, str]


def import_ray(address: str | None = None) -> ModuleType:
    """``ray`` with Ray Data, or say which extra installs it (also Ray Client for a ``ray://`` ``address``).

    Raises:
        SpecError: Ray (or Ray Data's dependencies) is not installed, or ``address`` is ``ray://...``
            and Ray Client's gRPC is not.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (its own dependencies, pyarrow and pandas, come with the extra)
    except ImportError as e:
        raise SpecError(f"[runtime].engine = 'ray' (--engine ray) needs Ray Data, which is not installed: "
                        f"pip install 'parity[{RAY_EXTRA}]' ({e})") from e
    if address is not None and address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise SpecError(f"ray_address {address!r} joins through Ray Client, which needs the extra "
                        f"'{RAY_CLIENT_EXTRA}' (gRPC): pip install '{RAY_CLIENT_EXTRA}', or give the cluster's "
                        "HOST:PORT (its GCS address) when this machine is one of its nodes")
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT`` (IPv6 in brackets); None for ``auto``,
    ``local`` and anything without a port (Ray resolves those itself, without retrying a network address)."""
    rest = address.removeprefix("ray://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str | None, *, attempts: int = CONNECT_ATTEMPTS, timeout: float = CONNECT_TIMEOUT,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Refuse a Ray address that takes no connection, after ``attempts`` bounded tries.

    Raises:
        SpecError: nothing accepts a TCP connection at the address's host and port.
    """
    target = _host_port(address) if address else None
    if target is None:
        return
    started, reason = time.monotonic(), ""
    for attempt in range(attempts):
        try:
            with socket.create_connection(target, timeout=timeout):
                return
        except OSError as e:
            reason = f"{type(e).__name__}: {e.strerror or e}" if not isinstance(e, TimeoutError) else \
                f"no answer within {timeout:g} s"
        if attempt + 1 < attempts:
            sleep(CONNECT_BACKOFF * 2 ** attempt)
    raise SpecError(f"cannot reach the Ray cluster at {address} ({reason}; {attempts} attempts over "
                    f"{time.monotonic() - started:.1f} s). Start it (`ray start --head`), or fix --ray-address / "
                    "[runtime].ray_address (leave it unset to start a local Ray instance)")


class EmbedActor:
    """One Ray actor of the pool: builds the pipeline once, then embeds the batches it is given.

    Args:
        spec: the spec the driver's pipeline was built from.
        device: the torch device for this actor (``cpu``, or ``cuda``: Ray gives each actor its own GPU).
        threads: torch's intra-op thread count (the driver's, so CPU results match the local engine);
            None keeps Ray's default.
        batches: every batch's rows, by batch index; the dataset's items carry only the index.
        golden: names of the samples whose pixels the fixture keeps.
        fingerprints: the driver's checkpoint fingerprints; this actor's must match (None: not checked).
    """

    def __init__(self, spec: Spec, device: str, threads: int | None, batches: Sequence[Sequence[_Row]],
                 golden: Sequence[str], fingerprints: Mapping[str, Any] | None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)  # Ray workers start with OMP_NUM_THREADS=1
        self.pipeline: Pipeline = build_pipeline(spec, device=device, fingerprints=fingerprints is not None)
        self.batches = batches
        self.golden = frozenset(golden)
        self.changed = "" if fingerprints is None else _weights_differ(fingerprints, self.pipeline.fingerprints)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"batch": [], "meta": [], "arrays": []}
        for index in batch["batch"].tolist():
            rows = [(i, FixtureRow(name, FixturePath(path, sha256=sha256), ())) for i, name, path, sha256 in
                    self.batches[index]]
            meta: dict[str, Any] = {"changed": self.changed, "checkpoint": bool(self.changed)}
            result = BatchResult()
            if not self.changed:
                try:
                    result = embed_batch(self.pipeline, rows, self.golden)
                except FixtureChangedError as e:  # raised again on the driver: nothing may be mixed
                    meta["changed"] = str(e)
            meta_text, arrays = _encode(result, meta)
            out["batch"].append(index)
            out["meta"].append(meta_text)
            out["arrays"].append(arrays)
        return {"batch": np.asarray(out["batch"], np.int64), "meta": np.asarray(out["meta"], object),
                "arrays": np.asarray(out["arrays"], object)}


def _weights_differ(expected: Mapping[str, Mapping[str, str]], got: Mapping[str, Mapping[str, str]]) -> str:
    """Why an actor's checkpoints are not the driver's ("" when they are: the same tensors, bit for bit)."""
    differ = sorted(f"{part}.{name}" for part in set(expected) | set(got)
                    for name in set(expected.get(part, {})) | set(got.get(part, {}))
                    if expected.get(part, {}).get(name) != got.get(part, {}).get(name))
    if not differ:
        return ""
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return (f"a Ray worker loaded other weights than this process: {', '.join(differ[:3])}{more} differ "
            "(expected the sha256 per tensor of the checkpoints loaded here). A checkpoint changed during the run "
            "or a node has other files at the spec's paths; give every node the same files and run again.")


def _encode(result: BatchResult, meta: dict[str, Any]) -> tuple[str, bytes]:
    """A batch's record as JSON plus one ``.npz`` (no pickles: the driver loads it with allow_pickle=False)."""
    names = list(result.pixels)
    meta.update(rows=result.rows, sample_errors=result.sample_errors, conversions=result.conversions,
                error=result.error, pixels=names, embedded=result.embeddings is not None)
    arrays = {f"pixels_{k}": result.pixels[name] for k, name in enumerate(names)}
    if result.embeddings is not None:
        arrays["embeddings"] = result.embeddings
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return json.dumps(meta), buffer.getvalue()


def _decode(meta_text: str, data: bytes) -> BatchResult:
    """The driver's side of `_encode`.

    Raises:
        FixtureChangedError: a worker found an image changed after the fixture was verified.
        CheckpointError: a worker loaded a checkpoint that differs from the driver's.
    """
    meta = json.loads(meta_text)
    if meta["changed"]:
        raise (CheckpointError if meta["checkpoint"] else FixtureChangedError)(meta["changed"])
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return BatchResult(
            rows=[int(i) for i in meta["rows"]],
            sample_errors=[(name, message) for name, message in meta["sample_errors"]],
            conversions=dict(meta["conversions"]),
            pixels={name: arrays[f"pixels_{k}"] for k, name in enumerate(meta["pixels"])},
            embeddings=arrays["embeddings"] if meta["embedded"] else None,
            error=meta["error"],
        )


@contextmanager
def ray_session(address: str | None) -> Iterator[ModuleType]:
    """``ray``, joined to ``address`` (a local instance when None) unless it is initialised already;
    an instance this call started is shut down on leaving.

    Raises:
        SpecError: Ray is not installed, or the cluster cannot be joined (the address takes no
            connection, Ray refuses it): bounded, never Ray's own unending retries.
    """
    # Without an address, ray.init joins $RAY_ADDRESS when it is set: that one is checked too.
    joining = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    ray = import_ray(joining)
    started = False
    if not ray.is_initialized():
        check_reachable(joining)
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
            raise SpecError(f"cannot join the Ray cluster at {joining or 'a new local instance'}: "
                            f"{type(e).__name__}: {e}") from e
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _pool(ray: ModuleType, pipeline: Pipeline, n_batches: int,
          actors: int | None) -> tuple[int, str, int | None, dict[str, float]]:
    """How many actors, their device, torch threads and Ray resources each.

    CPU: each actor takes as many CPUs as the driver's torch threads (fewer when ``actors`` are asked
    for that would not fit the cluster otherwise), and as many actors as fit. CUDA: one GPU per
    actor, one actor per GPU.

    Raises:
        SpecError: the spec's device is CUDA and the cluster has no GPU.
    """
    import torch

    resources = ray.cluster_resources()
    if pipeline.device.type == "cuda":
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise SpecError(f"[runtime].device = {str(pipeline.device)!r} but the Ray cluster has no GPU "
                            f"(resources: {dict(resources)}); use --device cpu or a cluster with GPUs")
        return actors or max(1, min(gpus, n_batches)), "cuda", None, {"num_gpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    threads = max(1, min(torch.get_num_threads(), cpus // (actors or 1)))
    return actors or max(1, min(cpus // threads, n_batches)), "cpu", threads, {"num_cpus": threads}


def ray_batches(pipeline: Pipeline, fixture: Fixture, *, progress: Progress | None = None,
                actors: int | None = None) -> Iterator[BatchResult]:
    """The Ray engine: every batch's `BatchResult`, in fixture order, as the actors finish them.

    Args:
        pipeline: the driver's pipeline (its spec, device and fingerprints are what the actors build).
        actors: the actor pool's size (default: as many as the cluster's CPUs or GPUs allow; on CPUs,
            each actor's torch threads are then reduced to fit, which may change the last bits).

    Raises:
        SpecError: Ray is not installed, or the spec's device needs GPUs the cluster lacks.
        FixtureChangedError: an image changed after the fixture was verified.
        CheckpointError: a worker loaded a different checkpoint than the driver.
    """
    batches = [[(i, row.name, str(row.image), getattr(row.image, "sha256", "")) for i, row in rows]
               for rows in batch_rows(fixture, pipeline.spec.runtime.batch_size)]
    import_ray(pipeline.spec.runtime.ray_address)
    if not batches:
        return
    with ray_session(pipeline.spec.runtime.ray_address) as ray:
        context = ray.data.DataContext.get_current()
        bars = context.enable_progress_bars
        context.enable_progress_bars = False  # the caller's `progress` reports instead
        try:
            size, device, threads, resources = _pool(ray, pipeline, len(batches), actors)
            dataset = ray.data.from_items([{"batch": b} for b in range(len(batches))]).map_batches(
                EmbedActor,
                batch_size=1,  # one item is one local batch: the same rows per forward as the local engine
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=size),
                fn_constructor_kwargs={
                    "spec": pipeline.spec, "device": device, "threads": threads, "batches": batches,
                    "golden": sorted(fixture.golden_pixels), "fingerprints": pipeline.fingerprints or None,
                },
                **resources,
            )
            # Items may finish out of order: hold early ones until their predecessors arrive.
            pending: dict[int, dict[str, Any]] = {}
            following = done = 0
            for row in dataset.iter_rows():
                pending[int(row["batch"])] = row
                while following in pending:
                    item = pending.pop(following)
                    yield _decode(item["meta"], item["arrays"])
                    done += len(batches[following])
                    following += 1
                    if progress:
                        progress(done, len(fixture.rows))
            if following != len(batches):
                raise RuntimeError(f"the Ray engine returned {following} of {len(batches)} batches")
        finally:
            context.enable_progress_bars = bars
