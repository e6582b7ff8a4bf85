"""Deploy a torch module to an inference runtime and call it on numpy batches.

A deployment is what a service would run instead of the eager module: ``compile`` (``torch.compile``,
inductor), ``onnxruntime`` (the module exported to ONNX, run by an ``InferenceSession``) or
``openvino`` (the same ONNX file compiled by OpenVINO for the CPU). Quantization is part of the
deployment: ``dynamic_int8`` is torch's dynamic quantization of ``Linear`` layers (eager, compile),
``int8`` is onnxruntime's static quantization of the exported graph, calibrated on given inputs
(onnxruntime, openvino), optionally with some modules' nodes left unquantized (``exclude``: the ONNX
nodes the TorchScript exporter scoped under those modules, `exported_scopes`). A combination that
cannot run here raises `DeployError` with the reason, never a traceback: the variant matrix shows it
as a skipped cell.

Nothing here knows what the module computes: the matrix deploys a pixels -> embeddings module
(`parity.model.batches.extraction_module`), and a head can be deployed the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.errors import DeployError, SpecError
from parity.extras import require
from parity.model.quantize import dynamic_int8_copy
from parity.spec import QUANTIZATIONS, RUNTIMES

__all__ = ["RUNTIMES", "QUANTIZATIONS", "Deployed", "ExportedScope", "deploy", "exported_scopes", "refusal"]

_QUANTIZED_BY = {"dynamic_int8": ("eager", "compile"), "int8": ("onnxruntime", "openvino")}
_EXPORTED = ("onnxruntime", "openvino")
# OpenVINO's CPU plugin picks bf16 by itself on CPUs with AMX or AVX512-BF16: a precision is always named.
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_OPSET = 17


@dataclass(frozen=True)
class ExportedScope:
    """The ONNX nodes that one module of the exported module became.

    ``path``: the scope components of its nodes' names down to the module, each with the module it names
    (``(("blocks", "model.blocks"), ("blocks.1", "model.blocks.1"))`` for ``/blocks/blocks.1/attn/qkv/MatMul``).
    """

    module: str
    path: tuple[tuple[str, str], ...]
    nodes: tuple[str, ...]

    @property
    def prefix(self) -> str:
        """Every one of its nodes' names starts with this: ``/blocks/blocks.1/`` (empty when it has no node)."""
        return "".join(f"/{component}" for component, _ in self.path) + "/" if self.path else ""


@dataclass
class Deployed:
    """A module deployed to a runtime: call it on numpy arrays (batch first), get numpy arrays back.

    ``load_s`` is what deploying cost (export, quantization, session creation or compilation, plus
    the first call that compiles): a deployment's model load.
    """

    runtime: str
    load_s: float
    call: Callable[..., tuple[np.ndarray, ...]] = field(repr=False)
    quantize: str = "none"
    threads: int | None = None
    # ``int8`` with ``exclude``: the modules' ONNX nodes left unquantized, in the exported graph's order.
    excluded: tuple[ExportedScope, ...] = ()

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """The module's outputs (float32) for one batch of inputs."""
        return self.call(*arrays)


def refusal(runtime: str, quantize: str = "none", *, device: str = "cpu", precision: str | None = None) -> str | None:
    """Why ``runtime`` cannot run with these settings here, or ``None`` (checked before any export)."""
    if runtime not in RUNTIMES:
        return f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}"
    if quantize not in QUANTIZATIONS:
        return f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}"
    if quantize != "none" and runtime not in _QUANTIZED_BY[quantize]:
        maker = "torch" if quantize == "dynamic_int8" else "onnxruntime.quantization"
        return (f"quantize = {quantize} is made by {maker} "
                f"for runtime {' or '.join(_QUANTIZED_BY[quantize])}, not {runtime}")
    if quantize == "dynamic_int8" and device != "cpu":
        return "torch's dynamic int8 quantization runs on CPU only"
    if runtime in _EXPORTED and device != "cpu":
        return f"{runtime} runs the exported graph on CPU here (its CUDA builds are not part of parity's extras)"
    if runtime == "onnxruntime" and precision not in (None, "float32"):
        return (f"onnxruntime runs the exported float32 graph; precision {precision} is the eager or compiled "
                f"module's (runtime eager or compile), or OpenVINO's inference precision (runtime openvino)")
    if runtime == "openvino" and precision not in (None, *_OPENVINO_PRECISION):
        return f"OpenVINO's inference precision is one of {', '.join(_OPENVINO_PRECISION)}, not {precision}"
    if quantize != "none" and precision not in (None, "float32"):
        return f"quantize = {quantize} starts from the float32 module, not {precision}"
    return None


def deploy(module, runtime: str, example: tuple, *, threads: int | None = None, quantize: str = "none",
           precision: str | None = None, calibration: Iterable[tuple[np.ndarray, ...]] | None = None,
           workdir: Path | None = None, exclude: Sequence[str] = ()) -> Deployed:
    """Deploy ``module`` (in eval mode) to ``runtime``.

    Args:
        example: input tensors of one batch, as the module takes them; the exported graph's batch axis
            (axis 0 of every input and output) is dynamic, other axes keep the example's sizes.
        threads: intra-op threads of onnxruntime's session and OpenVINO's compiled model (default: the
            runtime's own). Torch's threads are the caller's (``torch.set_num_threads``).
        quantize: ``none``, ``dynamic_int8`` (torch, ``Linear`` layers, eager or compile) or ``int8``
            (onnxruntime static quantization, QDQ, onnxruntime or openvino).
        precision: OpenVINO's inference precision (``float32``, ``bfloat16``, ``float16``; default
            float32, which its CPU plugin would otherwise lower to bf16 on CPUs with AMX); onnxruntime
            takes float32 only; eager and compile compute in the module's own dtype.
        calibration: batches of inputs (numpy) that ``int8`` calibrates activation ranges on (default:
            ``example``).
        workdir: where the ONNX files are written and kept; by default a temporary directory removed once
            the runtime has loaded them.
        exclude: with ``int8``, names of ``module``'s submodules (as ``module.named_modules()`` names them)
            whose ONNX nodes stay float32 (onnxruntime.quantization's ``nodes_to_exclude``); listed in
            ``Deployed.excluded``.

    Raises:
        DeployError: the combination is refused (with the reason), the runtime is not installed, or the
            export, quantization or compilation failed (with the library's own message).
        SpecError: ``exclude`` without ``int8``, or naming no submodule of ``module``.
    """
    first = example[0]
    reason = refusal(runtime, quantize, device=first.device.type, precision=precision)
    if reason is not None:
        raise DeployError(reason)
    if exclude and quantize != "int8":
        raise SpecError(f"exclude leaves modules out of onnxruntime's static int8 quantization (quantize = int8), "
                        f"not quantize = {quantize}")
    unknown = sorted(set(exclude) - {name for name, _ in module.named_modules()})
    if unknown:
        raise SpecError(f"exclude names no module of the deployed module: {', '.join(unknown)}")
    module = module.eval()
    began = time.perf_counter()
    if runtime in ("eager", "compile"):
        if quantize == "dynamic_int8":
            module = dynamic_int8_copy(module)
        call = _torch_call(module if runtime == "eager" else _compiled(module), first.device, first.dtype)
        if runtime == "compile":
            _first_call(call, example)  # torch.compile compiles on its first call: part of the load
        return Deployed(runtime, time.perf_counter() - began, call, quantize, threads)
    with _directory(workdir) as folder:
        path = _export(module, example, folder / "model.onnx")
        excluded: tuple[ExportedScope, ...] = ()
        if quantize == "int8":
            excluded = exported_scopes(path, module, exclude) if exclude else ()
            path = _quantize_int8(path, folder / "model.int8.onnx",
                                  calibration or [tuple(t.detach().cpu().numpy() for t in example)],
                                  [node for scope in excluded for node in scope.nodes])
        call = _onnxruntime(path, threads) if runtime == "onnxruntime" else \
            _openvino(path, threads, precision or "float32")
    return Deployed(runtime, time.perf_counter() - began, call, quantize, threads, excluded)


@contextlib.contextmanager
def _directory(workdir: Path | None):
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    folder = Path(tempfile.mkdtemp(prefix="parity-deploy-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _torch_call(module, device, dtype) -> Callable[..., tuple[np.ndarray, ...]]:
    import torch  # deferred: see deploy

    def call(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            # floating inputs take the module's dtype; integer ones (indices, categories) keep theirs
            inputs = [torch.from_numpy(np.asarray(a)) for a in arrays]
            inputs = [t.to(device, dtype if t.is_floating_point() else None) for t in inputs]
            out = module(*inputs)
            out = out if isinstance(out, (tuple, list)) else (out,)
            return tuple(o.float().cpu().numpy() for o in out)  # the copy out waits for the device

    return call


def _compiled(module):
    import torch  # deferred: see deploy

    try:
        return torch.compile(module)
    except Exception as e:  # torch.compile raises its own errors (no compiler, unsupported platform)
        raise DeployError(f"torch.compile refused the module: {_first_line(e)}") from e


def _first_call(call: Callable, example: tuple) -> None:
    try:
        call(*(t.detach().cpu().numpy() for t in example))
    except Exception as e:  # dynamo and inductor raise many types (BackendCompilerFailed, Unsupported, ...)
        raise DeployError(f"torch.compile failed: {_first_line(e)}") from e


def _require(library: str, purpose: str):
    """An optional library (or one of its modules), or `DeployError` naming the extra that installs it: a
    skipped cell, not a spec error."""
    try:
        top = require(library.partition(".")[0], purpose)
    except SpecError as e:
        raise DeployError(str(e)) from e
    return importlib.import_module(library) if "." in library else top


def _first_line(error: BaseException) -> str:
    """The error's type and first informative line (OpenVINO stacks "Exception from <file>" lines before its cause)."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("Exception from ")]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:400]}".strip()


def _export(module, example: tuple, path: Path) -> Path:
    """The module as an ONNX file with a dynamic batch axis, by the TorchScript exporter.

    torch 2.14's default exporter (``dynamo=True``) needs onnxscript, which parity's extras do not
    install; the TorchScript exporter needs only the ``onnx`` package (as ``examples/onnx/export.py``).
    """
    import torch  # deferred: see deploy

    _require("onnx", "runtime onnxruntime or openvino (the ONNX export)")
    with torch.no_grad():
        outputs = module(*example)
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    inputs = [f"input{i}" for i in range(len(example))]
    names = [f"output{i}" for i in range(count)]
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (docstring); its deprecation and tracer notices are known.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example), str(path), input_names=inputs, output_names=names,
                              dynamic_axes={name: {0: "batch"} for name in inputs + names}, opset_version=_OPSET,
                              dynamo=False)
    except Exception as e:  # the exporter raises RuntimeError, TypeError, SymbolicValueError, ... per unsupported op
        raise DeployError(f"torch.onnx.export failed: {_first_line(e)}") from e
    return path


def _unqualified(name: str) -> str:
    """A module's scope component in the TorchScript exporter's node names: its qualified name from the last
    non-numeric atom on (``blocks.0`` for ``model.blocks.0``), as ``torch.onnx.utils`` scopes modules."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def exported_scopes(path: Path, module, names: Sequence[str]) -> tuple[ExportedScope, ...]:
    """Per name in ``names`` (submodules of ``module``, the module exported to ``path`` by `deploy`), the ONNX
    nodes that came from it, from its scope in their names.

    The TorchScript exporter names a node ``/c1/c2/.../Op``, one component per module whose forward ran
    around it (`_unqualified`; a container iterated rather than called has none). Each component is resolved
    to the shallowest submodule below the previous one that it names; a node belongs to a module when the
    module or one of its submodules is on that path. Nodes outside every module (constants, the root's
    own arithmetic) belong to none; a module whose forward did not run in the export has no node.
    """
    onnx = _require("onnx", "quantize = int8")
    by_component: dict[str, list[str]] = {}
    for qualified, _ in module.named_modules():
        if qualified:
            by_component.setdefault(_unqualified(qualified), []).append(qualified)
    nodes: dict[str, list[str]] = {name: [] for name in names}
    paths: dict[str, tuple[tuple[str, str], ...]] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        resolved: list[tuple[str, str]] = []
        for component in node.name.split("/")[1:-1]:
            above = resolved[-1][1] + "." if resolved else ""
            inside = [q for q in by_component.get(component, ()) if q.startswith(above)]
            if not inside:
                break
            resolved.append((component, min(inside, key=lambda q: q.count("."))))
        for depth, (_, qualified) in enumerate(resolved):
            if qualified in nodes:
                nodes[qualified].append(node.name)
                paths.setdefault(qualified, tuple(resolved[:depth + 1]))
    return tuple(ExportedScope(name, paths.get(name, ()), tuple(nodes[name])) for name in names)


class _Calibration:
    """onnxruntime's calibration reader over numpy batches (duck-typed ``CalibrationDataReader``)."""

    def __init__(self, names: Sequence[str], batches: Iterable[tuple[np.ndarray, ...]]) -> None:
        self.batches = iter([dict(zip(names, batch)) for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _quantize_int8(path: Path, out: Path, calibration: Iterable[tuple[np.ndarray, ...]],
                   exclude: Sequence[str] = ()) -> Path:
    """Static int8 (QDQ), the format onnxruntime recommends for CPU: uint8 activations, int8 per-channel
    weights with ``reduce_range`` (7-bit weights: no saturation on x86-64 CPUs without VNNI); the ``exclude``
    nodes stay float32. `parity.results.PrecisionRepair.code` prints the same call."""
    quantization = _require("onnxruntime.quantization", "quantize = int8")
    onnx = _require("onnx", "quantize = int8")
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing": a notice on the root logger, not an error
    try:
        quantization.quantize_static(str(path), str(out), _Calibration(names, calibration),
                                     quant_format=quantization.QuantFormat.QDQ, per_channel=True, reduce_range=True,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8, nodes_to_exclude=list(exclude))
    except Exception as e:  # onnxruntime.quantization raises per unsupported graph pattern
        raise DeployError(f"onnxruntime.quantization failed: {_first_line(e)}") from e
    finally:
        quiet.setLevel(level)
    return out


def _onnxruntime(path: Path, threads: int | None) -> Callable[..., tuple[np.ndarray, ...]]:
    ort = _require("onnxruntime", "runtime onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own Fail / InvalidGraph / NotImplemented
        raise DeployError(f"onnxruntime refused the exported model: {_first_line(e)}") from e
    names = [i.name for i in session.get_inputs()]

    def call(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(o, np.float32) for o in session.run(None, dict(zip(names, arrays))))

    return call


def _openvino(path: Path, threads: int | None, precision: str) -> Callable[..., tuple[np.ndarray, ...]]:
    ov = _require("openvino", "runtime openvino")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision]}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:  # OpenVINO raises RuntimeError (or its own GeneralFailure) per unsupported op or hint
        raise DeployError(f"OpenVINO refused the exported model: {_first_line(e)}") from e
    ran = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # "<Type: 'float32'>"
    ran = ran.split("'")[1] if ran.count("'") == 2 else ran
    if ran != precision:  # the CPU plugin falls back to f32 where the CPU lacks the type: not what was asked for
        raise DeployError(f"OpenVINO computes in {ran} on this CPU, not {precision} (the CPU lacks the instructions "
                          f"for {precision})")
    outputs = list(compiled.outputs)
    request = compiled.create_infer_request()

    def call(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        result = request.infer(list(arrays))
        return tuple(np.array(result[o], np.float32) for o in outputs)  # a copy: the request reuses its buffers

    return call
