"""Mixed-precision repair: which backbone modules to keep in float32 so a failing float16/bfloat16 cell passes.

Like Polygraphy's ``debug precision`` for TensorRT, but on the spec's own torch model: the backbone's
module groups (its top-level children, with each block of a ``Sequential``/``ModuleList`` apart), in
data order, are all kept in float32 first; then halves, quarters, ... down to single groups are put
back into the cell's dtype wherever the cell still passes. A kept module runs in float32 on inputs
cast up, and its outputs are cast back down, as the shipped code would run it. The kept set is
confirmed by re-running the cell on a fresh copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.errors import SpecError
from parity.judge.arrays import compare_arrays
from parity.judge.tolerance import cell_tolerance
from parity.model.batches import extract_pixels
from parity.model.pipeline import build_pipeline
from parity.results import Comparison, PrecisionRepair
from parity.spec import Spec
from parity.store.fixtures import load_fixture
from parity.store.images import load_image

__all__ = ["REPAIRABLE", "module_groups", "repair_precision"]

REPAIRABLE = ("float16", "bfloat16")


def module_groups(model: Any) -> list[str]:
    """The backbone's module groups in data order (registration order), each holding parameters."""
    import torch

    groups = []
    for name, child in model.named_children():
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)):
            groups += [f"{name}.{inner}" for inner, block in child.named_children()
                       if next(block.parameters(), None) is not None]
        elif next(child.parameters(), None) is not None:
            groups.append(name)
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

    mixed = copy.deepcopy(model).to(dtype).eval()
    for name in keep:
        module = mixed.get_submodule(name).float()
        module.register_forward_pre_hook(lambda _m, args: _cast(args, torch.float32))
        # registered after any hook the model already has: the module's own hooks run in float32 too
        module.register_forward_hook(lambda _m, _args, out: _cast(out, dtype))
    return mixed


def repair_precision(spec: Spec, *, dtype: str, fixtures: str | Path | None = None, batch_size: int | None = None,
                     samples: int | None = None, progress: Callable[[int], None] | None = None) -> PrecisionRepair:
    """Find a small set of backbone modules to keep in float32 so the deployment cell at ``dtype`` passes (CPU).

    Args:
        dtype: the cell's precision (float16 or bfloat16).
        batch_size: images per backbone call (default ``[runtime].batch_size``).
        samples: search on the fixture's first ``samples`` samples only (quicker); the confirming re-run
            uses every sample.
        progress: called with the number of trials run so far.

    Raises:
        SpecError: ``dtype`` is not a reduced precision.
    """
    import torch

    if dtype not in REPAIRABLE:
        raise SpecError(f"a precision repair keeps modules in float32 for a {' or '.join(REPAIRABLE)} cell, "
                        f"not {dtype!r}")
    fixture = load_fixture(spec.fixture_root(fixtures))
    pipeline = build_pipeline(spec, device="cpu", fingerprints=False)
    pixels = torch.stack([pipeline.preprocess(load_image(row.image, exif_transpose=spec.preprocess.exif_transpose))
                          for row in fixture.rows])
    own, target, budget = pipeline.backbone, getattr(torch, dtype), cell_tolerance(spec, dtype)
    size = batch_size or spec.runtime.batch_size
    tried = 0

    def judge(keep: Sequence[str], count: int | None = samples) -> Comparison:
        nonlocal tried
        tried += 1
        if progress:
            progress(tried)
        out = extract_pixels(mixed_copy(own, target, keep), pixels[:count], [spec.backbone.extract],
                             library=pipeline.spec.backbone.library, batch_size=size, device="cpu", dtype=target,
                             normalize=spec.backbone.normalize)[spec.backbone.extract]
        return compare_arrays(np.asarray(out), fixture.embeddings[:count], names=list(fixture.names)[:count],
                              cosine=True, tolerance=budget)

    cell = f"{spec.backbone.extract}-cpu-{dtype}-bs{size}"
    before = judge((), None)
    if before:
        return PrecisionRepair(cell, dtype, before, (), before, confirmed=True, tried=tried)
    keep = module_groups(own)
    if not judge(keep):  # parameters outside every group (position embeddings, tokens) stay reduced
        return PrecisionRepair(cell, dtype, before, (), None, confirmed=False, tried=tried)
    chunk = max(1, len(keep) // 2)
    while True:
        start = 0
        while start < len(keep):
            trial = keep[:start] + keep[start + chunk:]
            if trial != keep and judge(trial):
                keep = trial
            else:
                start += chunk
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    after = judge(keep, None)  # the confirming re-run: a fresh copy, every sample
    return PrecisionRepair(cell, dtype, before, tuple(keep), after, confirmed=bool(after), tried=tried)
