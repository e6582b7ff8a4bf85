"""Variant matrices: extraction mode × preprocessing × device × dtype, sharing work across cells.

Every preprocessing geometry is computed once per image, every per-pixel variant once per
geometry, one backbone trunk pass (timm's ``forward_features``) runs per distinct
(pixels, device, dtype, attention backend), and every extraction mode is taken from that
pass by `parity.libraries.extract_embeddings`, the function the gate's pipeline extracts
with. Budgets come from `parity.judge.tolerance.cell_tolerance`.

Every cell carries its cost (`parity.results.CellCost`): its trunk pass is timed batch by batch
after one untimed warm-up batch, ``repeat`` times, and cells that share a pass (extraction modes of
one configuration) share its timings. With a ``batch_size`` axis each cell is also compared with the
batch-size-1 run of its configuration (run apart when 1 is not among the values), so an output that
depends on its batch-mates fails naming batch dependence, and the module where it starts
(`parity.model.layers.first_batch_dependent_module`). Timing never changes a verdict.

Deployment cells (the spec's preprocessing and extraction) also run the spec's head on their
embeddings when the fixture has head outputs, judged by `parity.commands.deployment` (outputs at the
cell's budget, decisions as the gate's decisions stage); the head's time counts in the cell's cost.
A spec whose backbone or preprocessing is not timm's runs a deployment matrix on the pipeline's own pixels.

``quantize = "dynamic_int8"`` on the eager runtime runs copies of backbone and head with their Linear
layers quantized (`parity.model.quantize`). A ``runtime`` other than ``eager`` (or ``quantize =
"int8"``) deploys the pass's pixels -> embeddings module (`parity.model.batches.extraction_module`)
once per runtime, device, dtype, quantization and thread count (`parity.model.runtimes.deploy`); its
export or compile time is the cell's load time, the head runs in torch on the deployed backbone's
embeddings, and a deployment that cannot run here skips its cells with the reason. The ``threads``
axis sets torch's intra-op threads for the cell (restored after) and the runtime's own.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import platform
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.commands.deployment import batch_reason, has_outputs, head_outputs, judge_head
from parity.judge.arrays import compare_arrays
from parity.model.layers import first_batch_dependent_module
from parity.model.quantize import DYNAMIC_INT8, dynamic_int8_copy
from parity.errors import DeployError, SpecError
from parity.model.pipeline import build_pipeline
from parity.store.fixtures import files_version, load_fixture
from parity.store.images import load_image
from parity.model.batches import extract_deployed, extract_pixels, extraction_module
from parity.model.runtimes import Deployed, deploy, refusal
from parity.libraries import get as library
from parity.preprocess.transform import create_preprocess
from parity.results import Cell, CellCost, CellResult, MatrixReport, Shard, Status, Tolerance
from parity.store.shards import part_version, shard_fixture
from parity.spec import AXES, MEAN_STD_PRESETS, PRECISION_AXES, Spec, parse_axes, vocabulary
from parity.judge.tolerance import cell_tolerance

__all__ = ["AXES", "Cell", "CellResult", "MatrixReport", "expand_matrix", "run_matrix", "parse_axes",
           "cell_tolerance", "CHUNK_IMAGES"]

_ALWAYS_IN_ID = ("extract", "interpolation", "resize_backend", "device", "dtype")
_GEOMETRY = ("interpolation", "resize_backend", "crop_pct")
_PIXELS = _GEOMETRY + ("mean_std", "channel_order", "value_scale")
# Images whose geometry and pixels are held at once; a static int8 cell calibrates on its first chunk.
CHUNK_IMAGES = 64
_TRUNK = _PIXELS + PRECISION_AXES
_LOCATE_IMAGES = 4  # images of the batch hooked module by module to find where batch dependence starts


def _preset_name(mean: Sequence[float], std: Sequence[float]) -> str:
    if not len(mean):
        return "spec"
    for name, (m, s) in MEAN_STD_PRESETS.items():
        if np.allclose(m, mean) and np.allclose(s, std):
            return name
    return "spec"


def base_values(spec: Spec, data_config: Mapping[str, Any] | None, *, device: str | None = None) -> dict[str, Any]:
    """The spec's own value on every axis: the deployment configuration (threads: this process's torch threads).

    ``data_config`` None: the spec's preprocessing is its library's own (not timm's), whose pixel axes the
    matrix does not vary; they read ``"spec"``.
    """
    import torch  # deferred: the matrix's model code needs torch, its grammar does not

    if data_config is None:
        data_config = {"interpolation": "spec", "crop_pct": 1.0, "mean": (), "std": ()}
    return {
        "extract": spec.backbone.extract,
        "interpolation": data_config["interpolation"],
        "resize_backend": spec.preprocess.resize_backend,
        "crop_pct": float(data_config["crop_pct"]),
        "mean_std": _preset_name(data_config["mean"], data_config["std"]),
        "channel_order": spec.preprocess.channel_order,
        "value_scale": spec.preprocess.value_scale,
        "device": "cuda" if (device or spec.runtime.device).startswith("cuda") else "cpu",
        "dtype": spec.runtime.dtype,
        "tf32": False,
        "sdpa": "default",
        "runtime": "eager",
        "quantize": "none",
        "threads": torch.get_num_threads(),
        "batch_size": spec.runtime.batch_size,
    }


def _timm_passes(spec: Spec) -> bool:
    """Whether the spec's backbone and preprocessing are the libraries whose shared passes the matrix varies."""
    return vocabulary(spec.backbone.library).matrix and vocabulary(spec.preprocess.library).matrix


def resolve_data_config(spec: Spec) -> dict[str, Any] | None:
    """The preprocessing configuration without building the model (the matrix library's own resolution);
    None for another library's preprocessing, which the matrix runs as the pipeline does."""
    if not _timm_passes(spec):
        return None
    return library(spec.preprocess.library).data_config(spec)


def unsupported(spec: Spec, axes: Mapping[str, Sequence] | None = None) -> str | None:
    """Why the matrix cannot run this spec over ``axes`` (default: its ``[matrix]``), or ``None``.

    Extraction and pixel variants come from timm's shared passes; a deployment matrix (device, dtype,
    batch size, TF32, attention kernel, quantization) runs any library, on the pipeline's own pixels.
    """
    if _timm_passes(spec):
        return None
    varied = [a for a in ("extract",) + _PIXELS if a in dict(spec.matrix if axes is None else axes)]
    if not varied:
        return None
    return (f"the variant matrix derives every extraction mode from one timm forward_features pass and every "
            f"pixel variant from timm's transform; this spec uses {spec.backbone.library} with "
            f"{spec.preprocess.library} preprocessing, so only deployment axes (device, dtype, batch_size, tf32, "
            f"sdpa, quantize) can vary, not {', '.join(varied)}. Check preprocessing with `parity explain-preprocess`")


def _require_supported(spec: Spec, axes: Mapping[str, Sequence] | None = None) -> None:
    reason = unsupported(spec, axes)
    if reason is not None:
        raise SpecError(f"{spec.path}: {reason}")


def expand_matrix(spec: Spec, axes: Mapping[str, Sequence] | None = None, *, device: str | None = None,
                  data_config: Mapping[str, Any] | None = None) -> list[Cell]:
    """All cells of the spec's ``[matrix]`` (or ``axes``); axes not listed keep the spec's value.

    Raises:
        SpecError: the axes vary extraction or pixels of a spec whose backbone or preprocessing is not
            timm's (see `unsupported`).
    """
    _require_supported(spec, axes)
    axes = dict(spec.matrix if axes is None else axes)
    base = base_values(spec, data_config or resolve_data_config(spec), device=device)
    names = list(AXES)
    choices = [axes.get(name, (base[name],)) for name in names]
    always = _ALWAYS_IN_ID if _timm_passes(spec) else ("extract", "device", "dtype")
    shown = [n for n in names if n in always or len(axes.get(n, ())) > 1]
    cells = []
    for combo in itertools.product(*choices):
        values = dict(zip(names, combo))
        deployment = all(values[n] == base[n] for n in ("extract",) + _PIXELS)
        cell_id = "-".join(_id_part(n, values[n]) for n in shown)
        cells.append(Cell(tuple(values.items()), cell_id, deployment))
    return cells


def _id_part(axis: str, value: Any) -> str:
    if axis == "crop_pct":
        return f"crop{value:g}"
    if axis == "tf32":
        return "tf32" if value else "notf32"
    if axis == "sdpa":
        return f"sdpa_{value}"
    if axis == "batch_size":
        return f"bs{value}"
    if axis == "threads":
        return f"t{value}"
    if axis == "quantize":
        return f"q_{value}"
    return str(value)


def _precision_context(device: str, precision: str, tf32: bool, sdpa: str):
    import torch

    stack = contextlib.ExitStack()
    if precision.startswith("autocast_"):
        stack.enter_context(torch.autocast(device_type=device, dtype=getattr(torch, precision[len("autocast_"):])))
    if sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa]
        stack.enter_context(sdpa_kernel(backend))
    if device == "cuda":
        previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        stack.callback(_restore_tf32, previous)
    return stack


def _restore_tf32(previous: tuple[bool, bool]) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Torch's intra-op threads for one cell's pass, restored after."""
    import torch

    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _deploys(values: Mapping[str, Any]) -> bool:
    """Whether the pass runs a deployed module (`parity.model.runtimes`) rather than an eager copy."""
    return values["runtime"] != "eager" or values["quantize"] == "int8"


def _deploy_key(values: Mapping[str, Any], modes: Sequence[str]) -> tuple:
    # tf32 and sdpa are in the key: an export or a compile traces under the pass's numerics context.
    axes = ("runtime", "device", "dtype", "quantize", "threads", "tf32", "sdpa")
    return tuple(values[a] for a in axes) + tuple(modes)


class _Engine:
    """Caches shared between cells: converted models and runtime deployments for the whole run; decoded
    images, geometry and pixels for the current chunk of images only, so memory does not grow with the fixture."""

    def __init__(self, pipeline, batch_size: int, build_s: float = 0.0) -> None:
        self.pipeline, self.batch_size, self.build_s = pipeline, batch_size, build_s
        self.load_s: dict[tuple, float] = {}
        self.library = pipeline.spec.backbone.library
        self.own_pixels = not _timm_passes(pipeline.spec)
        self.images: list = []
        self.geometry: dict[tuple, Any] = {}
        self.pixels: dict[tuple, Any] = {}
        self.models: dict[tuple, Any] = {}
        self.deployments: dict[tuple, Deployed | DeployError] = {}
        self.warmed: dict[tuple, set[int]] = {}
        self.heads: dict[tuple, Any] = {}
        self.biases = np.zeros((0, 0), np.int64)

    def load(self, images: list, biases: np.ndarray | None = None) -> None:
        self.images = images
        self.biases = np.zeros((len(images), 0), np.int64) if biases is None else biases
        self.geometry.clear()
        self.pixels.clear()

    def unit_pixels(self, values: Mapping[str, Any]):
        import torch

        key = tuple(values[a] for a in _GEOMETRY)
        if key not in self.geometry:
            config = dict(self.pipeline.data_config, interpolation=values["interpolation"], crop_pct=values["crop_pct"])
            transform = create_preprocess(config, resize_backend=values["resize_backend"])
            self.geometry[key] = torch.stack([transform.geometry(image) for image in self.images])
        return self.geometry[key]

    def normalized_pixels(self, values: Mapping[str, Any]):
        key = tuple(values[a] for a in _PIXELS)
        if key not in self.pixels and self.own_pixels:  # the pipeline's own preprocessing, image by image
            import torch

            self.pixels[key] = torch.stack([self.pipeline.pixels(image) for image in self.images])
        if key not in self.pixels:
            mean, std = MEAN_STD_PRESETS.get(values["mean_std"], (self.pipeline.data_config["mean"],
                                                                  self.pipeline.data_config["std"]))
            config = dict(self.pipeline.data_config, mean=mean, std=std)
            finish = create_preprocess(config, channel_order=values["channel_order"],
                                       value_scale=values["value_scale"]).finish
            self.pixels[key] = finish(self.unit_pixels(values))  # per-pixel steps work on a batch too
        return self.pixels[key]

    def model(self, device: str, precision: str, quantize: str = "none"):
        import torch

        dtype = torch.float32 if precision.startswith("autocast_") else getattr(torch, precision)
        key = (device, dtype, quantize)
        if key not in self.models:
            own = self.pipeline.backbone
            first = next(own.parameters())
            began = time.perf_counter()
            if quantize == DYNAMIC_INT8:
                self.models[key] = dynamic_int8_copy(own)
                self.load_s[key] = time.perf_counter() - began
            elif first.device.type == device and first.dtype == dtype:
                self.models[key] = own  # the spec's own device and dtype: no copy; its load is the pipeline's build
                self.load_s[key] = self.build_s
            else:
                self.models[key] = copy.deepcopy(own).to(device, dtype).eval()
                self.load_s[key] = time.perf_counter() - began
        return self.models[key], dtype

    def deployed(self, values: Mapping[str, Any], modes: Sequence[str], pixels) -> Deployed:
        """The pass's extraction module deployed to its runtime, once per `_deploy_key` (a failure is kept too).

        Raises:
            DeployError: the runtime cannot run this pass here (refused, not installed, export or compile failed).
        """
        key = _deploy_key(values, modes)
        if key not in self.deployments:
            self.deployments[key] = self._deploy(values, modes, pixels)
        found = self.deployments[key]
        if isinstance(found, DeployError):
            raise found
        return found

    def _deploy(self, values: Mapping[str, Any], modes: Sequence[str], pixels) -> Deployed | DeployError:
        runtime, device, precision, size = values["runtime"], values["device"], values["dtype"], values["batch_size"]
        exported = runtime in ("onnxruntime", "openvino")
        reason = refusal(runtime, values["quantize"], device=device, precision=precision)
        if reason is None and precision.startswith("autocast_") and runtime != "compile":
            reason = f"autocast is torch's own mixed precision: runtime eager or compile, not {runtime}"
        if reason is not None:
            return DeployError(reason)
        # Exports and quantizations start from the float32 CPU module; OpenVINO lowers it to its own precision.
        float32 = exported or values["quantize"] != "none"
        model, dtype = self.model("cpu", "float32") if float32 else self.model(device, precision)
        module = extraction_module(model, modes, library=self.library, normalize=self.pipeline.spec.backbone.normalize)
        example = (pixels[:min(2, len(pixels))] if exported else pixels[:size]).to(device, dtype)
        calibration = [(pixels[s:s + size].numpy(),) for s in range(0, len(pixels), size)]
        try:
            with _precision_context(device, precision, values["tf32"], values["sdpa"]), \
                    _torch_threads(values["threads"]):
                return deploy(module, runtime, (example,), threads=values["threads"], quantize=values["quantize"],
                              precision=precision if exported else None, calibration=calibration)
        except DeployError as e:
            return e

    def load_seconds(self, values: Mapping[str, Any], modes: Sequence[str]) -> float:
        """The pass's model load: its deployment's export or compile, else its model copy (for the spec's own
        device and dtype, the pipeline's build)."""
        if _deploys(values):
            found = self.deployments.get(_deploy_key(values, modes))
            return found.load_s if isinstance(found, Deployed) else 0.0
        return self.load_s.get((values["device"], _model_dtype(values["dtype"]), values["quantize"]), 0.0)

    def head(self, device: str, precision: str, quantize: str = "none"):
        """The spec's head on the cell's device, dtype and quantization, its load counted in the model's.

        Only ``dynamic_int8`` quantizes the head: an ``int8`` cell's int8 graph is its deployed backbone,
        and its head runs unquantized in torch.
        """
        dtype = _model_dtype(precision)
        quantize = quantize if quantize == DYNAMIC_INT8 else "none"
        key = (device, dtype, quantize)
        if key not in self.heads:
            own = self.pipeline.head
            began = time.perf_counter()
            self.heads[key] = (dynamic_int8_copy(own) if quantize == DYNAMIC_INT8
                               else copy.deepcopy(own).to(device, dtype).eval())
            self.load_s[key] = self.load_s.get(key, 0.0) + time.perf_counter() - began
        return self.heads[key], dtype

    def outputs(self, values: Mapping[str, Any], embeddings: np.ndarray, *, start: int = 0,
                timings: list[float] | None = None) -> np.ndarray:
        """The head's outputs for the cell's embeddings of the chunk's images ``start:``, at its batch size."""
        head, dtype = self.head(values["device"], values["dtype"], values["quantize"])
        with _precision_context(values["device"], values["dtype"], values["tf32"], values["sdpa"]), \
                _torch_threads(values["threads"]):
            return head_outputs(self.pipeline, head, embeddings, self.biases[start:start + len(embeddings)],
                                device=values["device"], dtype=dtype, batch_size=values["batch_size"], timings=timings)

    def embeddings(self, values: Mapping[str, Any], modes: Sequence[str], *, count: int | None = None,
                   timings: list[float] | None = None) -> dict[str, np.ndarray]:
        """The cell's embeddings for the chunk's first ``count`` images (all by default), at its batch size."""
        pixels = self.normalized_pixels(values)
        if count is not None:
            pixels = pixels[:count]
        if _deploys(values):
            deployed = self.deployed(values, modes, pixels)
            # torch.compile guards on the numerics context it compiled under: the calls hold the same one.
            with _precision_context(values["device"], values["dtype"], values["tf32"], values["sdpa"]), \
                    _torch_threads(values["threads"]):
                return extract_deployed(deployed, pixels, modes, batch_size=values["batch_size"], timings=timings,
                                        warmed=self.warmed.setdefault(_deploy_key(values, modes), set()))
        model, dtype = self.model(values["device"], values["dtype"], values["quantize"])
        with _precision_context(values["device"], values["dtype"], values["tf32"], values["sdpa"]), \
                _torch_threads(values["threads"]):
            return extract_pixels(model, pixels, modes, library=self.library, batch_size=values["batch_size"],
                                  device=values["device"], dtype=dtype,
                                  normalize=self.pipeline.spec.backbone.normalize, timings=timings)


class _Meter:
    """One trunk pass's timings: per-batch seconds and images, peak memory, over every chunk and repeat."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.images: list[int] = []
        self.cuda_peak: float | None = None
        self.warm = False

    def cost(self, values: Mapping[str, Any], *, images: int, repeat: int, load_s: float) -> CellCost:
        import torch

        per_image = np.array(self.seconds) / np.maximum(np.array(self.images), 1) * 1e3
        total = float(np.sum(self.seconds))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
        cuda = values["device"] == "cuda"
        name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine() or "cpu")
        return CellCost(batch_size=int(values["batch_size"]), images=images,
                        repeat=repeat, latency_p50_ms=float(np.percentile(per_image, 50)) if per_image.size else 0.0,
                        latency_p95_ms=float(np.percentile(per_image, 95)) if per_image.size else 0.0,
                        throughput=sum(self.images) / total if total > 0 else 0.0, load_s=load_s,
                        peak_rss_mb=float(rss), cuda_peak_mb=self.cuda_peak, device_name=name)


def run_matrix(spec: Spec, *, fixtures: str | Path | None = None, axes: Mapping[str, Sequence] | None = None,
               device: str | None = None, tolerance: Tolerance | None = None,
               progress: Callable[[int, int], None] | None = None,
               shard: tuple[int, int] | None = None, repeat: int = 1) -> MatrixReport:
    """Run every cell against the fixture's reference embeddings, timing each cell's trunk pass.

    Args:
        tolerance: one budget for every cell (default: per precision, see `cell_tolerance`).
        repeat: timed passes over the images per cell (the first one's embeddings are judged).
        shard: ``(I, N)``: run shard I of N of the samples (`parity.store.shards`); the report records it
            for `parity.commands.merge`.
    """
    import torch

    _require_supported(spec, axes)
    root = spec.fixture_root(fixtures)
    fixture = load_fixture(root)
    shard_record = None
    if shard is not None:
        whole = len(fixture.rows)
        fixture, picked = shard_fixture(fixture, *shard)
        shard_record = Shard(index=shard[0], count=shard[1], of=whole, rows=tuple(picked), names=tuple(fixture.names),
                             runner="matrix", version=part_version(files_version(fixture.manifest), spec.path))
    if repeat < 1:
        raise SpecError(f"--repeat must be at least 1, got {repeat}")
    began = time.perf_counter()
    pipeline = build_pipeline(spec, device="cpu", fingerprints=False)  # the gate proves the weights; matrices compare outputs
    build_s = time.perf_counter() - began
    axes = dict(spec.matrix if axes is None else axes)
    cells = expand_matrix(spec, axes, device=device, data_config=resolve_data_config(spec))
    engine = _Engine(pipeline, spec.runtime.batch_size, build_s)
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[a] for a in _TRUNK), []).append(cell)
    # With a batch_size axis, each configuration's batch-size-1 pass is the cell's second reference.
    solo_of = {key: _solo_key(key) for key in groups if "batch_size" in axes and groups[key][0]["batch_size"] != 1}
    passes: dict[tuple, dict[str, Any]] = {key: dict(group[0].values) for key, group in groups.items()}
    modes: dict[tuple, set[str]] = {key: {c["extract"] for c in group} for key, group in groups.items()}
    for key, solo in solo_of.items():
        passes.setdefault(solo, dict(passes[key], batch_size=1))
        modes.setdefault(solo, set()).update(modes[key])
    results: dict[str, CellResult] = {}
    impossible: dict[tuple, str] = {}
    chunks: dict[tuple, dict[str, list[np.ndarray]]] = {}
    for key, values in passes.items():
        if values["device"] == "cuda" and not torch.cuda.is_available():
            impossible[key] = "CUDA is not available on this machine"
        elif not fixture.rows:
            impossible[key] = "no sample falls in this shard"
        elif _unquantizable(values):  # an eager quantized copy; a deployment says why it cannot run when made
            impossible[key] = _unquantizable(values)
        else:
            chunks[key] = {m: [] for m in sorted(modes[key])}
    meters = {key: _Meter() for key in groups}
    # Deployment cells run the head too when the fixture has its outputs (and so do their batch-size-1 passes).
    headed = {key for key, group in groups.items() if has_outputs(fixture) and any(c.deployment for c in group)}
    headed |= {solo_of[key] for key in headed if key in solo_of}
    head_chunks: dict[tuple, list[np.ndarray]] = {key: [] for key in headed}
    extract = spec.backbone.extract

    largest = max(v["batch_size"] for v in passes.values())
    total, step = len(fixture.rows), largest * -(-CHUNK_IMAGES // largest)  # whole batches of the largest size per chunk
    loaded: list[int] = []

    def load(start: int) -> None:
        engine.load([load_image(row.image, exif_transpose=spec.preprocess.exif_transpose)
                     for row in fixture.rows[start:start + step]], fixture.biases(range(start, min(start + step, total))))
        loaded[:] = [start]

    for start in range(0, total, step):
        load(start)
        for key, per_mode in chunks.items():
            if key in impossible:  # already impossible on an earlier chunk
                continue
            values, meter = passes[key], meters.get(key)
            head = extract if key in headed else None
            try:
                if meter is None:  # a batch-size-1 pass kept only to compare with: untimed
                    out = engine.embeddings(values, list(per_mode))
                    outputs = None if head is None else engine.outputs(values, out[head])
                else:
                    out, outputs = _timed(engine, values, list(per_mode), meter, repeat, head=head)
                for mode, array in out.items():
                    per_mode[mode].append(array)
                if outputs is not None:
                    head_chunks[key].append(outputs)
            except DeployError as e:
                impossible[key] = f"cannot deploy: {e}"
            # e.g. lanczos on tensors without antialias; a head's input_biases outside its embedding table
            except (ValueError, RuntimeError, NotImplementedError, IndexError) as e:
                impossible[key] = f"not possible here: {e}"
        if progress:
            progress(min(start + step, total), total)

    for key, reason in impossible.items():
        results.update({c.id: CellResult(c, Status.SKIP, reason=reason) for c in groups.get(key, ())})
    embeddings = {key: {mode: np.concatenate(parts) for mode, parts in per_mode.items()}
                  for key, per_mode in chunks.items() if key not in impossible}
    head_out = {key: np.concatenate(parts) for key, parts in head_chunks.items() if parts and key not in impossible}
    equivalent: set[tuple[str, ...]] = set()
    starts: dict[tuple, tuple[Any, Any]] = {}
    for key, group in groups.items():
        if key in impossible:
            continue
        equivalent |= _identical_modes(embeddings[key])
        values = passes[key]
        cost = meters[key].cost(values, images=total, repeat=repeat, load_s=engine.load_seconds(values, list(chunks[key])))
        solo = embeddings.get(solo_of.get(key))
        for cell in group:
            budget = tolerance or cell_tolerance(spec, cell["dtype"], quantize=cell["quantize"])
            array = embeddings[key][cell["extract"]]
            comparison = compare_arrays(array, fixture.embeddings, names=fixture.names, cosine=True, tolerance=budget)
            batch = None if solo is None else compare_arrays(array, solo[cell["extract"]], names=fixture.names,
                                                            cosine=True, tolerance=budget)
            verdict = None
            if cell.deployment and key in head_out:
                verdict = judge_head(spec, fixture, dict(cell.values), head_out[key], embeddings=array,
                                     embedding_comparison=comparison, solo_outputs=head_out.get(solo_of.get(key)),
                                     tolerance=tolerance)
            batch_outputs = None if verdict is None else verdict.batch_outputs
            numbers = bool(comparison) and (verdict is None or bool(verdict.outputs))
            batched = (batch is None or bool(batch)) and (batch_outputs is None or bool(batch_outputs))
            decided = verdict is None or not verdict.decisions_failed
            # [decisions].gate = "decisions": the gate accepts drift whose decisions pass (values of another shape
            # never); a deployment cell is judged alike.
            waived = (not numbers and spec.decisions.gate == "decisions" and verdict is not None
                      and verdict.flips is not None and decided and comparison.shapes_match
                      and verdict.outputs.shapes_match)
            status = Status.PASS if batched and decided and (numbers or waived) else Status.FAIL
            reason = ""
            if (batch is not None and not batch) or (batch_outputs is not None and not batch_outputs):
                headed_cell = cell.deployment and key in head_out
                if (key, headed_cell) not in starts:  # cells of one pass share where it starts
                    if loaded != [0]:  # it is found on the fixture's first images
                        load(0)
                    starts[key, headed_cell] = _batch_start(engine, values, budget, head=headed_cell)
                start, module = starts[key, headed_cell]
                reason = batch_reason(cell["batch_size"], batch, batch_outputs, start, module)
            reasons = "; ".join(r for r in (reason, "" if verdict is None else verdict.reason) if r)
            if waived:
                reasons = (f"drift whose decisions pass ({verdict.flips} changed, flip-rate bound "
                           f"{verdict.flip_bound:.3g}), accepted by [decisions].gate = \"decisions\" as the gate accepts "
                           f"it: " + "; ".join(r for r in (_embedding_drift(comparison), reasons) if r))
            results[cell.id] = CellResult(
                cell, status, comparison, reason=reasons, cost=cost, batch_comparison=batch,
                outputs=None if verdict is None else verdict.outputs, batch_outputs=batch_outputs,
                flip_bound=None if verdict is None else verdict.flip_bound,
                flips=None if verdict is None else verdict.flips)
    varied = tuple(a for a in AXES if len({c[a] for c in cells}) > 1)
    return MatrixReport(spec=str(spec.path), fixtures=str(root), cells=tuple(results[c.id] for c in cells),
                        axes=varied, equivalent_modes=tuple(sorted(equivalent)), reference_dtype=spec.runtime.dtype,
                        shard=shard_record)


def _solo_key(key: tuple) -> tuple:
    """The trunk key of the same configuration at batch size 1."""
    return tuple(1 if axis == "batch_size" else value for axis, value in zip(_TRUNK, key))


def _model_dtype(precision: str):
    import torch

    return torch.float32 if precision.startswith("autocast_") else getattr(torch, precision)


def _timed(engine: _Engine, values: Mapping[str, Any], modes: list[str], meter: _Meter,
           repeat: int, *, head: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The pass's embeddings for the chunk (and with ``head``, the extraction mode the head takes, its
    outputs), timed batch by batch ``repeat`` times, a batch's head call counted in its time.

    The pass's very first batch is its warm-up (first-call allocations, kernel choice): its outputs
    count, its time does not. A pass of one batch is run once more to have a timed one.
    """
    import torch

    cuda = values["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = outputs = None
    count, size = len(engine.images), values["batch_size"]
    runs = repeat + (1 if not meter.warm and count <= size else 0)
    for _ in range(runs):
        seconds: list[float] = []
        result = engine.embeddings(values, modes, timings=seconds)
        if head is not None:
            head_seconds: list[float] = []
            produced = engine.outputs(values, result[head], timings=head_seconds)
            outputs = produced if outputs is None else outputs
            seconds = [a + b for a, b in zip(seconds, head_seconds)]
        images = [min(size, count - start) for start in range(0, count, size)]
        if not meter.warm:
            seconds, images, meter.warm = seconds[1:], images[1:], True
        meter.seconds += seconds
        meter.images += images
        out = result if out is None else out
    if cuda:
        meter.cuda_peak = max(meter.cuda_peak or 0.0, torch.cuda.max_memory_allocated() / 2 ** 20)
    return out, outputs


def _embedding_drift(comparison) -> str:
    """The embeddings' drift in a waived cell's reason, or ``""`` when they are within the budget."""
    if comparison:
        return ""
    return (f"embeddings: max abs {comparison.max_abs:.3g}, {comparison.mismatched} of {comparison.total} values "
            f"beyond {comparison.tolerance.describe()}")


def _unquantizable(values: Mapping[str, Any]) -> str:
    """Why an eager pass's quantized copy cannot run here (the runtimes' own refusal), or ``""``."""
    if _deploys(values) or values["quantize"] == "none":
        return ""
    return refusal("eager", values["quantize"], device=values["device"], precision=values["dtype"]) or ""


def _batch_start(engine: _Engine, values: Mapping[str, Any], budget: Tolerance, *, head: bool) -> tuple[Any, Any]:
    """Where batch dependence starts: the first module (backbone, then head) whose outputs for the chunk's first
    images differ between one batch and the images alone, and that module; ``(None, None)`` when none does."""
    count = min(values["batch_size"], len(engine.images), _LOCATE_IMAGES)
    if count < 2:
        return None, None
    pixels = engine.normalized_pixels(values)
    model, dtype = engine.model(values["device"], values["dtype"], values["quantize"])
    parts = {"backbone": model}
    if head:
        parts["head"] = engine.head(values["device"], values["dtype"], values["quantize"])[0]
    extract = engine.pipeline.spec.backbone.extract

    def run(start: int, stop: int) -> None:
        with _precision_context(values["device"], values["dtype"], values["tf32"], values["sdpa"]):
            out = extract_pixels(model, pixels[start:stop], [extract], library=engine.library, batch_size=stop - start,
                                 device=values["device"], dtype=dtype, normalize=engine.pipeline.spec.backbone.normalize)
        if head:
            one = dict(values, batch_size=stop - start)
            engine.outputs(one, out[extract], start=start)

    start = first_batch_dependent_module(parts, run, count, atol=budget.atol, rtol=budget.rtol)
    if start is None:
        return None, None
    prefix, _, name = start.module.partition(".")
    return start, parts[prefix].get_submodule(name)


def _identical_modes(embeddings: Mapping[str, np.ndarray]) -> set[tuple[str, ...]]:
    """Groups of extraction modes that gave bit-identical embeddings (e.g. pre_logits and cls on CLIP ViTs)."""
    groups: list[list[str]] = []
    for mode, array in embeddings.items():
        for group in groups:
            first = embeddings[group[0]]
            if first.shape == array.shape and np.array_equal(first, array):
                group.append(mode)
                break
        else:
            groups.append([mode])
    return {tuple(g) for g in groups if len(g) > 1}
