"""The photo tagger as shipped, without bugs: its Space, Endpoint handler and HTTP service pass the gate, and the
Space and the handler are observed stage by stage whatever wraps their models.
"""

from __future__ import annotations

import json

import pytest

from parity.cli import EXIT_PASS, main
from parity.store.fixtures import load_fixture
from tests.shipped.bugs import INFERENCE_MODE
from tests.shipped.findings import findings

INNER_STAGES = ("weights", "decode", "pixels", "embedding", "head", "outputs", "decisions")
# (kind, replacements): the Space as written (``@torch.no_grad()``) and under ``@torch.inference_mode()``.
DEPLOYMENTS = {
    "app_no_grad": ("python", {}),
    "app_inference_mode": ("python", INFERENCE_MODE),
    "handler": ("endpoint_handler", {}),
    "service": ("url", {}),
}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_the_clean_deployment_passes_and_diagnoses_as_no_drift(name, deployed, tmp_path):
    kind, replacements = DEPLOYMENTS[name]
    with deployed(kind, replacements) as spec:
        assert main(["check", "--spec", str(spec), "--report", str(tmp_path / "report")]) == EXIT_PASS
        assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "diagnosis.json")]) == EXIT_PASS
    check = json.loads((tmp_path / "report" / "report.json").read_text())
    assert check["passed"] is True and check["first_failure"] is None
    assert not findings(check, json.loads((tmp_path / "diagnosis.json").read_text()))


@pytest.mark.parametrize("name", ["app_no_grad", "app_inference_mode", "handler"])
def test_the_app_and_the_handler_are_observed_stage_by_stage(name, deployed, reference, tmp_path):
    """A class instance under @torch.no_grad() / @torch.inference_mode(), models in a dict loaded at the first
    call (the Space), or attributes of the handler: every inner stage compared, every trained tensor counted."""
    kind, replacements = DEPLOYMENTS[name]
    with deployed(kind, replacements) as spec:
        assert main(["check", "--spec", str(spec), "--json", str(tmp_path / "check.json")]) == EXIT_PASS
    stages = {s["stage"]: s for s in json.loads((tmp_path / "check.json").read_text())["stages"]}
    for stage in INNER_STAGES:
        assert stages[stage]["status"] == "PASS", f"{stage}: {stages[stage]['headline']}"
    weights = load_fixture(reference.fixture).manifest["weights"]
    trained = len(weights["backbone"]["tensors"]) + len(weights["head"]["tensors"])
    assert f"{trained} tensors" in stages["weights"]["headline"]


def test_the_suite_reads_findings_and_pastes_spec_fixes_as_a_user_would(reference, tmp_path):
    """The suite's own reading of reports: a nested finding is found, a TOML fix is pasted and validated."""
    from parity.errors import SpecError
    from tests.shipped.findings import apply_spec_fix, words_present

    finding = {"detector": "pixels.interpolation", "stage": "pixels", "cause": "bilinear", "evidence": "max abs 2e-7",
               "fix": "Change the shipped code: resize with bicubic", "where": "", "max_abs": 2e-7, "spec_fix": ""}
    assert findings({"stages": [{"stage": "pixels", "findings": [finding]}]}) == [finding]
    assert words_present("resize with bicubic", ("bicubic|bilinear", "crop")) == ["crop"]
    spec = tmp_path / "parity.toml"
    spec.write_text(reference.spec_text())
    assert apply_spec_fix(spec, '[preprocess]\ninterpolation = "bilinear"\n')["preprocess"]["interpolation"] == "bilinear"
    with pytest.raises(AssertionError, match="current values"):
        apply_spec_fix(spec, '[preprocess]\ninterpolation = "bicubic"\n')
    with pytest.raises(SpecError):
        apply_spec_fix(spec, '[preprocess]\nprocessor = "fast"\n')  # a transformers field on a timm spec
