"""The comparator: judge one `CandidateRun` against a fixture, stage by stage, in data order.

It runs no model: every number it needs is in the record or the fixture. Notes and fixes are
added afterwards by `parity.explain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from parity.libraries import canonical_names
from parity.checkpoints import read_state_dict
from parity.compare import compare_arrays, merge_comparisons
from parity.decisions import argmax_flips, bound_flip_rates, threshold_flips, verification_flips
from parity.fixtures import Fixture
from parity.results import CandidateRun, DecisionFlips, StageResult, Status, TensorDiff, Tolerance
from parity.sampling import sample_notes
from parity.spec import DEFAULT_LIBRARY, Spec
from parity import tolerance

__all__ = ["STAGE_ORDER", "compare_run", "recorded_library", "decode_stage", "decisions_stage", "verification_band"]

STAGE_ORDER = ("load", "weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")


def stage_tolerance(spec: Spec, fixture: Fixture, stage: str) -> Tolerance:
    """The gate's budget (`parity.tolerance.stage_tolerance`), with a reference made in reduced
    precision (TF32, autocast) given the spread its emulation measures (`parity.emulate`)."""
    from parity.emulate import emulated_tolerance

    return tolerance.stage_tolerance(spec, fixture, stage, reference=emulated_tolerance)


def recorded_library(fixture: Fixture) -> str:
    return fixture.pipeline.get("backbone", {}).get("library", DEFAULT_LIBRARY)


def compare_run(run: CandidateRun, fixture: Fixture, spec: Spec) -> dict[str, StageResult]:
    """One `StageResult` per stage of `STAGE_ORDER`."""
    if run.load_failure is not None:
        failed = StageResult("load", Status.FAIL, "weights do not load with strict=True", key_diffs=(run.load_failure,))
        return {"load": failed, **{s: StageResult(s, Status.SKIP, "not run: weights did not load")
                                   for s in STAGE_ORDER[1:]}}
    if "load" in run.errors:  # a candidate that cannot even start (e.g. its own strict load raised)
        failed = StageResult("load", Status.FAIL, run.errors["load"])
        return {"load": failed, **{s: StageResult(s, Status.SKIP, "not run: the candidate did not load")
                                   for s in STAGE_ORDER[1:]}}

    def compare(stage: str, candidate, reference, names: Sequence[str], *, cosine: bool = False) -> StageResult:
        if not len(names):  # every sample failed before this stage: nothing compared is never a match
            return StageResult(stage, Status.SKIP, "not run: no sample reached this stage (see decode)")
        comparison = compare_arrays(np.asarray(candidate), reference, tolerance=stage_tolerance(spec, fixture, stage),
                                    names=names, cosine=cosine)
        return StageResult(stage, Status.PASS if comparison else Status.FAIL, "", comparison=comparison)

    def unobserved(stage: str, default: str) -> StageResult:
        reason = run.unobservable.get(stage)
        return StageResult(stage, Status.SKIP, f"not observable: {reason}" if reason else default)

    names, rows = fixture.names, list(run.rows)
    stages = {"load": unobserved("load", "") if "load" in run.unobservable
              else StageResult("load", Status.PASS, _load_headline(spec)),
              "weights": _weights_stage(run, fixture, spec),
              "decode": decode_stage(run.runner, run.sample_errors,
                                     tuple(f"{name}: {note}" for name, note in run.conversions.items()), len(names))}

    # In sample order, as every other stage (and as a merge of shards puts them back).
    golden = [name for name in names if name in fixture.golden_pixels and run.pixels is not None and name in run.pixels]
    if run.pixels is None:
        stages["pixels"] = unobserved("pixels", "not run")
    elif not fixture.golden_pixels:
        stages["pixels"] = StageResult("pixels", Status.SKIP, "the fixture has no golden pixels")
    elif not golden:
        stages["pixels"] = StageResult("pixels", Status.SKIP, "no golden image was decoded")
    else:
        stages["pixels"] = _pixels_stage({n: run.pixels[n] for n in golden},
                                         {n: fixture.golden_pixels[n] for n in golden},
                                         stage_tolerance(spec, fixture, "pixels"))

    if "embedding" in run.errors:
        stages["embedding"] = StageResult("embedding", Status.FAIL, run.errors["embedding"])
    elif run.embeddings is None:
        stages["embedding"] = unobserved("embedding", "not run")
    else:
        stages["embedding"] = compare("embedding", run.embeddings, fixture.embeddings[rows], [names[i] for i in rows],
                                      cosine=True)

    stages["head"] = _head_stage("head", run, run.head_outputs, fixture.outputs, names, compare, unobserved)
    stages["outputs"] = _head_stage("outputs", run, run.outputs, fixture.outputs[rows], [names[i] for i in rows],
                                    compare, unobserved,
                                    default="not run: no candidate embeddings of the right shape")
    stages["decisions"] = _decision_stage(spec, fixture, stages, run)
    return {s: stages[s] for s in STAGE_ORDER}


def _head_stage(stage: str, run: CandidateRun, values, reference, names, compare, unobserved, *,
                default: str = "not run") -> StageResult:
    if stage in run.errors:
        return StageResult(stage, Status.FAIL, run.errors[stage])
    if values is None:
        return unobserved(stage, default)
    if stage in run.nondeterministic and run.runner in ("python", "endpoint_handler"):
        training = [name for name, m in (run.modules.get("head") or _NoModule()).named_modules() if m.training]
        mode = (f"the app's head is in training mode ({len(training)} modules with .training = True): call "
                ".eval() on it after loading" if training else "a random layer is active in forward()")
        return StageResult(stage, Status.FAIL, f"the {stage} differ between two identical calls: {mode}")
    if stage in run.nondeterministic:
        return StageResult(stage, Status.FAIL, "the head gives different outputs for the same inputs in eval mode: "
                           "dropout or another random layer is active in forward()")
    return compare(stage, values, reference, names)


def _pixels_stage(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  tolerance: Tolerance) -> StageResult:
    """The golden pixels, in sample order. Images of one shape on each side are compared as one batch;
    images of several shapes (a processor that keeps the aspect ratio, no centre crop) image by image,
    where an image whose shape differs from its reference's is that image's failure."""
    names = list(candidate)
    cand = {n: np.asarray(candidate[n]) for n in names}
    ref = {n: np.asarray(reference[n]) for n in names}
    if len({cand[n].shape for n in names}) == 1 and len({ref[n].shape for n in names}) == 1:
        comparison = compare_arrays(np.stack([cand[n] for n in names]), np.stack([ref[n] for n in names]),
                                    tolerance=tolerance, names=names)
        return StageResult("pixels", Status.PASS if comparison else Status.FAIL, "", comparison=comparison)
    reshaped = [n for n in names if cand[n].shape != ref[n].shape]
    notes = tuple(f"{n}: pixels {list(cand[n].shape)}, the reference's {list(ref[n].shape)}" for n in reshaped)
    headline = (f"{len(reshaped)} of {len(names)} golden images have another shape than the reference's"
                if reshaped else f"{len(names)} golden images of several shapes, compared image by image")
    same = [n for n in names if n not in reshaped]
    if not same:
        return StageResult("pixels", Status.FAIL, headline, notes=notes)
    # One comparison per image, merged as shards are: the per-image shapes are kept out of the merged one.
    position = {n: i for i, n in enumerate(names)}
    parts = [replace(compare_arrays(cand[n][None], ref[n][None], tolerance=tolerance, names=[n]),
                     candidate_shape=(1,), reference_shape=(1,)) for n in same]
    comparison = merge_comparisons(parts, position.__getitem__)
    status = Status.PASS if comparison and not reshaped else Status.FAIL
    return StageResult("pixels", status, headline, comparison=comparison, notes=notes)


class _NoModule:
    def named_modules(self):
        return iter(())


def decode_stage(runner: str, sample_errors: Sequence[tuple[str, str]], notes: Sequence[str],
                 total: int) -> StageResult:
    """The decode verdict: every sample decoded (``notes``: the RGB conversions), or which failed and why."""
    converted = f", {len(notes)} converted to RGB" if notes else ""
    if sample_errors:
        failed = ("cannot be decoded; an unreadable sample never counts as parity" if runner == "spec" else
                  "failed (unreadable, or the candidate raised on them); a failed sample never counts as parity")
        return StageResult("decode", Status.FAIL, f"{len(sample_errors)} of {total} samples {failed}",
                           sample_errors=tuple(sample_errors), notes=tuple(notes))
    return StageResult("decode", Status.PASS, f"{total}/{total} decoded{converted}", notes=tuple(notes))


def _decision_stage(spec: Spec, fixture: Fixture, stages: Mapping[str, StageResult], run: CandidateRun) -> StageResult:
    """Every decision the spec names, checked for flips; a flip where the reference sits within the
    budget of the boundary is a near-tie (reported, not failed); any other flip fails."""
    wanted = spec.decisions
    if not wanted.any:
        return StageResult("decisions", Status.SKIP, "no [decisions] in the spec")
    if not run.rows:
        return StageResult("decisions", Status.SKIP, "not run: no sample reached the candidate's outputs")
    kept = list(run.rows)
    names = [fixture.rows[i].name for i in kept]
    found: list[DecisionFlips] = []
    skipped: list[str] = []
    out_cmp = stages["outputs"].comparison
    if wanted.threshold is not None or wanted.argmax:
        if run.outputs is None or out_cmp is None or not out_cmp.shapes_match:
            skipped.append("no comparable outputs")
        else:
            ref, band = fixture.outputs[kept], out_cmp.tolerance.atol
            if wanted.threshold is not None:
                found.append(threshold_flips(wanted.threshold, run.outputs, ref, band, names))
            if wanted.argmax:
                found.append(argmax_flips(run.outputs, ref, band, names))
    if wanted.verification_threshold is not None:
        emb_cmp = stages["embedding"].comparison
        if run.embeddings is None or emb_cmp is None or not emb_cmp.shapes_match:
            skipped.append("no comparable embeddings")
        else:
            found.append(verification_flips(wanted.verification_threshold, run.embeddings,
                                             fixture.embeddings[kept], verification_band(emb_cmp.tolerance), names))
    return decisions_stage(found, skipped, wanted.max_flip_rate, sample_notes(fixture))


def verification_band(tolerance: Tolerance) -> float:
    """How close to the threshold a pair's reference cosine counts as a near-tie: each embedding may
    turn by arccos(min_cosine), a pair's angle by twice that."""
    floor = tolerance.min_cosine if tolerance.min_cosine is not None else 1.0
    return 2 * float(np.arccos(np.clip(floor, -1.0, 1.0)))


def decisions_stage(found: list[DecisionFlips], skipped: Sequence[str], max_flip_rate: float | None,
                    notes: Sequence[str] = ()) -> StageResult:
    """The decisions verdict from the flips of each kind: any flip, or a flip-rate bound above
    ``max_flip_rate``, fails; near-ties are reported."""
    if not found:
        return StageResult("decisions", Status.SKIP, "not run: " + "; ".join(skipped))
    found, statements, exceeded = bound_flip_rates(found, max_flip_rate)
    headline = "; ".join(f"{d.kind}: {len(d.flips)} flip(s), {len(d.near_ties)} near-tie(s) of {d.total}"
                         for d in found)
    if skipped:
        headline += "; not run: " + "; ".join(skipped)
    failed = any(d.flips for d in found) or bool(exceeded)
    return StageResult("decisions", Status.FAIL if failed else Status.PASS, headline, decisions=tuple(found),
                       notes=tuple(statements + exceeded + list(notes)))


def _load_headline(spec: Spec) -> str:
    headline = ("backbone and head loaded with strict=True" if spec.backbone.checkpoint is not None else
                "head loaded with strict=True; backbone: no [backbone].checkpoint, so no weights were loaded "
                "(initial or library-default weights)")
    for section, part in (("backbone", spec.backbone), ("head", spec.head)):
        explicit = [f"state_dict_key {part.state_dict_key!r}"] if part.state_dict_key else []
        explicit += [f"key_map {dict(part.key_map)}"] if part.key_map else []
        explicit += [f"drop_keys {list(part.drop_keys)}"] if part.drop_keys else []
        if explicit:
            headline += f"; {section}: " + ", ".join(explicit)
    return headline


def _weights_stage(run: CandidateRun, fixture: Fixture, spec: Spec) -> StageResult:
    """Bit-identity of the deployed weights with the trained ones, by per-tensor sha256."""
    recorded = fixture.manifest.get("weights")
    if run.fingerprints is None:
        reason = run.unobservable.get("weights")
        return StageResult("weights", Status.SKIP, f"not observable: {reason}" if reason else "not run")
    if not recorded:
        return StageResult("weights", Status.SKIP, "the fixture records no weight fingerprints")
    library = run.description.get("backbone", {}).get("library", spec.backbone.library)
    other_library = recorded_library(fixture) != library
    diffs: list[TensorDiff] = []
    checked = 0
    # Converting between libraries renames, splits and transposes tensors; the embeddings are their check.
    crossed = (f"; backbone not compared: fingerprinted as a {recorded_library(fixture)} module, deployed as a "
               f"{library} one (converted layout; the embedding stage checks it)"
               if other_library and "backbone" in recorded else "")
    absent: list[str] = []
    unloaded: list[str] = []
    for part, entry in recorded.items():
        got = run.fingerprints.get(part)
        if part == "backbone" and other_library:
            continue
        if part in run.unloaded:  # recorded but nothing loaded: random or library-default weights, never a pass
            unloaded.append(f"{part} ({len(entry['tensors'])} recorded tensors)")
            continue
        if got is None:  # a part this runner does not observe
            continue
        names_in = library if part == "backbone" else ""
        trained, got = canonical_names(entry["tensors"], names_in), canonical_names(got, names_in)
        # A backbone tensor the deployed class does not hold (the projection a pooled-output class lacks)
        # is a structure difference, not a changed weight: every tensor it holds loaded strictly.
        absent += [f"{part}.{n}" for n in trained if n not in got and part == "backbone"]
        shared = {n: sha for n, sha in trained.items() if n in got or part != "backbone"}
        checked += len(shared)
        changed = [n for n, sha in shared.items() if got.get(n) != sha]
        diffs += _measure(run.modules.get(part), fixture, part, entry.get("file"), changed, library=names_in)
    if absent:
        crossed += f"; {len(absent)} recorded tensor(s) not in the deployed module: {', '.join(absent[:4])}" + (
            " ..." if len(absent) > 4 else "")
    if unloaded:
        return StageResult("weights", Status.FAIL,
                           f"no checkpoint loaded for {', '.join(unloaded)}: the candidate runs initial weights",
                           notes=("Fix: set the checkpoint the fixture was made with ([backbone].checkpoint / "
                                  "[head].weights)",))
    if not checked:
        return StageResult("weights", Status.SKIP, "no recorded part has a candidate checkpoint" + crossed)
    if not diffs:
        return StageResult("weights", Status.PASS, f"{checked} tensors bit-identical to the trained weights" + crossed)
    parts = sorted({d.part for d in diffs})
    return StageResult(
        "weights", Status.FAIL, f"{len(diffs)} of {checked} tensors differ from the trained weights",
        tensor_diffs=tuple(diffs),
        notes=tuple(f"Fix: deploy the {part} checkpoint the fixture was made with "
                    f"({recorded[part].get('file')}), or rebuild the fixture from the new one" for part in parts),
    )


def _measure(module, fixture: Fixture, part: str, file: str | None, names: list[str], *,
             library: str = "") -> list[TensorDiff]:
    """How far each changed tensor moved, when the fixture keeps a copy of the trained file."""
    if not names:
        return []
    current = canonical_names(module.state_dict(), library) if module is not None else {}
    trained = {}
    if file and (fixture.root / file).is_file():
        trained = canonical_names(read_state_dict(fixture.root / file), library)
    out = []
    for name in names:
        old = trained.get(name)
        if old is None or name not in current or tuple(old.shape) != tuple(current[name].shape):
            out.append(TensorDiff(part, name, None, "not comparable with the trained copy"))
        else:
            delta = (current[name].detach().double().cpu() - old.double()).abs().max().item()
            out.append(TensorDiff(part, name, delta))
    return out
