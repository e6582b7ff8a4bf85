"""Outputs under a post-processing the shipped code adds or leaves out: sigmoid, softmax, logit, scale, temperature.

`fit_postprocess` is the pure search (also what diagnose and a declared ``[candidate].postprocess``
use); `findings` turns a fit on the head or outputs stage into a `Finding`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from parity.explain.detectors.evidence import Evidence, fit, number
from parity.results import Finding, Tolerance

__all__ = ["POSTPROCESSES", "apply_postprocess", "fit_postprocess", "findings"]


_FIT_ROWS = 256


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logit(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x) - np.log1p(-x)


# name -> f(reference, params): the shipped outputs as a function of the reference outputs.
POSTPROCESSES: dict[str, Callable[[np.ndarray, Mapping[str, float]], np.ndarray]] = {
    "sigmoid": lambda x, p: _sigmoid(x),
    "softmax": lambda x, p: _softmax(x),
    "log_softmax": lambda x, p: _log_softmax(x),
    "logit": lambda x, p: _logit(x),
    "scale": lambda x, p: x * p["scale"],
    "sigmoid_temperature": lambda x, p: _sigmoid(x / p["temperature"]),
    "softmax_temperature": lambda x, p: _softmax(x / p["temperature"]),
}


def apply_postprocess(name: str, params: Mapping[str, float], values: Any) -> np.ndarray:
    """``values`` post-processed as ``name`` (one of `POSTPROCESSES`) with ``params``, in float64."""
    return POSTPROCESSES[name](np.asarray(values, dtype=np.float64), params)


def _temperature(observed: np.ndarray, reference: np.ndarray, squash: Callable) -> float | None:
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return float(np.square(squash(reference / np.exp(log_t)) - observed).sum())

    # T between 1/20 and 20; a temperature outside that range is not a calibration step.
    found = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-12})
    return float(np.exp(found.x)) if found.success else None


def fit_postprocess(observed: Any, reference: Any, tolerance: Tolerance) -> tuple[str, dict[str, float], float] | None:
    """The post-processing of the reference outputs that reproduces ``observed`` within ``tolerance``.

    Tried in order (parameter-free first): sigmoid, softmax, log-softmax, logit (the reference's
    outputs are probabilities the shipped code did not produce), a constant scale, softmax(x / T)
    and sigmoid(x / T) with T fitted. The identity of each family (scale 1, T = 1) is never a fit.

    Returns:
        ``(name, params, max_abs)`` of the first that fits (``name`` a key of `POSTPROCESSES`),
        or ``None``.
    """
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if obs.shape != ref.shape or obs.ndim != 2 or not obs.size or not np.isfinite(obs).all() \
            or not np.isfinite(ref).all():
        return None
    tried: list[tuple[str, dict[str, float]]] = [("sigmoid", {}), ("softmax", {}), ("log_softmax", {})]
    if ((ref > 0) & (ref < 1)).all():
        tried.append(("logit", {}))
    denominator = float(np.square(ref).sum())
    if denominator > 0:
        scale = float((obs * ref).sum() / denominator)
        if abs(scale - 1.0) > 1e-6 and scale != 0:
            tried.append(("scale", {"scale": scale}))
    for name, squash in (("softmax_temperature", _softmax), ("sigmoid_temperature", _sigmoid)):
        # fitted on the first rows (a large output set costs no more), then checked on all of them
        temperature = _temperature(obs[:_FIT_ROWS], ref[:_FIT_ROWS], squash)
        if temperature is not None and abs(temperature - 1.0) > 1e-4:
            tried.append((name, {"temperature": temperature}))
    for name, params in tried:
        result = fit(obs, apply_postprocess(name, params, ref), tolerance)
        if result.passed:
            return name, params, result.max_abs
    return None


def _words(name: str, params: Mapping[str, float], what: str, at: str) -> tuple[str, str]:
    """(cause, fix) in the shipped code's terms."""
    declare = ("; or, if the service is meant to return them, declare the same post-processing in the spec so "
               "the gate compares like with like")
    if name in ("sigmoid", "softmax", "log_softmax"):
        op = {"sigmoid": "a sigmoid", "softmax": "a softmax", "log_softmax": "a log-softmax"}[name]
        return (f"the shipped code applies {op} after the head, which outputs logits",
                f"Change the shipped code: return the head's logits, without {op} after the head call{at}{declare}")
    if name == "logit":
        return (f"the shipped code returns the head's logits where the reference {what} are probabilities "
                "(the reference applied a sigmoid the shipped code leaves out)",
                f"Change the shipped code: apply `torch.sigmoid` to the head's outputs{at}")
    if name == "scale":
        s = params["scale"]
        return (f"the shipped code multiplies the head's outputs by {s:.6g} (1/{1 / s:.6g})",
                f"Change the shipped code: return the head's outputs unscaled{at}")
    op = "sigmoid" if name == "sigmoid_temperature" else "softmax"
    t = params["temperature"]
    return (f"the shipped code applies {op}(logits / T) with a temperature T = {t:.4g} after the head, "
            "which outputs logits",
            f"Change the shipped code: return the head's logits, without the temperature-scaled {op}{at}{declare}")


def _describe(name: str, params: Mapping[str, float]) -> str:
    if name == "scale":
        return f"the reference times {params['scale']:.6g}"
    if "temperature" in params:
        return f"{name.split('_')[0]}(reference / {params['temperature']:.4g})"
    return f"{name.replace('_', '-')}(reference)"


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """A post-processing that reproduces the failing head or outputs stage."""
    run, fixture = evidence.run, evidence.fixture
    found: dict[str, list[Finding]] = {}
    observed = {"outputs": (run.outputs, list(run.rows)),
                "head": (run.head_outputs, list(range(len(fixture.rows))))}
    for stage, (values, rows) in observed.items():
        if not evidence.failing(stage) or values is None or not rows:
            continue
        reference = fixture.outputs[rows]
        tolerance = evidence.tolerance(stage)
        fitted = fit_postprocess(values, reference, tolerance)
        if fitted is None:
            continue
        name, params, max_abs = fitted
        cause, fix = _words(name, params, stage, evidence.at("head"))
        found.setdefault(stage, []).append(Finding(
            detector=f"outputs.{name}", stage=stage, cause=cause,
            evidence=(f"{_describe(name, params)} reproduces the shipped {stage} of {len(rows)} samples: max abs "
                      f"{number(max_abs)} ({tolerance.describe()})"),
            fix=fix, where=evidence.where("head"), max_abs=max_abs,
            spec_fix=f'[candidate]\npostprocess = "{name}"' if name in ("sigmoid", "softmax", "log_softmax") else ""))
    return found
