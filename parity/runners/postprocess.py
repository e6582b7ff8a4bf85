"""``[candidate].postprocess``: what the shipped code does after the head, applied to the reference.

The names are the outputs detectors' (`parity.explain.detectors.outputs.POSTPROCESSES`, which a detector
proposes as ``[candidate] postprocess = "..."`` when it reproduces a candidate's outputs); they
are computed with `scipy.special`, as the comparator sits below the detectors. ``module:function``
is the user's own, imported from ``[candidate].python_path`` and called on the user-code thread
(`parity.runners.guard`) with the reference's outputs as an (N, L) float64 array.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import special

from parity.errors import SpecError
from parity.runners import guard
from parity.runners.python_app import load_function
from parity.spec import CandidateSpec

__all__ = ["BUILTIN", "postprocess_reference"]

BUILTIN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": special.expit,
    "softmax": lambda x: special.softmax(x, axis=-1),
    "log_softmax": lambda x: special.log_softmax(x, axis=-1),
}


def postprocess_reference(candidate: CandidateSpec, outputs: np.ndarray) -> np.ndarray:
    """The reference's ``outputs`` as the shipped code returns them after ``candidate.postprocess``.

    Raises:
        SpecError: the user's function cannot be imported, raises, stops, or returns another shape
            or non-finite values (the declared post-processing is then not what the spec says).
    """
    name = candidate.postprocess
    if name == "none":
        return outputs
    values = np.asarray(outputs, dtype=np.float64)
    if name in BUILTIN:
        return BUILTIN[name](values)

    where = f"[candidate].postprocess = {name!r}"
    try:
        function = load_function(name, candidate.python_path, timeout=candidate.timeout,
                                 field="[candidate].postprocess")
        result = guard.call(function, values.copy(), timeout=candidate.timeout, what=name)
    except SpecError:
        raise
    except guard.Stopped as e:
        raise SpecError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's function: its failure is the spec's to fix
        raise SpecError(f"{where} raised {type(e).__name__} on the reference's outputs: {e}") from None
    try:
        result = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where} returned {type(result).__name__}, not numbers: {e}") from None
    if result.shape != values.shape or not np.isfinite(result).all():
        raise SpecError(f"{where} returned shape {list(result.shape)} "
                        f"{'with non-finite values ' if result.shape == values.shape else ''}for the reference's "
                        f"outputs of shape {list(values.shape)}; it must return finite values, one per output")
    return result
