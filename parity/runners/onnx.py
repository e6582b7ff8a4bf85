"""An ONNX export as the candidate, run with onnxruntime (``[candidate] onnx = "model.onnx"``).

The graph may hold the backbone, the head or both; its inputs say which:

- a float input shaped (B, 3, H, W) takes pixels, which the spec's preprocessing produces;
- a float input shaped (B, D) takes embeddings (the head), fed the fixture's reference
  embeddings for the head stage and the candidate's own embeddings for the outputs stage;
- an integer input shaped (B, K) takes ``input_biases``.

Its outputs are read by name: ``embedding`` (or ``embeddings``) is the embedding stage, the
output named by ``[candidate].output_key`` (default ``outputs``, else the only other output) is
the head's outputs. A part the graph does not hold is the spec's, loaded with ``strict=True``
(a backbone-only export is deployed with the spec's head, and the other way round).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import numpy as np

from parity.extras import require
from parity.model.pipeline import build_pipeline
from parity.store.checkpoints import StrictLoadError
from parity.errors import SpecError
from parity.store.fixtures import Fixture
from parity.results import CandidateRun
from parity.model.batches import Decoded, decoded_batches, embed_pixels
from parity.model.fast_pixels import recorded_pixels
from parity.spec import Spec

__all__ = ["run", "OnnxGraph", "inspect_graph", "providers_for", "shape_misfit"]

Progress = Callable[[int, int], None]

EMBEDDING_OUTPUTS = ("embedding", "embeddings")
_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INTS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_IN_GRAPH = "an ONNX graph carries its own weights: strict loading does not apply"
_FOLDED = ("the exporter folds and renames initializers, so they cannot be matched to the trained tensors; "
           "the embedding and outputs stages check them")


@dataclass(frozen=True)
class OnnxGraph:
    """What an exported graph takes and gives, by role.

    ``pixels``, ``embedding`` and ``biases`` are input names (``None`` when absent);
    ``embedding_output`` and ``outputs`` are output names; ``batch`` is a fixed batch size
    when the graph was exported with one.
    """

    path: Path
    pixels: str | None
    embedding: str | None
    biases: str | None
    embedding_output: str | None
    outputs: str | None
    dtypes: dict[str, Any]
    batch: int | None

    @property
    def parts(self) -> tuple[str, ...]:
        """``backbone`` and/or ``head``: what the graph computes."""
        head = self.embedding is not None or (self.pixels is not None and self.outputs is not None)
        return tuple(p for p, inside in (("backbone", self.pixels is not None), ("head", head)) if inside)


def providers_for(device: str) -> list[str]:
    """CUDA (then CPU as fallback) for a ``cuda`` device when onnxruntime has it; else CPU.

    Raises:
        SpecError: a CUDA device was asked for and this onnxruntime has no CUDA provider.
    """
    import onnxruntime

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise SpecError(f"device {device!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
                            f"(available: {', '.join(onnxruntime.get_available_providers())}); install "
                            "onnxruntime-gpu or use --device cpu")
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, device: str):
    """An onnxruntime session for ``path``.

    Raises:
        SpecError: onnxruntime is not installed, the file is missing or is not a valid model.
    """
    onnxruntime = require("onnxruntime", "[candidate].onnx")
    if not path.is_file():
        raise SpecError(f"[candidate].onnx: {path} not found; export the model first (see examples/onnx/export.py)")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the gate reports what matters
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers_for(device))
    except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph, ...: no common base class
        raise SpecError(f"[candidate].onnx: onnxruntime cannot load {path}: {e}") from e


def inspect_graph(session, path: Path, *, output_key: str | None = None) -> OnnxGraph:
    """Sort the graph's inputs and outputs into roles (module docstring).

    Raises:
        SpecError: an input parity cannot feed, no pixel or embedding input, or no output to compare.
    """
    pixels = embedding = biases = None
    dtypes: dict[str, Any] = {}
    batch = None
    for node in session.get_inputs():
        shape = list(node.shape)
        if node.type in _FLOATS and len(shape) == 4 and shape[1] == 3:
            pixels = node.name
        elif node.type in _FLOATS and len(shape) == 2:
            embedding = node.name
        elif node.type in _INTS and len(shape) == 2:
            biases = node.name
        else:
            raise SpecError(f"[candidate].onnx {path}: input {node.name!r} ({node.type} {shape}) is none of what "
                            "parity can feed: pixels (B, 3, H, W) float, an embedding (B, D) float, input_biases "
                            "(B, K) int")
        dtypes[node.name] = _FLOATS.get(node.type) or _INTS[node.type]
        if isinstance(shape[0], int):
            if shape[0] < 1:
                raise SpecError(f"[candidate].onnx {path}: input {node.name!r} has the fixed shape {shape}, a batch "
                                f"of {shape[0]} samples, which no sample can be fed in; export it with a dynamic "
                                f"batch dimension (dynamic_axes={{{node.name!r}: {{0: 'batch'}}}}) or a batch of 1")
            batch = shape[0]
    if pixels is not None and embedding is not None:
        raise SpecError(f"[candidate].onnx {path}: the graph takes both pixels ({pixels!r}) and an embedding "
                        f"({embedding!r}); export the backbone and the head as one graph or as two")
    if pixels is None and embedding is None:
        raise SpecError(f"[candidate].onnx {path}: no pixels (B, 3, H, W) or embedding (B, D) input")
    names = [node.name for node in session.get_outputs()]
    embedding_output = next((n for n in EMBEDDING_OUTPUTS if n in names), None)
    if output_key is not None:
        if output_key not in names:
            raise SpecError(f"[candidate].output_key = {output_key!r} is not an output of {path}; its outputs: "
                            f"{', '.join(names)}")
        outputs = output_key
    else:
        rest = [n for n in names if n != embedding_output]
        outputs = "outputs" if "outputs" in rest else (rest[0] if len(rest) == 1 else None)
        if outputs is None and rest:
            raise SpecError(f"[candidate].onnx {path}: outputs {', '.join(rest)}; set [candidate].output_key to "
                            "the one holding the head's outputs")
    if outputs is None and embedding_output is None:
        raise SpecError(f"[candidate].onnx {path}: no output to compare")
    if embedding is not None and outputs is None:
        raise SpecError(f"[candidate].onnx {path}: takes an embedding but gives no outputs; name the head's "
                        "output 'outputs' or set [candidate].output_key")
    return OnnxGraph(path, pixels, embedding, biases, embedding_output, outputs, dtypes, batch)


def shape_misfit(session, graph: OnnxGraph, fixture: Fixture, *, postprocess: str = "none") -> str:
    """Why the graph's declared widths cannot match the fixture's (``""`` when they can, or are dynamic).

    Read from the graph's signature alone, so a wrong export is refused before any sample is decoded.
    """
    widths = {node.name: node.shape[-1] for node in [*session.get_inputs(), *session.get_outputs()]
              if len(node.shape) == 2 and isinstance(node.shape[-1], int)}
    expected = [(graph.embedding, "input", fixture.embeddings.shape[1], "embeddings"),
                (graph.embedding_output, "output", fixture.embeddings.shape[1], "embeddings")]
    if postprocess == "none":  # a postprocess may change the shipped width: the outputs stage judges it then
        expected.append((graph.outputs, "output", fixture.outputs.shape[1], "head outputs"))
    for name, role, want, what in expected:
        if name in widths and widths[name] != want:
            return (f"the ONNX graph {graph.path.name}'s {role} {name!r} is {widths[name]} wide, the fixture's "
                    f"{what} are {want} wide: the export is not of the model the fixture was made with. "
                    f"Change the shipped code: export the trained model (its {what} are {want} wide)")
    return ""


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Run the exported graph over every fixture sample; the parts it lacks come from the spec."""
    device = device or spec.runtime.device
    path = Path(spec.candidate.target)
    session = open_session(path, device)
    graph = inspect_graph(session, path, output_key=spec.candidate.output_key)
    misfit = shape_misfit(session, graph, fixture, postprocess=spec.candidate.postprocess)
    if misfit:  # before any image is decoded or any torch module built: a broken export fails in a second
        return CandidateRun("onnx", errors={"load": misfit})
    in_graph = set(graph.parts)
    # A whole-pipeline graph needs only the spec's pixels: numpy makes them without torch when the spec
    # resolves to the fixture's recorded preprocessing; a part the graph lacks is the spec's (torch).
    source, why = (recorded_pixels(spec, fixture) if in_graph == {"backbone", "head"}
                   else (None, f"the graph holds only the {'/'.join(graph.parts)}; the rest is the spec's torch module"))
    pipeline = None
    if source is None:
        try:
            pipeline = build_pipeline(spec, device=device)
        except StrictLoadError as e:
            return CandidateRun("onnx", load_failure=e.key_diff)
    runner = _Graph(session, graph, pipeline, source or pipeline)
    if pipeline is not None:
        description = pipeline.describe()
        fingerprints = {part: prints for part, prints in pipeline.fingerprints.items() if part not in in_graph}
    else:
        # what onnxruntime ran with: torch's numerics flags (TF32, SDPA, threads) are not this candidate's
        numerics = {"device": device.partition(":")[0], "batch_size": spec.runtime.batch_size,
                    "engine": f"onnxruntime {_version('onnxruntime')}"}
        description, fingerprints = {"preprocess": source.record, "numerics": numerics,
                                     "runtime": {"device": device, "dtype": spec.runtime.dtype}}, {}
    description["candidate"] = {"onnx": str(path), "parts": list(graph.parts), "providers": session.get_providers(),
                                "pixels": "numpy, the fixture's recorded preprocessing" if pipeline is None
                                else f"the spec's library transform ({why})"}
    unobservable: dict[str, str] = {}
    if in_graph == {"backbone", "head"}:
        unobservable["load"] = _IN_GRAPH
    if not fingerprints:
        unobservable["weights"] = _FOLDED

    seen = _run_rows(runner, fixture, progress)
    errors = dict(seen.errors)
    embeddings = None
    if graph.pixels is not None and graph.embedding_output is None:
        unobservable["embedding"] = "the ONNX graph has no 'embedding' output (name it so to compare it)"
    elif "embedding" not in errors:
        embeddings = (np.concatenate(seen.embeddings) if seen.embeddings
                      else np.zeros((0, fixture.embeddings.shape[1]), np.float32))
    head_outputs = outputs = None
    if graph.pixels is not None and "head" in in_graph:
        unobservable["head"] = ("the ONNX graph takes pixels, so its head cannot be fed the reference embeddings; "
                                "export the head as its own graph to see this stage")
        if "embedding" not in errors:
            outputs = np.concatenate(seen.outputs) if seen.outputs else np.zeros((0, fixture.outputs.shape[1]))
    else:
        try:
            head_outputs = runner.head(fixture.embeddings, fixture.biases())
        except _RunError as e:
            errors["head"] = str(e)
        if embeddings is not None and seen.rows and embeddings.shape[1:] == fixture.embeddings.shape[1:]:
            try:
                outputs = runner.head(embeddings, fixture.biases(seen.rows))
            except _RunError as e:
                errors["outputs"] = str(e)
    return CandidateRun("onnx", description=description, fingerprints=fingerprints or None,
                        modules={part: getattr(pipeline, part) for part in fingerprints}, rows=tuple(seen.rows),
                        sample_errors=tuple(seen.sample_errors), conversions=seen.conversions, pixels=seen.pixels,
                        embeddings=embeddings, head_outputs=head_outputs, outputs=outputs, errors=errors,
                        unobservable=unobservable)


class _RunError(Exception):
    """onnxruntime (or the spec's module standing in for a part) raised; the message says which and why."""


class _Graph:
    """The graph plus the spec's parts it lacks."""

    def __init__(self, session, graph: OnnxGraph, pipeline, pixels) -> None:
        # ``pipeline``: the spec's, for the parts the graph lacks (None when it lacks none);
        # ``pixels``: what preprocesses for it (the pipeline, or numpy pixels)
        self.session, self.graph, self.pipeline, self.pixels = session, graph, pipeline, pixels

    def _call(self, feeds: dict[str, np.ndarray], wanted: list[str]) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(value, dtype=self.graph.dtypes[name]) for name, value in feeds.items()}
        size, total = self.graph.batch, len(next(iter(feeds.values())))
        try:
            if size is None or size == total:
                results = self.session.run(wanted, feeds)
            else:  # exported with a fixed batch size: feed it slices of that size
                parts = [self.session.run(wanted, {k: v[s:s + size] for k, v in feeds.items()})
                         for s in range(0, total, size)]
                results = [np.concatenate([p[i] for p in parts]) for i in range(len(wanted))]
        except Exception as e:  # onnxruntime's Fail, InvalidArgument, RuntimeException: no common base
            raise _RunError(f"onnxruntime raised {type(e).__name__}: {e}") from e
        return [np.asarray(r, dtype=np.float32) for r in results]

    def run_pixels(self, pixels: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(embeddings, outputs)`` of a batch of pixels; either is ``None`` when the graph does not give it."""
        g = self.graph
        if g.pixels is None:
            import torch

            try:
                return embed_pixels(self.pipeline, torch.from_numpy(pixels), batch_size=len(pixels)), None
            except (RuntimeError, ValueError, AssertionError) as e:
                raise _RunError(f"the spec's backbone raised {type(e).__name__}: {e}") from e
        wanted = [n for n in (g.embedding_output, g.outputs) if n]
        feeds = {g.pixels: pixels}
        if g.biases is not None:
            feeds[g.biases] = biases
        results = dict(zip(wanted, self._call(feeds, wanted)))
        return results.get(g.embedding_output), results.get(g.outputs)

    def head(self, embeddings: np.ndarray, biases: np.ndarray) -> np.ndarray:
        """Head outputs for embeddings: the graph's head, or the spec's for a backbone-only graph."""
        g = self.graph
        if g.embedding is None:
            try:
                return self.pipeline.run_head(embeddings, biases).numpy()
            except (RuntimeError, ValueError, IndexError) as e:
                raise _RunError(f"the spec's head raised {type(e).__name__}: {e}") from e
        feeds = {g.embedding: embeddings}
        if g.biases is not None:
            feeds[g.biases] = biases
        return self._call(feeds, [g.outputs])[0]


@dataclass
class _Seen(Decoded):
    embeddings: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _run_rows(runner: _Graph, fixture: Fixture, progress: Progress | None) -> _Seen:
    """Each sample decoded once and preprocessed by the spec, then embedded batch by batch."""
    seen = _Seen()
    for batch_rows, batch in decoded_batches(runner.pixels, fixture, seen, progress=progress):
        if batch and "embedding" not in seen.errors:
            pixels = np.stack([x if isinstance(x, np.ndarray) else x.numpy() for x in batch])
            try:
                embeddings, outputs = runner.run_pixels(pixels, fixture.biases(batch_rows))
            except _RunError as e:
                seen.errors["embedding"] = str(e)
            else:
                if embeddings is not None:
                    seen.embeddings.append(embeddings)
                if outputs is not None:
                    seen.outputs.append(outputs)
    return seen
