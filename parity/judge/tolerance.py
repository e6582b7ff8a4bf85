"""What budget applies here: one answer for the gate, the matrix, calibration and diagnosis.

In order of precedence: the spec's explicit ``[tolerance.STAGE]``, a calibration recorded in the
fixture's manifest for the candidate's dtype, then the default for the reference's precision.
The matrix and diagnosis probes ask the same questions as the gate, so a probe that passes is
a candidate the gate passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from parity.errors import FixtureError
from parity.results import Tolerance
from parity.spec import DEFAULT_ATOL_RTOL, Spec, default_tolerance
from parity.store.fixtures import Fixture

__all__ = ["FLOOR", "MAX_MARGIN", "MAX_RELATIVE_NOISE", "MAX_COSINE_GAP", "default_tolerance",
           "calibrated_tolerance", "calibration_budget", "stage_tolerance", "reference_dtype", "cell_tolerance"]

# Below this a calibrated budget is the floor: a few float32 ulps of a unit-scale value.
FLOOR = {"atol": 1e-6, "cosine_gap": 1e-7}
# A margin is a safety factor on measured noise, not a way to switch the gate off.
MAX_MARGIN = 100.0
# Budgets above these are not noise: the reference pipeline does not reproduce its own fixture
# (another version of the data, another model), and storing them would let real drift pass.
MAX_RELATIVE_NOISE = 0.05  # budget atol / the stage's largest reference magnitude
MAX_COSINE_GAP = 0.01  # 1 - budget min_cosine
# The budget of a quantized matrix cell is this dtype's default.
QUANTIZED_BUDGET_DTYPE = "bfloat16"


def _number(value: Any, what: str, source: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise FixtureError(f"{source}: calibration {what} = {value!r} is not a finite number in [{low:g}, {high:g}].\n"
                           "Note: the manifest was damaged or edited; recalibrate with `parity calibrate`.")
    return float(value)


def calibration_budget(entry: Any, stage: str, dtype: str, *, source: str) -> Tolerance | None:
    """The validated budget of one stage from a calibration entry (None if the stage was not calibrated)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("noise"), dict):
        raise FixtureError(f"{source}: calibration for {dtype} must be an object with 'noise', got {str(entry)[:120]}")
    if stage not in entry["noise"]:
        return None
    noise = entry["noise"][stage]
    if not isinstance(noise, dict):
        raise FixtureError(f"{source}: calibration noise for {stage} must be an object, got {str(noise)[:120]}")
    margin = _number(entry.get("margin"), "margin", source, low=1.0, high=MAX_MARGIN)
    max_abs = _number(noise.get("max_abs"), f"{stage} max_abs", source)
    cosine = noise.get("min_cosine")
    if cosine is not None:
        cosine = _number(cosine, f"{stage} min_cosine", source, low=-1.0, high=1.0)
    runs, device = entry.get("runs"), entry.get("device")
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs) or not isinstance(device, str):
        raise FixtureError(f"{source}: calibration for {dtype} must record 'device' and a list of 'runs'")
    atol = max(max_abs * margin, FLOOR["atol"])
    gap = None if cosine is None else max((1.0 - cosine) * margin, FLOOR["cosine_gap"])
    scale = noise.get("scale")
    limit = None if scale is None else _number(scale, f"{stage} scale", source) * MAX_RELATIVE_NOISE
    if limit is not None and atol > max(limit, FLOOR["atol"]) or gap is not None and gap > MAX_COSINE_GAP:
        raise FixtureError(
            f"{source}: the {stage} budget (atol {atol:.3g}"
            + ("" if gap is None else f", min_cosine {1 - gap:.6g}") + ") is too large to be numeric noise "
            f"(atol at most {MAX_RELATIVE_NOISE:g} x the largest reference value"
            + ("" if limit is None else f" = {limit:.3g}") + f", cosine gap at most {MAX_COSINE_GAP:g}).\n"
            "Note: the reference pipeline does not reproduce its own fixture; fix the reference spec or "
            "rebuild the fixture before calibrating."
        )
    origin = (f"calibrated on {device}/{dtype}, {len(runs)} runs ({'; '.join(runs)}), x{margin:g} margin")
    if isinstance(entry.get("emulation"), str):
        origin += f"; {entry['emulation']}, x{margin:g} margin"
    return Tolerance(atol=atol, rtol=0.0, min_cosine=None if gap is None else 1.0 - gap, origin=origin)


def calibrated_tolerance(manifest: dict, stage: str, dtype: str) -> Tolerance | None:
    """The budget a calibration recorded for ``stage`` at ``dtype``: noise × margin, never below the floor.

    Raises:
        FixtureError: the recorded entry is malformed, non-finite, or too large to be noise.
    """
    calibration = manifest.get("calibration", {})
    if not isinstance(calibration, dict):
        raise FixtureError(f"manifest 'calibration' must be an object, got {type(calibration).__name__}")
    entry = calibration.get(dtype)
    if not entry:
        return None
    return calibration_budget(entry, stage, dtype, source="manifest")


def reference_dtype(fixture: Fixture) -> str:
    """The precision the fixture's reference ran at (float32 when it does not say, or says something unknown)."""
    reference = fixture.pipeline.get("runtime", {}).get("dtype", "float32")
    return reference if reference in DEFAULT_ATOL_RTOL else "float32"


def stage_tolerance(spec: Spec, fixture: Fixture, stage: str, *,
                    reference: Callable[[Spec, Fixture, str], Tolerance | None] | None = None) -> Tolerance:
    """The spec's explicit tolerance, else a calibrated budget, else the reference precision's default.

    A candidate that changes precision (float16, bfloat16) is therefore drift unless its
    spec states the budget it accepts or a calibration at that precision exists.
    """
    if stage in spec.tolerances:
        return spec.tolerances[stage]
    calibrated = calibrated_tolerance(fixture.manifest, stage, spec.runtime.dtype)
    if calibrated is not None:
        return calibrated
    # ``reference``: the budget of a reference made with other numerics (the gate passes
    # `parity.numerics.emulate.emulated_tolerance`: a TF32 or autocast reference's emulated spread).
    derived = reference(spec, fixture, stage) if reference is not None else None
    if derived is not None:
        return derived
    return default_tolerance(stage, reference_dtype(fixture))


def cell_tolerance(spec: Spec, precision: str, stage: str = "embedding", *, quantize: str = "none") -> Tolerance:
    """A matrix cell's budget for ``stage`` (``embedding`` or ``outputs``): its precision's default, never
    tighter than the float32 reference's own.

    At the spec's own dtype, unquantized, the spec's explicit budget for the stage applies, as in the gate.
    A quantized cell (8-bit integers) gets bfloat16's default: the same 8 significant bits.
    """
    dtype = QUANTIZED_BUDGET_DTYPE if quantize != "none" else precision.removeprefix("autocast_")
    if quantize == "none" and dtype == spec.runtime.dtype and stage in spec.tolerances:
        return spec.tolerances[stage]
    own, floor = default_tolerance(stage, dtype), default_tolerance(stage, "float32")
    cosine = None if own.min_cosine is None else min(own.min_cosine, floor.min_cosine)
    origin = own.origin if quantize == "none" else f"{quantize}: {own.origin} (8 significant bits)"
    return Tolerance(atol=max(own.atol, floor.atol), rtol=max(own.rtol, floor.rtol), min_cosine=cosine, origin=origin)
