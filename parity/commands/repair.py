"""Mixed-precision repair: which modules to keep in float32 so a failing float16/bfloat16 cell passes, or
unquantized so a failing dynamic_int8 cell passes.

Like Polygraphy's ``debug precision`` for TensorRT, but on the spec's own torch model: the backbone's
and then the head's module groups (its top-level children, with each block of a ``Sequential``/``ModuleList`` apart), in
data order, are all kept in float32 first; then halves, quarters, ... down to single groups are put
back into the cell's dtype wherever the cell still passes. A kept module runs in float32 on inputs
cast up, and its outputs are cast back down, as the shipped code would run it. The kept set is
confirmed by re-running the cell on a fresh copy of the model.

A static int8 cell (runtime onnxruntime, ``quantize = "int8"``) is searched alike over the backbone's
groups (its head runs unquantized in torch): a kept module's ONNX nodes are left out of
onnxruntime's static quantization (``nodes_to_exclude``), the export quantized again per trial.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.commands.deployment import HeadVerdict, has_outputs, head_outputs, judge_head
from parity.commands.matrix import CHUNK_IMAGES
from parity.errors import SpecError
from parity.judge.arrays import compare_arrays
from parity.judge.tolerance import cell_tolerance
from parity.model.batches import extract_deployed, extract_pixels, extraction_module
from parity.model.pipeline import build_pipeline
from parity.model.quantize import DYNAMIC_INT8, dynamic_int8_copy
from parity.model.runtimes import ExportedScope, deploy
from parity.results import Comparison, PrecisionRepair
from parity.spec import Spec
from parity.store.fixtures import load_fixture
from parity.store.images import load_image

__all__ = ["REPAIRABLE", "INT8", "module_groups", "mixed_copy", "repair_precision"]

REPAIRABLE = ("float16", "bfloat16")
INT8 = "int8"
# `extraction_module` holds the backbone as its ``model``: the deployed module's names of the backbone's modules.
_EXTRACTED = "model"


def module_groups(model: Any) -> list[str]:
    """A model's module groups in data order (registration order), each holding parameters: its children,
    each block of a ``Sequential``/``ModuleList`` apart, looking through a wrapper that holds one child
    (transformers' ``vision_model``) and into a child that holds the blocks (its ``encoder.layers``)."""
    import torch

    blocks = (torch.nn.Sequential, torch.nn.ModuleList)

    def holds(module: Any) -> bool:
        return next(module.parameters(), None) is not None

    groups: list[str] = []

    def walk(module: Any, prefix: str) -> None:
        children = [(name, child) for name, child in module.named_children() if holds(child)]
        for name, child in children:
            inner = [c for c in child.children() if holds(c)]
            if isinstance(child, blocks):
                groups.extend(f"{prefix}{name}.{n}" for n, block in child.named_children() if holds(block))
            elif inner and (len(children) == 1 or any(isinstance(c, blocks) for c in inner)):
                walk(child, f"{prefix}{name}.")
            else:
                groups.append(f"{prefix}{name}")

    walk(model, "")
    return groups


def _cast(value: Any, dtype) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def mixed_copy(model: Any, dtype, keep: Sequence[str]) -> Any:
    """A copy of ``model`` in ``dtype`` with the ``keep`` modules in float32, inputs cast up and outputs down."""
    import torch

    mixed = copy.deepcopy(model)
    # The kept modules' own float32 values: a cast down and back up would keep their rounding (or overflow).
    own = {name: {k: v.clone() for k, v in mixed.get_submodule(name).state_dict().items()} for name in keep}
    mixed = mixed.to(dtype).eval()
    for name in keep:
        module = mixed.get_submodule(name).float()
        module.load_state_dict(own[name], strict=True)
        module.register_forward_pre_hook(lambda _m, args: _cast(args, torch.float32))
        # registered after any hook the model already has: the module's own hooks run in float32 too
        module.register_forward_hook(lambda _m, _args, out: _cast(out, dtype))
    return mixed


def repair_precision(spec: Spec, *, dtype: str, fixtures: str | Path | None = None, batch_size: int | None = None,
                     samples: int | None = None, progress: Callable[[int], None] | None = None,
                     quantize: str = "none", runtime: str = "eager") -> PrecisionRepair:
    """Find a small set of modules to keep in float32 (or unquantized) so the deployment cell passes (CPU).

    The cell is judged as `parity.commands.matrix` judges a deployment cell: its embeddings, and when the
    fixture has head outputs, the head's outputs and decisions. The module groups are the backbone's and,
    then, the head's (named ``head.NAME``); a static int8 cell's are the backbone's only.

    Args:
        dtype: the cell's precision (float16 or bfloat16; float32 with ``quantize``).
        batch_size: images per backbone call (default ``[runtime].batch_size``).
        samples: search on the fixture's first ``samples`` samples only (quicker); the confirming re-run
            uses every sample.
        progress: called with the number of trials run so far.
        quantize: ``dynamic_int8``: the cell quantizes every Linear; kept modules stay unquantized.
            ``int8`` (with runtime ``onnxruntime``): onnxruntime's static int8 of the exported backbone,
            calibrated as the matrix's cell (the fixture's first images, ``CHUNK_IMAGES`` rounded up to whole
            batches of ``batch_size``); kept modules' nodes stay float32.
        runtime: ``eager``, or ``onnxruntime`` for an ``int8`` cell.

    Raises:
        SpecError: ``dtype`` is not a reduced precision (nor float32 with dynamic_int8 or int8), or the runtime
            does not make the cell's quantization.
        DeployError: the export or onnxruntime's quantization failed (its message).
    """
    import torch

    if (quantize == INT8) != (runtime == "onnxruntime") or runtime not in ("eager", "onnxruntime"):
        raise SpecError(f"a repair runs runtime eager (float16, bfloat16, dynamic_int8) or onnxruntime (int8), not "
                        f"runtime {runtime!r} with quantize {quantize!r}")
    if quantize in (DYNAMIC_INT8, INT8):
        if dtype != "float32":
            raise SpecError(f"a {quantize} repair keeps modules unquantized in a float32 cell, not {dtype!r}")
    elif quantize != "none":
        raise SpecError(f"a repair keeps modules unquantized for a {DYNAMIC_INT8} or {INT8} cell, not {quantize!r}")
    elif dtype not in REPAIRABLE:
        raise SpecError(f"a precision repair keeps modules in float32 for a {' or '.join(REPAIRABLE)} cell, "
                        f"not {dtype!r}")
    fixture = load_fixture(spec.fixture_root(fixtures))
    pipeline = build_pipeline(spec, device="cpu", fingerprints=False)
    pixels = torch.stack([pipeline.preprocess(load_image(row.image, exif_transpose=spec.preprocess.exif_transpose))
                          for row in fixture.rows])
    own, target = pipeline.backbone, getattr(torch, dtype)
    budget = cell_tolerance(spec, dtype, quantize=quantize)
    values = {"dtype": dtype, "quantize": quantize}
    size = batch_size or spec.runtime.batch_size
    headed = has_outputs(fixture)
    exported = quantize == INT8  # the head of a static int8 cell runs unquantized in torch: not searched
    groups = module_groups(own) + ([f"head.{g}" for g in module_groups(pipeline.head) or [""]]
                                   if headed and not exported else [])
    biases = fixture.biases()
    extract = spec.backbone.extract
    # The matrix's int8 cell calibrates on its first chunk of images, in batches of its size.
    first = pixels[:size * -(-CHUNK_IMAGES // size)]
    calibration = [(first[s:s + size].numpy(),) for s in range(0, len(first), size)]
    excluded: list[ExportedScope] = []
    tried = 0

    def embeddings(keep: Sequence[str], count: int | None) -> np.ndarray:
        inner = [k for k in keep if not k.startswith("head.")]
        if exported:
            module = extraction_module(own, [extract], library=spec.backbone.library, normalize=spec.backbone.normalize)
            deployed = deploy(module, "onnxruntime", (pixels[:2],), quantize=INT8, calibration=calibration,
                              exclude=[f"{_EXTRACTED}.{k}" for k in inner])
            excluded[:] = deployed.excluded
            return extract_deployed(deployed, pixels[:count], [extract], batch_size=size)[extract]
        backbone = dynamic_int8_copy(own, inner) if quantize == DYNAMIC_INT8 else mixed_copy(own, target, inner)
        return extract_pixels(backbone, pixels[:count], [extract], library=spec.backbone.library, batch_size=size,
                              device="cpu", dtype=target, normalize=spec.backbone.normalize)[extract]

    def head_copy(keep: Sequence[str]) -> Any:
        outer = [k.removeprefix("head.") for k in keep if k.startswith("head.")]
        if exported:
            return pipeline.head
        return dynamic_int8_copy(pipeline.head, outer) if quantize == DYNAMIC_INT8 else \
            mixed_copy(pipeline.head, target, outer)

    def judge(keep: Sequence[str], count: int | None = samples) -> tuple[Comparison, HeadVerdict | None]:
        nonlocal tried
        tried += 1
        if progress:
            progress(tried)
        rows = fixture.subset(range(len(fixture.rows))[:count])
        out = embeddings(keep, count)
        head = head_copy(keep)
        comparison = compare_arrays(np.asarray(out), rows.embeddings, names=rows.names, cosine=True, tolerance=budget)
        if not headed:
            return comparison, None
        outputs = head_outputs(pipeline, head, out, biases[:count], device="cpu", dtype=target, batch_size=size)
        return comparison, judge_head(spec, rows, values, outputs, embeddings=out, embedding_comparison=comparison)

    def passes(judged: tuple[Comparison, HeadVerdict | None]) -> bool:
        comparison, verdict = judged
        return bool(comparison) and (verdict is None or verdict.passed)

    def reason(judged: tuple[Comparison, HeadVerdict | None]) -> str:
        return "" if judged[1] is None else judged[1].reason

    cell = (f"{extract}-cpu-{dtype}" + ("-onnxruntime" if exported else "")
            + (f"-q_{quantize}" if quantize != "none" else "") + f"-bs{size}")
    found = dict(dtype=dtype, quantize=quantize, runtime=runtime)
    before = judge((), None)
    if passes(before):
        return PrecisionRepair(cell, before=before[0], keep=(), after=before[0], confirmed=True, tried=tried, **found)
    keep = list(groups)
    if not passes(judge(keep)):  # parameters outside every group (position embeddings, tokens) stay reduced
        return PrecisionRepair(cell, before=before[0], keep=(), after=None, confirmed=False, tried=tried,
                               reason_before=reason(before), **found)
    chunk = max(1, len(keep) // 2)
    while True:
        start = 0
        while start < len(keep):
            trial = keep[:start] + keep[start + chunk:]
            if trial != keep and passes(judge(trial)):
                keep = trial
            else:
                start += chunk
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    after = judge(keep, None)  # the confirming re-run: fresh copies (a fresh export), every sample
    scopes = [scope for scope in excluded if scope.nodes]  # a module that did not run in the export has none
    nodes = tuple(node for scope in scopes for node in scope.nodes)
    # The kept modules' scopes without parity's wrapper's: as the user's own export of the backbone names them.
    prefixes = tuple("".join(f"/{c}" for c, name in scope.path if name != _EXTRACTED) + "/" for scope in scopes)
    return PrecisionRepair(cell, before=before[0], keep=tuple(keep), after=after[0], confirmed=passes(after),
                           tried=tried, reason_before=reason(before), reason_after=reason(after), nodes=nodes,
                           scopes=prefixes, **found)
