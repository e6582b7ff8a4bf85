"""The comparator: judge one `CandidateRun` against a fixture, stage by stage, in data order.

It runs no model: every number it needs is in the record or the fixture. Notes and fixes are
added afterwards by `parity.explain.fixes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from parity.errors import ParityError
from parity.libraries import canonical_names
from parity.store.checkpoints import fingerprint, read_state_dict, trained_shapes
from parity.judge.arrays import compare_arrays, merge_comparisons
from parity.judge.decisions import argmax_flips, bound_flip_rates, threshold_flips, verification_flips
from parity.store.fixtures import Fixture
from parity.results import CandidateRun, DecisionFlips, Finding, StageResult, Status, TensorDiff, Tolerance
from parity.store.forensics import propose_key_fix
from parity.store.sampling import sample_notes
from parity.spec import DEFAULT_LIBRARY, DecisionsSpec, Spec

__all__ = ["STAGE_ORDER", "compare_run", "recorded_library", "decode_stage", "decisions_stage", "decision_flips",
           "verification_band"]

STAGE_ORDER = ("load", "weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")
# Runners whose head stage runs the head module itself (the one found in the app, handler, Gradio app or
# MLflow model): what the shipped code does after it ([candidate].postprocess) is not in it. Other runners'
# head (an ONNX head graph) is the exported code, post-processing included.
_HEAD_MODULE_RUNNERS = ("python", "endpoint_handler", "mlflow_model", "gradio_app")


def recorded_library(fixture: Fixture) -> str:
    return fixture.pipeline.get("backbone", {}).get("library", DEFAULT_LIBRARY)


def compare_run(run: CandidateRun, fixture: Fixture, spec: Spec, *, budgets: Mapping[str, Tolerance],
                shipped_outputs: np.ndarray | None = None) -> dict[str, StageResult]:
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
        comparison = compare_arrays(np.asarray(candidate), reference, tolerance=budgets[stage],
                                    names=names, cosine=cosine)
        return StageResult(stage, Status.PASS if comparison else Status.FAIL, "", comparison=comparison)

    def unobserved(stage: str, default: str) -> StageResult:
        reason = run.unobservable.get(stage)
        return StageResult(stage, Status.SKIP, f"not observable: {reason}" if reason else default)

    names, rows = fixture.names, list(run.rows)
    # What the shipped code returns for the reference's head outputs ([candidate].postprocess).
    shipped = fixture.outputs if shipped_outputs is None else shipped_outputs
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
                                         budgets["pixels"])

    if "embedding" in run.errors:
        stages["embedding"] = StageResult("embedding", Status.FAIL, run.errors["embedding"])
    elif run.embeddings is None:
        stages["embedding"] = unobserved("embedding", "not run")
    else:
        stages["embedding"] = compare("embedding", run.embeddings, fixture.embeddings[rows], [names[i] for i in rows],
                                      cosine=True)

    head_reference = fixture.outputs if run.runner in _HEAD_MODULE_RUNNERS else shipped
    stages["head"] = _head_stage("head", run, run.head_outputs, head_reference, names, compare, unobserved)
    stages["outputs"] = _head_stage("outputs", run, run.outputs, shipped[rows], [names[i] for i in rows],
                                    compare, unobserved,
                                    default="not run: no candidate embeddings of the right shape")
    stages["decisions"] = _decision_stage(spec, fixture, stages, run, shipped)
    return {s: stages[s] for s in STAGE_ORDER}


def _head_stage(stage: str, run: CandidateRun, values, reference, names, compare, unobserved, *,
                default: str = "not run") -> StageResult:
    if stage in run.errors:
        return StageResult(stage, Status.FAIL, run.errors[stage])
    if values is None:
        return unobserved(stage, default)
    if stage in run.nondeterministic and run.runner in _HEAD_MODULE_RUNNERS:
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


def _decision_stage(spec: Spec, fixture: Fixture, stages: Mapping[str, StageResult], run: CandidateRun,
                    outputs: np.ndarray) -> StageResult:
    """Every decision the spec names, checked for flips; a flip where the reference sits within the
    budget of the boundary is a near-tie (reported, not failed); any other flip fails."""
    wanted = spec.decisions
    if not wanted.any:
        return StageResult("decisions", Status.SKIP, "no [decisions] in the spec")
    if not run.rows:
        return StageResult("decisions", Status.SKIP, "not run: no sample reached the candidate's outputs")
    kept = list(run.rows)
    out_cmp, emb_cmp = stages["outputs"].comparison, stages["embedding"].comparison
    comparable = run.outputs is not None and out_cmp is not None and out_cmp.shapes_match
    found, skipped = decision_flips(
        wanted, [fixture.rows[i].name for i in kept], outputs=(run.outputs, outputs[kept] if comparable else None, out_cmp),
        embeddings=(run.embeddings, fixture.embeddings[kept], emb_cmp))
    return decisions_stage(found, skipped, wanted.max_flip_rate, sample_notes(fixture))


def decision_flips(wanted: DecisionsSpec, names: Sequence[str], *, outputs: tuple, embeddings: tuple
                   ) -> tuple[list[DecisionFlips], list[str]]:
    """The flips of every decision ``wanted`` names, and the kinds that could not be checked (and why).

    Args:
        outputs: ``(candidate, reference, comparison)`` of the head outputs; the comparison's budget is the
            near-tie band. A candidate or comparison of None (or of another shape) is not comparable.
        embeddings: the same for the embeddings (verification decisions).
    """
    found: list[DecisionFlips] = []
    skipped: list[str] = []
    got, ref, out_cmp = outputs
    if wanted.threshold is not None or wanted.argmax:
        if got is None or out_cmp is None or not out_cmp.shapes_match:
            skipped.append("no comparable outputs")
        else:
            band = out_cmp.tolerance.atol
            if wanted.threshold is not None:
                found.append(threshold_flips(wanted.threshold, got, ref, band, list(names)))
            if wanted.argmax:
                found.append(argmax_flips(got, ref, band, list(names)))
    if wanted.verification_threshold is not None:
        got, ref, emb_cmp = embeddings
        if got is None or emb_cmp is None or not emb_cmp.shapes_match:
            skipped.append("no comparable embeddings")
        else:
            found.append(verification_flips(wanted.verification_threshold, got, ref,
                                             verification_band(emb_cmp.tolerance), list(names)))
    return found, skipped


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
    """Bit-identity of the deployed weights with the trained ones, by per-tensor sha256.

    A runner that sees every tensor the candidate reaches (``all_fingerprints``) must account for
    every trained tensor (`_accounted_weights_stage`); the others compare the parts they loaded.
    """
    recorded = fixture.manifest.get("weights")
    if run.fingerprints is None:
        reason = run.unobservable.get("weights")
        return StageResult("weights", Status.SKIP, f"not observable: {reason}" if reason else "not run")
    if not recorded:
        return StageResult("weights", Status.SKIP, "the fixture records no weight fingerprints")
    if run.all_fingerprints is not None:
        return _accounted_weights_stage(run, fixture, spec, recorded)
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


def _measure(module, fixture: Fixture, part: str, file: str | None, names: Sequence[str], *,
             library: str = "", trained: Mapping | None = None) -> list[TensorDiff]:
    """How far each changed tensor moved, when the fixture keeps a copy of the trained file (or ``trained``
    holds its values already)."""
    if not names:
        return []
    current = canonical_names(module.state_dict(), library) if module is not None else {}
    if trained is None:
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


# -- every trained tensor accounted for (runners that see every tensor the candidate reaches) ----------

# How shipped code casts a whole module to each dtype.
_CASTS = {"float16": "`.half()` or `.to(torch.float16)`", "bfloat16": "`.bfloat16()` or `.to(torch.bfloat16)`",
          "float64": "`.double()` or `.to(torch.float64)`", "float32": "`.float()` or `.to(torch.float32)`"}
# A trained tensor held under another name may also have been rounded on the way (`.half()` after renaming).
_ROUNDINGS = ("float16", "bfloat16")
_SHOWN = 4


# Buffers a normalisation layer updates in training mode, on every forward.
_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _training_statistics(run: CandidateRun, part: str, names: Sequence[str]) -> list[str]:
    """Of ``names`` (tensors of ``part``), the running statistics of modules the candidate left in training mode."""
    root = run.description.get("candidate", {}).get(f"{part}_module", "")
    training = {path.removeprefix(f"{root}.") if path != root else "" for path, _ in run.module_states.get(part, ())}
    return [n for n in names if n.rpartition(".")[2] in _RUNNING_STATISTICS and n.rpartition(".")[0] in training]


@dataclass
class _Account:
    """Where each trained tensor of one part is in the candidate, by sha256."""

    part: str
    identical: int = 0
    elsewhere: dict[str, str] = field(default_factory=dict)  # trained name -> the reachable tensor holding it
    cast: dict[str, str] = field(default_factory=dict)  # trained name -> the dtype it is held in, rounded
    changed: list[str] = field(default_factory=list)  # held under its name with other values
    missing: list[str] = field(default_factory=list)  # nowhere
    absent: list[str] = field(default_factory=list)  # a backbone tensor the deployed class does not hold
    values: Callable[[], Mapping] = dict  # the trained values, read once when needed

    @property
    def checked(self) -> int:
        return self.identical + len(self.elsewhere) + len(self.cast) + len(self.changed) + len(self.missing)


def _accounted_weights_stage(run: CandidateRun, fixture: Fixture, spec: Spec,
                             recorded: Mapping[str, Mapping]) -> StageResult:
    """Each trained tensor must be found in the modules the candidate runs: by name in the part the runner
    recognised, or by content (sha256) anywhere it reaches. A tensor equal to the trained one rounded to
    another dtype is a dtype change; one found nowhere fails, named with what the deployed module holds."""
    library = run.description.get("backbone", {}).get("library", spec.backbone.library)
    reachable_libraries = run.description.get("candidate", {}).get("libraries") or []
    by_content: dict[str, str] = {}
    for name, sha in (run.all_fingerprints or {}).items():
        by_content.setdefault(sha, name)
    skipped: list[str] = []
    accounts: list[_Account] = []
    for part, entry in recorded.items():
        got = run.fingerprints.get(part)
        deployed_library = library if got is not None else next(
            (lib for lib in reachable_libraries if lib != recorded_library(fixture)), recorded_library(fixture))
        if part == "backbone" and deployed_library != recorded_library(fixture):
            # Converting between libraries renames, splits and transposes tensors; the embeddings are their check.
            skipped.append(f"backbone not compared: fingerprinted as a {recorded_library(fixture)} module, deployed "
                           f"as a {deployed_library} one (converted layout; the embedding stage checks it)")
            continue
        names_in = library if part == "backbone" else ""
        values = _TrainedValues(fixture, entry.get("file"), names_in)
        account = _account(part, canonical_names(entry["tensors"], names_in),
                           canonical_names(got, names_in) if got is not None else None, run, values, names_in,
                           by_content)
        if got is None and not account.elsewhere and not account.cast and not _unclaimed(run):
            found = " and the ".join(p for p in ("backbone", "head") if run.fingerprints.get(p) is not None)
            skipped.append(f"{part} not checked: no module the candidate reaches holds its {account.checked} trained "
                           f"tensors (by name, shape or contents) and none but the {found} is reachable")
            continue
        accounts.append(account)
    notes = list(run.notes)
    if not accounts:
        return StageResult("weights", Status.SKIP, "; ".join(["no recorded part is in the candidate", *skipped]),
                           notes=tuple(notes))
    findings, sentences, diffs = [], [], []
    declared: list[str] = []
    for account in accounts:
        entry = recorded[account.part]
        names_in = library if account.part == "backbone" else ""
        if account.missing:
            sentence, finding, missing = _unaccounted(account, run, fixture)
            sentences.append(sentence)
            findings.append(finding)
            diffs += missing
        for dtype in sorted(set(account.cast.values())):
            cast = [n for n, d in account.cast.items() if d == dtype]
            if dtype == spec.runtime.dtype:
                declared.append(f"{len(cast)} {account.part} tensors equal the trained ones in {dtype}, "
                                "as [runtime].dtype declares")
                continue
            measured = _measure(run.modules.get(account.part), fixture, account.part, entry.get("file"), cast,
                                library=names_in, trained=account.values())
            sentence, finding = _cast_finding(account, dtype, cast, measured, run)
            sentences.append(sentence)
            findings.append(finding)
        statistics = _training_statistics(run, account.part, account.changed)
        if statistics:  # moved by the candidate's own calls, not deployed so: the training mode is the cause
            notes.append(f"{len(statistics)} {account.part} buffer(s) were updated by the candidate's own calls, since "
                         f"their modules run in training mode: {', '.join(statistics[:_SHOWN])}"
                         + (" ..." if len(statistics) > _SHOWN else ""))
        account.changed = [n for n in account.changed if n not in statistics]
        changed = _measure(run.modules.get(account.part), fixture, account.part, entry.get("file"), account.changed,
                           library=names_in, trained=account.values() if account.changed else None)
        if changed:
            diffs += changed
            sentences.append(f"{len(changed)} of {account.checked} {account.part} tensors differ from the trained "
                             "weights")
            notes.append(f"Fix: deploy the {account.part} checkpoint the fixture was made with ({entry.get('file')}), "
                         "or rebuild the fixture from the new one")
    checked = sum(a.checked for a in accounts)
    elsewhere = {f"{a.part}.{n}": w for a in accounts for n, w in a.elsewhere.items()}
    absent = [f"{a.part}.{n}" for a in accounts for n in a.absent]
    extra = [*declared, *skipped]
    if elsewhere:
        shown = ", ".join(f"{n} as {w}" for n, w in list(elsewhere.items())[:_SHOWN])
        extra.append(f"{len(elsewhere)} held under other names: {shown}" + (" ..." if len(elsewhere) > _SHOWN else ""))
    if absent:
        extra.append(f"{len(absent)} recorded tensor(s) not in the deployed module: {', '.join(absent[:_SHOWN])}"
                     + (" ..." if len(absent) > _SHOWN else ""))
    if not sentences:
        identical = checked - sum(len(a.cast) for a in accounts)
        return StageResult("weights", Status.PASS, "; ".join([f"{identical} tensors bit-identical to the trained "
                                                              "weights", *extra]), notes=tuple(notes))
    return StageResult("weights", Status.FAIL, "; ".join(sentences + extra), tensor_diffs=tuple(diffs),
                       notes=tuple(notes), findings=tuple(findings))


def _account(part: str, trained: Mapping[str, str], got: Mapping[str, str] | None, run: CandidateRun,
             values: Callable[[], Mapping], library: str, by_content: Mapping[str, str]) -> _Account:
    """Find each trained tensor: by name in the recognised part, else by content, else rounded to another dtype."""
    account = _Account(part, values=values)
    held = got or {}
    by_name: dict[str, str] = {}
    elsewhere: list[str] = []
    for name, sha in trained.items():
        if name in held and held[name] == sha:
            account.identical += 1
        elif name in held:
            by_name[name] = held[name]
        elif sha in by_content:
            account.elsewhere[name] = by_content[sha]
        else:
            elsewhere.append(name)
    deployed = canonical_names(run.modules[part].state_dict(), library) if by_name and part in run.modules else {}
    dtypes = {n: (str(deployed[n].dtype).replace("torch.", ""),) if n in deployed else _ROUNDINGS for n in by_name}
    rounded = _rounded(values, {**dtypes, **{n: _ROUNDINGS for n in elsewhere}})
    for name, sha in by_name.items():
        dtype = next((d for d, h in rounded.get(name, {}).items() if h == sha), None)
        if dtype is not None:
            account.cast[name] = dtype
        else:
            account.changed.append(name)
    for name in elsewhere:
        hit = next((d for d, h in rounded.get(name, {}).items() if h in by_content), None)
        if hit is not None:
            account.cast[name] = hit
        elif part == "backbone" and got is not None:
            # A backbone tensor the deployed class does not hold (the projection a pooled-output class lacks)
            # is a structure difference, not a changed weight: every tensor it holds is checked.
            account.absent.append(name)
        else:
            account.missing.append(name)
    return account


def _rounded(values: Callable[[], Mapping], wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, str]]:
    """sha256 (as `parity.store.checkpoints.fingerprint` computes it) of each trained tensor cast to each wanted dtype."""
    import torch

    trained = values() if wanted else {}
    out: dict[str, dict[str, str]] = {}
    for dtype in dict.fromkeys(d for ds in wanted.values() for d in ds):
        target = getattr(torch, dtype, None)
        # One dtype at a time: a whole backbone's casts are not held at once.
        casts = {n: trained[n].to(target) for n, ds in wanted.items() if dtype in ds and n in trained
                 and trained[n].is_floating_point() and trained[n].dtype != target}
        for name, sha in fingerprint(casts).items() if casts else ():
            out.setdefault(name, {})[dtype] = sha
    return out


class _TrainedValues:
    """The trained tensors of one part, from the fixture's copy or the referenced checkpoint (none without
    one), read on first use only: a passing gate never reads a checkpoint."""

    def __init__(self, fixture: Fixture, file: str | None, library: str) -> None:
        self._path = fixture.root / file if file else None
        self._library = library
        self._values: Mapping | None = None

    def __call__(self) -> Mapping:
        if self._values is None:
            self._values = {}
            if self._path is not None and self._path.is_file():
                try:
                    self._values = canonical_names(read_state_dict(self._path), self._library)
                except ParityError:
                    pass  # an unreadable copy: nothing to compare with, as without one
        return self._values


def _unclaimed(run: CandidateRun) -> list[str]:
    """Reachable tensors outside every recognised part: where an unrecognised part could be."""
    parts = [run.description.get("candidate", {}).get(f"{p}_module") for p in (run.fingerprints or {})]
    prefixes = tuple(f"{w}." for w in parts if w)
    return [name for name in (run.all_fingerprints or {}) if not prefixes or not name.startswith(prefixes)]


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _unaccounted(account: _Account, run: CandidateRun, fixture: Fixture) -> tuple[str, Finding, list[TensorDiff]]:
    """The sentence, finding and evidence for trained tensors found nowhere in the candidate."""
    part = account.part
    shapes = _trained_shapes(account, fixture)
    order = {name: i for i, name in enumerate(shapes)}  # as the trained class declares them
    missing = sorted(account.missing, key=lambda name: order.get(name, len(order)))
    module = run.modules.get(part)
    path = run.description.get("candidate", {}).get(f"{part}_module", "")
    trained_class = (fixture.pipeline.get(part) or {}).get("class") or (fixture.pipeline.get(part) or {}).get("model")
    trained_as = f" ({trained_class})" if trained_class else ""
    n = len(missing)
    if module is None:
        others = _unclaimed(run)
        sentence = (f"{n} trained {part} tensors are in no module the candidate runs: {_listing(missing)}; no "
                    f"reachable module has the trained {part}'s tensor names or shapes (reachable besides: "
                    f"{_listing(others)})")
        fix = (f"Change the shipped code: build the {part} as the trained class{trained_as} and load its checkpoint "
               "with load_state_dict(..., strict=True)")
        evidence = (f"the sha256 of each of these trained tensors (fixture manifest) matches none of the "
                    f"{len(run.all_fingerprints or {})} tensors the candidate reaches")
        where = path
    else:
        trained_names = set(fixture.manifest["weights"][part]["tensors"])
        declared = [k for k in module.state_dict() if k not in trained_names]
        cls = type(module).__name__
        sentence = (f"{n} trained tensors are not in the deployed {part}: {_listing(missing)}; the {part} declares "
                    f"{_listing(declared)} ({path}, class {cls}); its values are not the trained ones: it was loaded "
                    "non-strictly (strict=False) or not at all")
        renames, mapping = _key_mapping(shapes, part, module)
        fix = (f"Change the shipped code: load the {part} with load_state_dict(..., strict=True) into the trained "
               f"class{trained_as}" + (f", or rename its layers to the trained names: {renames}" if renames else
                                       f"; the deployed class {cls} is another architecture"))
        evidence = (f"no tensor named so in {path}, and the sha256 of each (fixture manifest) matches none of the "
                    f"{len(run.all_fingerprints or {})} tensors the candidate reaches"
                    + (f"; {mapping}" if mapping else ""))
        where = run.call_sites.get(part) or path
    diffs = [TensorDiff(part, name, None, f"not in the deployed {part}, nor its contents under another name")
             for name in missing]
    return sentence, Finding("weights.unaccounted", "weights", sentence, evidence, fix, where=where), diffs


def _trained_shapes(account: _Account, fixture: Fixture) -> dict[str, tuple[int, ...]]:
    """The trained tensors' shapes, in the trained class's order: from the values already read, else as
    `parity.store.checkpoints.trained_shapes` finds them (the recorded structure)."""
    names = set(fixture.manifest["weights"][account.part]["tensors"])
    values = account.values()
    if values and names <= set(values):
        return {name: tuple(t.shape) for name, t in values.items() if name in names}
    return trained_shapes(fixture, account.part)


def _key_mapping(shapes: Mapping[str, tuple[int, ...]], part: str, module) -> tuple[str, str]:
    """How the trained keys map onto the deployed module's, as ``parity inspect --class`` maps them
    (`parity.store.forensics.propose_key_fix`): the renames that would load it strictly, and the causes."""
    import torch

    if not shapes:
        return "", ""
    checkpoint = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    fix = propose_key_fix(checkpoint, {k: tuple(v.shape) for k, v in module.state_dict().items()}, key=None,
                          source=f"the trained {part}")
    renames = ", ".join(f"{(dst[:-1] or '<root>')} -> {(src[:-1] or '<root>')}" for src, dst in fix.key_map) \
        if fix.verified and fix.key_map else ""
    return renames, "; ".join(fix.causes)


def _cast_finding(account: _Account, dtype: str, cast: Sequence[str], measured: Sequence[TensorDiff],
                  run: CandidateRun) -> tuple[str, Finding]:
    """A part whose tensors are the trained ones rounded to ``dtype``: a dtype change, not another checkpoint."""
    part = account.part
    path = run.description.get("candidate", {}).get(f"{part}_module", "") or part
    trained = account.values()
    source = str(trained[cast[0]].dtype).replace("torch.", "") if cast[0] in trained else "float32"
    moved = [d.max_abs for d in measured if d.max_abs is not None]
    largest = max(moved) if moved else float("nan")
    cause = f"the {part} runs in {dtype}: {_CASTS.get(dtype, f'`.to(torch.{dtype})`')}"
    evidence = (f"{len(cast)} of {account.checked} {part} tensors equal the trained ones rounded to {dtype} (sha256 of "
                f"trained.to(torch.{dtype}))"
                + (f"; largest change from the trained values {largest:.3g}" if moved else ""))
    fix = (f"Change the shipped code: keep the {part} in {source} (remove the {_CASTS.get(dtype, dtype)} applied to "
           f"{path}), or gate the {dtype} deployment against a {dtype} budget: set [runtime].dtype = \"{dtype}\" "
           "in the spec")
    finding = Finding("weights.dtype", "weights", cause, evidence, fix, where=run.call_sites.get(part) or path,
                      max_abs=largest, spec_fix=f'[runtime]\ndtype = "{dtype}"')
    return f"{cause} ({evidence})", finding
