"""The parity gate: compare the candidate pipeline with the fixture, stage by stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.checkpoints import StrictLoadError, read_state_dict
from parity.compare import compare_arrays
from parity.decisions import argmax_flips, threshold_flips, verification_flips
from parity.errors import FixtureChangedError, FixtureError
from parity.source import git_revision
from parity.fixtures import Fixture, environment, load_fixture, sha256_file
from parity.images import decode_image
from parity.forensics import diff_structure
from parity.pipeline import Pipeline, build_pipeline
from parity.results import ConfigDiff, DecisionFlips, Report, StageResult, Status, TensorDiff
from parity.spec import DTYPES, Spec, default_tolerance

__all__ = ["STAGE_ORDER", "SETTABLE", "run_check", "diff_config", "stage_tolerance", "toml_value"]

STAGE_ORDER = ("load", "weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")
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

Progress = Callable[[int, int], None]


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


def stage_tolerance(spec: Spec, fixture: Fixture, stage: str):
    """The spec's explicit tolerance, else a calibrated budget, else the reference precision's default.

    A candidate that changes precision (float16, bfloat16) is therefore drift unless its
    spec states the budget it accepts or a calibration at that precision exists.
    """
    from parity.calibrate import calibrated_tolerance

    if stage in spec.tolerances:
        return spec.tolerances[stage]
    calibrated = calibrated_tolerance(fixture.manifest, stage, spec.runtime.dtype)
    if calibrated is not None:
        return calibrated
    reference = fixture.pipeline.get("runtime", {}).get("dtype", "float32")
    return default_tolerance(stage, reference if reference in DTYPES else "float32")


def _compare_stage(stage: str, candidate, reference, spec: Spec, names, *, fixture: Fixture, cosine=False) -> StageResult:
    comparison = compare_arrays(np.asarray(candidate), reference, tolerance=stage_tolerance(spec, fixture, stage),
                                names=names, cosine=cosine)
    return StageResult(stage, Status.PASS if comparison else Status.FAIL, "", comparison=comparison)


@dataclass
class _Decoded:
    """What decoding every sample found: the rows that decoded, the errors, the conversions."""

    kept: list[int] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, str] = field(default_factory=dict)


def _embed_all(pipeline: Pipeline, fixture: Fixture, progress: Progress | None) -> tuple[np.ndarray, _Decoded]:
    """Embed every sample that decodes, in batches; an unreadable sample is an error, never skipped silently."""
    import torch

    decoded = _Decoded()
    size, total, chunks = pipeline.spec.runtime.batch_size, len(fixture.rows), []
    for start in range(0, total, size):
        pixels = []
        for i in range(start, min(start + size, total)):
            row = fixture.rows[i]
            try:
                image, note = decode_image(row.image, exif_transpose=pipeline.spec.preprocess.exif_transpose)
                pixel = pipeline.preprocess(image)  # a resize refused for its size is this sample's error too
            except FixtureChangedError:
                raise  # not a bad sample: the fixture changed under the run, nothing may be mixed
            except FixtureError as e:
                decoded.errors.append((row.name, str(e)))
                continue
            if note:
                decoded.conversions[row.name] = note
            decoded.kept.append(i)
            pixels.append(pixel)
        if pixels:
            chunks.append(pipeline.embed(torch.stack(pixels)).numpy())
        if progress:
            progress(min(start + size, total), total)
    width = fixture.embeddings.shape[1]
    return (np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)), decoded


def _decode_stage(decoded: _Decoded, total: int) -> StageResult:
    converted = f", {len(decoded.conversions)} converted to RGB" if decoded.conversions else ""
    notes = tuple(f"{name}: {note}" for name, note in decoded.conversions.items())
    if decoded.errors:
        return StageResult("decode", Status.FAIL, f"{len(decoded.errors)} of {total} samples cannot be decoded; "
                           "an unreadable sample never counts as parity", sample_errors=tuple(decoded.errors),
                           notes=notes)
    return StageResult("decode", Status.PASS, f"{total}/{total} decoded{converted}", notes=notes)


def _run_head(stage: str, pipeline: Pipeline, embeddings: np.ndarray, fixture: Fixture,
              kept: list[int]) -> tuple[StageResult, np.ndarray | None]:
    """The stage's verdict and the head's outputs (``None`` when it raised)."""
    biases = fixture.biases(kept)
    try:
        outputs = pipeline.run_head(embeddings, biases).numpy()
        again = pipeline.run_head(embeddings, biases).numpy()
    except (RuntimeError, ValueError, IndexError) as e:
        return StageResult(stage, Status.FAIL, f"the head raised {type(e).__name__}: {e}"), None
    if not np.array_equal(outputs, again, equal_nan=True):
        return StageResult(stage, Status.FAIL, "the head gives different outputs for the same inputs in eval mode: "
                           "dropout or another random layer is active in forward()"), outputs
    names = [fixture.rows[i].name for i in kept]
    return _compare_stage(stage, outputs, fixture.outputs[kept], pipeline.spec, names, fixture=fixture), outputs


def _with_notes(result: StageResult, notes: list[str]) -> StageResult:
    if result.status is not Status.FAIL or not notes:
        return result
    from dataclasses import replace

    return replace(result, notes=result.notes + tuple(notes))


def run_check(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None,
              progress: Progress | None = None) -> Report:
    """Run the gate: strict load, golden pixels, embeddings, head on reference embeddings, outputs.

    Raises:
        SpecError: no fixtures given, or the spec cannot be built into a pipeline.
        FixtureError: the fixture is missing, tampered with, or inconsistent.
        CheckpointError: a checkpoint cannot be read at all.
    """
    root = spec.fixture_root(fixtures)
    fixture = load_fixture(root)
    device_name = device or spec.runtime.device
    report = dict(spec=str(spec.path), fixtures=str(root), device=device_name, dtype=spec.runtime.dtype)
    try:
        pipeline = build_pipeline(spec, device=device_name)
    except StrictLoadError as e:
        failed = StageResult("load", Status.FAIL, "weights do not load with strict=True", key_diffs=(e.key_diff,))
        skipped = tuple(StageResult(s, Status.SKIP, "not run: weights did not load") for s in STAGE_ORDER[1:])
        return Report(**report, stages=(failed, *skipped))

    producer = fixture.manifest.get("producer", {})
    recorded = dict(fixture.pipeline, versions=producer.get("versions", {}),
                    provenance={"git_revision": producer.get("git_revision"), **_recorded_checkpoints(fixture)})
    candidate = dict(pipeline.describe(), versions=environment(),
                     provenance={"git_revision": git_revision(spec.path), **_checkpoint_hashes(spec)})
    cross_notes: list[str] = []
    if _recorded_library(fixture) != spec.backbone.library:
        cross_notes = _align_libraries(recorded, candidate)
    diffs = diff_config(recorded, candidate)
    names = fixture.names
    stages = {"load": StageResult("load", Status.PASS, _load_headline(spec)),
              "weights": _weights_stage(pipeline, fixture)}

    try:
        embeddings, decoded = _embed_all(pipeline, fixture, progress)
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. timm refusing a 224 px input to a 336 px model
        embeddings, decoded = None, _Decoded(kept=list(range(len(names))))
        stages["embedding"] = StageResult("embedding", Status.FAIL, f"the backbone raised {type(e).__name__}: {e}")
    else:
        stages["embedding"] = _compare_stage("embedding", embeddings, fixture.embeddings[decoded.kept], spec,
                                             [names[i] for i in decoded.kept], fixture=fixture, cosine=True)
    stages["decode"] = _decode_stage(decoded, len(names))

    unreadable = {name for name, _ in decoded.errors}
    golden = [row for row in fixture.rows if row.name in fixture.golden_pixels and row.name not in unreadable]
    if golden:
        import torch

        exif = spec.preprocess.exif_transpose
        pixels = torch.stack([pipeline.preprocess(decode_image(row.image, exif_transpose=exif)[0]) for row in golden])
        reference = np.stack([fixture.golden_pixels[row.name] for row in golden])
        stages["pixels"] = _compare_stage("pixels", pixels.numpy(), reference, spec, [row.name for row in golden],
                                          fixture=fixture)
    else:
        stages["pixels"] = StageResult("pixels", Status.SKIP, "the fixture has no golden pixels")

    stages["head"], _ = _run_head("head", pipeline, fixture.embeddings, fixture, list(range(len(names))))
    outputs = None
    if embeddings is None or embeddings.shape[1:] != fixture.embeddings.shape[1:] or not decoded.kept:
        stages["outputs"] = StageResult("outputs", Status.SKIP, "not run: no candidate embeddings of the right shape")
    else:
        stages["outputs"], outputs = _run_head("outputs", pipeline, embeddings, fixture, decoded.kept)

    stages["decisions"] = _decision_stage(spec, fixture, stages, outputs, embeddings, decoded.kept)
    first = next((s for s in STAGE_ORDER if stages[s].status is Status.FAIL), None)
    for name in STAGE_ORDER[1:]:
        notes = _fixes(diffs, name)
        if name == "pixels" and stages["pixels"].status is Status.FAIL:
            notes += _preprocess_notes(recorded.get("preprocess"), candidate.get("preprocess"), diffs)
        if name == "embedding":
            got = embeddings.shape[1:] if embeddings is not None else fixture.embeddings.shape[1:]
            notes = _embedding_notes(stages, got, fixture.embeddings.shape[1:], diffs) + cross_notes + notes
        if name != first and not notes and first is not None:
            notes.append(f"follows from the drift first seen at the {first} stage")
        stages[name] = _with_notes(stages[name], notes)
    return Report(**report, stages=tuple(stages[s] for s in STAGE_ORDER), config_diffs=diffs,
                  gate=spec.decisions.gate)


# Backbone fields that name things in one library's terms (or its module tree).
_LIBRARY_TERMS = ("structure", "model", "kwargs", "extract", "hidden_act", "attn_implementation")


def _align_libraries(recorded: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """Make two libraries' backbone records comparable; return the extraction fix, if one is needed.

    Module paths, model names and kwargs share nothing across libraries, so they are not diffed;
    extraction modes and activation classes are compared by what they are, not by their names.
    """
    from parity.backbones import activation_family, equivalent_extract, extraction_point

    points = []
    for side in (recorded, candidate):
        backbone = side.get("backbone", {})
        point = extraction_point(backbone.get("library", "timm"), backbone.get("extract", "pre_logits"))
        points.append((backbone.get("library", "timm"), backbone.get("extract"), point))
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
    from parity.errors import ParityError
    from parity.preprocess_config import describe_record
    from parity.preprocess_diff import explain_preprocess, format_field_value as shown

    if not recorded or not candidate:
        return []
    try:
        explanation = explain_preprocess(describe_record(recorded, source="reference"),
                                         describe_record(candidate, source="candidate"))
    except ParityError:
        return []  # a record from an older manifest: the configuration diff is all there is
    named = {d.field.removeprefix("preprocess.") for d in diffs if d.field.startswith("preprocess.")}
    return [f"{d.field}: {shown(d.a, missing='None')} (reference) vs {shown(d.b, missing='None')} (candidate): "
            f"{d.effect}"
            for d in explanation.differences if d.field not in named]


def _decision_stage(spec: Spec, fixture: Fixture, stages: Mapping[str, StageResult], outputs: np.ndarray | None,
                    embeddings: np.ndarray | None, kept: list[int]) -> StageResult:
    """Every decision the spec names, checked for flips; a flip where the reference sits within the
    budget of the boundary is a near-tie (reported, not failed); any other flip fails."""
    wanted = spec.decisions
    if not wanted.any:
        return StageResult("decisions", Status.SKIP, "no [decisions] in the spec")
    names = [fixture.rows[i].name for i in kept]
    found: list[DecisionFlips] = []
    skipped: list[str] = []
    out_cmp = stages["outputs"].comparison
    if wanted.threshold is not None or wanted.argmax:
        if outputs is None or out_cmp is None or not out_cmp.shapes_match:
            skipped.append("no comparable outputs")
        else:
            ref, band = fixture.outputs[kept], out_cmp.tolerance.atol
            if wanted.threshold is not None:
                found.append(threshold_flips(wanted.threshold, outputs, ref, band, names))
            if wanted.argmax:
                found.append(argmax_flips(outputs, ref, band, names))
    if wanted.verification_threshold is not None:
        emb_cmp = stages["embedding"].comparison
        if embeddings is None or emb_cmp is None or not emb_cmp.shapes_match:
            skipped.append("no comparable embeddings")
        else:
            # Each embedding may turn by arccos(min_cosine); a pair's angle by twice that.
            floor = emb_cmp.tolerance.min_cosine if emb_cmp.tolerance.min_cosine is not None else 1.0
            band = 2 * float(np.arccos(np.clip(floor, -1.0, 1.0)))
            found.append(verification_flips(wanted.verification_threshold, embeddings,
                                             fixture.embeddings[kept], band, names))
    if not found:
        return StageResult("decisions", Status.SKIP, "not run: " + "; ".join(skipped))
    headline = "; ".join(f"{d.kind}: {len(d.flips)} flip(s), {len(d.near_ties)} near-tie(s) of {d.total}"
                         for d in found)
    if skipped:
        headline += "; not run: " + "; ".join(skipped)
    failed = any(d.flips for d in found)
    return StageResult("decisions", Status.FAIL if failed else Status.PASS, headline, decisions=tuple(found))


_HASHED_BYTES = 256 << 20  # larger checkpoints are proven by the per-tensor fingerprints alone


def _recorded_checkpoints(fixture: Fixture) -> dict[str, str]:
    weights = fixture.manifest.get("weights", {})
    return {f"{part}_checkpoint_sha256": entry["sha256"] for part, entry in weights.items() if entry.get("sha256")}


def _checkpoint_hashes(spec: Spec) -> dict[str, str]:
    files = {"backbone": spec.backbone.checkpoint, "head": spec.head.weights}
    return {f"{part}_checkpoint_sha256": sha256_file(path) for part, path in files.items()
            if path is not None and path.is_file() and path.stat().st_size <= _HASHED_BYTES}


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


def _weights_stage(pipeline: Pipeline, fixture: Fixture) -> StageResult:
    """Bit-identity of the deployed weights with the trained ones, by per-tensor sha256."""
    recorded = fixture.manifest.get("weights")
    if not recorded:
        return StageResult("weights", Status.SKIP, "the fixture records no weight fingerprints")
    diffs: list[TensorDiff] = []
    checked = 0
    other_library = _recorded_library(fixture) != pipeline.spec.backbone.library
    unloaded = []
    for part, entry in recorded.items():
        got = pipeline.fingerprints.get(part)
        if part == "backbone" and other_library:
            continue
        if got is None:  # recorded but nothing loaded: random or library-default weights, never a pass
            unloaded.append(f"{part} ({len(entry['tensors'])} recorded tensors)")
            continue
        checked += len(entry["tensors"])
        changed = [n for n, sha in entry["tensors"].items() if got.get(n) != sha]
        diffs += _measure(pipeline, fixture, part, entry.get("file"), changed)
    # Converting between libraries renames, splits and transposes tensors; the embeddings are their check.
    crossed = (f"; backbone not compared: fingerprinted as a {_recorded_library(fixture)} module, deployed as a "
               f"{pipeline.spec.backbone.library} one (converted layout; the embedding stage checks it)"
               if other_library and "backbone" in recorded else "")
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


def _recorded_library(fixture: Fixture) -> str:
    return fixture.pipeline.get("backbone", {}).get("library", "timm")


def _measure(pipeline: Pipeline, fixture: Fixture, part: str, file: str | None, names: list[str]) -> list[TensorDiff]:
    """How far each changed tensor moved, when the fixture keeps a copy of the trained file."""
    if not names:
        return []
    module = pipeline.backbone if part == "backbone" else pipeline.head
    current = module.state_dict()
    trained = {}
    if file and (fixture.root / file).is_file():
        trained = read_state_dict(fixture.root / file)
    out = []
    for name in names:
        old = trained.get(name)
        if old is None or name not in current or tuple(old.shape) != tuple(current[name].shape):
            out.append(TensorDiff(part, name, None, "not comparable with the trained copy"))
        else:
            delta = (current[name].detach().double().cpu() - old.double()).abs().max().item()
            out.append(TensorDiff(part, name, delta))
    return out


def _embedding_notes(stages: dict[str, StageResult], got: tuple, expected: tuple,
                     diffs: tuple[ConfigDiff, ...]) -> list[str]:
    if got != expected:
        return [
            f"the candidate embedding is {got} per sample, the reference {expected}: the extraction "
            "returns a different tensor. timm's forward() gives the head output (the CLIP projection); "
            "pre-logits features come from forward_head(forward_features(x), pre_logits=True)."
        ]
    if stages["pixels"].status is not Status.FAIL:
        note = ("weights loaded with strict=True and the pixels match, yet the embeddings moved: "
                "the backbone computes differently")
        activation = next((d for d in diffs if d.field == "backbone.activation"), None)
        if activation is not None:
            note += (f" (activation {', '.join(activation.reference)} in the reference, "
                     f"{', '.join(activation.candidate)} in the candidate; identical keys, so strict loading cannot see it)")
        return [note]
    return []
