"""Put the partial reports of `parity check|matrix --shard I/N` back together (`parity merge`).

The merged report is the one the unsharded run gives: per stage the maxima, minima and counts
of the parts, the mean weighted by element count, the worst samples of the union, every sample
error and flip in sample order, and the decisions' flip-rate bounds recomputed over all
decisions. Decisions over pairs of samples (verification) are judged again from the
embeddings the partial reports carry. A matrix merges cell by cell. Only a complete set of
shards of one run merges: one part per shard, all made from the same fixture data and the same
spec contents (the digests each part records). The parts are taken in shard order, so the
order they are given in changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from parity.judge.stages import STAGE_ORDER, decisions_stage, decode_stage, verification_band
from parity.judge.arrays import merge_comparisons
from parity.judge.decisions import verification_flips
from parity.errors import SpecError
from parity.report.files import read_json
from parity.results import (REPORT_SCHEMA_VERSION, CellResult, DecisionFlips, Diagnosis, MatrixReport, Report, Shard,
                            StageResult, Status, from_plain)
from parity.store.shards import read_part_version, unpack_vectors

__all__ = ["load_partial", "merge_reports"]


_KINDS = {"check": Report, "matrix": MatrixReport, "diagnosis": Diagnosis}
Partial = Report | MatrixReport | Diagnosis


def load_partial(path: str | Path) -> Partial:
    """A partial report written by ``parity check|matrix|diagnose --shard I/N --json PATH`` (or ``--report DIR``).

    Raises:
        SpecError: not readable, not JSON, not a check or matrix report, or not a shard's report.
    """
    path = Path(path)
    data = read_json(path, SpecError, expected="a partial report written by `parity check|matrix|diagnose --shard I/N "
                                                "--json PART.json`")
    if not isinstance(data, dict):
        raise SpecError(f"{path} is not a `parity check --json` report")
    if data.get("schema_version", REPORT_SCHEMA_VERSION) != REPORT_SCHEMA_VERSION:
        raise SpecError(f"{path} has report schema_version {data['schema_version']!r}; this parity reads "
                        f"{REPORT_SCHEMA_VERSION}: merge with the parity version that wrote the parts")
    kind = data.get("kind", "matrix" if "cells" in data else "check")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise SpecError(f"{path} is a {str(kind)[:40]} report; parity merge takes check, matrix and diagnosis reports")
    holder = data.get("report") if kind == "diagnosis" else data
    if not isinstance(holder, dict) or not isinstance(holder.get("shard"), dict):
        raise SpecError(f"{path} is a whole report, not a shard's: write parts with "
                        f"`parity {kind} --shard I/N --json PART.json`")
    try:
        part = from_plain(_KINDS[kind], data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise SpecError(f"{path}: not a report this version of parity wrote: {str(e)[:200]}") from e
    check = part.report if isinstance(part, Diagnosis) else part
    if isinstance(check, Report) and tuple(s.stage for s in check.stages) != STAGE_ORDER:
        raise SpecError(f"{path}: its stages are not {', '.join(STAGE_ORDER)}: not a report this version of "
                        "parity wrote")
    _check_vectors(path, part)
    return part


def _check_vectors(path: Path, part: Partial) -> None:
    """The embeddings a part carries for pair decisions must be what its own stages say they are:
    the reference's are finite (a fixture holds no NaN), and the candidate's are non-finite only
    where its embedding stage counted non-finite values. Otherwise NaN would be judged as flips.

    Raises:
        SpecError: the vectors do not decode, or hold NaN or infinity the part's stages do not account for.
    """
    shard = _shard(part)
    if shard is None or shard.vectors is None:
        return
    try:
        candidate, reference = unpack_vectors(shard.vectors)
    except (SpecError, ValueError) as e:
        raise SpecError(f"{path}: {e}: not a report this version of parity wrote") from e
    check = part.report if isinstance(part, Diagnosis) else part
    embedding = check.stage("embedding").comparison if isinstance(check, Report) else None
    counted = embedding.nonfinite if embedding is not None else 0
    bad = int((~np.isfinite(candidate)).sum())
    if not np.isfinite(reference).all() or bad > counted:
        raise SpecError(f"{path}: its embeddings for pair decisions hold NaN or infinite values "
                        f"({bad} in the candidate's, {int((~np.isfinite(reference)).sum())} in the reference's) that "
                        "its embedding stage does not report: the part is damaged; run its shard again")


def _shard(part: Partial) -> Shard | None:
    return part.report.shard if isinstance(part, Diagnosis) else part.shard


def _differ(what: str, values: Sequence[str], sources: Sequence[str], fix: str) -> None:
    """Refuse parts whose ``values`` differ, naming which part has which.

    Raises:
        SpecError: more than one distinct value.
    """
    groups: dict[str, list[str]] = {}
    for value, source in zip(values, sources):
        groups.setdefault(value, []).append(source)
    if len(groups) > 1:
        listed = "; ".join(f"{', '.join(names)}: {value or 'not recorded'}" for value, names in groups.items())
        raise SpecError(f"the partial reports were made from different {what} ({listed}): {fix}")


def _short(version: str) -> str:
    """A digest's first 16 hex digits (enough to tell two apart); anything else as it is."""
    return version[:16] if len(version) == 64 and all(c in "0123456789abcdef" for c in version) else version


def _check_complete(reports: Sequence[Partial], sources: Sequence[str]) -> list[Shard]:
    shards = [_shard(r) for r in reports]
    if not shards:
        raise SpecError("parity merge needs the partial reports of every shard")
    if len({type(r) for r in reports}) > 1:
        raise SpecError("parity merge got reports of different commands together: merge the shards of one run")
    if any(s is None for s in shards):
        raise SpecError("parity merge takes shard reports only (`parity check --shard I/N --json PART.json`)")
    first = shards[0]
    counts = {s.count for s in shards}
    if len(counts) > 1:
        raise SpecError(f"the partial reports come from different shardings: N = {sorted(counts)}")
    versions = [read_part_version(s.version) for s in shards]
    again = "run every shard on the same fixture and spec, then merge"
    _differ("fixture data", [f"{s.of} samples, data version {_short(v['fixture'])}" for s, v in zip(shards, versions)],
            sources, again)
    if all(v["spec"] for v in versions):  # contents decide; the same file may sit at other paths on other machines
        _differ("spec contents", [f"spec sha256 {_short(v['spec'])}" for v in versions], sources,
                "the spec file changed between the shards' runs; " + again)
    else:  # parts written before they carried the spec's digest: its path is all there is
        _differ("specs", [(r.report if isinstance(r, Diagnosis) else r).spec for r in reports], sources, again)
    _differ("candidates", [s.runner for s in shards], sources, again)
    seen = sorted(s.index for s in shards)
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    if repeated:
        raise SpecError(f"shard(s) {', '.join(f'{i}/{first.count}' for i in repeated)} given twice")
    missing = [i for i in range(1, first.count + 1) if i not in seen]
    if missing:
        raise SpecError(f"shard(s) {', '.join(f'{i}/{first.count}' for i in missing)} missing: parity merge "
                        f"needs all {first.count} partial reports")
    return shards


def merge_reports(reports: Sequence[Partial], *, sources: Sequence[str | Path] | None = None) -> Partial:
    """The report of the whole sample set from every shard's partial report, in any order.

    ``sources`` name the parts in messages (their files); by default ``part 1``, ``part 2``...

    Raises:
        SpecError: a shard missing or given twice, or parts of different runs (fixture data, spec
            contents or candidate).
    """
    names = [str(s) for s in sources] if sources is not None else [f"part {i}" for i in range(1, len(reports) + 1)]
    _check_complete(reports, names)
    # Shard order, whatever the argument order: every "first" below is then the same part.
    reports = sorted(reports, key=lambda r: _shard(r).index)
    shards = [_shard(r) for r in reports]
    order: dict[str, int] = {}
    for shard in shards:
        for name, row in zip(shard.names, shard.rows):
            order.setdefault(name, row)
    position = lambda name: order.get(name, len(order))  # noqa: E731
    if isinstance(reports[0], MatrixReport):
        return _merge_matrices(reports, position)
    if isinstance(reports[0], Diagnosis):
        return _merge_diagnoses(reports, shards, position)
    return _merge_checks(reports, shards, position)


def _merge_checks(reports: Sequence[Report], shards: Sequence[Shard], position) -> Report:
    by_stage = {s: [r.stage(s) for r in reports] for s in STAGE_ORDER}
    stages = {"load": _same(by_stage["load"]), "weights": _same(by_stage["weights"]),
              "decode": _decode(by_stage["decode"], shards, position)}
    for stage in ("pixels", "embedding", "head", "outputs"):
        stages[stage] = _compared(by_stage[stage], position)
    stages["decisions"] = _decisions(by_stage["decisions"], stages["embedding"], shards, position)
    first = reports[0]
    return replace(first, stages=tuple(stages[s] for s in STAGE_ORDER), shard=None)


def _notes(parts: Sequence[StageResult]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(note for part in parts for note in part.notes))


def _same(parts: Sequence[StageResult]) -> StageResult:
    """A stage every shard judges alike (load, weights): the first failure if any shard failed, else
    the first that ran (a shard without samples runs nothing)."""
    return next((p for status in (Status.FAIL, Status.PASS) for p in parts if p.status is status), parts[0])


def _decode(parts: Sequence[StageResult], shards: Sequence[Shard], position) -> StageResult:
    errors = sorted((e for p in parts for e in p.sample_errors), key=lambda e: position(e[0]))
    conversions = sorted(dict.fromkeys(n for p in parts for n in p.notes if not n.startswith("Fix:")),
                         key=lambda n: position(n.partition(": ")[0]))
    merged = decode_stage(shards[0].runner, errors, conversions, shards[0].of)
    return replace(merged, notes=merged.notes + tuple(n for n in _notes(parts) if n.startswith("Fix:")))


def _compared(parts: Sequence[StageResult], position) -> StageResult:
    """A numeric stage: the parts' comparisons merged; a stage that failed without numbers (the
    candidate raised) stays failed; a stage no shard could compare stays as the first shard says."""
    raised = [p for p in parts if p.status is Status.FAIL and p.comparison is None]
    if raised:
        return replace(raised[0], notes=_notes(parts))
    compared = [p.comparison for p in parts if p.comparison is not None]
    if not compared:
        return parts[0]
    comparison = merge_comparisons(compared, position)
    base = next(p for p in parts if p.comparison is not None)
    return replace(base, status=Status.PASS if comparison else Status.FAIL, comparison=comparison,
                   notes=_notes(parts))


def _decisions(parts: Sequence[StageResult], embedding: StageResult, shards: Sequence[Shard],
               position) -> StageResult:
    judged = [p for p in parts if p.decisions]
    if not judged:
        return parts[0]
    kinds = list(dict.fromkeys(d.kind for p in judged for d in p.decisions))
    found: list[DecisionFlips] = []
    for kind in kinds:
        if kind == "verification":
            threshold = next(d.threshold for p in judged for d in p.decisions if d.kind == kind)
            pairs = _pairs(shards, embedding, threshold, position)
            if pairs is not None:
                found.append(pairs)
            continue
        same = [d for p in judged for d in p.decisions if d.kind == kind]
        probability = [d.max_probability_error for d in same if d.max_probability_error is not None]
        found.append(replace(
            same[0], total=sum(d.total for d in same),
            flips=tuple(sorted((f for d in same for f in d.flips), key=position)),
            near_ties=tuple(sorted((f for d in same for f in d.near_ties), key=position)),
            max_probability_error=max(probability) if probability else None, flip_rate_bound=None))
    skipped = [p.headline.partition("not run: ")[2] for p in judged if "not run: " in p.headline]
    # The parts' flip-rate statements are about their share only; decisions_stage states the whole.
    kept = [n for n in _notes(parts) if not any(n.startswith(f"{kind}: ") for kind in kinds)]
    return decisions_stage(found, list(dict.fromkeys(s for s in skipped if s)), shards[0].max_flip_rate, kept)


def _pairs(shards: Sequence[Shard], embedding: StageResult, threshold: float, position) -> DecisionFlips | None:
    """Verification over every pair of samples, shards crossed, from the embeddings the parts carry."""
    parts = [s.vectors for s in shards if s.vectors is not None and s.vectors.names]
    if not parts or embedding.comparison is None:
        return None
    names, candidate, reference = [], [], []
    for vectors in parts:
        got, want = unpack_vectors(vectors)
        names += vectors.names
        candidate.append(got)
        reference.append(want)
    keep = sorted(range(len(names)), key=lambda i: position(names[i]))
    return verification_flips(threshold, np.concatenate(candidate)[keep], np.concatenate(reference)[keep],
                              verification_band(embedding.comparison.tolerance), [names[i] for i in keep])


def _merge_matrices(reports: Sequence[MatrixReport], position) -> MatrixReport:
    """Cell by cell; modes are equivalent when they were bit-identical in every shard."""
    cells = []
    for parts in zip(*(r.cells for r in reports)):
        if len({p.cell.id for p in parts}) > 1:
            raise SpecError("the partial matrix reports have different cells: run every shard with the same axes")
        compared = [p.comparison for p in parts if p.comparison is not None]
        if not compared:
            cells.append(next((p for p in parts if "no sample falls" not in p.reason), parts[0]))
            continue
        comparison = merge_comparisons(compared, position)
        ran = [p for p in parts if p.comparison is not None]
        merged = {name: _merged([getattr(p, name) for p in ran], position)
                  for name in ("batch_comparison", "outputs", "batch_outputs")}
        # A part that failed on what is not merged here (its decisions) fails the cell. Flip-rate bounds are
        # about each part's share: the merged cell keeps the changed decisions, not a bound.
        passed = comparison and all(p.status is Status.PASS for p in ran) and all(
            c is None or c for c in merged.values())
        flips = [p.flips for p in ran if p.flips is not None]
        reason = "; ".join(dict.fromkeys(f"{p.reason}" for p in ran if p.reason))
        cells.append(CellResult(parts[0].cell, Status.PASS if passed else Status.FAIL, comparison, reason=reason,
                                flips=sum(flips) if flips else None, **merged))
    if len({len(r.cells) for r in reports}) > 1:
        raise SpecError("the partial matrix reports have different cells: run every shard with the same axes")
    equivalent = set(reports[0].equivalent_modes)
    for report in reports[1:]:
        equivalent &= set(report.equivalent_modes)
    return replace(reports[0], cells=tuple(cells), equivalent_modes=tuple(sorted(equivalent)), shard=None)


def _merged(comparisons: Sequence[Any], position) -> Any:
    """The parts' comparisons merged, or None when a part has none."""
    if not comparisons or any(c is None for c in comparisons):
        return None
    return merge_comparisons(list(comparisons), position)


def _merge_diagnoses(parts: Sequence[Diagnosis], shards: Sequence[Shard], position) -> Diagnosis:
    """The merged gate, and the fix when every drifting shard's search found the same one.

    Each shard searched and confirmed on its own samples; a fix is confirmed for the whole set
    when every drifting shard confirmed it (shards without drift need none).
    """
    report = _merge_checks([p.report for p in parts], shards, position)
    drifting = [p for p in parts if p.drift]
    first = parts[0]
    if not drifting:
        return replace(first, report=report, notes=("no drift: every stage reproduces the reference",))
    notes = list(dict.fromkeys(n for p in drifting for n in p.notes))
    fixes = {tuple(c.key for c in p.fix) for p in drifting}
    count = shards[0].count
    if len(fixes) == 1:
        fix, confirmed = drifting[0].fix, all(p.confirmed for p in drifting)
        if len(drifting) < len(parts):
            notes.append(f"{len(drifting)} of {count} shards drift; the fix was searched and confirmed on those")
    else:
        fix, confirmed = (), False
        notes.append("the shards' searches disagree, so no single change is named for the whole set:")
        notes += [f"  shard {p.report.shard.index}/{count}: " + ("; ".join(c.toml() for c in p.fix) or "no single change")
                  + (" (confirmed on its samples)" if p.confirmed else "") for p in drifting]
    causes: dict[tuple, object] = {}
    for cause in (c for p in drifting for c in p.causes):
        kept = causes.get(cause.change.key)
        if kept is None or cause.before > kept.before:  # the shard where it mattered most speaks for it
            causes[cause.change.key] = cause
    errors: dict[str, float] = {}
    for stage in ("embedding", "outputs"):
        comparison = report.stage(stage).comparison
        for sample in comparison.samples if comparison is not None else ():
            errors[sample.name] = max(errors.get(sample.name, 0.0), sample.max_abs)
    affected = sorted({n for p in drifting for n in p.affected}, key=lambda n: (-errors.get(n, 0.0), position(n)))
    return Diagnosis(report, tuple(causes.values()), tuple(fix), confirmed,
                     next((p.layer for p in drifting if p.layer is not None), None), tuple(affected), shards[0].of,
                     next((p.pattern for p in drifting if p.pattern), ""), tuple(notes), candidate=first.candidate)
