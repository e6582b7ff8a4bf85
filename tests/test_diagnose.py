"""Diagnosis on the bundled example: each injected drift's true cause ranks first and its fix restores parity."""

from __future__ import annotations

import pytest
import torch

from parity.check import run_check
from parity.checkpoints import read_state_dict
from parity.diagnose import diagnose, first_divergent_layer
from parity.pipeline import build_pipeline
from tests.conftest import EXAMPLE_FIXTURES

HEAD = EXAMPLE_FIXTURES / "dnnV1_model_best.pth"
QUICKGELU = "vit_large_patch14_clip_quickgelu_336.openai"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """The head from another training run: same architecture, slightly different weights."""
    state = read_state_dict(HEAD)
    state["output.bias"] = state["output.bias"] + 0.01
    path = tmp_path_factory.mktemp("other_run") / "dnnV1_model_best.pth"
    torch.save(state, path)
    return path


DRIFTS = {
    "interpolation": ({"preprocess": {"interpolation": "bilinear"}}, '[preprocess].interpolation = "bicubic"'),
    "crop_pct": ({"preprocess": {"crop_pct": 0.875}}, "[preprocess].crop_pct = 1.0"),
    "resize-size": ({"preprocess": {"input_size": (3, 224, 224)}}, "[preprocess].input_size = [3, 336, 336]"),
    "mean-std-preset": ({"preprocess": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}},
                        "[preprocess].mean = [0.48145466, 0.4578275, 0.40821073]; "
                        "[preprocess].std = [0.26862954, 0.26130258, 0.27577711]"),
    "bgr": ({"preprocess": {"channel_order": "bgr"}}, '[preprocess].channel_order = "rgb"'),
    "resize-backend": ({"preprocess": {"resize_backend": "tensor"}}, '[preprocess].resize_backend = "pil"'),
    "extraction-mode": ({"backbone": {"extract": "forward"}}, '[backbone].extract = "pre_logits"'),
    "gelu-for-quickgelu": ({"backbone": {"model": "vit_large_patch14_clip_336.openai"}},
                           f'[backbone].model = "{QUICKGELU}"'),
    "float16": ({"runtime": {"dtype": "float16"}}, '[runtime].dtype = "float32"'),
    "bfloat16": ({"runtime": {"dtype": "bfloat16"}}, '[runtime].dtype = "float32"'),
    "exif-ignored": ({"preprocess": {"exif_transpose": False}}, "[preprocess].exif_transpose = true"),
    "input-biases-order": ({"head": {"input_biases_order": (1, 0)}}, "remove [head].input_biases_order"),
    "l2-one-side": ({"backbone": {"normalize": "l2"}}, '[backbone].normalize = "none"'),
}


@pytest.mark.parametrize(("change", "fix"), DRIFTS.values(), ids=DRIFTS.keys())
def test_true_cause_ranks_first_and_its_fix_restores_parity(example_spec, change, fix):
    candidate = example_spec.replace(**change)
    assert not run_check(candidate).passed, "the injected drift must fail the gate"
    result = diagnose(candidate)
    assert result.causes[0].change.toml() == fix
    assert result.causes[0].reproduces and result.causes[0].after < result.causes[0].before
    assert [c.toml() for c in result.fix] == [fix] and result.confirmed
    assert run_check(result.fix[0].apply(candidate)).passed


def test_head_from_another_training_run(example_spec, other_run):
    result = diagnose(example_spec.replace(head={"weights": other_run}))
    assert result.causes[0].change.origin == "the trained weights' fingerprints"
    assert result.causes[0].change.toml() == f'[head].weights = "{HEAD}"'
    assert result.confirmed


def test_clean_candidate_has_no_drift_and_no_invented_causes(example_spec):
    result = diagnose(example_spec)
    assert not result.drift and result.causes == () and result.fix == ()


def test_exif_drift_is_reported_per_sample(example_spec):
    result = diagnose(example_spec.replace(preprocess={"exif_transpose": False}))
    assert result.affected == ("chelsea_exif_rotated.png",)
    assert result.pattern == "only images with an EXIF orientation tag drift (all of them)"


def test_activation_swap_is_localised_to_the_first_activation(example_spec):
    result = diagnose(example_spec.replace(backbone={"model": "vit_large_patch14_clip_336.openai"}))
    assert result.layer.module == "blocks.0.mlp.act"


def test_first_divergent_layer_is_none_for_identical_models(example_spec):
    pipeline = build_pipeline(example_spec)
    pixels = torch.stack([pipeline.preprocess(EXAMPLE_FIXTURES / "images" / "chelsea.png")])
    assert first_divergent_layer(pipeline.backbone, pipeline.backbone, pixels) is None


def test_strict_load_failure_is_diagnosed_with_the_key_fix(example_spec, tmp_path):
    from torch import nn

    from reference.build_fixtures import HEAD_KWARGS
    from reference.models import MultiLabelRegressionNN

    head = MultiLabelRegressionNN(**HEAD_KWARGS)
    head.load_state_dict(read_state_dict(HEAD))
    path = tmp_path / "dp.pth"
    torch.save(nn.DataParallel(head).state_dict(), path)
    result = diagnose(example_spec.replace(head={"weights": path}))
    assert result.fix[0].toml() == '[head].key_map = { "module." = "" }'
    assert result.confirmed


def test_diagnose_cli(tmp_path, capsys):
    from parity.cli import main
    from tests.conftest import write_spec

    spec = write_spec(tmp_path, {'channel_order = "rgb"': 'channel_order = "bgr"'})
    assert main(["diagnose", "--spec", str(spec), "--json", str(tmp_path / "d.json")]) == 1
    out = capsys.readouterr().out
    assert '1. [preprocess].channel_order = "rgb" (the spec has "bgr")' in out
    assert "Fix (confirmed: parity check passes with it):" in out
    import json

    assert json.loads((tmp_path / "d.json").read_text())["fix_toml"] == ['[preprocess].channel_order = "rgb"']


def _log_service(spec, path, *, rows=6, embedding=True, outputs=True, csv=False):
    """Write what a service running ``spec`` would log for the first ``rows`` example images."""
    import csv as csv_module
    import json

    from parity.fixtures import load_fixture

    pipeline = build_pipeline(spec)
    records = []
    for row in load_fixture(EXAMPLE_FIXTURES).rows[:rows]:
        record = {"image": str(row.image.resolve()), "input_biases": list(row.input_biases)}
        emb = pipeline.embed(torch.stack([pipeline.preprocess(row.image)]))
        if embedding:
            record["embedding"] = emb[0].tolist()
        if outputs:
            record["outputs"] = pipeline.run_head(emb, [row.input_biases])[0].tolist()
        records.append(record)
    if csv:
        with open(path, "w", newline="") as f:
            writer = csv_module.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_service_log_from_the_spec_pipeline_matches(example_spec, tmp_path):
    from parity.diagnose import diagnose_logged

    result = diagnose_logged(example_spec, _log_service(example_spec, tmp_path / "service.jsonl"))
    assert result.matches and result.compared == ("embedding", "outputs")


@pytest.mark.parametrize(("change", "reproduced_by", "kind"), [
    ({"preprocess": {"interpolation": "bilinear"}}, '[preprocess].interpolation = "bilinear"', "jsonl"),
    ({"preprocess": {"channel_order": "bgr"}}, '[preprocess].channel_order = "bgr"', "csv-outputs-only"),
])
def test_service_log_names_the_configuration_the_service_runs(example_spec, tmp_path, change, reproduced_by, kind):
    from parity.diagnose import diagnose_logged

    csv = kind.startswith("csv")
    log = _log_service(example_spec.replace(**change), tmp_path / f"service.{'csv' if csv else 'jsonl'}",
                       embedding=not csv, csv=csv)
    result = diagnose_logged(example_spec, log)
    assert not result.matches
    assert [c.toml() for c in result.reproduced_by] == [reproduced_by] and result.reproduced


@pytest.mark.parametrize(("content", "message"), [
    ('{"image": "nope.png", "outputs": [1.0]}\n', "image"),
    ('{"image": "%s", "outputs": [1.0]}\n{"image": "%s", "outputs": [1.0, 2.0]}\n', "line 2: 'outputs' has 2 values, but the first line has 1"),
    ('{"image": "%s", "outputs": [1.0]}\n{"image": "%s"}\n', "line 2: 'outputs' is missing here but logged on line 1"),
    ('{"image": "%s", "outputs": [NaN]}\n', "line 1: 'outputs' holds NaN"),
    ('{"image": "%s"}\n', "log 'embedding' and/or 'outputs' for each sample"),
    ("not json\n", "line 1: not valid JSONL"),
])
def test_bad_service_logs_are_refused_with_the_reason(tmp_path, content, message):
    from parity.errors import FixtureError
    from parity.fixtures import load_logged_samples

    image = str((EXAMPLE_FIXTURES / "images" / "chelsea.png").resolve())
    path = tmp_path / "log.jsonl"
    path.write_text(content.replace("%s", image))
    with pytest.raises(FixtureError, match=message):
        load_logged_samples(path)


def test_diagnose_cli_with_a_service_log(example_spec, tmp_path, capsys):
    from parity.cli import main
    from tests.conftest import EXAMPLE_SPEC

    log = _log_service(example_spec.replace(preprocess={"interpolation": "bilinear"}), tmp_path / "s.jsonl")
    assert main(["diagnose", "--spec", str(EXAMPLE_SPEC), "--logged", str(log)]) == 1
    assert '[preprocess].interpolation = "bilinear" (the spec has "bicubic")' in capsys.readouterr().out
