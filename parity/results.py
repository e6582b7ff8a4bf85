"""Result records: frozen dataclasses that carry numbers and no formatting logic."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Tolerance",
    "SampleError",
    "Comparison",
    "LayerGuess",
    "KeyFix",
    "KeyDiff",
    "TensorDiff",
    "DecisionFlips",
    "Status",
    "Verdict",
    "StageResult",
    "ConfigDiff",
    "Report",
    "CandidateRun",
    "RefereeStage",
    "Referee",
]


@dataclass(frozen=True)
class Tolerance:
    """Element-wise ``|a - b| <= atol + rtol * |b|`` plus an optional per-row cosine floor."""

    atol: float
    rtol: float
    min_cosine: float | None = None
    origin: str = "default"

    def describe(self) -> str:
        text = f"atol {self.atol:.2g}, rtol {self.rtol:.2g}"
        if self.min_cosine is not None:
            text += f", cos >= {self.min_cosine:.8g}"
        return text


@dataclass(frozen=True)
class SampleError:
    """How far one sample (one row) is from its reference."""

    name: str
    max_abs: float
    cosine: float | None = None


@dataclass(frozen=True)
class Comparison:
    """Numbers from comparing a candidate array against its reference."""

    candidate_shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    tolerance: Tolerance
    max_abs: float = float("nan")
    mean_abs: float = float("nan")
    max_rel: float = float("nan")
    mismatched: int = 0
    total: int = 0
    min_cosine: float | None = None
    nonfinite: int = 0
    required_atol: float = float("nan")
    worst: tuple[SampleError, ...] = ()

    @property
    def shapes_match(self) -> bool:
        return self.candidate_shape == self.reference_shape

    @property
    def passed(self) -> bool:
        if not self.shapes_match or self.nonfinite or self.mismatched:
            return False
        return self.tolerance.min_cosine is None or (
            self.min_cosine is not None and self.min_cosine >= self.tolerance.min_cosine
        )

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class LayerGuess:
    """A layer inferred from the tensors under one module path, e.g. ``Linear(80, 128)``."""

    path: str
    kind: str
    args: tuple[int, ...]
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    bias: bool = True

    @property
    def call(self) -> str:
        if self.kind == "Conv2d":
            c_in, c_out, kh, kw = self.args
            args = f"{c_in}, {c_out}, kernel_size=({kh}, {kw})"
        else:
            args = ", ".join(map(str, self.args))
        return f"{self.kind}({args}{'' if self.bias else ', bias=False'})"


@dataclass(frozen=True)
class KeyFix:
    """A recognised cause of a key mismatch and the explicit spec change that loads strictly."""

    causes: tuple[str, ...]
    state_dict_key: str | None = None
    key_map: tuple[tuple[str, str], ...] = ()
    drop_keys: tuple[str, ...] = ()
    verified: bool = False

    @property
    def spec_lines(self) -> list[str]:
        """The TOML that goes into the spec section naming the checkpoint."""
        lines = [f'state_dict_key = "{self.state_dict_key}"'] if self.state_dict_key else []
        if self.key_map:
            lines.append("key_map = { " + ", ".join(f'"{a}" = "{b}"' for a, b in self.key_map) + " }")
        if self.drop_keys:
            lines.append("drop_keys = [" + ", ".join(f'"{k}"' for k in self.drop_keys) + "]")
        return lines


@dataclass(frozen=True)
class KeyDiff:
    """Why a state_dict does not load into a module with ``strict=True``."""

    target: str
    source: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    dtype_mismatches: tuple[tuple[str, str, str], ...] = ()
    section: str = "head"
    fix: KeyFix | None = None
    inferred: tuple[LayerGuess, ...] = ()

    @property
    def loads(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)


@dataclass(frozen=True)
class TensorDiff:
    """A deployed weight tensor that is not bit-identical to the trained one."""

    part: str
    name: str
    max_abs: float | None = None
    reason: str = "values differ"


@dataclass(frozen=True)
class DecisionFlips:
    """Decisions of one kind that differ from the reference's, split by whether the reference was a near-tie.

    ``kind`` is ``threshold`` (an output above ``threshold`` is positive), ``argmax`` (the top-1
    class) or ``verification`` (a pair of samples matches when their embeddings' cosine reaches
    ``threshold``). ``band`` is how close to the boundary the reference must sit to count as a
    near-tie; ``max_probability_error`` (argmax) is the largest softmax change. ``flip_rate_bound`` is
    the upper one-sided Clopper–Pearson bound, at ``confidence``, on the rate of changed decisions
    (flips and near-ties: both are decisions the service would make differently) over ``total``
    decisions counted in ``unit`` (samples, outputs, pairs).
    """

    kind: str
    threshold: float | None
    band: float
    total: int
    flips: tuple[str, ...] = ()
    near_ties: tuple[str, ...] = ()
    max_probability_error: float | None = None
    flip_rate_bound: float | None = None
    confidence: float = 0.95
    unit: str = "samples"

    @property
    def changed(self) -> int:
        """Decisions that differ from the reference's, near-ties included."""
        return len(self.flips) + len(self.near_ties)


class Status(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class StageResult:
    """The verdict for one pipeline stage, with its evidence."""

    stage: str
    status: Status
    headline: str
    metric: str = ""
    comparison: Comparison | None = None
    key_diffs: tuple[KeyDiff, ...] = ()
    tensor_diffs: tuple[TensorDiff, ...] = ()
    sample_errors: tuple[tuple[str, str], ...] = ()
    decisions: tuple[DecisionFlips, ...] = ()
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.status is not Status.FAIL


@dataclass(frozen=True)
class ConfigDiff:
    """A configuration field whose candidate value differs from what the fixture recorded."""

    field: str
    reference: object
    candidate: object


# Stages a decisions gate never waives: a model that does not load or a sample that does not
# decode is not "drift that flips no decision".
_ALWAYS_GATED = ("load", "weights", "decode", "decisions")


class Verdict(str, enum.Enum):
    PARITY = "parity"
    DRIFT_NO_FLIPS = "drift without decision flips"
    DECISION_FLIPS = "decision flips"
    DRIFT = "drift"
    NO_VERDICT = "no verdict"


@dataclass(frozen=True)
class Report:
    """Everything one parity check found.

    ``gate`` is ``outputs`` (every stage must pass) or ``decisions`` (numeric drift that flips
    no decision passes; load, weights, decode and decisions must still pass).
    """

    spec: str
    fixtures: str
    device: str
    dtype: str
    stages: tuple[StageResult, ...]
    config_diffs: tuple[ConfigDiff, ...] = ()
    gate: str = "outputs"

    @property
    def verdict(self) -> Verdict:
        failed = {s.stage for s in self.stages if s.status is Status.FAIL}
        if not any(s.status is Status.PASS for s in self.stages):
            return Verdict.NO_VERDICT
        if not failed:
            return Verdict.PARITY
        if "decisions" in failed:
            return Verdict.DECISION_FLIPS
        decided = any(s.stage == "decisions" and s.status is Status.PASS for s in self.stages)
        return Verdict.DRIFT_NO_FLIPS if decided else Verdict.DRIFT

    @property
    def passed(self) -> bool:
        verdict = self.verdict
        if verdict is Verdict.DRIFT_NO_FLIPS and self.gate == "decisions":
            return not any(s.stage in _ALWAYS_GATED and s.status is Status.FAIL for s in self.stages)
        return verdict is Verdict.PARITY

    def __bool__(self) -> bool:
        return self.passed

    @property
    def first_failure(self) -> StageResult | None:
        return next((s for s in self.stages if s.status is Status.FAIL), None)

    def stage(self, name: str) -> StageResult:
        for result in self.stages:
            if result.stage == name:
                return result
        raise KeyError(f"no stage named {name!r}; stages: {[s.stage for s in self.stages]}")


@dataclass(frozen=True)
class CandidateRun:
    """What one runner observed of a candidate, stage by stage; the comparator judges it.

    ``None`` means not observed. ``unobservable`` names the stages this runner cannot see and why
    (an HTTP service shows no pixels), so they are reported as such, never as a match. ``rows`` are
    the fixture rows that ``embeddings`` and ``outputs`` belong to, in order; a row that failed
    (unreadable file, the candidate raised on it) is in ``sample_errors`` instead.

    Attributes:
        runner: what produced the record (``spec``, ``python``, ``endpoint_handler``, ``onnx``, ``url``, ``logged``).
        description: the candidate's configuration as manifests record it (provenance, config diffs).
        load_failure: why a strict load failed; nothing else was run.
        fingerprints: part (``backbone``, ``head``) -> tensor name -> sha256 of the modules actually used.
        modules: part -> the torch module actually used, to measure how far a changed tensor moved.
        conversions: sample -> how its image was converted to RGB.
        pixels: golden sample -> pixels (3, H, W) entering the backbone.
        embeddings: (len(rows), D) embeddings entering the head.
        head_outputs: the candidate head on the fixture's reference embeddings, every row.
        outputs: (len(rows), L) the candidate's outputs.
        nondeterministic: stages whose values changed between two identical calls.
        errors: stage -> what the candidate raised there (the stage fails with it).
    """

    runner: str
    description: Mapping[str, Any] = field(default_factory=dict)
    load_failure: KeyDiff | None = None
    fingerprints: Mapping[str, Mapping[str, str]] | None = None
    modules: Mapping[str, Any] = field(default_factory=dict)
    rows: tuple[int, ...] = ()
    sample_errors: tuple[tuple[str, str], ...] = ()
    conversions: Mapping[str, str] = field(default_factory=dict)
    pixels: Mapping[str, Any] | None = None
    embeddings: Any = None
    head_outputs: Any = None
    outputs: Any = None
    nondeterministic: tuple[str, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)
    unobservable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RefereeStage:
    """One stage judged against a float64 run of the candidate pipeline (RMSE, as `torch._dynamo.utils.same`).

    ``reference_error`` is the fixture's RMSE against the float64 run; ``rounding`` maps each legitimately
    rounded run of the same computation (the candidate at its dtype, the reference's emulated precisions)
    to its own RMSE against it. ``explained_by`` is the first of them within which the reference's
    error falls (``error <= multiplier * rounding + tol / 10``), or ``None``: a change of computation.
    """

    stage: str
    reference_error: float
    rounding: tuple[tuple[str, float], ...] = ()
    multiplier: float = 2.0
    tol: float = 1e-4
    explained_by: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Referee:
    """Whether the difference between a candidate and its reference is rounding or a change of computation."""

    samples: tuple[str, ...]
    stages: tuple[RefereeStage, ...]
    hypotheses: str = ""

    @property
    def explained(self) -> bool:
        return bool(self.stages) and all(s.explained_by is not None for s in self.stages)

    @property
    def verdict(self) -> str:
        """``rounding`` or ``computation``."""
        return "rounding" if self.explained else "computation"

    @property
    def reduced_precision(self) -> str | None:
        """The reduced precision of the reference that explains the difference, if that is what explains it."""
        named = [s.explained_by for s in self.stages if s.explained_by and s.explained_by.startswith("reference ")]
        return named[0].removeprefix("reference ") if self.explained and named else None
