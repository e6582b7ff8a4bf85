"""Emulating a reference's reduced-precision numerics on the machine the gate runs on.

On Ampere and later GPUs cuDNN convolutions (by default) and cuBLAS matmuls (when allowed) round
their float32 inputs to TF32, a 10-bit mantissa, and accumulate in float32. A TorchFunctionMode
reproduces that on any device by rounding the float32 operands of convolutions, linear layers and
matmuls to nearest-even at 10 (TF32) or 7 (bfloat16) mantissa bits; autocast and the batch size are
reproduced as themselves. The spread between such a run and the plain float32 run, times a
margin, is the budget a fixture made with those numerics gets (`emulated_tolerance`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from parity.judge import tolerance
from parity.model.batches import embed_rows
from parity.judge.arrays import compare_arrays
from parity.model.numerics import describe_reduced, probe_numerics, reduced_precision
from parity.model.pipeline import build_pipeline
from parity.results import Tolerance
from parity.spec import default_tolerance

__all__ = ["gate_tolerance", "gate_budgets", "MANTISSA_BITS", "round_mantissa", "ReducedPrecisionMode", "emulate_reference", "emulated_runs",
           "measure_spread", "emulated_tolerance", "reference_emulation", "add_emulated_noise", "PROBES"]

# Explicit mantissa bits of the formats operands are rounded to (float32 has 23).
MANTISSA_BITS = {"tf32": 10, "bfloat16": 7}
PROBES = 8  # samples an uncalibrated check emulates on
MARGIN = 4.0
_STAGES = ("embedding", "head", "outputs")


def round_mantissa(x, bits: int = 10):
    """``x`` (float32) rounded to nearest-even at ``bits`` explicit mantissa bits, as float32.

    Works on the int32 view: add half an ulp of the target format (minus one when the kept last
    bit is even, so exact halves round to even), then clear the dropped bits. Inf and NaN pass through.
    """
    import torch

    if x.dtype != torch.float32:
        return x
    drop = 23 - bits
    raw = x.contiguous().view(torch.int32)
    keep_odd = (raw >> drop) & 1
    rounded = ((raw + ((1 << (drop - 1)) - 1) + keep_odd) & ~((1 << drop) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def _functions() -> tuple[set, set, set]:
    import torch
    import torch.nn.functional as F

    conv = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
    # Operands to round: the first two positional tensors (input, weight / the two matrices).
    matmul = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
              torch.bmm, torch.Tensor.bmm}
    # (bias-like, mat1, mat2): round the last two.
    addmm = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm}
    return conv, matmul, addmm


class ReducedPrecisionMode:
    """A ``TorchFunctionMode`` rounding float32 operands of convolutions and/or matmuls (``"tf32"``, ``"bfloat16"``).

    Scaled-dot-product attention has its q, k, v rounded (its inner products are matmuls on a GPU);
    the attention weights inside the fused kernel are not reached.
    """

    def __new__(cls, *, conv: str | None = None, matmul: str | None = None):
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        conv_fns, matmul_fns, addmm_fns = _functions()
        conv_bits = MANTISSA_BITS[conv] if conv else None
        matmul_bits = MANTISSA_BITS[matmul] if matmul else None

        def rounded(args: tuple, positions: Sequence[int], bits: int) -> tuple:
            return tuple(round_mantissa(a, bits) if i in positions and isinstance(a, torch.Tensor) else a
                         for i, a in enumerate(args))

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if conv_bits is not None and func in conv_fns:
                    args = rounded(args, (0, 1), conv_bits)
                    if "weight" in kwargs:
                        kwargs = {**kwargs, "weight": round_mantissa(kwargs["weight"], conv_bits)}
                elif matmul_bits is not None:
                    if func in matmul_fns:
                        args = rounded(args, (0, 1), matmul_bits)
                    elif func in addmm_fns:
                        args = rounded(args, (1, 2), matmul_bits)
                    elif func is F.scaled_dot_product_attention:
                        args = rounded(args, (0, 1, 2), matmul_bits)
                return func(*args, **kwargs)

        return _Mode()


@contextlib.contextmanager
def emulate_reference(reduced: Mapping[str, str], *, device_type: str = "cpu") -> Iterator[None]:
    """Run the block with the reduced precision of ``reduced`` (see `parity.model.numerics.reduced_precision`)."""
    import torch

    with contextlib.ExitStack() as stack:
        if reduced.get("autocast"):
            stack.enter_context(torch.autocast(device_type, dtype=getattr(torch, reduced["autocast"])))
        if reduced.get("conv") or reduced.get("matmul"):
            stack.enter_context(ReducedPrecisionMode(conv=reduced.get("conv"), matmul=reduced.get("matmul")))
        yield


def _pipeline_run(pipeline, fixture, rows: Sequence[int], batch_size: int) -> dict[str, np.ndarray]:
    embeddings = embed_rows(pipeline, fixture, rows, batch_size=batch_size)
    biases = fixture.biases(rows)
    measured = {"embedding": embeddings, "head": pipeline.run_head(fixture.embeddings[list(rows)], biases).numpy()}
    try:
        measured["outputs"] = pipeline.run_head(embeddings, biases).numpy()
    except (ValueError, RuntimeError):
        pass  # embeddings the head cannot take (the comparator reports the shape): no outputs to measure
    return measured


def emulated_runs(pipeline, fixture, rows: Sequence[int], numerics: Mapping[str, Any]) -> tuple[dict, list[dict]]:
    """The plain float32 run and the runs under each recorded reduced precision, on ``rows``.

    Each reduced precision is emulated alone and all together, at the recorded batch size (else the spec's).
    """
    reduced = reduced_precision(numerics)
    batch = int(numerics.get("batch_size") or pipeline.spec.runtime.batch_size)
    plain = _pipeline_run(pipeline, fixture, rows, pipeline.spec.runtime.batch_size)
    device_type = getattr(pipeline.device, "type", str(pipeline.device))
    variants = [{k: v} for k, v in reduced.items()] + ([dict(reduced)] if len(reduced) > 1 else [])
    runs = []
    for variant in variants or [{}]:
        with emulate_reference(variant, device_type=device_type):
            runs.append(_pipeline_run(pipeline, fixture, rows, batch))
    return plain, runs


def measure_spread(plain: Mapping[str, np.ndarray], runs: Sequence[Mapping[str, np.ndarray]],
                   names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per stage, the worst max abs, max rel, min cosine and per-sample error of ``runs`` against ``plain``."""
    exact = Tolerance(atol=0.0, rtol=0.0)
    spread: dict[str, dict[str, Any]] = {}
    for stage in _STAGES:
        if stage not in plain or any(stage not in run for run in runs):
            continue
        worst = {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0 if stage == "embedding" else None,
                 "per_sample": np.zeros(len(names))}
        for run in runs:
            c = compare_arrays(run[stage], plain[stage], tolerance=exact, cosine=stage == "embedding")
            worst["max_abs"], worst["max_rel"] = max(worst["max_abs"], c.max_abs), max(worst["max_rel"], c.max_rel)
            if c.min_cosine is not None:
                worst["min_cosine"] = min(worst["min_cosine"], c.min_cosine)
            worst["per_sample"] = np.maximum(worst["per_sample"], np.abs(run[stage] - plain[stage]).max(axis=1))
        worst["per_sample"] = {name: float(v) for name, v in zip(names, worst["per_sample"])}
        spread[stage] = worst
    return spread


def reference_emulation(fixture, spec) -> dict[str, str]:
    """The reduced precision the fixture's reference used and the candidate does not, else ``{}``."""
    recorded = fixture.manifest.get("producer", {}).get("numerics")
    reduced = reduced_precision(recorded)
    if not reduced:
        return {}
    try:
        here = reduced_precision(probe_numerics(spec.runtime.device))
    except (RuntimeError, ValueError):
        here = {}
    return {} if here == reduced else reduced


_CACHE: dict[tuple, tuple[Any, dict[str, dict[str, Any]], int]] = {}


def probe_rows(fixture, probes: int) -> list[int]:
    # Evenly spread over the fixture: deterministic, and covers its start and end.
    n = len(fixture.rows)
    return sorted(set(np.linspace(0, n - 1, num=min(probes, n)).round().astype(int).tolist()))


def emulated_tolerance(spec, fixture, stage: str, *, probes: int = PROBES, margin: float = MARGIN) -> Tolerance | None:
    """The budget for a fixture whose reference ran in reduced precision, when nothing else sets one.

    The spread between the emulated and the plain float32 run on ``probes`` samples, times
    ``margin``, never below the float32 default. Computed once per fixture and spec in a process.
    """
    if stage not in _STAGES or spec.runtime.dtype != "float32":
        return None
    reduced = reference_emulation(fixture, spec)
    if not reduced:
        return None
    key = (id(fixture), repr(spec), probes)
    cached = _CACHE.get(key)
    if cached is None or cached[0] is not fixture:
        rows = probe_rows(fixture, probes)
        pipeline = build_pipeline(spec, fingerprints=False)
        plain, runs = emulated_runs(pipeline, fixture, rows, fixture.manifest["producer"]["numerics"])
        _CACHE.clear()  # one run at a time: keep only the latest fixture alive
        cached = _CACHE[key] = (fixture, measure_spread(plain, runs, [fixture.rows[i].name for i in rows]), len(rows))
    if stage not in cached[1]:
        return None
    spread, count = cached[1][stage], cached[2]
    default = default_tolerance(stage, "float32")
    origin = (f"{describe_reduced(reduced, fixture.manifest['producer']['numerics'])}; budget from "
              f"{describe_emulation(reduced)} on {count} probe samples, x{margin:g} margin")
    return budget_from_spread(spread, default, margin=margin, origin=origin)


def gate_tolerance(spec, fixture, stage: str) -> Tolerance:
    """The gate's budget for ``stage`` (`parity.judge.tolerance.stage_tolerance`), with a reference made in
    reduced precision (TF32, autocast) given the spread its emulation measures."""
    return tolerance.stage_tolerance(spec, fixture, stage, reference=emulated_tolerance)


def gate_budgets(spec, fixture) -> dict[str, Tolerance]:
    """Every compared stage's budget, computed here so that the judge runs no model."""
    return {stage: gate_tolerance(spec, fixture, stage) for stage in ("pixels", "embedding", "head", "outputs")}


def describe_emulation(reduced: Mapping[str, str]) -> str:
    """``TF32 emulation`` / ``bfloat16 autocast emulation`` ..."""
    words = dict.fromkeys(("TF32" if v == "tf32" else f"{v} {'autocast' if k == 'autocast' else 'matmul'}")
                          for k, v in reduced.items())
    return " and ".join(words) + " emulation"


def budget_from_spread(spread: Mapping[str, Any], default: Tolerance, *, margin: float, origin: str) -> Tolerance:
    """``spread × margin``, never tighter than ``default``."""
    cosine = default.min_cosine
    if cosine is not None and spread.get("min_cosine") is not None:
        cosine = min(cosine, 1.0 - (1.0 - spread["min_cosine"]) * margin)
    return Tolerance(atol=max(default.atol, spread["max_abs"] * margin), rtol=default.rtol, min_cosine=cosine,
                     origin=origin)


def add_emulated_noise(noise: Mapping[str, Mapping[str, Any]], pipeline, fixture,
                       spec) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Calibration's measured noise widened by the spread of emulating the reference's numerics.

    Returns the noise (unchanged when the reference ran in plain float32, or the candidate runs with the
    same reduced precision) and the words for its origin, e.g. ``reference made on CUDA with cuDNN TF32;
    budget from TF32 emulation``.
    """
    reduced = reference_emulation(fixture, spec)
    if not reduced or spec.runtime.dtype != "float32":
        return {stage: dict(entry) for stage, entry in noise.items()}, None
    rows = list(range(len(fixture.rows)))
    numerics = fixture.manifest["producer"]["numerics"]
    spread = measure_spread(*emulated_runs(pipeline, fixture, rows, numerics), fixture.names)
    merged = {}
    for stage, entry in noise.items():
        extra = spread.get(stage)
        entry = dict(entry)
        if extra is not None:
            entry["max_abs"] = max(entry["max_abs"], extra["max_abs"])
            entry["max_rel"] = max(entry["max_rel"], extra["max_rel"])
            if entry.get("min_cosine") is not None and extra["min_cosine"] is not None:
                entry["min_cosine"] = min(entry["min_cosine"], extra["min_cosine"])
            entry["per_sample"] = {name: max(v, extra["per_sample"].get(name, 0.0))
                                   for name, v in entry["per_sample"].items()}
        merged[stage] = entry
    return merged, f"{describe_reduced(reduced, numerics)}; budget from {describe_emulation(reduced)}"
