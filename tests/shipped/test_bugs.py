"""The shipped-code bug suite: each bug, injected into the photo tagger's own app, handler or service, is caught
with its first failing stage, its cause and its fix named.

The photo tagger (tests/shipped/project) is written apart from the bundled examples: a Space whose
predictor is a class instance with a ``@torch.no_grad()`` ``__call__`` and models loaded lazily into
a dict, an Endpoint handler on torchvision's v2 transforms, a FastAPI service normalising with numpy;
a timm ViT-B/16 CLIP tower and a ``TagScorer`` head with BatchNorm, Dropout and two ``input_biases``
columns. Each bug is a text replacement in a copy of one entry file (tests/shipped/bugs.py); the
gate runs through the command line (``parity check --report``, ``parity diagnose --json``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from parity.cli import EXIT_DRIFT, main
from tests.shipped.bugs import BUGS
from tests.shipped.findings import apply_spec_fix, findings, printed_spec_fixes, words_present

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Expected:
    """What the gate must say: the first failing stage, and per detector the words its finding must hold.

    Words are looked for in the finding's cause, evidence and fix together; ``"a|b"`` accepts either.
    """

    first_failure: str
    detectors: dict[str, tuple[str, ...]] = field(default_factory=dict)


# The expected detector per bug, in one place (names as in `parity.results.Finding.detector`).
EXPECTED: dict[str, Expected] = {
    # the Space (python candidate)
    "app_input_biases_swapped": Expected("outputs", {"head_inputs.columns": ("input_biases",)}),
    "app_sigmoid_on_logits": Expected("outputs", {"outputs.sigmoid": ("sigmoid",)}),
    "app_batch_l2_norm": Expected("embedding", {"embeddings.l2_added": ("L2|norm",)}),
    "app_batchnorm_train_mode": Expected("decode", {"head_inputs.training_mode": ("BatchNorm", ".eval()")}),
    "app_only_grayscale_converted": Expected("decode", {"images.mode": ("RGBA", 'convert("RGB")')}),
    "app_bilinear_resize": Expected("pixels", {"pixels.interpolation": ("bilinear", "bicubic")}),
    "app_exif_ignored": Expected("pixels", {"pixels.exif": ("exif_transpose",)}),
    "app_resize_to_crop_size": Expected("pixels", {"pixels.crop_pct": ("248|crop_pct|0.9",)}),
    # the Endpoint handler (endpoint_handler candidate)
    "handler_redeclared_head_strict_false": Expected("weights", {"weights.unaccounted": ("proj.weight", "strict=True")}),
    "handler_half_backbone": Expected("weights", {"weights.dtype": ("float16", ".half()")}),
    "handler_imagenet_mean_std": Expected("pixels", {"pixels.mean_std": ("0.485|ImageNet|imagenet",
                                                                         "0.4814|CLIP|openai")}),
    "handler_pixels_0_255": Expected("pixels", {"pixels.value_scale": ("255",)}),
    "handler_jpeg_reencode_q85": Expected("pixels", {"pixels.jpeg": ("JPEG|jpeg", "quality")}),
    "handler_dropout_active": Expected("head", {"head_inputs.training_mode": ("Dropout", ".eval()")}),
    "handler_forward_not_pre_logits": Expected("decode", {"embeddings.extract": ("pre_logits",)}),
    # the HTTP service (url candidate): only its outputs are visible
    "service_bgr_and_squash": Expected("outputs", {"pixels.channel_order": ("BGR",), "pixels.squash": ("crop|aspect",)}),
    "service_bgr": Expected("outputs", {"pixels.channel_order": ("BGR",)}),
    "service_squash": Expected("outputs", {"pixels.squash": ("crop|aspect",)}),
    "service_softmax_temperature": Expected("outputs", {"outputs.softmax_temperature": ("softmax", "temperature")}),
}


def test_every_bug_has_an_expectation():
    assert sorted(EXPECTED) == sorted(BUGS)
    assert len(BUGS) >= 16 and {kind for kind, _ in BUGS.values()} == {"python", "endpoint_handler", "url"}


@dataclass(frozen=True)
class Outcome:
    """What the command line answered for one injected bug."""

    bug: str
    spec: Path
    check_status: int
    check: dict[str, Any]
    diagnose_status: int
    diagnosis: dict[str, Any]

    def findings(self) -> list[dict[str, Any]]:
        return findings(self.check, self.diagnosis)

    def shown(self) -> str:
        return "; ".join(f"{f['detector']} ({f['stage']}): {f['cause']}" for f in self.findings()) or "no findings"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.fixture(scope="module", params=sorted(BUGS))
def outcome(request, deployed, tmp_path_factory) -> Outcome:
    """The bug's deployment gated once (``check --report``) and diagnosed once (``diagnose --json``)."""
    bug = request.param
    kind, replacements = BUGS[bug]
    out = tmp_path_factory.mktemp(f"{bug}-out")
    with deployed(kind, replacements) as spec:
        check_status = main(["check", "--spec", str(spec), "--report", str(out / "report")])
        diagnose_status = main(["diagnose", "--spec", str(spec), "--json", str(out / "diagnosis.json")])
    return Outcome(bug, spec, check_status, _read(out / "report" / "report.json"), diagnose_status,
                   _read(out / "diagnosis.json"))


def test_the_gate_fails_at_the_first_stage_the_bug_touches(outcome):
    assert outcome.check_status == EXIT_DRIFT
    assert outcome.check["passed"] is False
    assert outcome.check["first_failure"] == EXPECTED[outcome.bug].first_failure


def _named(detector: str) -> set[str]:
    """The detectors a finding stands for: ``pixels.channel_order+squash`` is both a channel-order and a squash finding."""
    family, _, names = detector.partition(".")
    return {f"{family}.{name}" for name in names.split("+")}


def test_the_cause_and_the_fix_are_named(outcome):
    found = outcome.findings()
    for detector, words in EXPECTED[outcome.bug].detectors.items():
        named = [f for f in found if detector in _named(f["detector"])]
        assert named, f"{outcome.bug}: no {detector} finding; the gate said: {outcome.shown()}"
        finding = named[0]
        text = " ".join((finding["cause"], finding["evidence"], finding["fix"]))
        assert not words_present(text, words), f"{outcome.bug}: {detector} lacks {words_present(text, words)}: {text}"
        # The direction is explicit: the shipped code (a service's, for the url kind) is what changes, not the reference.
        assert "Change the shipped code" in finding["fix"] or "Change the service" in finding["fix"], finding["fix"]


def test_the_diagnosis_runs_and_every_printed_spec_fix_is_toml_parity_accepts(outcome):
    assert outcome.diagnose_status == EXIT_DRIFT, outcome.diagnosis.get("headline")
    for fix in printed_spec_fixes(outcome.diagnosis, outcome.check):
        try:
            apply_spec_fix(outcome.spec, fix)
        except tomllib.TOMLDecodeError as e:
            pytest.fail(f"{outcome.bug}: the printed fix {fix!r} is not TOML: {e}")
