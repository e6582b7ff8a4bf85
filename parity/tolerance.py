"""What budget applies here: one answer for the gate, the matrix, calibration and diagnosis.

In order of precedence: the spec's explicit ``[tolerance.STAGE]``, a calibration recorded in the
fixture's manifest for the candidate's dtype, then the default for the reference's precision.
The matrix and diagnosis probes ask the same questions as the gate, so a probe that passes is
a candidate the gate passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from parity.results import Tolerance

if TYPE_CHECKING:  # annotations only: the spec and fixtures are built on this module
    from parity.fixtures import Fixture
    from parity.spec import Spec

__all__ = ["FLOOR", "default_tolerance", "calibrated_tolerance", "stage_tolerance", "reference_dtype",
           "cell_tolerance"]

# In the spirit of torch.testing.assert_close's per-dtype defaults; half precision is
# looser because a whole network, not one op, sits between input and output.
_DEFAULT_ATOL_RTOL = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-5, 1.3e-6),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
_DEFAULT_MIN_COSINE = {"float64": 0.999999, "float32": 0.99999, "float16": 0.9995, "bfloat16": 0.999}
# Below this a calibrated budget is the floor: a few float32 ulps of a unit-scale value.
FLOOR = {"atol": 1e-6, "cosine_gap": 1e-7}


def default_tolerance(stage: str, dtype: str) -> Tolerance:
    """The tolerance used for ``stage`` at ``dtype`` when the spec sets none."""
    atol, rtol = _DEFAULT_ATOL_RTOL[dtype]
    if stage == "pixels":
        # Preprocessing runs in float32 on the CPU whatever the model dtype.
        atol, rtol = _DEFAULT_ATOL_RTOL["float32"]
    cosine = _DEFAULT_MIN_COSINE[dtype] if stage == "embedding" else None
    return Tolerance(atol=atol, rtol=rtol, min_cosine=cosine, origin=f"default for {dtype}")


def calibrated_tolerance(manifest: Mapping[str, Any], stage: str, dtype: str) -> Tolerance | None:
    """The budget a calibration recorded for ``stage`` at ``dtype``: noise × margin, never below the floor."""
    entry = manifest.get("calibration", {}).get(dtype)
    if not entry or stage not in entry.get("noise", {}):
        return None
    noise, margin = entry["noise"][stage], float(entry["margin"])
    cosine = noise.get("min_cosine")
    origin = (f"calibrated on {entry['device']}/{dtype}, {len(entry['runs'])} runs "
              f"({'; '.join(entry['runs'])}), x{margin:g} margin")
    return Tolerance(
        atol=max(noise["max_abs"] * margin, FLOOR["atol"]),
        rtol=0.0,
        min_cosine=None if cosine is None else 1.0 - max((1.0 - cosine) * margin, FLOOR["cosine_gap"]),
        origin=origin,
    )


def reference_dtype(fixture: Fixture) -> str:
    """The precision the fixture's reference ran at (float32 when it does not say, or says something unknown)."""
    reference = fixture.pipeline.get("runtime", {}).get("dtype", "float32")
    return reference if reference in _DEFAULT_ATOL_RTOL else "float32"


def stage_tolerance(spec: Spec, fixture: Fixture, stage: str) -> Tolerance:
    """The spec's explicit tolerance, else a calibrated budget, else the reference precision's default.

    A candidate that changes precision (float16, bfloat16) is therefore drift unless its
    spec states the budget it accepts or a calibration at that precision exists.
    """
    if stage in spec.tolerances:
        return spec.tolerances[stage]
    calibrated = calibrated_tolerance(fixture.manifest, stage, spec.runtime.dtype)
    if calibrated is not None:
        return calibrated
    return default_tolerance(stage, reference_dtype(fixture))


def cell_tolerance(spec: Spec, precision: str) -> Tolerance:
    """A matrix cell's embedding budget: its precision's default, never tighter than the float32 reference's own.

    At the spec's own dtype the spec's explicit embedding budget applies, as in the gate.
    """
    dtype = precision.removeprefix("autocast_")
    if dtype == spec.runtime.dtype and "embedding" in spec.tolerances:
        return spec.tolerances["embedding"]
    own, floor = default_tolerance("embedding", dtype), default_tolerance("embedding", "float32")
    return Tolerance(atol=max(own.atol, floor.atol), rtol=max(own.rtol, floor.rtol),
                     min_cosine=min(own.min_cosine, floor.min_cosine), origin=own.origin)
