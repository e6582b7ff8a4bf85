"""What the head was given: its input_biases columns re-ordered or re-coded, its dtype, its modules' training mode."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from parity.explain.detectors.evidence import Evidence, dtype_name, fit, number
from parity.results import Finding
from parity.judge.tolerance import default_tolerance, reference_dtype
from parity.store.fixtures import METADATA

__all__ = ["ColumnMapping", "column_mapping", "training_modules", "STOCHASTIC", "findings"]

# Modules whose forward differs between .train() and .eval() (class-name prefixes).
STOCHASTIC = ("BatchNorm", "SyncBatchNorm", "InstanceNorm", "Dropout", "AlphaDropout", "FeatureAlphaDropout",
              "Dropout1d", "Dropout2d", "Dropout3d", "DropPath", "StochasticDepth")
_BATCHNORM_ERROR = "Expected more than 1 value per channel"
_INDEX_ERROR = re.compile(r"index out of range|out of bounds|IndexError", re.IGNORECASE)
_MAX_PERMUTED = 6  # 720 orders; more columns are matched one by one


@dataclass(frozen=True)
class ColumnMapping:
    """``observed[:, j] == reference[:, order[j]] + offsets[j]`` on every sample."""

    order: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def permuted(self) -> bool:
        return self.order != tuple(range(len(self.order)))

    @property
    def recoded(self) -> bool:
        return any(self.offsets)


def column_mapping(observed: Any, reference: Any) -> ColumnMapping | None:
    """The column order and constant per-column offsets that take ``reference`` rows to ``observed``.

    Only a mapping that is not the identity and is the only simplest one (fewest re-coded columns,
    then fewest moved ones) is returned: columns equal on every sample cannot be told apart.
    Needs two samples at least.
    """
    obs = np.asarray(observed, dtype=np.int64)
    ref = np.asarray(reference, dtype=np.int64)
    if obs.shape != ref.shape or obs.ndim != 2 or obs.shape[0] < 2 or obs.shape[1] == 0:
        return None
    k = obs.shape[1]
    # offsets[j][c]: the constant observed[:, j] - reference[:, c], or None when it varies
    offsets = [[None if (d := obs[:, j] - ref[:, c]).min() != d.max() else int(d[0]) for c in range(k)]
               for j in range(k)]
    if k <= _MAX_PERMUTED:
        orders = itertools.permutations(range(k))
    else:  # each observed column to the one reference column it equals (no re-coding)
        matches = [[c for c in range(k) if offsets[j][c] == 0] for j in range(k)]
        orders = [tuple(m[0] for m in matches)] if all(len(m) == 1 for m in matches) else []
    fitting = []
    for order in orders:
        shift = [offsets[j][c] for j, c in enumerate(order)]
        if any(s is None for s in shift) or len(set(order)) != k:
            continue
        mapping = ColumnMapping(tuple(order), tuple(shift))
        cost = (sum(1 for s in shift if s), sum(1 for j, c in enumerate(order) if j != c))
        fitting.append((cost, mapping))
    if not fitting:
        return None
    fitting.sort(key=lambda item: item[0])
    best_cost, best = fitting[0]
    if best_cost == (0, 0) or (len(fitting) > 1 and fitting[1][0] == best_cost):
        return None
    return best


def training_modules(states: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (path, class) of ``states`` whose forward changes in training mode (`STOCHASTIC`)."""
    return [(path, cls) for path, cls in states if cls.startswith(STOCHASTIC)]


def _column_names(evidence: Evidence, k: int) -> list[str]:
    try:
        names = json.loads((evidence.fixture.root / METADATA).read_text(encoding="utf-8")).get("bias_names")
    except Exception:
        names = None
    if isinstance(names, list) and len(names) == k and all(isinstance(n, str) for n in names):
        return [f"{n!r}" for n in names]
    return [f"column {i}" for i in range(k)]


def _table_sizes(evidence: Evidence, k: int) -> list[int] | None:
    """Rows of the head's embedding tables, in module order, when there is one per column."""
    structure = evidence.fixture.pipeline.get("head", {}).get("structure", {})
    embedding = {path for path, cls in structure.items() if cls == "Embedding"}
    sizes = []
    for name, shape in structure.items():
        module = name.removesuffix(".weight")
        wildcard = re.sub(r"\.\d+$", ".*", module)
        if name.endswith(".weight") and (module in embedding or wildcard in embedding):
            try:
                sizes.append((module, int(json.loads(shape)[0])))
            except (ValueError, TypeError, IndexError):
                return None
    sizes.sort(key=lambda item: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])])
    return [n for _, n in sizes] if len(sizes) == k else None


def _columns_finding(evidence: Evidence) -> dict[str, list[Finding]]:
    run, fixture = evidence.run, evidence.fixture
    by_name = {row.name: row.input_biases for row in fixture.rows}
    names = [n for n in run.head_inputs if n in by_name]
    if len(names) < 2:
        return {}
    try:
        observed = np.stack([np.asarray(run.head_inputs[n], dtype=np.int64).reshape(-1) for n in names])
    except (ValueError, TypeError):
        return {}
    reference = np.array([by_name[n] for n in names], dtype=np.int64).reshape(len(names), -1)
    mapping = column_mapping(observed, reference)
    if mapping is None:
        return {}
    k = reference.shape[1]
    columns = _column_names(evidence, k)
    parts = []
    shifted = [f"{columns[mapping.order[j]]} {s:+d}" for j, s in enumerate(mapping.offsets) if s]
    if mapping.permuted:
        shipped = ", ".join(columns[c] for c in mapping.order)
        parts.append(f"passes the input_biases columns in the order ({shipped}); the head was trained on "
                     f"({', '.join(columns)})")
    if mapping.recoded:
        parts.append(f"re-codes the categories ({', '.join(shifted)}: e.g. counting from 1)")
    fixes = []
    if mapping.permuted:
        fixes.append(f"pass the columns in the training order ({', '.join(columns)})")
    if mapping.recoded:
        fixes.append("pass the category indices the head was trained with, unshifted")
    at = evidence.at("head")
    how = " and ".join(filter(None, ("with the columns re-ordered" if mapping.permuted else "",
                                     f"shifted ({', '.join(shifted)})" if mapping.recoded else "")))
    evidence_text = f"on all {len(names)} samples the hooks saw, the head's input_biases are the fixture's {how}"
    raised = [(n, e) for n, e in run.sample_errors if _INDEX_ERROR.search(e)]
    sizes = _table_sizes(evidence, k)
    linked: list[str] = []
    if raised:
        for name, _ in raised:
            if name in run.head_inputs:
                values = np.asarray(run.head_inputs[name], dtype=np.int64).reshape(-1)
                over = [j for j in range(min(k, len(values))) if sizes is not None and values[j] >= sizes[j]]
                if over or sizes is None:
                    linked.append(name)
        if linked:
            detail = (f"; {len(linked)} sample(s) raised an index error ({linked[0]}: "
                      f"{dict(run.sample_errors)[linked[0]]!r})")
            if sizes is not None:
                detail += (": their values exceed the embedding tables' sizes "
                           f"({', '.join(f'{columns[j]} has {n} rows' for j, n in enumerate(sizes))})")
            evidence_text += detail
    finding = Finding(
        detector="head_inputs.columns", stage="outputs", cause="the shipped code " + " and ".join(parts),
        evidence=evidence_text, fix=f"Change the shipped code: {'; '.join(fixes)}{at}",
        where=evidence.where("head"), max_abs=0.0)
    stages = [s for s in ("decode", "outputs") if evidence.failing(s) and (s != "decode" or linked)]
    return {s: [replace(finding, stage=s)] for s in stages}


def _state_findings(evidence: Evidence) -> dict[str, list[Finding]]:
    run = evidence.run
    found: dict[str, list[Finding]] = {}
    for part, stages in (("head", ("decode", "head", "outputs")), ("backbone", ("decode", "embedding"))):
        modules = training_modules(run.module_states.get(part, ()))
        if not modules:
            continue
        listed = ", ".join(f"{path or '(root)'} ({cls})" for path, cls in modules[:6])
        more = f" and {len(modules) - 6} more" if len(modules) > 6 else ""
        batchnorm = [p for p, c in modules if "BatchNorm" in c]
        raised = [(n, e) for n, e in run.sample_errors if _BATCHNORM_ERROR in e]
        evidence_text = f"the hooks saw {len(modules)} module(s) of the {part} with .training = True: {listed}{more}"
        if raised and batchnorm:
            evidence_text += (f"; {len(raised)} sample(s) raised {_BATCHNORM_ERROR!r}, what a BatchNorm in training "
                              "mode raises on a batch of one")
        random = any(s in run.nondeterministic for s in stages)
        if random:
            evidence_text += "; its outputs changed between two identical calls"
        elif not batchnorm:  # a Dropout(p=0) in training mode changes nothing: not a cause by itself
            continue
        finding = Finding(
            detector="head_inputs.training_mode", stage="", cause=f"the shipped code runs the {part} in training mode "
            f"({'BatchNorm uses batch statistics, ' if batchnorm else ''}"
            f"{'Dropout is active' if any('Dropout' in c for _, c in modules) else 'stochastic layers are active'})",
            evidence=evidence_text,
            fix=f"Change the shipped code: call `.eval()` on the {part} after loading it "
                f"({', '.join(p or '(root)' for p, _ in modules[:3])}{'...' if len(modules) > 3 else ''}){evidence.at(part)}",
            where=evidence.where(part))
        for stage in stages:
            if evidence.failing(stage) and (stage != "decode" or (raised and batchnorm)):
                found.setdefault(stage, []).append(replace(finding, stage=stage))
    return found


def _dtype_findings(evidence: Evidence) -> dict[str, list[Finding]]:
    run, fixture = evidence.run, evidence.fixture
    reference = reference_dtype(fixture)
    rows = list(run.rows)
    observed = {"embedding": (run.embeddings, fixture.embeddings[rows] if rows else None),
                "head": (run.head_outputs, fixture.outputs),
                "outputs": (run.outputs, fixture.outputs[rows] if rows else None)}
    parts = dict(run.dtypes)
    if run.embeddings is not None and dtype_name(getattr(run.embeddings, "dtype", "")) in ("float16", "bfloat16"):
        parts.setdefault("backbone", dtype_name(run.embeddings.dtype))
    found: dict[str, list[Finding]] = {}
    for part, stages in (("backbone", ("embedding", "outputs")), ("head", ("head", "outputs"))):
        dtype = dtype_name(parts.get(part, ""))
        if dtype not in ("float16", "bfloat16", "float64") or dtype == reference:
            continue
        budget = default_tolerance("outputs", dtype)
        for stage in stages:
            values, expected = observed[stage]
            if not evidence.failing(stage) or values is None or expected is None:
                continue
            result = fit(values, expected, budget)
            if not result.passed:  # more than the precision change moved it: name nothing
                continue
            call = ".half()" if dtype == "float16" else f".to(torch.{dtype})"
            found.setdefault(stage, []).append(Finding(
                detector="head_inputs.dtype", stage=stage,
                cause=f"the shipped code runs the {part} in {dtype} (`{call}`); the reference ran in {reference}",
                evidence=(f"the {part}'s parameters are {dtype}; the {stage} residual (max abs {number(result.max_abs)}) "
                          f"is within what {dtype} rounding gives ({budget.describe()})"),
                fix=(f"Change the shipped code: run the {part} in {reference} (remove `{call}`){evidence.at(part)}; "
                     f"or, if {dtype} is intended, state the budget it accepts in the spec ([tolerance.{stage}] with "
                     f"[runtime].dtype = \"{dtype}\") or calibrate at {dtype}"),
                where=evidence.where(part), max_abs=result.max_abs))
    return found


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """Re-ordered or re-coded input_biases, the head's dtype, modules left in training mode."""
    found: dict[str, list[Finding]] = {}
    for family in (_columns_finding, _state_findings, _dtype_findings):
        for stage, items in family(evidence).items():
            found.setdefault(stage, []).extend(items)
    return found
