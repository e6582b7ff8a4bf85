"""A float64 referee: is a candidate's difference from its reference rounding, or a change of computation?

In the manner of PyTorch's accuracy checker (`torch._dynamo.utils.same` with ``fp64_ref``): the
candidate pipeline runs in float64 on a few probe samples; a value is accepted as rounding when its
RMSE against that float64 run is within ``multiplier`` times the RMSE of a legitimately rounded run of
the same computation, plus ``tol / 10``. Here the value judged is the reference (the fixture), and
the rounded runs are the candidate at its own dtype (rounding on the candidate's side) and the
candidate under the reference's reduced precision, emulated (`parity.numerics.emulate`; rounding on the
reference's side). When no run's rounding covers the reference's error, the two compute different
things.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from parity.model.batches import embed_rows
from parity.model.pipeline import build_pipeline
from parity.numerics.emulate import emulate_reference, probe_rows
from parity.store.fixtures import Fixture, load_fixture
from parity.model.numerics import reduced_precision
from parity.results import Referee, RefereeStage, Status
from parity.spec import Spec

__all__ = ["TOL", "referee", "judge", "multiplier", "numerics_signature", "UNRECORDED_HYPOTHESES"]

TOL = 1e-4  # `same`'s default tol: tol / 10 absorbs noise on values near zero
# A fixture without a numeric record is tried against what GPUs do silently: TF32 convolutions and matmuls.
UNRECORDED_HYPOTHESES = ({"conv": "tf32", "matmul": "tf32"},)
_LOW = ("float16", "bfloat16")
_ROUNDING_SCALE = 2e-3  # relative drift beyond which numerics_signature does not referee (TF32 gives ~2e-4)


def multiplier(numel: int, dtype: str) -> float:
    """`same`'s multiplier: 3 for a float16/bfloat16 run or fewer than 1000 values (noise dominates), else 2."""
    return 3.0 if dtype in _LOW or numel < 1000 else 2.0


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def judge(stage: str, reference: np.ndarray, fp64: np.ndarray, rounded: Sequence[tuple[str, str, np.ndarray]], *,
          tol: float = TOL) -> RefereeStage:
    """The reference judged against the float64 run, given rounded runs ``(label, dtype, values)`` in order."""
    if reference.shape != fp64.shape:
        return RefereeStage(stage, float("nan"), reason=f"shapes differ: reference {list(reference.shape[1:])}, "
                                                         f"candidate {list(fp64.shape[1:])} per sample")
    error = _rmse(reference, fp64)
    errors = tuple((label, _rmse(values, fp64)) for label, _, values in rounded)
    for (label, dtype, _), (_, own) in zip(rounded, errors):
        m = multiplier(fp64.size, dtype)
        if error <= m * own + tol / 10:
            return RefereeStage(stage, error, errors, m, tol, label)
    return RefereeStage(stage, error, errors, multiplier(fp64.size, "float32"), tol)


def _runs(pipeline, fixture: Fixture, rows: list[int]) -> dict[str, np.ndarray]:
    embeddings = embed_rows(pipeline, fixture, rows, batch_size=len(rows))
    out = {"embedding": embeddings}
    if embeddings.shape[1:] == fixture.embeddings.shape[1:]:
        out["outputs"] = pipeline.run_head(embeddings, fixture.biases(rows)).numpy()
    return out


def _words(mode: dict[str, str]) -> str:
    """``TF32 convolutions and TF32 matmuls``, ``bfloat16 autocast``."""
    kinds = {"conv": "convolutions", "matmul": "matmuls", "autocast": "autocast"}
    return " and ".join(f"{'TF32' if v == 'tf32' else v} {kinds[k]}" for k, v in mode.items())


def _float64(pipeline):
    import torch

    return dataclasses.replace(pipeline, backbone=copy.deepcopy(pipeline.backbone).double(),
                               head=copy.deepcopy(pipeline.head).double(), dtype=torch.float64)


def referee(spec: Spec, *, fixtures: str | Path | None = None, fixture: Fixture | None = None, samples: int = 4,
            device: str | None = None) -> Referee:
    """Run the candidate pipeline in float64 (and rounded) on ``samples`` probe samples and judge the reference.

    The reference's recorded reduced precision (``producer.numerics``) is emulated; a fixture that
    records none is tried against `UNRECORDED_HYPOTHESES`.
    """
    fixture = fixture if fixture is not None else load_fixture(spec.fixture_root(fixtures))
    rows = probe_rows(fixture, samples)
    pipeline = build_pipeline(spec, device=device, fingerprints=False)
    numerics = fixture.manifest.get("producer", {}).get("numerics")
    if numerics:
        recorded = reduced_precision(numerics)
        modes = (recorded,) if recorded else ()
        hypotheses = "recorded numerics: " + (", ".join(f"{k} {v}" for k, v in recorded.items()) or "float32")
    else:
        modes = UNRECORDED_HYPOTHESES
        hypotheses = "no numeric record; tried: " + "; ".join(", ".join(f"{k} {v}" for k, v in m.items()) for m in modes)
    fp64 = _runs(_float64(pipeline), fixture, rows)
    plain = _runs(pipeline, fixture, rows)
    dtype = spec.runtime.dtype
    device_type = getattr(pipeline.device, "type", "cpu")
    emulated = []
    if dtype == "float32":
        for mode in modes:
            with emulate_reference(mode, device_type=device_type):
                label = "reference " + _words(mode)
                emulated.append((label, mode.get("autocast", "float32"), _runs(pipeline, fixture, rows)))
    own = "float32 rounding" if dtype == "float32" else f"candidate {dtype}"
    stages = []
    for stage, reference in (("embedding", fixture.embeddings[rows]), ("outputs", fixture.outputs[rows])):
        if stage not in fp64:
            if stage == "embedding" or not stages or stages[0].explained_by is not None:
                stages.append(RefereeStage(stage, float("nan"), reason="the candidate's values are not comparable"))
            continue
        rounded = [(own, dtype, plain[stage])] + [(label, d, run[stage]) for label, d, run in emulated if stage in run]
        stages.append(judge(stage, reference, fp64[stage], rounded))
    return Referee(tuple(fixture.rows[i].name for i in rows), tuple(stages), hypotheses)


def numerics_signature(spec: Spec, fixture: Fixture, report, *, device: str | None = None,
                       samples: int = 4) -> tuple[str, ...] | None:
    """For `parity diagnose`: the notes to give when the drift is reduced-precision reference numerics, else None.

    Only a drift that starts after the pixels (which match) can be numerics; the referee decides.
    """
    first = report.first_failure
    if first is None or first.stage not in ("embedding", "head", "outputs") or spec.runtime.dtype != "float32":
        return None
    if report.stage("pixels").status is Status.FAIL or first.comparison is None or not first.comparison.shapes_match:
        return None
    # TF32 moves values by about 1e-4 of their scale; a drift far beyond that is not worth a float64 run.
    reference = fixture.embeddings if first.stage == "embedding" else fixture.outputs
    if first.comparison.max_abs > _ROUNDING_SCALE * float(np.abs(reference).max()):
        return None
    verdict = referee(spec, fixture=fixture, samples=samples, device=device)
    precision = verdict.reduced_precision
    if precision is None:
        return None
    errors = "; ".join(f"{s.stage}: reference RMSE {s.reference_error:.2e} vs float64, "
                       + ", ".join(f"{label} {e:.2e}" for label, e in s.rounding) for s in verdict.stages)
    return (f"The difference has the signature of reduced-precision reference numerics ({precision}), not of a "
            f"pipeline change: against a float64 run of the candidate on {len(verdict.samples)} samples, the "
            f"reference's error is within the rounding of that precision ({errors}).",
            "Fix: record the reference's numeric environment: parity.capture records it for new fixtures; for this "
            "one, re-capture with numerics={\"device\": \"cuda\", \"cudnn_allow_tf32\": true, ...} as it was made "
            "(the gate then emulates it and budgets for it), or run `parity calibrate` on the machine that made the "
            "reference.")
