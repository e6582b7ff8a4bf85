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
    assert '1. [preprocess].channel_order = "rgb" (candidate: "bgr")' in out
    assert "Fix (confirmed: parity check passes with it):" in out
    import json

    assert json.loads((tmp_path / "d.json").read_text())["fix_toml"] == ['[preprocess].channel_order = "rgb"']
