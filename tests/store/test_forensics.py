"""Checkpoint forensics: each common cause of a failed strict load is recognised and fixed explicitly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from parity.commands.check import run_check
from parity.store.checkpoints import read_checkpoint, read_state_dict
from parity.errors import CheckpointError
from parity.store.forensics import describe_layers, infer_layers, module_source
from parity.model.pipeline import build_pipeline
from parity.report.console import format_stage
from parity.results import Status
from reference.build_fixtures import HEAD_KWARGS
from reference.models import MultiLabelRegressionNN
from tests.support.paths import EXAMPLE_FIXTURES

HEAD = EXAMPLE_FIXTURES / "dnnV1_model_best.pth"
BACKBONE = EXAMPLE_FIXTURES / "backbone.safetensors"


def trained_head() -> MultiLabelRegressionNN:
    head = MultiLabelRegressionNN(**HEAD_KWARGS)
    head.load_state_dict(read_state_dict(HEAD), strict=True)
    return head


def test_inferred_architecture_of_the_trained_head():
    layers = infer_layers(read_state_dict(HEAD))
    assert [(l.path, l.call) for l in layers] == [
        ("bias_embeddings.0", "Embedding(3, 8)"),
        ("bias_embeddings.1", "Embedding(4, 8)"),
        ("mlp.0", "Linear(80, 128)"),
        ("mlp.1", "LayerNorm(128)"),
        ("mlp.4", "Linear(128, 64)"),
        ("mlp.5", "LayerNorm(64)"),
        ("output", "Linear(64, 5)"),
    ]
    words = describe_layers(layers)
    # The first Linear's input width, split into the embedding and the concatenated bias embeddings.
    assert any("(mlp.0) takes 80 = 64 (embedding) + 2 x 8 (bias embeddings" in line for line in words), words


@pytest.mark.parametrize("path", [HEAD, BACKBONE], ids=["head", "backbone"])
def test_generated_module_loads_the_checkpoint_strictly(path):
    namespace: dict = {}
    exec(module_source(infer_layers(read_state_dict(path))), namespace)
    namespace["InferredModule"]().load_state_dict(read_state_dict(path), strict=True)


def test_seed_scenario_simplified_head_names_the_missing_bias_embeddings(example_spec):
    report = run_check(example_spec.replace(head={"class_path": "tests.support.heads:CustomDNN", "kwargs": {}}))
    (diff,) = report.stage("load").key_diffs
    assert not diff.fix.verified
    (lacking,) = [c.partition("the module lacks: ")[2] for c in diff.fix.causes if "the module lacks: " in c]
    assert lacking.split(", ") == ["bias_embeddings.0", "bias_embeddings.1", "mlp.0", "mlp.1", "mlp.4", "mlp.5",
                                   "output"]
    text = format_stage(report.stage("load"))
    assert "The checkpoint's architecture, inferred from its tensors:" in text
    assert "bias_embeddings.0: Embedding(3, 8)" in text and "mlp.0: Linear(80, 128)" in text


def _dataparallel(head):
    return nn.DataParallel(head).state_dict()


def _compiled(head):
    return torch.compile(head).state_dict()


def _training_checkpoint(head):
    optimizer = torch.optim.Adam(head.parameters())
    return {"state_dict": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7}


def _timm_ema(head):
    return {"state_dict": head.state_dict(), "state_dict_ema": head.state_dict(), "epoch": 7}


def _averaged_model(head):
    return torch.optim.swa_utils.AveragedModel(head, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99)).state_dict()


def _lightning_style(head):
    return {"model." + k: v for k, v in head.state_dict().items()}


def _renamed(head):
    return {k.replace("output.", "fc_out."): v for k, v in head.state_dict().items()}


@pytest.mark.parametrize(("save", "cause", "toml"), [
    pytest.param(_dataparallel, "saved from nn.DataParallel / DistributedDataParallel (every key starts with 'module.')",
                 ['key_map = { "module." = "" }'], id="DataParallel"),
    pytest.param(_compiled, "saved from a torch.compile'd module (every key starts with '_orig_mod.')",
                 ['key_map = { "_orig_mod." = "" }'], id="torch.compile"),
    pytest.param(_lightning_style, "saved from a training wrapper that holds the network as `model` "
                 "(every key starts with 'model.')", ['key_map = { "model." = "" }'], id="model-wrapper"),
    pytest.param(_training_checkpoint, "the weights are nested under 'state_dict' in a training checkpoint "
                 "(other entries: ['epoch', 'optimizer'])", ['state_dict_key = "state_dict"'], id="nested"),
    pytest.param(_timm_ema, "'state_dict_ema' holds EMA weights: use state_dict_key = \"state_dict_ema\" instead if "
                 "the model was evaluated with its EMA copy", ['state_dict_key = "state_dict"'], id="timm-EMA"),
    pytest.param(_averaged_model, "saved from torch.optim.swa_utils.AveragedModel (EMA/SWA weights), which holds "
                 "the network as 'module.'", ['key_map = { "module." = "" }', 'drop_keys = ["n_averaged"]'], id="AveragedModel-EMA"),
    pytest.param(_renamed, "layers were renamed; they match one-to-one by tensor names and shapes: fc_out -> output",
                 ['key_map = { "fc_out." = "output." }'], id="renamed"),
])
def test_cause_is_recognised_and_the_proposed_fix_loads_strictly(example_spec, tmp_path, save, cause, toml):
    path = tmp_path / "head.pth"
    torch.save(save(trained_head()), path)
    spec = example_spec.replace(head={"weights": path})
    report = run_check(spec)
    load = report.stage("load")
    assert load.status is Status.FAIL
    fix = load.key_diffs[0].fix
    assert cause in fix.causes and fix.verified and fix.spec_lines == toml
    assert "Fix: add to [head] in the spec (loading stays strict=True):" in format_stage(load)

    fixed = run_check(spec.replace(head={"state_dict_key": fix.state_dict_key, "key_map": dict(fix.key_map),
                                         "drop_keys": fix.drop_keys}))
    assert fixed.passed, format_stage(fixed.first_failure)
    assert fixed.stage("weights").status is Status.PASS
    shown = f"key_map {dict(fix.key_map)}" if fix.key_map else f"state_dict_key {fix.state_dict_key!r}"
    assert shown in fixed.stage("load").headline, "the explicit mapping is shown in the report"


def test_head_from_another_training_run_fails_the_weights_stage(example_spec, tmp_path):
    other = trained_head()
    with torch.no_grad():
        other.output.bias.add_(0.01)
    path = tmp_path / "other_run.pth"
    torch.save(other.state_dict(), path)
    report = run_check(example_spec.replace(head={"weights": path}))
    weights = report.stage("weights")
    assert weights.status is Status.FAIL and weights.headline == "1 of 45 tensors differ from the trained weights"
    (diff,) = weights.tensor_diffs
    assert (diff.part, diff.name) == ("head", "output.bias") and diff.max_abs == pytest.approx(0.01, rel=1e-4)
    assert report.stage("head").status is Status.FAIL


def test_half_precision_checkpoint_is_listed_as_a_dtype_difference(example_spec, tmp_path, capsys):
    from parity.cli import main

    path = tmp_path / "fp16.pth"
    torch.save({k: v.half() for k, v in read_state_dict(HEAD).items()}, path)
    assert main(["inspect", str(path), "--class", "reference.models:MultiLabelRegressionNN",
                 "--kwargs", '{"embedding_dim": 64, "bias_cardinalities": [3, 4], "num_outputs": 5}']) == 0
    assert "note: output.weight is float16 in the checkpoint, float32 in the module (cast on load)" in capsys.readouterr().out
    assert run_check(example_spec.replace(head={"weights": path})).stage("weights").status is Status.FAIL


def test_relu_for_gelu_in_the_head_is_a_structure_difference(example_spec):
    report = run_check(example_spec.replace(head={"class_path": "tests.support.heads:ReluRegressionNN"}))
    assert report.stage("load").status is Status.PASS and report.stage("head").status is Status.FAIL
    fields = {d.field: (d.reference, d.candidate) for d in report.config_diffs}
    assert fields["head.structure.mlp.2"] == ("GELU", "ReLU")


def to_openai_clip(state: dict) -> dict:
    """timm ViT-CLIP keys → OpenAI/open_clip `visual.*` keys (the inverse of timm's filter)."""
    swaps = [("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
             ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")]
    out = {}
    for key, value in state.items():
        if key == "head.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "cls_token":
            out["visual.class_embedding"] = value[0, 0]
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key.startswith("norm."):
            out["visual.ln_post." + key[5:]] = value
        elif key != "head.bias":
            for old, new in swaps:
                key = key.replace(old, new)
            out["visual." + key] = value
    return out


def test_open_clip_format_backbone_loads_through_timms_filter(example_spec, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "openai_visual.safetensors"
    save_file(to_openai_clip(read_state_dict(BACKBONE)), str(path))
    spec = example_spec.replace(backbone={"checkpoint": path})
    assert "visual.conv1.weight" in run_check(spec).stage("load").key_diffs[0].unexpected
    assert run_check(spec.replace(backbone={"checkpoint_format": "open_clip"})).passed


def test_open_clip_checkpoint_for_another_input_size_is_refused(example_spec, tmp_path):
    from safetensors.torch import save_file

    state = to_openai_clip(read_state_dict(BACKBONE))
    state["visual.positional_embedding"] = state["visual.positional_embedding"][:257]  # a 224 px model
    path = tmp_path / "openai_224.safetensors"
    save_file(state, str(path))
    spec = example_spec.replace(backbone={"checkpoint": path, "checkpoint_format": "open_clip"})
    with pytest.raises(CheckpointError, match="position embeddings have 257 tokens, the model 577"):
        build_pipeline(spec)


def test_old_pickle_with_numpy_scalars_explains_weights_only(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"state_dict": trained_head().state_dict(), "best_score": np.float64(0.93)}, path)
    with pytest.raises(CheckpointError, match="since torch 2.6 torch.load defaults to weights_only=True"):
        read_checkpoint(path)


def test_inspect_cli_against_a_spec(tmp_path, capsys):
    from parity.cli import main
    from tests.support.specs import write_spec

    path = tmp_path / "dp.pth"
    torch.save(_dataparallel(trained_head()), path)
    spec = write_spec(tmp_path, {str(HEAD): str(path)})
    assert main(["inspect", str(path), "--against", str(spec)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "12 tensors, 19,389 parameters" in out
    assert 'Fix: add to [head] in the spec (loading stays strict=True): key_map = { "module." = "" }' in out


def test_diff_structure_cli(tmp_path, capsys):
    from parity.cli import main
    from tests.support.specs import write_spec

    assert main(["diff-structure", "--spec", str(write_spec(tmp_path))]) == 0
    relu = write_spec(tmp_path, {"reference.models:MultiLabelRegressionNN": "tests.support.heads:ReluRegressionNN"},
                      name="relu.toml")
    assert main(["diff-structure", "--spec", str(relu)]) == 1
    assert "head.mlp.2: 'GELU' -> 'ReLU'" in capsys.readouterr().out


class TablesFirstHead(torch.nn.Module):
    """A user head (not reference/models.py): categorical tables named without "emb", listed first."""

    def __init__(self) -> None:
        super().__init__()
        self.country = torch.nn.Embedding(2, 8)
        self.device_kind = torch.nn.Embedding(6, 8)
        self.fc1 = torch.nn.Linear(64 + 16, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        self.out = torch.nn.Linear(64, 3, bias=False)


def test_embedding_tables_listed_before_the_linear_layers_are_read_as_tables(tmp_path, capsys):
    from parity.cli import main

    state = TablesFirstHead().state_dict()
    layers = infer_layers(state)
    assert [(l.path, l.call) for l in layers] == [
        ("country", "Embedding(2, 8)"),
        ("device_kind", "Embedding(6, 8)"),
        ("fc1", "Linear(80, 128)"),
        ("fc2", "Linear(128, 64)"),
        ("out", "Linear(64, 3, bias=False)"),  # a final bias-free projection stays a Linear
    ]
    words = describe_layers(layers)
    assert any("(fc1) takes 80 = 64 (embedding) + 2 x 8 (bias embeddings" in line for line in words), words
    assert "hidden widths [128, 64], 3 output(s) from out" in words
    namespace: dict = {}
    exec(module_source(layers), namespace)
    namespace["InferredModule"]().load_state_dict(state, strict=True)
    path = tmp_path / "head.pth"
    torch.save(state, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Embedding(2, 8)" in out and "Linear(8, 2" not in out and "input width 8" not in out


def test_a_bias_free_linear_that_feeds_the_next_layer_stays_a_linear():
    head = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    assert [l.call for l in infer_layers(head.state_dict())] == ["Linear(64, 32, bias=False)", "Linear(32, 5)"]
