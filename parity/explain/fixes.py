"""The explainer: what the candidate's configuration changed, and the fix each failing stage needs.

It reads a comparison (stage results) next to the configurations of the reference (recorded in
the fixture) and of the candidate (the run's description) and adds notes; it never re-judges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from parity.errors import ParityError
from parity.libraries import canonical_names, extraction_hint
from parity.judge.stages import STAGE_ORDER, recorded_library
from parity.explain.detectors import detect
from parity.preprocess.diff import explain_preprocess, format_field_value
from parity.store.fixtures import Fixture, environment, sha256_file
from parity.libraries import activation_family, describe_record, equivalent_extract, extraction_point
from parity.store.forensics import diff_structure
from parity.model.numerics import candidate_numerics
from parity.results import CandidateRun, ConfigDiff, StageResult, Status, toml_value
from parity.store.provenance import git_revision, known_revision
from parity.spec import DEFAULT_LIBRARY, Spec, vocabulary

__all__ = ["SETTABLE", "explain_run", "diff_config", "toml_value"]

# Which stage a recorded configuration field can move first.
_SECTION_STAGE = {"preprocess": "pixels", "backbone": "embedding", "runtime": "embedding", "head": "head"}
# Fields a spec sets directly, so a differing value has a one-line fix.
SETTABLE = {
    "preprocess": {"library", "processor", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                   "resize_backend", "channel_order", "value_scale", "exif_transpose"},
    "backbone": {"model", "kwargs", "extract", "normalize"},
    "head": {"class", "input_biases_order"},
    "runtime": {"dtype"},
}
# Backbone fields that name things in one library's terms (or its module tree).
_LIBRARY_TERMS = ("structure", "model", "kwargs", "extract", "hidden_act", "attn_implementation")
_HASHED_BYTES = 256 << 20  # larger checkpoints are proven by the per-tensor fingerprints alone


def explain_run(stages: Mapping[str, StageResult], run: CandidateRun, fixture: Fixture,
                spec: Spec) -> tuple[dict[str, StageResult], tuple[ConfigDiff, ...]]:
    """The stages with fixes and notes added to the failing ones, and the configuration differences."""
    if run.load_failure is not None:
        return dict(stages), ()
    producer = fixture.manifest.get("producer", {})
    recorded = dict(fixture.pipeline, versions=producer.get("versions", {}),
                    provenance={**known_revision(producer.get("git_revision")), **_recorded_checkpoints(fixture)})
    candidate = dict(run.description, versions=environment(),
                     provenance={**known_revision(git_revision(spec.path)), **_checkpoint_hashes(spec)})
    if producer.get("numerics"):  # the numeric environments, where the fixture recorded its own
        recorded["numerics"] = producer["numerics"]
        # a runner whose model ran outside torch (onnxruntime) records its own; torch's flags do not apply to it
        candidate["numerics"] = run.description.get("numerics") or candidate_numerics(run, spec)
    for side in (recorded, candidate):  # one library's classes name the same tower differently
        if "structure" in side.get("backbone", {}):
            library = side["backbone"].get("library", DEFAULT_LIBRARY)
            side["backbone"] = dict(side["backbone"], structure=canonical_names(side["backbone"]["structure"], library))
    library = run.description.get("backbone", {}).get("library", spec.backbone.library)
    cross_notes: list[str] = []
    if recorded_library(fixture) != library:
        cross_notes = _align_libraries(recorded, candidate)
    diffs = _summarised(diff_config(recorded, candidate), run)
    explained = dict(stages)
    first = next((s for s in STAGE_ORDER if stages[s].status is Status.FAIL), None)
    # The spec-built pipeline's configuration is known: its diff is the explanation, in the spec's terms.
    found = detect(run, fixture, stages, spec) if run.runner != "spec" else {}
    explained_by = next((s for s in STAGE_ORDER if stages[s].findings or found.get(s)), None)
    for name in STAGE_ORDER[1:]:
        findings = stages[name].findings + found.get(name, ())
        notes = _fixes(diffs, name)
        if name == "pixels" and stages["pixels"].status is Status.FAIL:
            notes += _preprocess_notes(recorded.get("preprocess"), candidate.get("preprocess"), diffs)
        if name == "embedding" and not findings:  # a finding says what moved the embeddings, not these guesses
            expected = fixture.embeddings.shape[1:]
            got = run.embeddings.shape[1:] if run.embeddings is not None else expected
            notes = _embedding_notes(stages, got, expected, diffs, library=library) + cross_notes + notes
        if findings:  # the finding is the explanation: no generic word on top of it
            pass
        elif name != first and not notes and explained_by is not None and STAGE_ORDER.index(explained_by) < \
                STAGE_ORDER.index(name):
            notes.append(f"follows from the cause found at the {explained_by} stage")
        elif name != first and not notes and first is not None:
            notes.append(f"follows from the drift first seen at the {first} stage")
        elif name == first and not notes and name in ("pixels", "embedding") and run.runner != "spec":
            notes.append("the shipped code does not record its configuration: `parity diagnose` with the same "
                         "spec names the spec change under which the spec reproduces its numbers")
        explained[name] = _with_notes(replace(stages[name], findings=findings), notes)
    return explained, diffs


def _summarised(diffs: tuple[ConfigDiff, ...], run: CandidateRun) -> tuple[ConfigDiff, ...]:
    """A head found by its tensors' shapes has other layer names by definition: its structure diff is one
    line (the weights stage names the renamed layers), not one per module."""
    if run.description.get("candidate", {}).get("head_recognised_by") != "tensor shapes":
        return diffs
    structure = [d for d in diffs if d.field.startswith("head.structure.")]
    if not structure:
        return diffs
    kept = tuple(d for d in diffs if not d.field.startswith("head.structure."))
    return kept + (ConfigDiff("head.structure", f"{len(structure)} module(s) under the trained names",
                              "other layer names (see the weights stage)"),)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in ("kwargs", "structure"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def diff_config(recorded: Mapping[str, Any], candidate: Mapping[str, Any]) -> tuple[ConfigDiff, ...]:
    """Fields present on both sides whose values differ (lists and tuples compare equal)."""
    ref, cand = _flatten(recorded), _flatten(candidate)

    def norm(value: Any) -> Any:
        return [norm(v) for v in value] if isinstance(value, (list, tuple)) else value

    diffs: list[ConfigDiff] = []
    for name in ref:
        if name not in cand or norm(ref[name]) == norm(cand[name]):
            continue
        if name.endswith(".structure"):
            diffs += diff_structure(ref[name], cand[name], prefix=name + ".")
        else:
            diffs.append(ConfigDiff(name, ref[name], cand[name]))
    return tuple(diffs)


def _fixes(diffs: tuple[ConfigDiff, ...], stage: str) -> list[str]:
    fixes = []
    for diff in diffs:
        section, _, key = diff.field.partition(".")
        if _SECTION_STAGE.get(section) != stage:
            continue
        if key in SETTABLE.get(section, ()) and diff.reference is None:
            fixes.append(f"Fix: remove [{section}].{key} (the fixture was made without it)")
        elif key in SETTABLE.get(section, ()):
            fixes.append(
                f"Fix: set [{section}].{key} = {toml_value(diff.reference)} "
                f"(the fixture was made with it; the candidate has {toml_value(diff.candidate)})"
            )
        else:
            fixes.append(f"{diff.field}: reference {toml_value(diff.reference)}, candidate {toml_value(diff.candidate)}")
    return fixes


def _with_notes(result: StageResult, notes: list[str]) -> StageResult:
    if result.status is not Status.FAIL or not notes:
        return result
    return replace(result, notes=result.notes + tuple(notes))


def _align_libraries(recorded: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """Make two libraries' backbone records comparable; return the extraction fix, if one is needed.

    Module paths, model names and kwargs share nothing across libraries, so they are not diffed;
    extraction modes and activation classes are compared by what they are, not by their names.
    """

    points = []
    for side in (recorded, candidate):
        backbone = side.get("backbone", {})
        library = backbone.get("library", DEFAULT_LIBRARY)
        point = extraction_point(library, backbone.get("extract", vocabulary(library).default_extract))
        points.append((library, backbone.get("extract"), point))
        side["backbone"] = {k: v for k, v in backbone.items() if k not in _LIBRARY_TERMS}
        side["backbone"]["activation"] = sorted({activation_family(a) for a in backbone.get("activation", [])})
        side["backbone"]["extraction_point"] = point
    (ref_lib, ref_mode, ref_point), (lib, mode, point) = points
    if ref_point == point:
        return []
    same = equivalent_extract(lib, ref_point)
    if same is None:
        return [f"the fixture's {ref_lib} extract = \"{ref_mode}\" returns the {ref_point}; no {lib} extraction "
                "mode returns it"]
    return [f"Fix: set [backbone].extract = \"{same}\" ({lib}'s name for the {ref_point}, which the fixture's "
            f"{ref_lib} extract = \"{ref_mode}\" returns; the candidate's \"{mode}\" returns the {point})"]


def _preprocess_notes(recorded: Mapping[str, Any] | None, candidate: Mapping[str, Any] | None,
                      diffs: tuple[ConfigDiff, ...]) -> list[str]:
    """Both preprocessings in one comparable description: every differing field and what it does.

    Fields the configuration diff already names (same library, same field) are not repeated.
    """
    if not recorded or not candidate:
        return []
    try:
        explanation = explain_preprocess(describe_record(recorded, source="reference"),
                                         describe_record(candidate, source="candidate"))
    except ParityError:
        return []  # a record from an older manifest: the configuration diff is all there is
    named = {d.field.removeprefix("preprocess.") for d in diffs if d.field.startswith("preprocess.")}
    return [f"{d.field}: {format_field_value(d.a, missing='None')} (reference) vs "
            f"{format_field_value(d.b, missing='None')} (candidate): {d.effect}"
            for d in explanation.differences if d.field not in named]


def _recorded_checkpoints(fixture: Fixture) -> dict[str, str]:
    weights = fixture.manifest.get("weights", {})
    return {f"{part}_checkpoint_sha256": entry["sha256"] for part, entry in weights.items() if entry.get("sha256")}


def _checkpoint_hashes(spec: Spec) -> dict[str, str]:
    files = {"backbone": spec.backbone.checkpoint, "head": spec.head.weights}
    return {f"{part}_checkpoint_sha256": sha256_file(path) for part, path in files.items()
            if path is not None and path.is_file() and path.stat().st_size <= _HASHED_BYTES}


def _embedding_notes(stages: Mapping[str, StageResult], got: tuple, expected: tuple,
                     diffs: tuple[ConfigDiff, ...], *, library: str = "timm") -> list[str]:
    if got != expected:
        return [f"the candidate embedding is {got} per sample, the reference {expected}: the extraction "
                f"returns a different tensor. {extraction_hint(library)}".rstrip()]
    if stages["pixels"].status is Status.SKIP:
        return ["weights loaded with strict=True, but the pixels were not compared "
                f"({stages['pixels'].headline}): the preprocessing or the backbone moved the embeddings"]
    if stages["pixels"].status is not Status.FAIL:
        note = ("weights loaded with strict=True and the pixels match, yet the embeddings moved: "
                "the backbone computes differently")
        activation = next((d for d in diffs if d.field == "backbone.activation"), None)
        if activation is not None:
            note += (f" (activation {', '.join(activation.reference)} in the reference, "
                     f"{', '.join(activation.candidate)} in the candidate; identical keys, so strict loading cannot see it)")
        return [note]
    return []
