"""Fixes a user can paste: every printed spec fix is TOML, never a no-op or a field the spec's library refuses,
and "confirmed" means that very text, pasted into the spec file, passes.

The shipped code here is a team's own identity service (numpy between PIL and the processor, its own head
class), written apart from the bundled examples; the transformers spec is the clip_mlp one, copied.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from parity.cli import main
from parity.errors import SpecError
from parity.commands.diagnose import _Editor, _is_current, _Prober, _resolved, diagnose_candidate, printed_fix
from parity.store.fixtures import load_fixture
from parity.results import Change
from parity.spec import load_spec, parse_spec, vocabulary
from parity.spec_toml import apply_toml_fix, load_fixed, render_document, render_spec
from tests.support.paths import CLASSIFIER_SPEC, EXAMPLE_FIXTURES, EXAMPLE_SPEC, ROOT
from tests.support.specs import write_spec

TIMM_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def assert_fix_applies(spec: Path, data: dict, *, key: str = "fix", check: list[str] | None = None) -> Path:
    """Each printed TOML snippet parses; pasted into ``spec`` with its removals made, the spec passes the gate."""
    snippets, removals = data[f"{key}_toml"], data[f"{key}_remove"]
    assert snippets and len(snippets) == 1  # the whole fix is one snippet
    for text in snippets:
        tomllib.loads(text)
        assert "remove" not in text and ";" not in text
    fixed = apply_toml_fix(spec, "\n\n".join(snippets), remove=removals)
    assert main(["check", "--spec", str(fixed), *(check or [])]) == 0
    return fixed


def mlp_spec(directory: Path, preprocess: str | None = None, extra: str = "") -> Path:
    """A copy of the clip_mlp (transformers) spec with absolute paths, its [preprocess] table optionally replaced."""
    text = CLASSIFIER_SPEC.read_text().replace('"../fixtures/', f'"{ROOT / "fixtures"}/')
    if preprocess is not None:
        start = text.index("[preprocess]")
        text = text[:start] + preprocess + "\n" + text[text.index("[head]"):]
    path = directory / "identity.toml"
    path.write_text(text + extra)
    return path


# -- the TOML itself ---------------------------------------------------------------------------

def test_a_fix_is_one_toml_snippet_and_removals_stay_outside_it():
    changes = [Change("preprocess", (("interpolation", "bicubic"),)),
               Change("head", (("class", 'pkg.mod:Head'), ("key_map", {"module.": "", 'a"b': "c\\d"}))),
               Change("preprocess", (("mean", [0.5, 0.5, 0.5]), ("std", (0.5, 0.5, 0.5)))),
               Change("backbone", (("state_dict_key", None),))]
    text = Change.merged_toml(changes)
    assert tomllib.loads(text) == {
        "preprocess": {"interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
        "head": {"class": "pkg.mod:Head", "key_map": {"module.": "", 'a"b': "c\\d"}}}
    assert Change.merged_removals(changes) == ("remove [backbone].state_dict_key",)
    assert "remove" not in text and "backbone" not in text
    # A later change of a field wins, in the TOML and in the removals.
    later = [Change("head", (("input_biases_order", None),)), Change("head", (("input_biases_order", [0, 1]),))]
    assert Change.merged_toml(later) == "[head]\ninput_biases_order = [0, 1]" and not Change.merged_removals(later)
    assert changes[0].toml_text() == '[preprocess]\ninterpolation = "bicubic"'
    assert changes[0].toml() == '[preprocess].interpolation = "bicubic"'  # the one-line form old callers read


def test_apply_toml_fix_replaces_the_named_keys_and_keeps_the_rest(tmp_path):
    spec = write_spec(tmp_path)
    fixed = apply_toml_fix(spec, '[preprocess]\ninterpolation = "bilinear"\n\n[head]\ninput_biases_order = [1, 0]',
                           remove=["remove [preprocess].crop_mode"])
    assert fixed.parent == tmp_path and fixed != spec
    original, changed = load_spec(spec), load_spec(fixed)
    assert changed.preprocess.interpolation == "bilinear" and changed.head.input_biases_order == (1, 0)
    assert changed.preprocess.crop_mode is None and changed.name == original.name
    assert changed.backbone == original.backbone and changed.head.weights == original.head.weights
    assert changed.decisions == original.decisions and changed.matrix == original.matrix
    with pytest.raises(SpecError, match="not valid TOML"):
        apply_toml_fix(spec, "[preprocess].interpolation = \"bicubic\"")  # the old one-line form is no TOML


@pytest.mark.parametrize("path", [EXAMPLE_SPEC, CLASSIFIER_SPEC, *sorted((ROOT / "examples").glob("*/parity.toml"))],
                         ids=lambda p: p.parent.name + "/" + p.name)
def test_a_spec_changed_in_memory_is_written_out_as_the_toml_that_loads_it(path):
    spec = load_spec(path)
    variant = spec.replace(runtime={"batch_size": 3}, reference={"numerics": "tf32"},
                           decisions={"max_flip_rate": 0.1} if spec.decisions.any else {})
    for s in (spec, variant):
        assert parse_spec(tomllib.loads(render_document(render_spec(s))), path=s.path) == s


def test_a_field_the_library_refuses_is_never_a_fix():
    """A timm field on a transformers spec: the spec refuses it, so it is no candidate and never confirmed."""
    spec = load_spec(CLASSIFIER_SPEC)
    timm_field = Change("preprocess", (("interpolation", "bicubic"),))
    assert printed_fix(spec, [timm_field]) is None and _Editor(spec).load([timm_field]) is None
    assert not set(TIMM_FIELDS) & set(vocabulary(spec.preprocess.library).preprocess_fields)
    assert printed_fix(spec, [Change("preprocess", (("channel_order", "bgr"),))]).preprocess.channel_order == "bgr"


def test_a_value_the_library_resolves_for_an_unset_field_is_no_change(tmp_path):
    spec = load_spec(write_spec(tmp_path, {'interpolation = "bicubic"\n': ""}))
    assert spec.preprocess.interpolation is None
    resolved = _resolved(spec, _Prober(load_fixture(EXAMPLE_FIXTURES), [0], "cpu"))
    assert resolved["interpolation"] == "bicubic"  # from the model's pretrained_cfg
    assert _is_current(spec, Change("preprocess", (("interpolation", "bicubic"),)), resolved)
    assert not _is_current(spec, Change("preprocess", (("interpolation", "bilinear"),)), resolved)
    assert _is_current(spec, Change("head", (("input_biases_order", [0, 1]),)), resolved)  # unset: identity
    assert _is_current(spec, Change("preprocess", (("interpolation", None),)), resolved)  # already unset


# -- diagnose: confirmed as printed ------------------------------------------------------------

def test_two_causes_give_one_toml_fix_that_passes_as_pasted(tmp_path, capsys):
    """BGR and swapped input_biases columns, interpolation left to the model: the fix sets two tables, the
    column order as the explicit identity (a value, not a removal), and never the resolved bicubic."""
    spec = write_spec(tmp_path, {'interpolation = "bicubic"\n': "", 'channel_order = "rgb"': 'channel_order = "bgr"',
                                 "dropout = 0.1 }": "dropout = 0.1 }\ninput_biases_order = [1, 0]"})
    assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "d.json")]) == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["confirmed"]
    assert tomllib.loads(data["fix_toml"][0]) == {"preprocess": {"channel_order": "rgb"},
                                                  "head": {"input_biases_order": [0, 1]}}
    assert data["fix_remove"] == []
    proposed = [c["change"] for c in data["causes"]]
    assert not any(dict(map(tuple, c["fields"])).get("interpolation") == "bicubic" for c in proposed)
    capsys.readouterr()
    assert_fix_applies(spec, data)


def test_a_library_switch_fix_carries_its_removals_and_passes_as_printed(tmp_path):
    """timm preprocessing for a head trained on the transformers processor: the switch back removes the timm
    fields (printed apart from the TOML); the TOML alone would be refused."""
    pytest.importorskip("transformers")
    spec = mlp_spec(tmp_path, preprocess='[preprocess]\nlibrary = "timm"\ninput_size = [3, 224, 224]\n'
                                         'interpolation = "bilinear"\ncrop_pct = 1.0\ncrop_mode = "center"\n'
                                         "mean = [0.48145466, 0.4578275, 0.40821073]\n"
                                         "std = [0.26862954, 0.26130258, 0.27577711]\n")
    assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "d.json")]) == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["confirmed"]
    assert tomllib.loads(data["fix_toml"][0]) == {"preprocess": {"library": "transformers", "processor": "fast"}}
    assert data["fix_remove"] == [f"remove [preprocess].{k}" for k in TIMM_FIELDS]
    with pytest.raises(SpecError, match="timm data-config field"):
        load_spec(apply_toml_fix(spec, data["fix_toml"][0], directory=tmp_path))
    assert_fix_applies(spec, data)


# -- shipped code: the spec is the reference -----------------------------------------------------

APP = '''"""The identity service's predict, as its team wrote it: the checkpoint folder's processor, numpy between."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel

WEIGHTS = Path(r"{weights}")


class IdentityHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1))
        self.classifier = nn.Linear(128, 6)

    def forward(self, x):
        return self.classifier(self.mlp(x))


processor = CLIPImageProcessor.from_pretrained(WEIGHTS / "backbone"{processor})
vision = CLIPVisionModel.from_pretrained(WEIGHTS / "backbone").eval()
head = IdentityHead()
head.load_state_dict(torch.load(WEIGHTS / "mlp_classifier.pth", map_location="cpu", weights_only=True))
head.eval()


def predict(image):
    rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    {convert}
    pixels = processor(images=Image.fromarray(np.ascontiguousarray(rgb)), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return head(vision(pixel_values=pixels).pooler_output)[0].tolist()
'''
SQUASH = ', size={"height": 224, "width": 224}, do_center_crop=False'


def shipped_app(directory: Path, *, processor: str = "", convert: str = "pass") -> Path:
    """The service app beside a copy of the transformers spec that gates it; returns the spec."""
    (directory / "identity_app.py").write_text(APP.format(weights=ROOT / "fixtures" / "clip_mlp", processor=processor,
                                                          convert=convert))
    return mlp_spec(directory, extra='\n[candidate]\npython = "identity_app:predict"\n')


def test_a_bgr_service_is_told_to_change_its_code_and_the_alternative_toml_rebuilds_a_fixture_it_passes(tmp_path):
    pytest.importorskip("transformers")
    from parity.commands.check import run_check
    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline

    spec = shipped_app(tmp_path, convert="rgb = rgb[:, :, ::-1]  # the frame as OpenCV gives it")
    result = diagnose_candidate(load_spec(spec))
    assert result.report.first_failure.stage == "pixels"
    assert [c.toml() for c in result.fix] == ['[preprocess].channel_order = "bgr"'] and result.confirmed
    cause, _, change = result.shipped_fix[0].partition(". Change the shipped code")
    assert "shipped code" in cause and "BGR" in cause and "RGB" in cause.partition("; ")[2]
    # Where to change it, and how, in the shipped code's own terms (PIL and OpenCV).
    assert "identity_app.py:" in change and "RGB" in change
    assert '`image.convert("RGB")`' in change and "`cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`" in change
    label, _, spec_text = result.shipped_fix[1].partition("\n")
    assert "rebuild the fixture" in label and spec_text == '[preprocess]\nchannel_order = "bgr"'
    # Taken at its word: the fixture rebuilt from the spec with that TOML is one the shipped code passes.
    toml = result.shipped_fix[1].split("\n", 1)[1]
    rebuilt = load_spec(apply_toml_fix(spec, toml))
    rows = load_fixture(ROOT / "fixtures" / "clip_mlp").rows
    fixture = capture_pipeline(build_pipeline(rebuilt), [r.image for r in rows], tmp_path / "rebuilt",
                               golden=[rows[0].name])
    assert run_check(rebuilt, fixtures=fixture).passed


def test_a_squashing_bgr_service_on_a_transformers_spec_gets_no_refused_no_op_or_unconfirmed_fix(tmp_path):
    """The squash has no transformers spec field: the BGR order is found, never a timm field, and the fix is not
    called reproduced, since the squash remains."""
    pytest.importorskip("transformers")
    spec = shipped_app(tmp_path, processor=SQUASH, convert="rgb = rgb[:, :, ::-1]")
    loaded = load_spec(spec)
    result = diagnose_candidate(loaded)
    assert not result.confirmed
    editor = _Editor(loaded)
    for cause in result.causes:
        names = {name for name, _ in cause.change.fields}
        assert not names & set(TIMM_FIELDS), cause.words
        assert editor.load([cause.change]) is not None and not _is_current(loaded, cause.change)
    assert result.causes and result.causes[0].change.toml() == '[preprocess].channel_order = "bgr"'
    # The BGR order is named, as partial evidence; no fixture is to be rebuilt with a change that reproduces nothing.
    assert result.shipped_fix[0].startswith("Partly explained: ")
    assert any(line.startswith("The shipped code feeds the channels in BGR order") for line in result.shipped_fix)
    assert not any("rebuild the fixture" in line for line in result.shipped_fix)
    for text in (Change.merged_toml(result.fix),):
        tomllib.loads(text)
    assert load_fixed(loaded, Change.merged_toml(result.fix), Change.merged_removals(result.fix))


# -- candidates diagnose observes but cannot re-run ------------------------------------------------

def test_a_logged_candidate_is_diagnosed_and_says_what_it_could_not_try(tmp_path):
    """[candidate] logged (no fixture: the spec's pipeline is the reference): the configuration the service runs,
    as TOML that, pasted, makes the log pass; the notes name the probes a log cannot take."""
    from tests.support.service_logs import log_service

    log = log_service(load_spec(EXAMPLE_SPEC).replace(preprocess={"interpolation": "bilinear"}),
                       tmp_path / "service.jsonl", rows=4)
    spec = write_spec(tmp_path)
    text = spec.read_text()
    spec.write_text(text[text.index("\n[backbone]"):] + '\n[candidate]\nlogged = "service.jsonl"\n')
    assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "d.json")]) == 1
    data = json.loads((tmp_path / "d.json").read_text())
    assert not data["matches"] and data["reproduced"]
    assert data["reproduced_by_toml"] == ['[preprocess]\ninterpolation = "bilinear"']
    assert any(n.startswith("Not tried: re-running the candidate with a changed spec") for n in data["notes"])
    (untried,) = [n for n in data["notes"] if n.startswith("Not tried: the load")]
    assert "load, weights, pixels and head stages" in untried and "service log" in untried
    shipped, _, reference = data["shipped_fix"][0].partition(". ")[0].partition("; ")
    assert "service" in shipped and "bilinear" in shipped and "bicubic" in reference
    assert_fix_applies(spec, data, key="reproduced_by")


def test_a_url_candidate_is_observed_once_and_never_crashes(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart")
    from tests.support.http_service import load_example_service, url_spec, uvicorn_service

    example = load_example_service()
    with uvicorn_service(example.create_app(example.Predictor(interpolation="bilinear"))) as url:
        spec = url_spec(tmp_path, url)
        assert main(["diagnose", "--spec", str(spec), "--samples", "2", "--json", str(tmp_path / "d.json")]) == 1
        assert main(["diagnose", "--spec", str(spec), "--shard", "1/2"]) == 2
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["log"] == url and not data["matches"] and data["compared"] == ["outputs"]
    untried = [n.removeprefix("Not tried: ") for n in data["notes"] if n.startswith("Not tried: ")]
    assert any(n.startswith("the load, weights, pixels and head stages") and "outputs only" in n for n in untried)
    assert any(n.startswith("the embedding stage") and "outputs only" in n for n in untried)
    assert any(n.startswith("localising the drift inside the backbone") for n in untried)
    assert data["reproduced_by_toml"] == ['[preprocess]\ninterpolation = "bilinear"'] and data["reproduced"]
