"""Result records: frozen dataclasses that carry numbers and no formatting logic."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import numbers
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UnionType = types.UnionType
# The version of the report.json layout (`parity.report.console.document`); readers refuse another.
REPORT_SCHEMA_VERSION = 1

__all__ = [
    "Tolerance",
    "SampleError",
    "Thumbnail",
    "Comparison",
    "LayerGuess",
    "KeyFix",
    "KeyDiff",
    "TensorDiff",
    "DecisionFlips",
    "Finding",
    "Status",
    "Verdict",
    "StageResult",
    "ConfigDiff",
    "Report",
    "CandidateRun",
    "PRECISION_AXES",
    "Cell",
    "CellCost",
    "CellResult",
    "MatrixReport",
    "Choice",
    "PrecisionRepair",
    "toml_value",
    "toml_literal",
    "toml_key",
    "Change",
    "Cause",
    "LayerDivergence",
    "Diagnosis",
    "ServiceDiagnosis",
    "CheckpointSummary",
    "Run",
    "Calibration",
    "RefereeStage",
    "Referee",
    "Shard",
    "ShardVectors",
    "from_plain",
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
class Thumbnail:
    """The worst image of a pixel comparison, small enough to embed in a report.

    ``reference`` and ``candidate`` are base64 of ``height * width * 3`` bytes (8-bit RGB, both
    scaled by the reference image's own range so they are comparable); ``difference`` is base64
    of ``height * width`` bytes, the largest absolute difference over channels in each block,
    with 255 standing for ``difference_max`` (in normalized pixel units).
    """

    name: str
    height: int
    width: int
    reference: str
    candidate: str
    difference: str
    difference_max: float


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
    # Every row's error in row order (the worst ones when there are more than compare.MAX_SAMPLES),
    # so a report can plot the distribution without the arrays.
    samples: tuple[SampleError, ...] = ()
    thumbnail: Thumbnail | None = None

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


@dataclass(frozen=True)
class Finding:
    """A detector whose transform of the reference reproduced what the candidate did: the cause, its evidence, the fix.

    Detectors (`parity.explain.detectors`) each test one named explanation against what a runner observed;
    a finding exists only when the check reproduced the candidate's numbers within budget.

    Attributes:
        detector: ``family.name``, e.g. ``pixels.channel_order``, ``outputs.sigmoid``, ``weights.dtype``.
        stage: the stage it explains (one of the gate's stages).
        cause: what the shipped code does, in its own terms ("the shipped code feeds the model BGR images").
        evidence: the check that reproduced the candidate's numbers ("the reference pixels with channels
            reversed reproduce the shipped pixels: max abs 2.4e-07").
        fix: the change to make, direction explicit ("Change the shipped code: ...").
        where: where the hooks saw it (``deploy/app.py:31 in predict``, a module path), or ``""``.
        max_abs: the reproduction's residual (NaN when the evidence is not numeric).
        spec_fix: valid TOML for the spec when the reference side could take the change instead, else ``""``.
    """

    detector: str
    stage: str
    cause: str
    evidence: str
    fix: str
    where: str = ""
    max_abs: float = float("nan")
    spec_fix: str = ""


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
    # What the detectors reproduced for this stage (`parity.explain.detectors`), most specific first.
    findings: tuple[Finding, ...] = ()

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


@dataclass(frozen=True)
class ShardVectors:
    """One shard's candidate and reference embeddings (base64 of little-endian float32, row-major),
    kept only when a decision needs pairs of samples that may sit in different shards."""

    names: tuple[str, ...]
    width: int
    candidate: str
    reference: str


@dataclass(frozen=True)
class Shard:
    """Which part of the sample set a partial report covers (`parity check --shard I/N`).

    ``rows`` are the shard's samples as positions in the whole set of ``of`` samples, ``names``
    their names; ``runner`` and ``max_flip_rate`` are what a merge needs to judge the whole.
    """

    index: int
    count: int
    of: int
    rows: tuple[int, ...]
    names: tuple[str, ...]
    runner: str = "spec"
    version: str = ""
    max_flip_rate: float | None = None
    vectors: ShardVectors | None = None


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
    shard: Shard | None = None

    @property
    def verdict(self) -> Verdict:
        failed = {s.stage for s in self.stages if s.status is Status.FAIL}
        if not failed:  # nothing failed: parity if anything was compared at all
            return Verdict.PARITY if any(s.status is Status.PASS for s in self.stages) else Verdict.NO_VERDICT
        if "decisions" in failed:
            return Verdict.DECISION_FLIPS
        decided = any(s.stage == "decisions" and s.status is Status.PASS for s in self.stages)
        # Values of another shape are another model or extraction: no count of decisions vouches for it.
        return Verdict.DRIFT_NO_FLIPS if decided and not self.reshaped else Verdict.DRIFT

    @property
    def reshaped(self) -> tuple[str, ...]:
        """The stages whose candidate values have another shape than the reference's."""
        return tuple(s.stage for s in self.stages if s.comparison is not None and not s.comparison.shapes_match)

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

    @property
    def cause(self) -> Finding | None:
        """The explanation to lead with: the first finding of a failing stage, in data order."""
        return next((f for s in self.stages if s.status is Status.FAIL for f in s.findings), None)

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
        reference: the `parity.store.fixtures.Fixture` to judge the record against when it is not the
            spec's fixture (a replayed service log of images outside it: the spec pipeline's values
            on those images); ``rows`` then index into it.
        unloaded: parts the candidate runs without loading any checkpoint (initial or library-default
            weights): the weights stage fails for them. A part merely absent from ``fingerprints`` was
            not observed by this runner.
        shard_rows: for a runner with samples of its own (a log) run on one shard: ``(position,
            name)`` of each of the shard's samples, positions among all ``shard_of`` of them.
        head_inputs: sample -> the head's other tensor arguments as the candidate passed them (its
            ``input_biases``, an int array), samples the candidate raised on included.
        model_inputs: sample -> (shape, dtype) of the first tensor the backbone received, whatever its
            channel count, samples the candidate raised on included.
        module_states: part -> ``(module path, class name)`` of its modules left in training mode.
        dtypes: part -> the dtype of its floating-point parameters (``float16``).
        all_fingerprints: every tensor of every torch module the candidate can reach, ``root.path.name``
            -> sha256, to find a trained tensor held under another name (or not at all).
        call_sites: part -> where the candidate's own code called it (``app.py:31 in predict``).
        notes: how the runner observed the candidate when that is not plain (a compiled module run
            eagerly so that hooks fire, a module found only once the candidate had been called).
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
    reference: Any = None
    unloaded: tuple[str, ...] = ()
    shard_rows: tuple[tuple[int, str], ...] | None = None
    shard_of: int = 0
    head_inputs: Mapping[str, Any] = field(default_factory=dict)
    model_inputs: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    module_states: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    dtypes: Mapping[str, str] = field(default_factory=dict)
    all_fingerprints: Mapping[str, str] | None = None
    call_sites: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# -- the variant matrix (parity.commands.matrix) ----------------------------------------------------

# Matrix axes that change how the backbone computes, not what it is fed.
PRECISION_AXES = ("device", "dtype", "tf32", "sdpa", "runtime", "quantize", "threads", "batch_size")


@dataclass(frozen=True)
class Cell:
    """One point of the matrix. ``deployment`` cells keep the spec's preprocessing and extraction."""

    values: tuple[tuple[str, Any], ...]
    id: str
    deployment: bool

    def __getitem__(self, axis: str) -> Any:
        return dict(self.values)[axis]


@dataclass(frozen=True)
class CellCost:
    """What one cell's backbone pass cost, measured after a warm-up batch; never part of the verdict.

    Cells that share a trunk pass (extraction modes of one device, dtype and batch size) share its
    cost. ``latency_*_ms`` are per image at the cell's ``batch_size`` (a batch's wall time divided by
    its images), over every timed batch of every repeat; ``load_s`` is the cell's model copy and
    conversion (the pipeline's build for the spec's own device and dtype); ``peak_rss_mb`` is the
    process's peak resident memory after the pass; ``cuda_peak_mb`` the pass's CUDA max allocated.
    """

    batch_size: int
    images: int
    repeat: int
    latency_p50_ms: float
    latency_p95_ms: float
    throughput: float
    load_s: float
    peak_rss_mb: float
    cuda_peak_mb: float | None = None
    device_name: str = ""


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    status: Status
    comparison: Comparison | None = None
    reason: str = ""
    cost: CellCost | None = None
    # the cell's embeddings against the batch-size-1 run of the same configuration (batch_size axis)
    batch_comparison: Comparison | None = None
    # Deployment cells of a spec whose fixture has head outputs: the head run on the cell's embeddings, on
    # its device and precision, against the fixture's outputs (and against the batch-size-1 run's outputs).
    outputs: Comparison | None = None
    batch_outputs: Comparison | None = None
    # With [decisions]: the largest flip-rate bound over the decision kinds, and the decisions changed.
    flip_bound: float | None = None
    flips: int | None = None

    def __bool__(self) -> bool:
        return self.status is not Status.FAIL


@dataclass(frozen=True)
class MatrixReport:
    """Every cell's verdict, plus which axis values reproduce the reference."""

    spec: str
    fixtures: str
    cells: tuple[CellResult, ...]
    axes: tuple[str, ...]
    equivalent_modes: tuple[tuple[str, ...], ...] = ()
    reference_dtype: str = "float32"
    shard: Shard | None = None

    @property
    def passed(self) -> bool:
        """Every deployment cell that ran reproduces the reference (probes may drift)."""
        ran = [r for r in self.cells if r.cell.deployment and r.status is not Status.SKIP]
        return bool(ran) and all(r.status is Status.PASS for r in ran)

    def cell(self, cell_id: str) -> CellResult:
        for result in self.cells:
            if result.cell.id == cell_id:
                return result
        raise KeyError(f"no cell {cell_id!r}")

    def reproducing(self, axis: str) -> list[Any]:
        """Values of ``axis`` for which at least one cell reproduces the reference.

        Outside the precision axes only cells at the reference's dtype count: a looser
        half-precision budget can swallow a preprocessing drift.
        """
        cells = self.cells if axis in PRECISION_AXES else [r for r in self.cells if r.cell["dtype"] == self.reference_dtype]
        values = list(dict.fromkeys(r.cell[axis] for r in self.cells))
        return [v for v in values if any(r.status is Status.PASS and r.cell[axis] == v for r in cells)]


@dataclass(frozen=True)
class Choice:
    """`parity choose`: the deployment matrix, and per device the fastest passing cell.

    ``chosen`` maps a device to the id of its fastest passing cell (by per-image p50 latency,
    within ``budget_ms`` when given), or to None when none passes; ``pareto`` lists the ids of the
    cells that ran and that no other cell beats on all of latency p50, flip-rate bound and max abs.
    """

    report: MatrixReport
    chosen: Mapping[str, str | None]
    pareto: tuple[str, ...]
    budget_ms: float | None = None
    repairs: tuple[PrecisionRepair, ...] = ()

    @property
    def passed(self) -> bool:
        """At least one cell passes (within the budget, when given)."""
        return any(cell_id is not None for cell_id in self.chosen.values())


@dataclass(frozen=True)
class PrecisionRepair:
    """A failing reduced-precision cell, and the modules that kept in float32 make it pass.

    ``keep``: module names (in data order) run in float32 while the rest stays in the cell's dtype (with
    ``quantize``: left unquantized while the rest is quantized), found by bisection over the backbone's
    module groups and then the head's (named ``head.NAME``); empty with ``confirmed`` False when even
    every group kept does not pass. With ``quantize`` ``int8`` (runtime onnxruntime), ``keep`` names the
    backbone's modules whose ONNX nodes are left out of the static quantization (``nodes``). ``before`` and
    ``after`` (the confirming re-run of the cell with ``keep``) are the embeddings' comparisons; ``reason_before``/``reason_after`` say how the head's
    outputs or decisions failed.
    """

    cell: str
    dtype: str
    before: Comparison
    keep: tuple[str, ...] = ()
    after: Comparison | None = None
    confirmed: bool = False
    tried: int = 0
    # ``dynamic_int8``: ``keep`` names modules left unquantized (float32) instead of kept in float32.
    quantize: str = "none"
    # Why the cell failed before and after, beyond ``before``/``after`` (head outputs, decisions); empty when passing.
    reason_before: str = ""
    reason_after: str = ""
    # ``int8`` (runtime onnxruntime): the kept modules' ONNX nodes, left out of onnxruntime's static quantization:
    # their names in parity's export, and each kept module's node-name scope (``/blocks/blocks.1/``).
    runtime: str = "eager"
    nodes: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()

    def code(self) -> str:
        """The repair as the code that ships. Names under ``head.`` are the head's modules, others the backbone's."""
        if self.quantize == "int8":
            return self._static_int8_code()
        parts = {"model": [n for n in self.keep if not n.startswith("head.") and n != "head"],
                 "head": [n.removeprefix("head.") for n in self.keep if n.startswith("head.") or n == "head"]}
        if self.quantize == "dynamic_int8":
            calls = []
            for owner in ("model", "head"):
                kept = tuple(f"{name}." if name else "" for name in parts[owner])  # "": the whole head
                spared = (f", **{{n: None for n, _ in {owner}.named_modules() if (n + '.').startswith({kept!r})}}"
                          if parts[owner] else "")
                calls.append(f"{owner} = torch.ao.quantization.quantize_dynamic({owner}, {{torch.nn.Linear: "
                             f"torch.ao.quantization.default_dynamic_qconfig{spared}}}, dtype=torch.qint8)")
            return "; ".join(calls)
        # The kept modules are set aside before the cast: cast down and back up, their values would keep the
        # rounding (or the overflow) of the cell's dtype.
        kept = [f"{owner}{'.' + _attribute_path(name) if name else ''}" for owner in ("model", "head")
                for name in parts[owner]]
        saved = ", ".join(f"copy.deepcopy({e})" for e in kept)
        back = "; ".join(f"{e} = kept[{i}]" for i, e in enumerate(kept))
        return (f"kept = [{saved}]; model.to(torch.{self.dtype}); head.to(torch.{self.dtype}); {back}  "
                f"# and cast each kept module's inputs to float32, its outputs back to {self.dtype}")

    def _static_int8_code(self) -> str:
        """The user's own ``quantize_static`` call (the settings the cell was quantized with) with the kept modules'
        nodes excluded: by name when they are few, else every node under the modules' scopes (the TorchScript
        exporter's node names, ``/blocks/blocks.1/attn/qkv/MatMul``, which an export of the backbone alone shares)."""
        # Listed by name only when the names are the backbone's own (no scope of parity's wrapper before them).
        if len(self.nodes) <= _LISTED_NODES and all(n.startswith(self.scopes) for n in self.nodes):
            excluded = repr(list(self.nodes))
        else:
            excluded = (f"[node.name for node in onnx.load(model_input).graph.node "
                        f"if any(scope in node.name for scope in {tuple(self.scopes)!r})]")
        return ("import onnx; from onnxruntime.quantization import QuantFormat, QuantType, quantize_static; "
                "quantize_static(model_input, model_output, calibration_data_reader, quant_format=QuantFormat.QDQ, "
                "per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, "
                f"nodes_to_exclude={excluded})")


# A static int8 repair prints up to this many excluded nodes by name, more as a comprehension over their scopes.
_LISTED_NODES = 8


def _attribute_path(name: str) -> str:
    """``blocks.1.norm1`` as Python reaches it: ``blocks[1].norm1``."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".")).lstrip(".")


# -- diagnosis (parity.commands.diagnose) ------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else json.dumps(key, ensure_ascii=False)


def toml_literal(value: Any) -> str:
    """``value`` as a valid TOML value (JSON's string escapes are TOML's; NumPy scalars become plain numbers)."""
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # inf and nan are TOML too
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_literal(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


@dataclass(frozen=True)
class Change:
    """One spec edit: ``[section].field = value`` (several fields for a preset such as mean/std)."""

    section: str
    fields: tuple[tuple[str, Any], ...]
    origin: str = "search"

    @property
    def key(self) -> tuple:
        return (self.section, tuple((f, repr(v)) for f, v in self.fields))

    def toml(self) -> str:
        """One line, for reading (``[preprocess].interpolation = "bicubic"; remove [head].x``); not TOML:
        a user pastes `toml_text` and follows `removals`."""
        return "; ".join(f"[{self.section}].{f} = {toml_value(v)}" if v is not None else f"remove [{self.section}].{f}"
                         for f, v in self.fields)

    def toml_text(self) -> str:
        """This change as TOML a user pastes into the spec (``[preprocess]\ninterpolation = "bicubic"``),
        removals left out (`removals`)."""
        return Change.merged_toml((self,))

    def removals(self) -> tuple[str, ...]:
        """The fields this change removes, as instructions (a removal is no TOML value)."""
        return tuple(f"remove [{self.section}].{f}" for f, v in self.fields if v is None)

    @staticmethod
    def merged_toml(changes: collections.abc.Iterable[Change]) -> str:
        """Several changes as one TOML snippet, one table per section (a later change of a field wins);
        empty when they only remove fields."""
        tables: dict[str, dict[str, Any]] = {}
        for change in changes:
            table = tables.setdefault(change.section, {})
            for name, value in change.fields:
                table.pop(name, None)
                if value is not None:
                    table[name] = value
        return "\n\n".join(f"[{section}]\n" + "\n".join(f"{toml_key(k)} = {toml_literal(v)}" for k, v in table.items())
                           for section, table in tables.items() if table)

    @staticmethod
    def merged_removals(changes: collections.abc.Iterable[Change]) -> tuple[str, ...]:
        """The removal instructions of several changes (a field a later change sets again is not removed)."""
        removed: dict[tuple[str, str], bool] = {}
        for change in changes:
            for name, value in change.fields:
                removed.pop((change.section, name), None)
                removed[(change.section, name)] = value is None
        return tuple(f"remove [{section}].{name}" for (section, name), gone in removed.items() if gone)

    def apply(self, spec: Any) -> Any:
        """``spec`` (a `parity.spec.Spec`) with this change made."""
        values = {f: (tuple(v) if isinstance(v, list) else v) for f, v in self.fields}
        if self.section == "head" and "class" in values:
            values["class_path"] = values.pop("class")
        return spec.replace(**{self.section: values})


@dataclass(frozen=True)
class Cause:
    """A change that moves the candidate towards the reference, with its evidence."""

    change: Change
    stage: str
    metric: str
    before: float
    after: float
    reproduces: bool
    current: str
    resolved_from: str = ""  # where the value came from when the spec leaves the field unset

    @property
    def words(self) -> str:
        if self.stage == "load":  # no numbers to compare: the evidence is the recognised cause and the load
            verified = "; the checkpoint then loads with strict=True" if self.reproduces else ""
            return f"{self.change.toml()} ({self.current}){verified}"
        has = (f"the spec leaves it unset: {self.current} from {self.resolved_from}" if self.resolved_from
               else f"the spec has {self.current}")
        return f"{self.change.toml()} ({has}): {self.stage} {self.metric} {self.before:.2e} -> {self.after:.2e}"


@dataclass(frozen=True)
class LayerDivergence:
    """The first backbone module whose output moves beyond tolerance, fed identical pixels."""

    module: str
    index: int
    total: int
    max_abs: float


@dataclass(frozen=True)
class Diagnosis:
    report: Report
    causes: tuple[Cause, ...] = ()
    fix: tuple[Change, ...] = ()
    confirmed: bool = False
    layer: LayerDivergence | None = None
    affected: tuple[str, ...] = ()
    total: int = 0
    pattern: str = ""
    notes: tuple[str, ...] = ()
    # Set for shipped code (python, endpoint_handler): ``fix`` is then the spec change under which the
    # spec reproduces that code's numbers, i.e. where the shipped code departs from the reference.
    candidate: str = ""
    # Shipped code only: the fix in the shipped code's terms, the spec being the reference ("The shipped
    # code resizes with bilinear; the reference used bicubic. Change the shipped code: ..."), then the
    # alternative: the TOML to rebuild the fixture with if the shipped code is right.
    shipped_fix: tuple[str, ...] = ()
    # What the diagnosis reproduced, as detectors word it (`Finding`): a spec change or an image change
    # before the spec's preprocessing under which the reference pipeline computes the candidate's numbers.
    findings: tuple[Finding, ...] = ()

    @property
    def drift(self) -> bool:
        return not self.report.passed


@dataclass(frozen=True)
class ServiceDiagnosis:
    """Whether a service's logged values come from the spec's pipeline, and if not, from which variant."""

    log: str
    samples: int
    matches: bool
    compared: tuple[str, ...]
    before: float
    causes: tuple[Cause, ...] = ()
    reproduced_by: tuple[Change, ...] = ()
    reproduced: bool = False
    stage: str = ""  # where the service first departs from the spec: "embedding" or "head"
    decisions: tuple[DecisionFlips, ...] = ()  # the spec's [decisions], service vs spec pipeline
    gate: str = "outputs"
    notes: tuple[str, ...] = ()
    report: Report | None = None  # the gate on the log as a candidate (stages, [decisions], verdict)
    shipped_fix: tuple[str, ...] = ()  # as `Diagnosis.shipped_fix`: the service departs from the spec
    findings: tuple[Finding, ...] = ()  # as `Diagnosis.findings`

    @property
    def passed(self) -> bool:
        """The spec's gate: matching numbers, or with ``gate = "decisions"`` no decision flip."""
        if self.matches:
            return True
        if self.report is not None and self.report.reshaped:
            return False
        return self.gate == "decisions" and bool(self.decisions) and not any(d.flips for d in self.decisions)


# -- checkpoint inspection (parity.store.forensics) -------------------------------------------------

@dataclass(frozen=True)
class CheckpointSummary:
    """Everything `parity inspect` prints about one checkpoint."""

    path: str
    nested: tuple[str, ...]
    selected: str | None
    other_entries: tuple[str, ...]
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    layers: tuple[LayerGuess, ...]

    @property
    def total_params(self) -> int:
        total = 0
        for _, shape, _ in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


# -- calibration (parity.commands.calibrate) -----------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One perturbation of the reference pipeline."""

    batch_size: int
    threads: int
    shuffled: bool = False

    def describe(self) -> str:
        return f"batch {self.batch_size}{' shuffled' if self.shuffled else ''}, {self.threads} thread(s)"


@dataclass(frozen=True)
class Calibration:
    """Measured noise per stage, and the budgets derived from it."""

    device: str
    dtype: str
    runs: tuple[Run, ...]
    margin: float
    noise: dict[str, dict[str, Any]]
    emulation: str | None = None  # why the noise includes an emulated reference's numerics (parity.numerics.emulate)

    def to_manifest(self) -> dict[str, Any]:
        entry = {"device": self.device, "margin": self.margin, "runs": [r.describe() for r in self.runs],
                 "noise": self.noise}
        return {self.dtype: {**entry, "emulation": self.emulation} if self.emulation else entry}


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


def from_plain(cls: type, data: Any) -> Any:
    """Rebuild a result dataclass from its JSON form (what `parity.report.console.to_json` wrote).

    Fields the JSON lacks take their defaults; unknown keys (rendering extras such as ``text``)
    are ignored; JSON ``null`` for a float field is NaN again.

    Raises:
        ValueError: the data does not have the shape ``cls`` needs.
    """
    import math
    import typing

    def build(tp: Any, value: Any) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any or tp is object:
            return value
        if origin in (typing.Union, _UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return build(inner[0], value) if len(inner) == 1 else value
        if value is None:
            if tp is float:
                return math.nan
            raise ValueError(f"missing value for {tp}")
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
            hints = typing.get_type_hints(tp)
            return tp(**{f.name: build(hints[f.name], value[f.name])
                         for f in dataclasses.fields(tp) if f.init and f.name in value})
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(value)
        if origin is tuple:
            if not isinstance(value, list):
                raise ValueError(f"expected a list for {tp}, got {type(value).__name__}")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(build(args[0], v) for v in value)
            return tuple(build(a, v) for a, v in zip(args, value)) if args else tuple(value)
        if origin in (dict, Mapping, collections.abc.Mapping):
            if not isinstance(value, dict):
                raise ValueError(f"expected an object for {tp}, got {type(value).__name__}")
            return {k: build(args[1], v) for k, v in value.items()} if args else dict(value)
        if tp is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if tp in (int, str, bool):
            if type(value) is not tp and not (tp is int and isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"expected {tp.__name__}, got {value!r}")
            return value
        if tp is Path:
            return Path(value)
        return value

    return build(cls, data)
