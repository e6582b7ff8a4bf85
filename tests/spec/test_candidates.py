"""One spec, many candidates, on a user's own layout (not the bundled examples).

The repository in ``tmp_path`` has its own package for the head (``mlcore.heads:TagScorer``, with
BatchNorm, ignoring the input_biases), a ``deploy/app.py`` that applies a sigmoid after the head,
and a spec with three named candidates. Nothing is put on PYTHONPATH: import paths resolve from
the spec's folder.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch

from parity.commands.check import run_check
from parity.cli import main
from parity.errors import SpecError
from parity.store.fixtures import MANIFEST, load_fixture
from parity.spec import load_spec, select_candidate
from tests.support.paths import EXAMPLE_FIXTURES, EXAMPLE_SPEC

HEADS = '''
import torch
from torch import nn


class TagScorer(nn.Module):
    def __init__(self, width: int = 64, tags: int = 6):
        super().__init__()
        self.proj = nn.Linear(width, 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, tags)

    def forward(self, embedding, input_biases=None):
        return self.out(torch.relu(self.norm(self.proj(embedding))))
'''

APP = f'''
import timm
import torch
from safetensors.torch import load_file

from mlcore.heads import TagScorer

backbone = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                             embed_dim=64, depth=2, num_heads=2)
backbone.load_state_dict(load_file("{EXAMPLE_FIXTURES / 'backbone.safetensors'}"), strict=True)
backbone.eval()
head = TagScorer()
head.load_state_dict(torch.load(__file__.rsplit("/", 2)[0] + "/weights/tags.pth", weights_only=True), strict=True)
head.eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=backbone))


def _logits(image):
    with torch.inference_mode():
        pixels = transform(image.convert("RGB")).unsqueeze(0)
        return head(backbone.forward_head(backbone.forward_features(pixels), pre_logits=True))[0]


def predict(image):
    return torch.sigmoid(_logits(image)).tolist()


def predict_logits(image):
    return _logits(image).tolist()


def predict_calibrated(image):
    return torch.sigmoid(_logits(image) / 2.0).tolist()
'''

POST = '''
import numpy as np


def calibrate(logits):
    return 1.0 / (1.0 + np.exp(-logits / 2.0))
'''

CANDIDATES = '''
[candidates.app]
python = "deploy/app.py:predict"
postprocess = "sigmoid"

[candidates.logits]
python = "deploy.app:predict_logits"

[candidates.calibrated]
python = "deploy/app.py:predict_calibrated"
postprocess = "deploy.post:calibrate"
'''


def _base_spec(repo: Path) -> str:
    """The example spec's backbone and preprocessing, with the user's head and fixtures (relative paths)."""
    text = EXAMPLE_SPEC.read_text().replace('"../fixtures/clip_dnn/backbone.safetensors"',
                                            f'"{EXAMPLE_FIXTURES / "backbone.safetensors"}"')
    text = text.replace('fixtures = "../fixtures/clip_dnn"', 'fixtures = "fixtures/tags"')
    text = text.replace('class = "reference.models:MultiLabelRegressionNN"', 'class = "mlcore.heads:TagScorer"')
    text = text.replace('weights = "../fixtures/clip_dnn/dnnV1_model_best.pth"', 'weights = "weights/tags.pth"')
    head_kwargs = next(line for line in text.splitlines() if line.startswith("kwargs = { embedding_dim"))
    text = text.replace(head_kwargs, "kwargs = {}").replace("threshold = 0.0", "threshold = 0.5")
    return text.split("[matrix]")[0].replace('name = "clip_dnn"', 'name = "tags"')


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A user's repository: package, weights, deploy app, a frozen fixture and a three-candidate spec."""
    root = tmp_path_factory.mktemp("user_repo")
    (root / "mlcore").mkdir()
    (root / "mlcore" / "__init__.py").write_text("")
    (root / "mlcore" / "heads.py").write_text(HEADS)
    (root / "deploy").mkdir()
    (root / "deploy" / "app.py").write_text(APP)
    (root / "deploy" / "post.py").write_text(POST)
    (root / "weights").mkdir()
    (root / "parity.toml").write_text(_base_spec(root) + CANDIDATES)
    spec = load_spec(root / "parity.toml")  # imports mlcore from the spec's folder from now on
    from mlcore.heads import TagScorer

    torch.manual_seed(3)
    head = TagScorer().train()
    with torch.no_grad():
        for _ in range(3):  # non-default BatchNorm statistics
            head(torch.randn(16, 64))
    torch.save(head.eval().state_dict(), root / "weights" / "tags.pth")

    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline

    reference = load_fixture(EXAMPLE_FIXTURES)
    images = [row.image for row in reference.rows[:4]]
    capture_pipeline(build_pipeline(spec), images, root / "fixtures" / "tags", golden=[images[0].name])
    return root


@pytest.mark.parametrize("name", ["app", "logits", "calibrated"])
def test_each_named_candidate_passes(repo: Path, name: str):
    spec = select_candidate(load_spec(repo / "parity.toml"), name, base=repo)
    report = run_check(spec)
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]
    assert spec.candidate.name == name


def test_the_spec_built_pipeline_imports_the_head_from_the_spec_folder(repo: Path):
    assert run_check(load_spec(repo / "parity.toml")).passed


def test_a_sigmoid_app_fails_without_postprocess_and_passes_with_the_proposed_toml(repo: Path):
    spec = select_candidate(load_spec(repo / "parity.toml"), "app", base=repo)
    undeclared = dataclasses.replace(spec, candidate=dataclasses.replace(spec.candidate, postprocess="none"))
    report = run_check(undeclared)
    assert not report.passed
    assert report.stage("head").status.name == "PASS"  # the head itself gives logits, as trained
    findings = [f for f in report.stage("outputs").findings if f.detector == "outputs.sigmoid"]
    assert findings and findings[0].spec_fix == '[candidate]\npostprocess = "sigmoid"'

    fixed = repo / "fixed.toml"
    fixed.write_text(_base_spec(repo) + findings[0].spec_fix + '\npython = "deploy/app.py:predict"\n')
    report = run_check(load_spec(fixed))
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]


def test_kind_target_takes_the_options_of_the_matching_table(repo: Path):
    spec = load_spec(repo / "parity.toml")
    chosen = select_candidate(spec, "python:deploy/app.py:predict", base=repo).candidate
    assert (chosen.name, chosen.postprocess) == ("app", "sigmoid")
    assert chosen.target == f"{repo / 'deploy' / 'app.py'}:predict" and chosen.python_path == repo
    # No table of that kind: a [candidate] holding only options gives them.
    options = repo / "options.toml"
    options.write_text(_base_spec(repo) + '[candidate]\noutput_key = "scores"\npostprocess = "softmax"\n')
    only_options = load_spec(options)
    assert only_options.candidate.kind == "spec"
    chosen = select_candidate(only_options, "url:http://127.0.0.1:9/predict", base=repo).candidate
    assert (chosen.kind, chosen.output_key, chosen.postprocess) == ("url", "scores", "softmax")


def test_cli_selects_a_named_candidate_and_refuses_an_unknown_one(repo: Path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert main(["check", "--spec", "parity.toml", "--candidate", "calibrated"]) == 0
    assert main(["check", "--spec", "parity.toml", "--candidate", "python:deploy/app.py:predict"]) == 0
    capsys.readouterr()
    assert main(["check", "--spec", "parity.toml", "--candidate", "staging"]) == 2
    err = capsys.readouterr().err
    assert "'staging'" in err and "app, logits, calibrated" in err


@pytest.mark.parametrize("value, accepted", [
    ('"tanh"', "none, sigmoid, softmax, log_softmax"),
    ('"deploy/post.py"', "module:function"),
    ("1", "must be str"),
])
def test_a_bad_postprocess_is_exit_2_naming_the_accepted_values(repo: Path, capsys, value: str, accepted: str):
    bad = repo / "bad.toml"
    bad.write_text(_base_spec(repo) + f'[candidate]\npython = "deploy.app:predict"\npostprocess = {value}\n')
    assert main(["check", "--spec", str(bad)]) == 2
    assert accepted in capsys.readouterr().err


def test_candidate_tables_refuse_unknown_fields_listing_the_accepted_ones(repo: Path):
    bad = repo / "typo.toml"
    bad.write_text(_base_spec(repo) + '[candidate]\noutput_kee = "scores"\n')
    accepted = r"Accepted fields in \[candidate\]: api_name, batch"
    with pytest.raises(SpecError, match=r"Did you mean 'output_key'\?.*" + accepted):
        load_spec(bad)
    bad.write_text(_base_spec(repo) + '[candidates.x]\noutput_key = "scores"\n')
    with pytest.raises(SpecError, match=r"\[candidates.x\] names no kind"):
        load_spec(bad)


def test_fixture_directories_ignore_their_staging_and_lock_files(repo: Path):
    fixture = repo / "fixtures" / "tags"
    assert ".manifest.json.*" in (fixture / ".gitignore").read_text()
    beside = (repo / "fixtures" / ".gitignore").read_text().splitlines()
    assert {"/.tags.previous/", "/.tags.lock", "/.tags.tmp-*/"} <= set(beside)
    assert ".gitignore" not in json.loads((fixture / MANIFEST).read_text())["files"]
    load_fixture(fixture)  # not refused for a file the manifest does not list
    from parity.store.fixtures import check_replaceable

    check_replaceable(fixture)  # --force may still replace it


def test_pytest_gates_every_spec_of_a_multi_line_ini_and_every_candidate(repo: Path, pytester: pytest.Pytester):
    single = repo / "single.toml"
    single.write_text(_base_spec(repo).replace('name = "tags"', 'name = "tags_pipeline"'))
    pytester.makepyfile(test_gate="def test_parity(parity_gate):\n    parity_gate.assert_parity()\n")
    pytester.makeini(textwrap.dedent(f"""\
        [pytest]
        parity_spec =
            {repo / 'parity.toml'}
            {single}
        """))
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=33, skipped=3)  # an app's strict load is not observable: 3 skips
    for prefix in ("tags-app", "tags-logits", "tags-calibrated", "tags_pipeline"):
        result.stdout.fnmatch_lines([f"*test_parity[[]{prefix}-outputs[]] PASSED*", f"*[[]{prefix}-gate[]] PASSED*"])


def test_a_spec_with_named_candidates_is_written_out_as_the_toml_that_loads_it(repo: Path):
    """What diagnosis pastes its fixes into (`parity.spec_toml`) keeps every candidate table."""
    import tomllib

    from parity.spec import parse_spec
    from parity.spec_toml import render_document, render_spec

    spec = load_spec(repo / "parity.toml")
    again = parse_spec(tomllib.loads(render_document(render_spec(spec))), path=spec.path)
    assert again == spec and sorted(again.candidates) == ["app", "calibrated", "logits"]
