"""Drift diagnosis: the stage that moved, the cause, where inside the backbone, and the fix.

Triage follows the drift catalogue: static differences against what the fixture recorded,
then stage bisection (the gate), then a search over single spec changes probed on the
samples that drift most, confirmed on every sample by a full check, then layer
localisation with forward hooks when the backbone itself computes differently.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.check import SETTABLE, toml_value, run_check
from parity.compare import compare_arrays
from parity.errors import ParityError
from parity.fixtures import Fixture, load_fixture
from parity.images import load_image
from parity.preprocess import MEAN_STD_PRESETS
from parity.results import Report, Status
from parity.spec import INTERPOLATIONS, Spec, default_tolerance

__all__ = ["Change", "Cause", "LayerDivergence", "Diagnosis", "ServiceDiagnosis", "diagnose", "diagnose_logged",
           "first_divergent_layer"]

Progress = Callable[[str], None]


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
        return "; ".join(f"[{self.section}].{f} = {toml_value(v)}" if v is not None else f"remove [{self.section}].{f}"
                         for f, v in self.fields)

    def apply(self, spec: Spec) -> Spec:
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

    @property
    def words(self) -> str:
        return (f"{self.change.toml()} (the spec has {self.current}): {self.stage} {self.metric} "
                f"{self.before:.2e} -> {self.after:.2e}")


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

    @property
    def drift(self) -> bool:
        return not self.report.passed


# -- candidate changes ---------------------------------------------------------------------

_ACTIVATION_SWAPS = (("_clip_quickgelu_", "_clip_"),)


def _recorded_changes(report: Report, fixture: Fixture) -> list[Change]:
    """Every settable field whose candidate value differs from what the fixture recorded."""
    changes = []
    for diff in report.config_diffs:
        section, _, key = diff.field.partition(".")
        if key in SETTABLE.get(section, ()):
            changes.append(Change(section, ((key, diff.reference),), origin="recorded in the fixture"))
    weights = report.stage("weights")
    if weights.status is Status.FAIL:
        for part in sorted({d.part for d in weights.tensor_diffs}):
            trained = fixture.manifest["weights"][part].get("file")
            if trained and (fixture.root / trained).is_file():
                field = "weights" if part == "head" else "checkpoint"
                changes.append(Change(part, ((field, fixture.root / trained),), origin="the trained weights' fingerprints"))
    return changes


def _search_changes(spec: Spec, head_columns: int) -> list[Change]:
    """Single-field alternatives for when the fixture does not record the field that moved."""
    bb = spec.backbone
    out = [Change("backbone", (("extract", m),)) for m in ("pre_logits", "cls", "mean_tokens", "forward")]
    out += [Change("backbone", (("normalize", n),)) for n in ("none", "l2")]
    out += [Change("preprocess", (("interpolation", i),)) for i in INTERPOLATIONS]
    out += [Change("preprocess", (("mean", list(m)), ("std", list(s)))) for m, s in MEAN_STD_PRESETS.values()]
    out += [Change("preprocess", (("crop_pct", c),)) for c in (1.0, 0.95, 0.9, 0.875)]
    out += [Change("preprocess", (("channel_order", c),)) for c in ("rgb", "bgr")]
    out += [Change("preprocess", (("value_scale", v),)) for v in ("unit", "byte")]
    out += [Change("preprocess", (("resize_backend", r),)) for r in ("pil", "tensor", "tensor_noaa")]
    out += [Change("preprocess", (("exif_transpose", e),)) for e in (True, False)]
    out += [Change("runtime", (("dtype", "float32"),))]
    for a, b in _ACTIVATION_SWAPS:
        for old, new in ((a, b), (b, a)):
            if old in bb.model:
                out.append(Change("backbone", (("model", bb.model.replace(old, new, 1)),)))
    if 1 < head_columns <= 3:
        out += [Change("head", (("input_biases_order", list(p)),)) for p in itertools.permutations(range(head_columns))]
    return [c for c in out if not _is_current(spec, c)]


def _current(spec: Spec, section: str, field: str) -> Any:
    part = getattr(spec, section)
    value = getattr(part, "class_path" if field == "class" else field)
    return list(value) if isinstance(value, tuple) else value


def _is_current(spec: Spec, change: Change) -> bool:
    def same(a, b):
        return np.allclose(a, b) if isinstance(a, list) and a and isinstance(b, list) else a == b

    current = [_current(spec, change.section, f) for f, _ in change.fields]
    if change.section == "head" and change.fields[0][0] == "input_biases_order" and current[0] is None:
        return change.fields[0][1] == sorted(change.fields[0][1])  # None means identity
    return all(same(c, v) for c, (_, v) in zip(current, change.fields))


# -- probing ---------------------------------------------------------------------------------

class _Prober:
    """Runs candidate variants on a few samples, reusing loaded modules and decoded images."""

    def __init__(self, fixture: Fixture, rows: Sequence[int], device: str) -> None:
        self.fixture, self.rows, self.device = fixture, list(rows), device
        self.backbones: dict[str, Any] = {}
        self.heads: dict[str, Any] = {}
        self.images: dict[tuple[int, bool], Any] = {}
        reference = fixture.manifest.get("pipeline", {}).get("runtime", {}).get("dtype", "float32")
        self.tolerance = {s: default_tolerance(s, reference) for s in ("embedding", "outputs")}

    def pipeline(self, spec: Spec):
        from parity.pipeline import assemble_pipeline, load_backbone, load_head, resolve_device

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
            embeddings = pipeline.embed_images([self._image(i, exif) for i in self.rows])
        except (ParityError, RuntimeError, ValueError, AssertionError):
            return None
        try:
            return embeddings, pipeline.run_head(embeddings, self.fixture.biases(self.rows)).numpy()
        except (RuntimeError, ValueError, IndexError):
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
                             tolerance=self.tolerance["embedding"], cosine=True)
        if not emb.shapes_match:
            return far
        if outputs is None:
            return dict(far, embedding=emb.max_abs)
        out = compare_arrays(outputs, outputs if out_target is None else out_target, tolerance=self.tolerance["outputs"])
        return {"embedding": emb.max_abs, "outputs": out.max_abs, "ok": bool(emb) and bool(out)}


# -- layer localisation ----------------------------------------------------------------------

def first_divergent_layer(reference, candidate, pixels, *, atol: float = 1e-5, rtol: float = 1.3e-6,
                          extract: tuple[str, str] = ("cls", "timm"),
                          candidate_extract: tuple[str, str] | None = None) -> LayerDivergence | None:
    """Feed both backbones the same pixels and return the first module whose output diverges.

    ``extract`` is the (mode, library) each backbone runs with (`parity.backbones.extract_embedding`);
    modules are matched by name, so two libraries' backbones share none.

    The reference's module outputs are kept as they are produced; the candidate's are compared
    as they are produced and dropped, so memory stays near one forward pass of activations.
    """
    import torch

    outputs: dict[str, Any] = {}
    order: list[str] = []

    def keep(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = output.detach().float()
                order.append(name)
        return hook

    found: list[LayerDivergence] = []

    def check(name):
        def hook(_module, _inputs, output):
            ref = outputs.get(name)
            if found or ref is None or not isinstance(output, torch.Tensor) or ref.shape != output.shape:
                return
            delta = (output.detach().float() - ref).abs()
            if bool((delta > atol + rtol * ref.abs()).any()):
                found.append(LayerDivergence(name, order.index(name), len(order), float(delta.max())))
        return hook

    from parity.backbones import extract_embedding

    mode, library = extract
    cand_mode, cand_library = candidate_extract or extract
    handles = [m.register_forward_hook(keep(n)) for n, m in reference.named_modules() if n]
    with torch.inference_mode():
        extract_embedding(reference, pixels, mode, library=library)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(check(n)) for n, m in candidate.named_modules() if n]
    with torch.inference_mode():
        extract_embedding(candidate, pixels.to(next(candidate.parameters()).dtype), cand_mode, library=cand_library)
    for h in handles:
        h.remove()
    return found[0] if found else None


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
        tol = prober.tolerance[stage]
        err = np.abs(got - want)
        bad |= (err > tol.atol + tol.rtol * np.abs(want)).any(axis=1)
        errors.append(err.max(axis=1))
    worst = np.maximum(*errors)
    return sorted((int(i) for i in np.flatnonzero(bad)), key=lambda i: -float(worst[i]))


def diagnose(spec: Spec, *, fixtures: str | Path | None = None, device: str | None = None, samples: int = 4,
             progress: Progress | None = None) -> Diagnosis:
    """Find why the candidate drifts and which spec change restores parity.

    Args:
        samples: how many of the most-drifting samples each cheap probe runs on; the
            best change is then confirmed by a full `run_check` on every sample.
    """
    say = progress or (lambda _message: None)
    device = device or spec.runtime.device
    say("running the gate")
    report = run_check(spec, fixtures=fixtures, device=device)
    if report.passed:
        return Diagnosis(report, notes=("no drift: every stage reproduces the reference",))
    fixture = load_fixture(spec.fixture_root(fixtures))
    load = report.stage("load")
    if load.status is Status.FAIL:
        fix = load.key_diffs[0].fix
        if fix is not None and fix.verified:
            section = load.key_diffs[0].section
            fields = tuple((f, v) for f, v in (("state_dict_key", fix.state_dict_key), ("key_map", dict(fix.key_map)),
                                               ("drop_keys", list(fix.drop_keys))) if v)
            change = Change(section, fields, origin="checkpoint forensics")
            confirmed = run_check(change.apply(spec), fixtures=fixtures, device=device).passed
            cause = Cause(change, "load", "keys", float("nan"), float("nan"), confirmed, "; ".join(fix.causes))
            return Diagnosis(report, (cause,), (change,), confirmed)
        return Diagnosis(report, notes=tuple(fix.causes if fix else ()) + (
            "the head class is not the trained architecture; no spec field can fix that (see the load stage)",))

    from parity.referee import numerics_signature  # a reference made in TF32 is not a pipeline change

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
    for change in _recorded_changes(report, fixture) + _search_changes(spec, columns):
        candidates.setdefault(change.key, change)  # a recorded change wins over the same searched one

    causes, fix, current = [], [], spec
    for step in range(3):  # greedy: most drifts have one cause; a few have two or three
        say(f"probing {len(candidates)} changes on {len(probe_rows)} samples")
        scored = []
        for change in candidates.values():
            if not _is_current(current, change):
                score = prober.score(change.apply(current))
                scored.append((not score["ok"], score[stage], change.origin == "search", change))
        scored.sort(key=lambda t: (t[0], t[1], t[2]))
        improving = [t for t in scored if not t[0] or t[1] < 0.5 * base[stage]]
        if not improving:
            break
        for failing, error, _, change in improving[:5 if step == 0 else 1]:
            current_value = ", ".join(toml_value(_current(current, change.section, f)) for f, _ in change.fields)
            causes.append(Cause(change, stage, "max abs", base[stage], error, not failing, current_value))
        fix.append(improving[0][3])
        current = improving[0][3].apply(current)
        base = prober.score(current)
        if base["ok"]:
            break

    say("confirming the fix on every sample")
    confirmed = bool(fix) and run_check(current, fixtures=fixtures, device=device).passed
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
    return Diagnosis(report, tuple(causes), tuple(fix), confirmed, layer, names, len(fixture.rows),
                     _pattern(fixture, affected), notes)


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


def diagnose_logged(spec: Spec, log: str | Path, *, device: str | None = None, samples: int = 8,
                    progress: Progress | None = None) -> ServiceDiagnosis:
    """Decide whether logged service outputs match the spec's pipeline; if not, find the configuration that does.

    The spec is the reference pipeline (what should be deployed); the search looks for the
    spec changes under which it reproduces what the service logged.
    """
    from parity.fixtures import load_logged_samples

    say = progress or (lambda _message: None)
    logged = load_logged_samples(log)
    compared = tuple(k for k, a in (("embedding", logged.embeddings), ("outputs", logged.outputs)) if a.shape[1])
    stage = compared[0]
    everyone = _Prober(logged, range(len(logged.rows)), device or spec.runtime.device)
    base = everyone.score(spec)
    if base["ok"]:
        return ServiceDiagnosis(str(log), len(logged.rows), True, compared, base[stage])
    probe = _Prober(logged, range(min(samples, len(logged.rows))), device or spec.runtime.device)
    probe.backbones, probe.heads = everyone.backbones, everyone.heads
    candidates = {c.key: c for c in _search_changes(spec, len(logged.rows[0].input_biases))}
    causes, changes, current, score = [], [], spec, probe.score(spec)
    for _ in range(3):
        say(f"probing {len(candidates)} changes on {len(probe.rows)} logged samples")
        scored = sorted(((not s["ok"], s[stage], c) for c in candidates.values() if not _is_current(current, c)
                         for s in (probe.score(c.apply(current)),)), key=lambda t: (t[0], t[1]))
        improving = [t for t in scored if not t[0] or t[1] < 0.5 * score[stage]]
        if not improving:
            break
        failing, error, best = improving[0]
        value = ", ".join(toml_value(_current(current, best.section, f)) for f, _ in best.fields)
        causes.append(Cause(best, stage, "max abs", score[stage], error, not failing, value))
        changes.append(best)
        current = best.apply(current)
        score = probe.score(current)
        if score["ok"]:
            break
    reproduced = bool(changes) and everyone.score(current)["ok"]
    return ServiceDiagnosis(str(log), len(logged.rows), False, compared, base[stage], tuple(causes),
                            tuple(changes), reproduced)


def _localise(candidate: Spec, reference: Spec, prober: _Prober) -> LayerDivergence | None:
    import torch

    cand, ref = prober.pipeline(candidate), prober.pipeline(reference)
    image = load_image(prober.fixture.rows[prober.rows[0]].image)
    pixels = torch.stack([ref.preprocess(image)]).to(ref.device, ref.dtype)
    return first_divergent_layer(ref.backbone, cand.backbone, pixels,
                                 extract=(reference.backbone.extract, reference.backbone.library),
                                 candidate_extract=(candidate.backbone.extract, candidate.backbone.library))
