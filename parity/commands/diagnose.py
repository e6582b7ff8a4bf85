"""Drift diagnosis: the stage that moved, the cause, where inside the backbone, and the fix.

Triage follows the drift catalogue: static differences against what the fixture recorded,
then stage bisection (the gate), then a search over single spec changes probed on the
samples that drift most, confirmed on every sample by a full check, then layer
localisation with forward hooks when the backbone itself computes differently.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.commands.check import SETTABLE, judge_run, partial_report, run_check, toml_value
from parity.explain.detectors import SHIPPED_IMAGE_TRANSFORMS
from parity.judge.arrays import compare_arrays
from parity.model.batches import embed_images
from parity.model.layers import first_divergent_layer
from parity.judge.stages import STAGE_ORDER
from parity.model.pipeline import assemble_pipeline, load_backbone, load_head, resolve_device
from parity.numerics.emulate import gate_tolerance
from parity.numerics.referee import numerics_signature
from parity.judge.decisions import argmax_flips, threshold_flips, verification_flips
from parity.errors import ParityError, SpecError
from parity.runners import run_candidate
from parity.runners.app import to_run
from parity.runners.endpoint import load_handler, observe_handler
from parity.runners.mlflow import load_model, observe_model
from parity.runners.python_app import load_function, observe_function
from parity.store.fixtures import Fixture, load_fixture, load_logged_samples, verify_referenced_checkpoints
from parity.store.images import load_image
from parity.libraries import get as library
from parity.results import Cause, Change, DecisionFlips, Diagnosis, Finding, LayerDivergence, Report, ServiceDiagnosis, Status
from parity.store.shards import shard_fixture
from parity.spec import (CROP_MODES, DEFAULT_LIBRARY, INTERPOLATIONS, MEAN_STD_PRESETS, RESIZE_BACKENDS, CandidateSpec,
                         Spec, library_names, vocabulary)
from parity.spec_toml import load_fixed, spec_document


__all__ = ["Change", "Cause", "LayerDivergence", "Diagnosis", "ServiceDiagnosis", "diagnose", "diagnose_logged",
           "diagnose_candidate", "diagnose_service", "first_divergent_layer", "printed_fix"]

Progress = Callable[[str], None]


# -- candidate changes ---------------------------------------------------------------------


def _recorded_changes(report: Report, fixture: Fixture) -> list[Change]:
    """Every settable field whose candidate value differs from what the fixture recorded.

    A field the fixture was made without is set to the value that meant (`_explicit`) where
    there is one: a value pastes as TOML, a removal does not.
    """
    changes = []
    columns = len(fixture.rows[0].input_biases) if fixture.rows else 0
    for diff in report.config_diffs:
        section, _, key = diff.field.partition(".")
        if key in SETTABLE.get(section, ()):
            value = _explicit(section, key, diff.reference, fixture, columns)
            changes.append(Change(section, ((key, value),), origin="recorded in the fixture"))
    weights = report.stage("weights")
    if weights.status is Status.FAIL:
        for part in sorted({d.part for d in weights.tensor_diffs}):
            trained = fixture.manifest["weights"][part].get("file")
            if trained and (fixture.root / trained).is_file():
                field = "weights" if part == "head" else "checkpoint"
                changes.append(Change(part, ((field, fixture.root / trained),), origin="the trained weights' fingerprints"))
    return changes


def _explicit(section: str, key: str, value: Any, fixture: Fixture, columns: int) -> Any:
    """``value``, or for ``None`` (the fixture was made without the field) the value that stood for: the
    identity order of the input_biases columns, or the preprocessing value the fixture recorded."""
    if value is not None:
        return value
    if (section, key) == ("head", "input_biases_order") and columns:
        return list(range(columns))
    if section == "preprocess":
        recorded = (fixture.pipeline.get("preprocess") or {}).get(key)
        return list(recorded) if isinstance(recorded, tuple) else recorded
    return None


# timm data-config fields a timm preprocessing record carries, for switching back to it.
_GEOMETRY_ORDER = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "resize_backend")
_GEOMETRY = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def _switch_library(spec: Spec, fields: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """A preprocessing library switch with the removals the target library needs: each field the spec sets
    that the target refuses (another library's geometry, a processor or its config) is removed."""
    target = vocabulary(dict(fields)["library"])
    named = {name for name, _ in fields}
    pp = spec.preprocess
    gone = [k for k in _GEOMETRY if getattr(pp, k) is not None and k not in target.preprocess_fields and k not in named]
    if not target.processors:
        gone += [k for k, present in (("processor", bool(vocabulary(pp.library).processors)),
                                      ("config", pp.config is not None)) if present and k not in named]
    return tuple(fields) + tuple((k, None) for k in gone)


def _recorded_library_change(spec: Spec, fixture: Fixture) -> list[Change]:
    """The fixture's preprocessing library (and processor) when the spec runs another one.

    Each library records only its own fields, so the field-by-field configuration diff never
    sees a library swap: ``library`` is missing from a timm record, ``processor`` from all but
    transformers'.
    """
    record = fixture.pipeline.get("preprocess") or {}
    library = record.get("library", DEFAULT_LIBRARY)
    if not record or library == spec.preprocess.library or library not in library_names():
        return []
    vocab = vocabulary(library)
    fields: list[tuple[str, Any]] = [("library", library)]
    if vocab.processors:  # a processor-based library: which of its processors made the fixture
        fields.append(("processor", record.get("processor", vocab.processors[0])))
    if vocab.preprocess_fields:  # a library that takes geometry from the spec: the recorded values
        fields += [(k, record[k]) for k in _GEOMETRY_ORDER if k in (*vocab.preprocess_fields, "resize_backend")
                   and record.get(k) is not None]
    elif spec.preprocess.resize_backend != "pil":
        fields.append(("resize_backend", "pil"))  # the other libraries run their own resize
    return [Change("preprocess", _switch_library(spec, fields), origin="recorded in the fixture")]


def _library_changes(spec: Spec) -> list[Change]:
    """Whose preprocessing runs: the backbone library's own (when it reads its own configuration rather
    than fields from the spec), a processor-based library when the spec names a config file, and the
    preprocessing library's processors."""
    pp, library = spec.preprocess, spec.backbone.library
    out = [Change("preprocess", (("processor", p),)) for p in vocabulary(pp.library).processors]
    targets = [library] if not vocabulary(library).preprocess_fields else []
    if pp.config is not None:
        targets += [name for name in library_names() if vocabulary(name).processors and name not in targets]
    for target in targets:
        fields: list[tuple[str, Any]] = [("library", target)]
        if pp.resize_backend != "pil":
            fields.append(("resize_backend", "pil"))
        out.append(Change("preprocess", _switch_library(spec, fields)))
    return out


def _search_changes(spec: Spec, head_columns: int) -> list[Change]:
    """Single-field alternatives for when the fixture does not record the field that moved."""
    bb = spec.backbone
    out = [Change("backbone", (("extract", m),)) for m in vocabulary(bb.library).extract_modes]
    out += [Change("backbone", (("normalize", n),)) for n in ("none", "l2")]
    takes = vocabulary(spec.preprocess.library).preprocess_fields  # a library's refused fields are no candidates
    if "interpolation" in takes:
        out += [Change("preprocess", (("interpolation", i),)) for i in INTERPOLATIONS]
    if {"mean", "std"} <= set(takes):
        out += [Change("preprocess", (("mean", list(m)), ("std", list(s)))) for m, s in MEAN_STD_PRESETS.values()]
    if "crop_pct" in takes:
        out += [Change("preprocess", (("crop_pct", c),)) for c in (1.0, 0.95, 0.9, 0.875)]
    if "crop_mode" in takes:
        out += [Change("preprocess", (("crop_mode", m),)) for m in CROP_MODES]
    out += [Change("preprocess", (("channel_order", c),)) for c in ("rgb", "bgr")]
    out += [Change("preprocess", (("value_scale", v),)) for v in ("unit", "byte")]
    out += [Change("preprocess", (("resize_backend", r),)) for r in RESIZE_BACKENDS]
    out += [Change("preprocess", (("exif_transpose", e),)) for e in (True, False)]
    out += [Change("runtime", (("dtype", "float32"),))]
    out += _library_changes(spec)
    out += [Change("backbone", (("model", name),)) for name in library(bb.library).sibling_models(bb.model)]
    if 1 < head_columns <= 3:
        out += [Change("head", (("input_biases_order", list(p)),)) for p in itertools.permutations(range(head_columns))]
    return [c for c in out if not _is_current(spec, c)]


def _current(spec: Spec, section: str, field: str) -> Any:
    part = getattr(spec, section)
    value = getattr(part, "class_path" if field == "class" else field)
    return list(value) if isinstance(value, tuple) else value


def _resolved(spec: Spec, prober: _Prober) -> Mapping[str, Any]:
    """The preprocessing values the library resolves for ``spec`` (its fields left unset included), else ``{}``."""
    try:
        return prober.pipeline(spec).data_config
    except (ParityError, RuntimeError, ValueError, OSError):
        return {}


def _values(spec: Spec, change: Change, resolved: Mapping[str, Any] | None = None) -> tuple[list[Any], bool]:
    """The spec's values of ``change``'s fields, a field it leaves unset as the library resolves it, and
    whether any was so resolved."""
    values, from_library = [], False
    for name, _ in change.fields:
        try:
            value = _current(spec, change.section, name)
        except AttributeError:  # not a field of the section: nothing to compare with
            value = None
        if value is None and change.section == "preprocess" and resolved:
            found = resolved.get(name)
            if found is not None:
                value, from_library = (list(found) if isinstance(found, tuple) else found), True
        values.append(value)
    return values, from_library


def _current_words(spec: Spec, change: Change, prober: _Prober) -> tuple[str, str]:
    """The spec's value for ``change``'s fields in TOML, and where it came from when the spec leaves it unset.

    An unset preprocessing field that the preprocess library resolves (timm: from the model's
    ``pretrained_cfg``, then timm's defaults) is shown with its resolved value and the adapter's
    words for its origin (`Library.unset_preprocess_origin`); saying "None" would hide the value
    the candidate actually ran with.
    """
    adapter = library(spec.preprocess.library)
    unset_origin = adapter.unset_preprocess_origin(spec) if change.section == "preprocess" else None
    values, from_library = _values(spec, change, _resolved(spec, prober) if unset_origin is not None else None)
    return ", ".join(toml_value(v) for v in values), (unset_origin or "") if from_library else ""


def _is_current(spec: Spec, change: Change, resolved: Mapping[str, Any] | None = None) -> bool:
    """Whether ``change`` leaves ``spec`` as it is: every field already has the value (a field the spec
    leaves unset: the value the library resolves, from ``resolved``), or is already unset for a removal."""
    def same(a, b):
        numeric = isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a + b)
        return bool(np.allclose(a, b)) if numeric else a == b

    explicit, _ = _values(spec, change)
    current, _ = _values(spec, change, resolved)
    for (name, value), set_, now in zip(change.fields, explicit, current):
        if value is None:
            if set_ is not None:
                return False
        elif (change.section, name) == ("head", "input_biases_order") and set_ is None:
            if value != sorted(value):  # None means the identity order
                return False
        elif not same(now, value):
            return False
    return True


class _Editor:
    """Spec variants made as a user makes them: a fix's TOML text pasted into the spec's own TOML and its
    removals made (`parity.spec_toml`), so that a probed variant, a confirmed fix and a printed fix are
    one and the same spec, and a change the spec refuses (a field its library does not take) is no variant."""

    def __init__(self, spec: Spec) -> None:
        self.spec, self.document = spec, spec_document(spec)
        self._loaded: dict[tuple, Spec | None] = {}

    def load(self, changes: Sequence[Change]) -> Spec | None:
        """``spec`` with ``changes`` applied as printed, or ``None`` when the spec refuses them."""
        key = tuple(c.key for c in changes)
        if key not in self._loaded:
            try:
                self._loaded[key] = load_fixed(self.spec, Change.merged_toml(changes), Change.merged_removals(changes),
                                               document=self.document)
            except SpecError:
                self._loaded[key] = None
        return self._loaded[key]


def printed_fix(spec: Spec, fix: Sequence[Change]) -> Spec | None:
    """The spec a user gets from the printed fix (its TOML pasted into the spec, its removals made), or
    ``None`` when that spec is not valid. Confirmations run this spec, never an edit made in memory."""
    try:
        return load_fixed(spec, Change.merged_toml(fix), Change.merged_removals(fix))
    except SpecError:
        return None


# -- probing ---------------------------------------------------------------------------------

class _Prober:
    """Runs candidate variants on a few samples, reusing loaded modules and decoded images."""

    def __init__(self, fixture: Fixture, rows: Sequence[int], device: str) -> None:
        self.fixture, self.rows, self.device = fixture, list(rows), device
        self.backbones: dict[str, Any] = {}
        self.heads: dict[str, Any] = {}
        self.images: dict[tuple[int, bool], Any] = {}
        # A budget a caller fixes for a stage (freezing checks a claim at one stated budget).
        self.budgets: dict[str, Any] = {}

    def tolerance(self, spec: Spec, stage: str):
        """The gate's budget for ``stage`` under ``spec``: a probe that passes is a candidate the gate passes."""
        return self.budgets.get(stage) or gate_tolerance(spec, self.fixture, stage)

    def pipeline(self, spec: Spec):
        device = resolve_device(self.device)
        bkey, hkey = repr((spec.backbone, spec.runtime)), repr((spec.head, spec.runtime))
        if bkey not in self.backbones:
            self.backbones[bkey] = load_backbone(spec, device=device, fingerprints=False)[0]
        if hkey not in self.heads:
            self.heads[hkey] = load_head(spec, device=device, fingerprints=False)[0]
        return assemble_pipeline(spec, self.backbones[bkey], self.heads[hkey], device=device)

    # Decoded images are kept only for small probe sets; a full pass re-decodes batch by batch.
    _CACHED_IMAGES = 64

    def _image(self, i: int, exif: bool):
        if len(self.rows) > self._CACHED_IMAGES:
            return load_image(self.fixture.rows[i].image, exif_transpose=exif)
        return self.images.setdefault((i, exif), load_image(self.fixture.rows[i].image, exif_transpose=exif))

    def measure(self, spec: Spec) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Candidate embeddings and outputs for the probe rows, in batches (``None`` if the pipeline fails)."""
        try:
            pipeline = self.pipeline(spec)
            exif = spec.preprocess.exif_transpose
            # Decoded a chunk at a time: a 200k-sample log must not be one list of images.
            chunk = max(self._CACHED_IMAGES, spec.runtime.batch_size)
            embeddings = np.concatenate([embed_images(pipeline, [self._image(i, exif) for i in self.rows[s:s + chunk]])
                                         for s in range(0, len(self.rows), chunk)]) if self.rows else \
                np.zeros((0, 0), np.float32)
        except (ParityError, RuntimeError, ValueError, TypeError, AssertionError):  # a variant the libraries cannot run
            return None
        try:
            return embeddings, pipeline.run_head(embeddings, self.fixture.biases(self.rows)).numpy()
        except (RuntimeError, ValueError, IndexError, TypeError):  # the head refuses what the probe gives it
            return embeddings, None

    def targets(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What to reproduce; a service log may hold only one of the two (an (N, 0) array)."""
        emb, out = self.fixture.embeddings, self.fixture.outputs
        return (emb[self.rows] if emb.shape[1] else None), (out[self.rows] if out.shape[1] else None)

    def score(self, spec: Spec) -> dict[str, Any]:
        """Max abs error of the embeddings and outputs on the probe samples, and whether both pass.

        Errors (a crash, a wrong shape, a head that raises) count as infinitely far.
        """
        far = {"embedding": float("inf"), "outputs": float("inf"), "ok": False}
        measured = self.measure(spec)
        if measured is None:
            return far
        embeddings, outputs = measured
        emb_target, out_target = self.targets()
        emb = compare_arrays(embeddings, embeddings if emb_target is None else emb_target,
                             tolerance=self.tolerance(spec, "embedding"), cosine=True)
        if not emb.shapes_match:
            return far
        if outputs is None:
            return dict(far, embedding=emb.max_abs)
        out = compare_arrays(outputs, outputs if out_target is None else out_target, tolerance=self.tolerance(spec, "outputs"))
        return {"embedding": emb.max_abs, "outputs": out.max_abs, "ok": bool(emb) and bool(out)}


# -- per-sample patterns ---------------------------------------------------------------------

def _properties(path: Path) -> dict[str, bool]:
    from PIL import Image

    with Image.open(path) as image:
        orientation = image.getexif().get(0x0112, 1)
        return {
            "an EXIF orientation tag": orientation not in (None, 1),
            "an alpha channel or palette (RGBA/LA/P)": image.mode in ("RGBA", "LA", "P", "PA"),
            "a single channel (grayscale)": image.mode in ("L", "I", "I;16", "1"),
            "a non-square shape": image.width != image.height,
        }


def _pattern(fixture: Fixture, affected: Sequence[int]) -> str:
    if not affected or len(affected) == len(fixture.rows):
        return ""
    props = [_properties(row.image) for row in fixture.rows]
    for name in props[0]:
        having = {i for i, p in enumerate(props) if p[name]}
        if set(affected) <= having:
            share = "all" if set(affected) == having else f"{len(affected)} of {len(having)}"
            return f"only images with {name} drift ({share} of them)"
    return ""


# -- the diagnosis ---------------------------------------------------------------------------

def _per_row_drift(spec: Spec, fixture: Fixture, device: str) -> list[int]:
    """Rows whose embedding or output leaves the reference's tolerance, worst first."""
    prober = _Prober(fixture, range(len(fixture.rows)), device)
    measured = prober.measure(spec)
    everyone = list(range(len(fixture.rows)))
    if measured is None or measured[1] is None or measured[0].shape != fixture.embeddings.shape:
        return everyone
    errors, bad = [], np.zeros(len(fixture.rows), dtype=bool)
    for stage, got, want in (("embedding", measured[0], fixture.embeddings), ("outputs", measured[1], fixture.outputs)):
        tol = prober.tolerance(spec, stage)
        err = np.abs(got - want)
        bad |= (err > tol.atol + tol.rtol * np.abs(want)).any(axis=1)
        errors.append(err.max(axis=1))
    worst = np.maximum(*errors)
    return sorted((int(i) for i in np.flatnonzero(bad)), key=lambda i: -float(worst[i]))


def diagnose(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None, samples: int = 4,
             progress: Progress | None = None, shard: tuple[int, int] | None = None) -> Diagnosis | ServiceDiagnosis:
    """Find why the candidate drifts and which spec change restores parity.

    Shipped code (``python``, ``endpoint_handler``, ``mlflow_model``) is diagnosed by `diagnose_candidate`; a candidate
    observed only from outside (``url``, ``oip``, ``logged``) or through a client (``gradio``, ``gradio_app``) by
    `diagnose_service` / `diagnose_logged`.

    Args:
        samples: how many of the most-drifting samples each cheap probe runs on; the
            best change is then confirmed by a full `run_check` on every sample.
        shard: ``(I, N)``: diagnose on shard I of N of the samples (`parity.store.shards`); the gate,
            the probes and the confirmation all run on that shard, for `parity.commands.merge`.

    Raises:
        SpecError: ``shard`` for a url or logged candidate.
    """
    kind = spec.candidate.kind
    if kind in ("python", "endpoint_handler", "mlflow_model"):
        return diagnose_candidate(spec, fixtures=fixtures, device=device, samples=samples, progress=progress,
                                  shard=shard)
    if kind in ("url", "oip", "logged", "gradio", "gradio_app"):  # run once and observed, never re-run with a changed spec
        if shard is not None:
            raise SpecError(f"diagnose of a {kind} candidate does not take --shard: gate it in shards with "
                            "`parity check --shard I/N --json PART.json` and `parity merge`, then diagnose it whole")
        if kind == "logged":
            return diagnose_logged(spec, spec.candidate.target, device=device, samples=max(samples, 8),
                                   progress=progress)
        return diagnose_service(spec, fixtures=fixtures, device=device, samples=max(samples, 8), progress=progress)
    say = progress or (lambda _message: None)
    device = device or spec.runtime.device
    say("running the gate")
    report = run_check(spec, fixtures=fixtures, device=device, shard=shard)
    if report.passed:
        return Diagnosis(report, notes=("no drift: every stage reproduces the reference",))
    fixture = load_fixture(spec.fixture_root(fixtures))
    if shard is not None:
        fixture, _ = shard_fixture(fixture, *shard)
    # Samples that do not decode are named and left out of every probe: they say nothing about the fix.
    unreadable = dict(report.stage("decode").sample_errors) if _has_stage(report, "decode") else {}
    fixture = _without(fixture, unreadable)
    excluded = tuple(f"excluded from the probes (unreadable): {name}: {why}" for name, why in unreadable.items())
    load = report.stage("load")
    if load.status is Status.FAIL:
        fix = load.key_diffs[0].fix
        if fix is not None and fix.verified:
            section = load.key_diffs[0].section
            fields = tuple((f, v) for f, v in (("state_dict_key", fix.state_dict_key), ("key_map", dict(fix.key_map)),
                                               ("drop_keys", list(fix.drop_keys))) if v)
            change = Change(section, fields, origin="checkpoint forensics")
            fixed = printed_fix(spec, (change,))
            confirmed = fixed is not None and run_check(fixed, fixtures=fixtures, device=device, shard=shard).passed
            cause = Cause(change, "load", "keys", float("nan"), float("nan"), confirmed, "; ".join(fix.causes))
            return Diagnosis(report, (cause,), (change,), confirmed)
        section = load.key_diffs[0].section
        fields = "[head].class and kwargs" if section == "head" else "[backbone].model and kwargs"
        return Diagnosis(report, notes=tuple(fix.causes if fix else ()) + (
            f"the {section} module ({fields}) is not the architecture the {section} checkpoint holds; "
            "no key mapping fixes that (see the load stage)",))

    # a reference made in TF32 is not a pipeline change
    say("refereeing against a float64 run")
    signature = numerics_signature(spec, fixture, report, device=device, samples=samples)
    if signature is not None:
        return Diagnosis(report, notes=signature)
    say("finding the samples that drift")
    affected = _per_row_drift(spec, fixture, device)
    probe_rows = affected[:samples] or list(range(min(samples, len(fixture.rows))))
    prober = _Prober(fixture, probe_rows, device)
    stage = report.first_failure.stage if report.first_failure.stage in ("embedding", "outputs") else (
        "embedding" if report.first_failure.stage == "pixels" else "outputs")
    base = prober.score(spec)
    columns = len(fixture.rows[0].input_biases)
    candidates: dict[tuple, Change] = {}
    recorded = _recorded_changes(report, fixture) + _recorded_library_change(spec, fixture)
    for change in recorded + _search_changes(spec, columns):
        candidates.setdefault(change.key, change)  # a recorded change wins over the same searched one

    say(f"probing {len(candidates)} changes on {len(probe_rows)} samples")
    causes, fix, current, _ = _search(prober, candidates.values(), spec, stage, base, shown=5)

    say("confirming the fix on every sample")
    printed = printed_fix(spec, fix) if fix else None  # the fix as printed, pasted into the spec
    checked = run_check(printed, fixtures=fixtures, device=device, shard=shard) if printed is not None else None
    # "Confirmed" is the gate passing with the printed fix; samples that cannot be decoded fail it whatever the fix.
    confirmed = checked is not None and checked.passed
    readable_only = checked is not None and not confirmed and _passes(checked, bool(unreadable))
    layer = None
    if report.stage("pixels").status is not Status.FAIL and report.stage("embedding").status is Status.FAIL \
            and fix and all(c.section == "backbone" for c in fix):
        say("localising the first divergent layer")
        layer = _localise(spec, current, prober)
    names = tuple(fixture.rows[i].name for i in affected)
    notes: tuple[str, ...] = ()
    pixels = report.stage("pixels")
    if not confirmed and pixels.status is Status.FAIL and pixels.notes:
        # No spec field reaches the fixture's preprocessing (e.g. another library's): say how it differs.
        notes = ("The preprocessing differs from the fixture's:",) + tuple(f"  {note}" for note in pixels.notes)
    if readable_only:
        notes += (f"With the fix every readable sample passes, but parity check still fails: {len(unreadable)} "
                  "sample(s) cannot be decoded (named above); the fix is NOT confirmed until they are repaired or "
                  "removed from the fixture.",)
    return Diagnosis(report, tuple(causes), tuple(fix), confirmed, layer, names, len(fixture.rows),
                     _pattern(fixture, affected), excluded + notes)


def _has_stage(report: Report, stage: str) -> bool:
    return any(s.stage == stage for s in report.stages)


def _passes(report: Report, decode_failures_known: bool) -> bool:
    """The report passes, or fails only on the unreadable samples already named."""
    if report.passed or not decode_failures_known:
        return report.passed
    return all(s.status is not Status.FAIL for s in report.stages if s.stage != "decode")


def _without(fixture: Fixture, names: Mapping[str, str]) -> Fixture:
    """``fixture`` without the named rows."""
    if not names:
        return fixture
    return fixture.subset([i for i, row in enumerate(fixture.rows) if row.name not in names])


def _service_decisions(spec: Spec, logged: Fixture, prober: _Prober) -> tuple[DecisionFlips, ...]:
    """The decisions ``[decisions]`` names, made from the logged values and from the spec's pipeline."""
    wanted = spec.decisions
    measured = prober.measure(spec) if wanted.any else None
    if measured is None:
        return ()
    embeddings, outputs = measured
    names = [row.name for row in logged.rows]
    found = []
    if outputs is not None and logged.outputs.shape[1] and logged.outputs.shape == outputs.shape:
        band = prober.tolerance(spec, "outputs").atol
        if wanted.threshold is not None:
            found.append(threshold_flips(wanted.threshold, logged.outputs, outputs, band, names))
        if wanted.argmax:
            found.append(argmax_flips(logged.outputs, outputs, band, names))
    if wanted.verification_threshold is not None and logged.embeddings.shape == embeddings.shape:
        floor = prober.tolerance(spec, "embedding").min_cosine
        band = 2 * float(np.arccos(np.clip(floor if floor is not None else 1.0, -1.0, 1.0)))
        found.append(verification_flips(wanted.verification_threshold, logged.embeddings, embeddings, band, names))
    return tuple(found)


def _service_stage(spec: Spec, logged: Fixture, prober: _Prober) -> tuple[str, tuple[str, ...]]:
    """Where the service departs: with both logged, matching embeddings and moved outputs name the head."""
    if not (logged.embeddings.shape[1] and logged.outputs.shape[1]):
        return "", ()
    measured = prober.measure(spec)
    if measured is None or measured[0].shape != logged.embeddings.shape:
        return "embedding", ()
    if not compare_arrays(measured[0], logged.embeddings, tolerance=prober.tolerance(spec, "embedding"), cosine=True):
        return "embedding", ()
    try:  # the spec's head on the service's own embeddings isolates the head
        pipeline = prober.pipeline(spec)
        on_logged = pipeline.run_head(logged.embeddings, logged.biases(list(range(len(logged.rows))))).numpy()
    except (ParityError, RuntimeError, ValueError, IndexError, TypeError):
        on_logged = None
    gap = "" if on_logged is None or on_logged.shape != logged.outputs.shape else (
        f" (the spec's head on the logged embeddings: outputs max abs {np.abs(on_logged - logged.outputs).max():.2e})")
    return "head", (
        "The logged embeddings match the spec's preprocessing and backbone; the logged outputs do not: the service's "
        f"head differs from the spec's (the head stage){gap}. Check the deployed [head].weights, [head].class and "
        "its kwargs, and [head].input_biases_order.",)


class _LogProber(_Prober):
    """A prober over every logged row that runs a spec over them once: the score, the decisions and
    the stage all ask for the spec's own pipeline, and each pass over a 20,000-line log decodes and
    embeds 20,000 images. Only the last measurement is kept (one (N, D) array, not one per spec)."""

    def __init__(self, fixture: Fixture, rows: Sequence[int], device: str) -> None:
        super().__init__(fixture, rows, device)
        self._last: tuple[str, Any] | None = None

    def measure(self, spec: Spec) -> tuple[np.ndarray, np.ndarray | None] | None:
        key = repr(spec)
        if self._last is None or self._last[0] != key:
            self._last = None  # the previous arrays go before the next pass allocates its own
            self._last = (key, super().measure(spec))
        return self._last[1]


def diagnose_logged(spec: Spec, log: str | Path, *, device: str | None = None, samples: int = 8,
                    progress: Progress | None = None) -> ServiceDiagnosis:
    """Decide whether logged service outputs match the spec's pipeline; if not, find the configuration that does.

    The spec is the reference pipeline (what should be deployed); the search looks for the
    spec changes under which it reproduces what the service logged.
    """
    say = progress or (lambda _message: None)
    logged = load_logged_samples(log)
    say("gating the log")
    report = run_check(spec.replace(candidate={"kind": "logged", "target": str(Path(log).resolve())}), device=device)
    return _service_diagnosis(spec, logged, report, str(log), device=device or spec.runtime.device, samples=samples,
                              say=say, not_tried=_not_tried(report, "logged"))


def diagnose_service(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None, samples: int = 8,
                     progress: Progress | None = None) -> ServiceDiagnosis:
    """`diagnose_logged` for a candidate that cannot be re-run with a changed spec (``url``): it is run once,
    and what it returned for each fixture sample is what the spec's variants must reproduce.

    The notes name each probe that could not be tried on such a candidate, and why.
    """
    from dataclasses import replace

    say = progress or (lambda _message: None)
    device = device or spec.runtime.device
    kind = spec.candidate.kind
    fixture = load_fixture(spec.fixture_root(fixtures))
    verify_referenced_checkpoints(fixture)
    say(f"running the {kind} candidate")
    run = run_candidate(spec, fixture, device=device)
    judged = run.reference if run.reference is not None else fixture
    report = judge_run(run, judged, spec, device=device)
    not_tried = _not_tried(report, kind)
    rows = list(run.rows)

    def values(array) -> np.ndarray:
        if array is None or np.ndim(array) != 2 or len(array) != len(rows):
            return np.zeros((len(rows), 0), np.float32)
        return np.asarray(array, dtype=np.float32)

    observed = replace(judged.subset(rows), embeddings=values(run.embeddings), outputs=values(run.outputs),
                       golden_pixels={})
    if not rows or not (observed.embeddings.shape[1] or observed.outputs.shape[1]):
        why = "it answered no sample" if not rows else "it returned neither embeddings nor outputs of a known shape"
        return ServiceDiagnosis(spec.candidate.target, len(rows), False, (), float("nan"), report=report, notes=(
            f"No spec change can be probed against the {kind} candidate: {why} (see the gate's stages).",) + not_tried)
    return _service_diagnosis(spec, observed, report, spec.candidate.target, device=device, samples=samples, say=say,
                              not_tried=not_tried)


def _not_tried(report: Report, kind: str) -> tuple[str, ...]:
    """The probes a diagnosis of a candidate it can only observe from outside cannot try, and why."""
    unseen: dict[str, list[str]] = {}  # why -> the stages it hides
    for s in report.stages:
        if s.status is Status.SKIP and s.headline.startswith("not observable"):
            unseen.setdefault(s.headline.removeprefix("not observable: "), []).append(s.stage)
    def listed(stages: list[str]) -> str:
        return stages[0] if len(stages) == 1 else f"{', '.join(stages[:-1])} and {stages[-1]}"

    return tuple(f"Not tried: the {listed(stages)} stage{'s' if len(stages) > 1 else ''} ({why})."
                 for why, stages in unseen.items()) + (
        f"Not tried: re-running the candidate with a changed spec (a {kind} candidate runs its own configuration, not "
        "the spec's): each spec change was probed by running the spec's pipeline, changed, against what it returned.",
        f"Not tried: localising the drift inside the backbone (the {kind} candidate's modules are out of reach).")


def _service_diagnosis(spec: Spec, logged: Fixture, report: Report, label: str, *, device: str, samples: int,
                       say: Progress, not_tried: tuple[str, ...]) -> ServiceDiagnosis:
    """Whether the spec's pipeline reproduces what a service returned for ``logged``'s samples, and if not,
    the spec changes under which it does (what the service runs instead)."""
    compared = tuple(k for k, a in (("embedding", logged.embeddings), ("outputs", logged.outputs)) if a.shape[1])
    stage = compared[0]
    everyone = _LogProber(logged, range(len(logged.rows)), device)
    base = everyone.score(spec)
    decisions = _service_decisions(spec, logged, everyone)
    gate = spec.decisions.gate
    if base["ok"]:
        return ServiceDiagnosis(label, len(logged.rows), True, compared, base[stage], decisions=decisions,
                                gate=gate, report=report)
    where, notes = _service_stage(spec, logged, everyone)
    if where == "head":
        stage = "outputs"  # the embeddings already match: rank changes by what moved
    probe = _Prober(logged, range(min(samples, len(logged.rows))), device)
    probe.backbones, probe.heads = everyone.backbones, everyone.heads
    candidates = {c.key: c for c in _search_changes(spec, len(logged.rows[0].input_biases))}
    say(f"probing {len(candidates)} changes on {len(probe.rows)} logged samples")
    causes, changes, _, _ = _search(probe, candidates.values(), spec, stage, probe.score(spec), shown=1)
    printed = printed_fix(spec, changes) if changes else None
    reproduced = printed is not None and everyone.score(printed)["ok"]
    shipped = _shipped_fix(spec, changes, probe, reproduced=reproduced, who="the service") if changes else ()
    if reproduced:
        found = (_search_finding(changes, shipped, who="the service", stage=stage, before=base[stage],
                                 after=everyone.score(printed)[stage]),)
    else:
        say("probing the image changes services make before the model")
        image_change = _image_search(spec, probe, everyone, stage, base[stage], who="the service")
        found = (image_change,) if image_change is not None else ()
    return ServiceDiagnosis(label, len(logged.rows), False, compared, base[stage], tuple(causes),
                            tuple(changes), reproduced, where, decisions, gate, notes + not_tried, report, shipped,
                            findings=found)


def _search(prober: _Prober, candidates, spec: Spec, stage: str, base: dict[str, Any], *, shown: int,
            score: Callable[[Spec], dict[str, Any]] | None = None) -> tuple[list[Cause], list[Change], Spec, dict[str, Any]]:
    """Greedy search over single changes: most drifts have one cause; a few have two or three.

    Each step probes every change on top of the changes kept so far and keeps the best one when it
    passes or at least halves ``stage``'s error; the first step reports up to ``shown`` improving
    changes as causes, later steps their best. ``score`` measures a spec (default: ``prober.score``).
    Returns (causes, kept changes, the changed spec, its score).
    """
    score = score or prober.score
    editor = _Editor(spec)
    causes: list[Cause] = []
    fix: list[Change] = []
    current = spec
    for step in range(3):
        resolved = _resolved(current, prober)
        scored = []
        for change in candidates:
            # A change the spec refuses, or one that leaves it as it is (the value it has, or resolves), is none.
            variant = editor.load([*fix, change])
            if variant is None or variant == current or _is_current(current, change, resolved):
                continue
            measured = score(variant)
            scored.append((not measured["ok"], measured[stage], change.origin == "search", change))
        scored.sort(key=lambda t: (t[0], t[1], t[2]))
        improving = [t for t in scored if not t[0] or t[1] < 0.5 * base[stage]]
        if not improving:
            break
        for failing, error, _, change in improving[:shown if step == 0 else 1]:
            current_value, origin = _current_words(current, change, prober)
            causes.append(Cause(change, stage, "max abs", base[stage], error, not failing, current_value, origin))
        fix.append(improving[0][3])
        current = editor.load(fix)
        base = score(current)
        if base["ok"]:
            break
    return causes, fix, current, base


def _localise(candidate: Spec, reference: Spec, prober: _Prober) -> LayerDivergence | None:
    import torch

    cand, ref = prober.pipeline(candidate), prober.pipeline(reference)
    image = load_image(prober.fixture.rows[prober.rows[0]].image)
    pixels = torch.stack([ref.preprocess(image)]).to(ref.device, ref.dtype)
    return first_divergent_layer(ref.backbone, cand.backbone, pixels,
                                 extract=(reference.backbone.extract, reference.backbone.library),
                                 candidate_extract=(candidate.backbone.extract, candidate.backbone.library))


# -- shipped code (python, endpoint_handler candidates) --------------------------------------

def diagnose_candidate(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None,
                       samples: int = 4, progress: Progress | None = None,
                       shard: tuple[int, int] | None = None) -> Diagnosis:
    """Gate the shipped code, then name the spec change under which the spec reproduces its numbers.

    The embeddings the code's head received (hooked) are the target; the spec, read as the
    reference pipeline, is searched one change at a time on the samples whose embeddings drift
    most, and the best change is confirmed on every observed sample. When the code's pixels match
    and its embeddings do not, the first backbone module that diverges on those pixels is named.
    """
    from dataclasses import replace

    say = progress or (lambda _message: None)
    device = device or spec.runtime.device
    fixture = load_fixture(spec.fixture_root(fixtures))
    whole, picked = len(fixture.rows), range(len(fixture.rows))
    if shard is not None:
        fixture, picked = shard_fixture(fixture, *shard)
    kind = spec.candidate.kind
    say(f"running the {kind} candidate")
    observation = _observe_shipped(spec, fixture, device)
    run = to_run(observation, fixture)
    report = judge_run(run, fixture, spec, device=device)
    if shard is not None:
        report = partial_report(report, shard, tuple(zip(picked, fixture.names)), whole, run, fixture, spec)
    if report.passed:
        return Diagnosis(report, notes=("no drift: every stage reproduces the reference",), candidate=kind)
    cause = report.cause
    explained = cause is not None and (report.stage("embedding").status is not Status.FAIL
                                       or STAGE_ORDER.index(cause.stage) <= STAGE_ORDER.index("embedding"))
    reference_spec = replace(spec, candidate=CandidateSpec(python_path=spec.candidate.python_path))
    candidates = {c.key: c for c in _search_changes(reference_spec, len(fixture.rows[0].input_biases))}
    if explained:  # the gate's detectors named the cause: only the spec fields that say the same are searched
        named = _detector_names(cause.detector)
        candidates = {k: c for k, c in candidates.items() if _detector_names(_change_detector(c)) & named}
    searched_out = (f"The gate's detectors reproduced the shipped code's numbers ({cause.detector}, {cause.stage} "
                    "stage); no spec field says the same, so none was searched.",) if explained and not candidates else ()
    observed = sorted(observation.embeddings)
    if not observed:
        reason = report.stage("embedding").headline
        return Diagnosis(report, notes=searched_out or (
            f"no embedding entering the head was observed ({reason}): only the gate's stages above say where the "
            "shipped code drifts",), candidate=kind)
    target = np.stack([observation.embeddings[i] for i in observed]).astype(np.float32)
    reference = fixture.embeddings[observed]
    if target.shape[1:] == reference.shape[1:]:
        tol = gate_tolerance(spec, fixture, "embedding")
        err = np.abs(target - reference)
        drifting = (err > tol.atol + tol.rtol * np.abs(reference)).any(axis=1)
        worst = err.max(axis=1)
        affected = [observed[j] for j in sorted(np.flatnonzero(drifting), key=lambda j: -float(worst[j]))]
    else:
        affected = list(observed)
    names = tuple(fixture.rows[i].name for i in affected)
    if not affected or searched_out:
        # A detector reproduced the shipped code's own numbers up to the embedding: a spec search has nothing to add.
        return Diagnosis(report, affected=names, total=len(fixture.rows), pattern=_pattern(fixture, affected),
                         candidate=kind, notes=searched_out or (
            "the embeddings the shipped head receives equal the reference's: the drift is in the head or after it "
            "(see the head and outputs stages)",))
    # A fixture whose targets are what the shipped code's head received, for the probes to reproduce.
    shipped = replace(fixture, rows=tuple(fixture.rows[i] for i in observed), embeddings=target,
                      outputs=np.zeros((len(observed), 0), np.float32))
    position = {row: j for j, row in enumerate(observed)}
    everyone = _Prober(shipped, range(len(observed)), device)
    probe = _Prober(shipped, [position[i] for i in affected[:samples]], device)
    probe.backbones, probe.heads = everyone.backbones, everyone.heads
    say(f"probing {len(candidates)} changes on {len(probe.rows)} samples")
    causes, changes, current, _ = _search(probe, candidates.values(), reference_spec, "embedding",
                                          _embedding_score(probe, reference_spec), shown=5,
                                          score=lambda variant: _embedding_score(probe, variant))
    say("confirming on every sample")
    printed = printed_fix(reference_spec, changes) if changes else None  # the alternative's TOML, as printed
    reproduced = printed is not None and _embedding_score(everyone, printed)["ok"]
    notes: list[str] = []
    shipped = _shipped_fix(reference_spec, changes, probe, reproduced=reproduced,
                           where=_call_site(run, changes)) if changes else ()
    found = (_search_finding(changes, shipped, who="the shipped code", stage="embedding",
                             before=_embedding_score(everyone, reference_spec)["embedding"],
                             after=_embedding_score(everyone, printed)["embedding"], where=_call_site(run, changes)),) \
        if reproduced else ()
    layer = None
    backbone = observation.recognised.modules.get("backbone")
    if report.stage("pixels").status is Status.PASS and report.stage("embedding").status is Status.FAIL \
            and backbone is not None and target.shape[1:] == reference.shape[1:]:
        say("localising the first divergent layer")
        import torch

        ref = probe.pipeline(reference_spec)
        image = load_image(fixture.rows[affected[0]].image, exif_transpose=reference_spec.preprocess.exif_transpose)
        pixels = torch.stack([ref.preprocess(image)]).to(ref.device, ref.dtype)
        extract = (reference_spec.backbone.extract, reference_spec.backbone.library)
        try:
            layer = first_divergent_layer(ref.backbone, backbone, pixels, extract=extract)
        except (RuntimeError, ValueError, TypeError, AttributeError) as e:
            notes.append(f"the shipped backbone could not be run on the reference's pixels to localise the drift: {e}")
    return Diagnosis(report, tuple(causes), tuple(changes), reproduced, layer, names, len(fixture.rows),
                     _pattern(fixture, affected), tuple(notes), candidate=kind, shipped_fix=shipped, findings=found)


# -- fixes in the shipped code's terms -------------------------------------------------------

_RESIZERS = {"pil": "PIL's resize", "tensor": "a tensor resize (antialiased)",
             "tensor_noaa": "a tensor resize without antialiasing"}
_CROPS = {"center": "resizes the shorter side and crops the centre", "squash": "squashes the whole image to the input "
          "size (the aspect ratio is not kept)", "border": "pads the image to a square (border) and resizes it"}


def _words(value: Any) -> str:
    return toml_value(value) if not isinstance(value, str) else value


def _departure(section: str, fields: Mapping[str, Any]) -> tuple[str, str]:
    """(what code with these field values does, the instruction to make code do it), in the code's terms."""
    key = (section, next(iter(fields)))
    value = next(iter(fields.values()))
    if key == ("preprocess", "interpolation") and isinstance(value, str):
        return (f"resizes with {value}", f"resize with {value} (torchvision `InterpolationMode.{value.upper()}`, "
                f"PIL `Image.Resampling.{value.upper()}`)")
    if key == ("preprocess", "crop_mode") and value in _CROPS:
        return _CROPS[value], _CROPS[value].replace("resizes", "resize").replace("crops", "crop").replace(
            "squashes", "squash").replace("pads", "pad")
    if key == ("preprocess", "crop_pct"):
        return (f"crops with crop_pct {_words(value)}", f"resize the shorter side to input size / {_words(value)} "
                "before the centre crop")
    if key == ("preprocess", "input_size") and isinstance(value, list) and len(value) == 3:
        return f"feeds {value[1]}x{value[2]} pixels", f"resize and crop to {value[1]}x{value[2]}"
    if key == ("preprocess", "mean"):
        norm = f"mean {_words(fields.get('mean'))} and std {_words(fields.get('std'))}"
        return f"normalises with {norm}", f"normalise with {norm}"
    if key == ("preprocess", "channel_order") and isinstance(value, str):
        how = ("feed the channels in RGB order (PIL `image.convert(\"RGB\")`; from OpenCV, "
               "`cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`)" if value == "rgb" else "feed the channels in BGR order")
        return f"feeds the channels in {value.upper()} order", how
    if key == ("preprocess", "value_scale"):
        return (("feeds pixel values in 0-255", "keep the pixel values in 0-255 before normalising") if value == "byte"
                else ("feeds pixel values in 0-1", "scale the pixel values to 0-1 before normalising (divide by 255, "
                      "as `ToTensor()` does)"))
    if key == ("preprocess", "resize_backend") and value in _RESIZERS:
        return f"resizes with {_RESIZERS[value]}", f"resize with {_RESIZERS[value]}"
    if key == ("preprocess", "exif_transpose"):
        return (("applies the EXIF orientation", "apply the EXIF orientation after opening the image "
                 "(`ImageOps.exif_transpose(image)`)") if value else
                ("ignores the EXIF orientation", "do not rotate the image by its EXIF orientation"))
    if key == ("backbone", "extract"):
        return f"takes the embedding at {_words(value)}", f"take the embedding at {_words(value)}"
    if key == ("backbone", "normalize"):
        return (("L2-normalises the embedding", "L2-normalise the embedding before the head") if value == "l2" else
                ("passes the embedding on without L2 normalisation", "pass the embedding to the head without "
                 "L2 normalisation"))
    if key == ("runtime", "dtype"):
        return (f"runs in {_words(value)}", f"run in {_words(value)} (no `.half()`, `.to(torch.{value})` or autocast "
                "on the modules or inputs)" if value == "float32" else f"run in {_words(value)}")
    if key == ("backbone", "model"):
        return f"builds {_words(value)}", f"build {_words(value)}"
    if key == ("head", "input_biases_order"):
        return (f"passes the input_biases columns in the order {_words(value)}",
                f"pass the input_biases columns in the order {_words(value)}")
    words = ", ".join(f"{name} = {_words(v)}" for name, v in fields.items())
    return f"runs as the spec does with [{section}] {words}", f"use [{section}] {words}"


def _shipped_fix(spec: Spec, fix: Sequence[Change], prober: _Prober, *, reproduced: bool,
                 who: str = "the shipped code", where: str = "") -> tuple[str, ...]:
    """The fix in the shipped code's terms, the spec being the reference: what ``who`` does, what the
    reference did, and what to change in ``who``; then, when the changes reproduce its numbers, the spec's
    TOML as the alternative (a fixture rebuilt with changes that do not would not pass either)."""
    editor, current = _Editor(spec), spec
    lines = [] if reproduced else [
        f"Partly explained: with the changes below the spec comes closer to the numbers of {who} but does not "
        "reproduce them; another difference remains."]
    for i, change in enumerate(fix):
        reference, _ = _values(current, change, _resolved(current, prober))
        names = [name for name, _ in change.fields]
        does, _ = _departure(change.section, dict(change.fields))
        if any(v is None for v in reference):
            did, how = "leaves it to the library", f"use the reference's {', '.join(names)}"
        else:
            did, how = _departure(change.section, dict(zip(names, reference)))
        place = f" ({where})" if where else ""
        lines.append(f"{who[0].upper()}{who[1:]} {does}; the reference {did}. Change {who}{place}: {how}.")
        current = editor.load(fix[:i + 1]) or current
    if not reproduced:
        return tuple(lines)
    text, removals = Change.merged_toml(fix), Change.merged_removals(fix)
    alternative = f"If {who} is right, rebuild the fixture with this in the spec:\n{text}" if text else \
        f"If {who} is right, rebuild the fixture with the spec changed as follows:"
    return (*lines, alternative, *(f"and {r} from the spec" for r in removals))


# The detector a spec field's departure is reported as, when the search reproduced the candidate with it.
_FIELD_DETECTORS = {
    ("preprocess", "interpolation"): "pixels.interpolation", ("preprocess", "crop_pct"): "pixels.crop_pct",
    ("preprocess", "crop_mode"): "pixels.crop_mode", ("preprocess", "input_size"): "pixels.input_size",
    ("preprocess", "mean"): "pixels.mean_std", ("preprocess", "std"): "pixels.mean_std",
    ("preprocess", "channel_order"): "pixels.channel_order", ("preprocess", "value_scale"): "pixels.value_scale",
    ("preprocess", "resize_backend"): "pixels.resize_backend", ("preprocess", "exif_transpose"): "pixels.exif",
    ("preprocess", "library"): "pixels.library", ("preprocess", "processor"): "pixels.processor",
    ("backbone", "extract"): "embeddings.extract", ("backbone", "normalize"): "embeddings.normalize",
    ("backbone", "model"): "embeddings.model", ("head", "input_biases_order"): "head_inputs.columns",
    ("runtime", "dtype"): "numerics.dtype",
}


def _change_detector(change: Change) -> str:
    """The detector that names what ``change`` describes (``pixels.squash`` for ``crop_mode = "squash"``)."""
    field = change.fields[0][0]
    name = _FIELD_DETECTORS.get((change.section, field), f"{change.section}.{field}")
    return "pixels.squash" if name == "pixels.crop_mode" and dict(change.fields).get(field) == "squash" else name


def _detector_names(detector: str) -> set[str]:
    """Each detector a (possibly combined, ``pixels.squash+channel_order``) detector name stands for."""
    family, _, names = detector.partition(".")
    return {f"{family}.{name}" for name in names.split("+")}


def _search_finding(fix: Sequence[Change], shipped: Sequence[str], *, who: str, stage: str, before: float,
                    after: float, where: str = "") -> Finding:
    """A reproducing search result as a finding: what ``who`` does (``shipped``, `_shipped_fix`'s sentences)
    with the numbers, and the spec's TOML as the alternative."""
    names = [_change_detector(change).partition(".")[2] for change in fix]
    family = _change_detector(fix[0]).partition(".")[0]
    sentences = [line for line in shipped if not line.startswith("If ") and not line.startswith("and ")]
    causes = [line.split(". Change ", 1)[0] for line in sentences]
    fixes = ["Change " + line.split(". Change ", 1)[1] for line in sentences if ". Change " in line]
    one_line = "; ".join(change.toml() for change in fix)
    return Finding(
        f"{family}.{'+'.join(dict.fromkeys(names))}", stage, "; ".join(causes),
        f"the reference pipeline with {one_line} reproduces {who}'s {stage} on every sample: max abs {after:.2e} "
        f"(without it {before:.2e})", " ".join(fixes), where=where, max_abs=after,
        spec_fix="" if Change.merged_removals(fix) else Change.merged_toml(fix))


class _ShippedImages(_Prober):
    """A prober whose images first go through changes a shipped service makes (`SHIPPED_IMAGE_TRANSFORMS`)."""

    def __init__(self, base: _Prober, transforms: Sequence[Any], size: tuple[int, int]) -> None:
        super().__init__(base.fixture, base.rows, base.device)
        self.backbones, self.heads, self.budgets = base.backbones, base.heads, base.budgets
        self.transforms, self.size = tuple(transforms), size

    def _image(self, i: int, exif: bool):
        image = load_image(self.fixture.rows[i].image,
                           exif_transpose=exif and all(t.exif_transpose for t in self.transforms))
        for transform in self.transforms:
            image = transform.apply(image, self.size)
        return image


def _image_search(spec: Spec, probe: _Prober, everyone: _Prober, stage: str, before: float, *,
                  who: str) -> Finding | None:
    """The change (or two) a shipped service makes to each image before the model under which the spec's own
    pipeline reproduces what it returned, confirmed on every sample; none when no such change does."""
    try:
        first = probe.fixture.rows[probe.rows[0]].image
        pipeline = probe.pipeline(spec)
        size = tuple(pipeline.preprocess(load_image(first)).shape[-2:])
    except (ParityError, RuntimeError, ValueError, IndexError, OSError):
        return None
    transforms = list(SHIPPED_IMAGE_TRANSFORMS.values())
    family = {t.name: _TRANSFORM_DETECTORS.get(t.name.split("_")[0], t.name) for t in transforms}
    trials = [(t,) for t in transforms] + [(a, b) for i, a in enumerate(transforms) for b in transforms[i + 1:]
                                           if family[a.name] != family[b.name]]
    best: tuple[float, tuple] | None = None
    for trial in trials:
        measured = _ShippedImages(probe, trial, size).score(spec)
        if measured["ok"] and (best is None or measured[stage] < best[0]):
            best = (measured[stage], trial)
        if best is not None and len(trial) > 1 and len(best[1]) == 1:
            break  # one change that reproduces beats any pair
    if best is None:
        return None
    confirmed = _ShippedImages(everyone, best[1], size).score(spec)
    if not confirmed["ok"]:
        return None
    names = "+".join(dict.fromkeys(family[t.name] for t in best[1]))
    return Finding(
        f"pixels.{names}", stage, " and ".join(t.cause for t in best[1]),
        f"the reference pipeline fed images after {' then '.join(t.description for t in best[1])} reproduces "
        f"{who}'s {stage} on every sample: max abs {confirmed[stage]:.2e} (without it {before:.2e})",
        "; ".join(t.fix for t in best[1]), max_abs=confirmed[stage])


# `SHIPPED_IMAGE_TRANSFORMS` names by the detector they are reported as.
_TRANSFORM_DETECTORS = {"bgr": "channel_order", "squash": "squash", "jpeg": "jpeg", "no": "exif",
                        "grayscale": "grayscale"}


def _call_site(run, fix: Sequence[Change]) -> str:
    """Where the shipped code called the module a fix's first change acts on, when the runner saw it."""
    sites = getattr(run, "call_sites", None) or {}
    part = "head" if fix and fix[0].section == "head" else "backbone"
    site = sites.get(part)
    return f"where it calls the {part}: {site}" if site else ""


def _embedding_score(prober: _Prober, spec: Spec) -> dict[str, Any]:
    """How far the spec's embeddings are from the shipped code's on the probe rows (its head is not involved:
    with ``extract = "forward"`` the spec's own head cannot take the embedding the shipped code produced)."""
    measured = prober.measure(spec)
    if measured is None:
        return {"embedding": float("inf"), "ok": False}
    target, _ = prober.targets()
    emb = compare_arrays(measured[0], target, tolerance=prober.tolerance(spec, "embedding"), cosine=True)
    if not emb.shapes_match:
        return {"embedding": float("inf"), "ok": False}
    return {"embedding": emb.max_abs, "ok": bool(emb)}


def _observe_shipped(spec: Spec, fixture: Fixture, device: str):
    """The shipped code's full observation (every row, the rows it raised on included), as its runner makes it."""
    candidate = spec.candidate
    if candidate.kind == "python":
        return observe_function(spec, fixture, load_function(candidate.target, candidate.python_path,
                                                             timeout=candidate.timeout))
    if candidate.kind == "mlflow_model":
        return observe_model(spec, fixture, load_model(Path(candidate.target), timeout=candidate.timeout))
    return observe_handler(spec, fixture, load_handler(Path(candidate.target), timeout=candidate.timeout))
