"""A deployment cell end to end: the spec's head run on the cell's embeddings, judged as the gate judges.

A matrix cell that keeps the spec's preprocessing and extraction is a deployment: the head runs on
its embeddings on the cell's device, precision and quantization, called as the pipeline calls it
(`parity.model.pipeline.Pipeline.run_head`, with the fixture rows' ``input_biases``), one batch of the
cell's size at a time. Its outputs are compared with the fixture's at the cell's budget
(`parity.judge.tolerance.cell_tolerance`), its decisions checked for flips as the gate's decisions
stage checks them (`parity.judge.stages.decision_flips`, `decisions_stage`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.judge.arrays import compare_arrays
from parity.judge.stages import decision_flips, decisions_stage
from parity.judge.tolerance import cell_tolerance
from parity.model.pipeline import Pipeline
from parity.results import Comparison, LayerDivergence, Status, Tolerance
from parity.spec import Spec
from parity.store.fixtures import Fixture

__all__ = ["HeadVerdict", "has_outputs", "head_outputs", "judge_head", "batch_reason", "describe_module"]


@dataclass(frozen=True)
class HeadVerdict:
    """The head's part of a cell's verdict: outputs against the fixture's, decisions, batch dependence."""

    outputs: Comparison
    batch_outputs: Comparison | None = None
    flip_bound: float | None = None
    flips: int | None = None
    decisions_failed: bool = False
    reason: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and not self.decisions_failed and (self.batch_outputs is None or bool(self.batch_outputs))


def has_outputs(fixture: Fixture) -> bool:
    """Whether the fixture holds head outputs, one row per sample (a logged fixture may hold embeddings only)."""
    outputs = fixture.outputs
    return outputs.ndim == 2 and outputs.shape[0] == len(fixture.rows) and outputs.shape[1] > 0


def head_outputs(pipeline: Pipeline, head: Any, embeddings: np.ndarray, biases: np.ndarray, *, device: str, dtype,
                 batch_size: int, timings: list[float] | None = None) -> np.ndarray:
    """The head's outputs (N, L) float32 for ``embeddings``, ``batch_size`` rows per call, as the pipeline calls it.

    The caller holds the cell's numerics context (autocast, TF32). ``timings``, when given, gets each call's seconds.
    """
    import torch

    runner = dataclasses.replace(pipeline, head=head, device=torch.device(device), dtype=dtype)
    parts, size = [], max(1, batch_size)
    for start in range(0, len(embeddings), size):
        began = time.perf_counter()
        parts.append(runner.run_head(embeddings[start:start + size], biases[start:start + size]).numpy())
        if timings is not None:
            timings.append(time.perf_counter() - began)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def judge_head(spec: Spec, fixture: Fixture, values: dict[str, Any], outputs: np.ndarray, *,
               embeddings: np.ndarray, embedding_comparison: Comparison, solo_outputs: np.ndarray | None = None,
               tolerance: Tolerance | None = None) -> HeadVerdict:
    """A cell's head outputs against the fixture's (and against its batch-size-1 run's), and its decisions.

    Args:
        values: the cell's axis values (``dtype``, ``quantize`` choose the budget).
        tolerance: one budget for the outputs (default: the cell's, `cell_tolerance` for ``outputs``).
    """
    names = list(fixture.names)
    # One matrix-wide budget is an embedding budget: its cosine floor has no meaning for outputs.
    budget = (dataclasses.replace(tolerance, min_cosine=None) if tolerance is not None else
              cell_tolerance(spec, values["dtype"], "outputs", quantize=values.get("quantize", "none")))
    comparison = compare_arrays(outputs, fixture.outputs, names=names, tolerance=budget)
    batch = None if solo_outputs is None else compare_arrays(outputs, solo_outputs, names=names, tolerance=budget)
    reasons = []
    if not comparison:
        worst = f"max abs {comparison.max_abs:.3g}" if comparison.shapes_match else "shapes differ"
        reasons.append(f"outputs: the head's outputs on this cell's embeddings drift beyond the budget ({worst}, "
                       f"{comparison.mismatched} of {comparison.total} values beyond {budget.describe()})")
    bound = changed = None
    failed = False
    if spec.decisions.any:
        found, skipped = decision_flips(
            spec.decisions, names, outputs=(outputs, fixture.outputs if comparison.shapes_match else None, comparison),
            embeddings=(embeddings, fixture.embeddings, embedding_comparison))
        stage = decisions_stage(found, skipped, spec.decisions.max_flip_rate)
        if stage.decisions:
            bound = max(d.flip_rate_bound for d in stage.decisions)
            changed = sum(d.changed for d in stage.decisions)
        failed = stage.status is Status.FAIL
        if failed:
            exceeded = [n for n in stage.notes if "exceeds [decisions].max_flip_rate" in n]
            reasons.append(f"decisions: {stage.headline}" + (f" ({'; '.join(exceeded)})" if exceeded else ""))
    return HeadVerdict(comparison, batch, bound, changed, failed, "; ".join(reasons))


def batch_reason(batch_size: int, embeddings: Comparison | None, outputs: Comparison | None,
                 start: LayerDivergence | None = None, module: Any = None) -> str:
    """Names batch dependence when the embeddings or the head's outputs differ from the batch-size-1 run."""
    failed = [(what, c) for what, c in (("embeddings", embeddings), ("head outputs", outputs))
              if c is not None and not c]
    if not failed:
        return ""
    what, worst = failed[0]
    size = f"max abs {worst.max_abs:.3g}" if worst.shapes_match else "shapes differ"
    where = (f"; it starts at {start.module} ({describe_module(module)}, module {start.index + 1} of {start.total} "
             f"to finish, max abs {start.max_abs:.3g} between the batch and the images alone)"
             if start is not None else "")
    return (f"batch dependence: at batch size {batch_size} the same images' {what} differ from the batch-size-1 run "
            f"of this configuration ({size}, {worst.mismatched} of {worst.total} values beyond the budget): an output "
            f"depends on its batch-mates{where}" + ("" if start is not None else
                                                    " (a module reducing over the batch, e.g. BatchNorm in training "
                                                    "mode or a norm taken over the whole batch)"))


def describe_module(module: Any) -> str:
    """A module's type, and for a batch norm why it uses the batch's statistics."""
    import torch

    kind = type(module).__name__
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        if module.training:
            return f"{kind} in training mode: it normalises with the batch's statistics; call .eval() on it"
        if not module.track_running_stats:
            return (f"{kind} with track_running_stats=False: it normalises with the batch's statistics even in "
                    "eval mode")
    if isinstance(module, torch.nn.Module) and module.training:
        return f"{kind} in training mode"
    return f"{kind}, whose forward mixes the images of a batch"

