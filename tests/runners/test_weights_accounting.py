"""Every trained tensor accounted for: the weights stage of the app runners finds each one in the modules the
shipped code runs, by name or by content, and names what is missing or was rounded to another dtype.

The fixture is this file's own: a head with bias tables and BatchNorm (not the bundled example's
architecture), captured over three of the example images on the example's shrunk backbone. The
shipped code is an Inference Endpoints handler written here, in several variants.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from parity.commands.check import judge_run
from parity.numerics.emulate import gate_budgets
from parity.judge.stages import compare_run
from parity.store.fixtures import load_fixture
from parity.model.pipeline import build_pipeline
from parity.results import CandidateRun, Status
from parity.runners import run_candidate
from parity.commands.capture import capture_pipeline
from parity.spec import CandidateSpec, load_spec
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import write_spec

WIDTH = 64
# The spec names this module's head by its import path, whatever folder the module is in.
HEAD_CLASS = f"{__name__}:TagHead"


class TagHead(nn.Module):
    """Bias tables, then Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, embedding_dim: int = WIDTH, cardinalities: tuple[int, ...] = (3, 4), hidden: int = 32,
                 num_outputs: int = 5) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, 4) for n in cardinalities)
        self.fc1 = nn.Linear(embedding_dim + 4 * len(cardinalities), hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_outputs)

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        looked_up = [table(input_biases[:, i]) for i, table in enumerate(self.tables)]
        return self.fc2(torch.relu(self.bn(self.fc1(torch.cat([embedding, *looked_up], dim=1)))))


TRAINED_NAMES = ["tables.0.weight", "tables.1.weight", "fc1.weight", "fc1.bias", "bn.weight", "bn.bias",
                 "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "fc2.weight", "fc2.bias"]


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """(spec, fixture folder, trained head file): TagHead trained a little, frozen over three images."""
    folder = tmp_path_factory.mktemp("taghead")
    torch.manual_seed(3)
    head = TagHead().train()
    with torch.no_grad():
        for _ in range(3):  # moves BatchNorm's running statistics off their initial values
            head(torch.randn(16, WIDTH), torch.stack([torch.randint(0, 3, (16,)), torch.randint(0, 4, (16,))], 1))
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))  # and the affine weights off ones and zeros
    weights = folder / "taghead.pth"
    torch.save(head.eval().state_dict(), weights)
    spec = load_spec(write_spec(folder, {
        'class = "reference.models:MultiLabelRegressionNN"': f'class = "{HEAD_CLASS}"',
        f'weights = "{EXAMPLE_FIXTURES}/dnnV1_model_best.pth"': f'weights = "{weights}"',
        "kwargs = { embedding_dim = 64, bias_cardinalities = [3, 4], num_outputs = 5, bias_dim = 8, "
        "hidden_dims = [128, 64], dropout = 0.1 }": "kwargs = {}",
    }))
    reference = load_fixture(EXAMPLE_FIXTURES)
    rows = [reference.rows[i] for i in (1, 2, 4)]
    out = capture_pipeline(build_pipeline(spec), [r.image for r in rows], folder / "fixture",
                           input_biases=[r.input_biases for r in rows], golden=[rows[1].image.name])
    return spec, out, weights


# The service's handler: the backbone loaded strictly, the head declared here with layer names to choose.
HANDLER = '''from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T

BACKBONE = Path({backbone!r})
HEAD = Path({head!r})


class Scorer(nn.Module):
    def __init__(self):
        super().__init__()
        self.{tables} = nn.ModuleList([nn.Embedding(3, 4), nn.Embedding(4, 4)])
        self.{fc1} = nn.Linear(72, {hidden})
        self.{bn} = nn.BatchNorm1d({hidden})
        self.{fc2} = nn.Linear({hidden}, 5)

    def forward(self, embedding, input_biases):
        looked_up = [table(input_biases[:, i]) for i, table in enumerate(self.{tables})]
        return self.{fc2}(torch.relu(self.{bn}(self.{fc1}(torch.cat([embedding, *looked_up], dim=1)))))


class EndpointHandler:
    def __init__(self, path=""):
        self.encoder = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                                         embed_dim=64, depth=2, num_heads=2)
        self.encoder.load_state_dict(load_file(BACKBONE), strict=True)
        self.encoder.eval(){encoder_cast}
        self.scorer = Scorer()
        state = torch.load(HEAD, weights_only=True)
        self.scorer.load_state_dict({state}, strict={strict})
        self.scorer.eval(){scorer_cast}
        self.prepare = T.Compose([T.Resize(336, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(336),
                                  T.ToTensor(), T.Normalize([0.48145466, 0.4578275, 0.40821073],
                                                            [0.26862954, 0.26130258, 0.27577711])])

    @torch.inference_mode()
    def __call__(self, data):
        pixels = self.prepare(data["inputs"].convert("RGB"))[None].to(next(self.encoder.parameters()).dtype)
        embedding = self.encoder.forward_head(self.encoder.forward_features(pixels), pre_logits=True)
        biases = torch.tensor([data["parameters"]["input_biases"]])
        scores = self.scorer(embedding.to(next(self.scorer.parameters()).dtype), biases)
        return scores[0].float().tolist()
'''
TRAINED_LAYERS = {"tables": "tables", "fc1": "fc1", "bn": "bn", "fc2": "fc2"}
RENAMED_LAYERS = {"tables": "lookups", "fc1": "project", "bn": "norm", "fc2": "classify"}


def _gate(tmp_path, captured, *, layers=TRAINED_LAYERS, state="state", strict=True, hidden=32, encoder_cast="",
          scorer_cast="", dtype="float32"):
    """Write the handler variant, gate it on the captured fixture: (report, run, handler path)."""
    spec, out, weights = captured
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER.format(backbone=str(EXAMPLE_FIXTURES / "backbone.safetensors"), head=str(weights),
                                      state=state, strict=strict, hidden=hidden, encoder_cast=encoder_cast,
                                      scorer_cast=scorer_cast, **layers))
    spec = dataclasses.replace(spec, candidate=CandidateSpec(kind="endpoint_handler", target=str(handler)),
                               runtime=dataclasses.replace(spec.runtime, dtype=dtype))
    fixture = load_fixture(out)
    run = run_candidate(spec, fixture)
    return judge_run(run, fixture, spec), run, handler


def _line(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_the_clean_handler_accounts_for_every_trained_tensor(tmp_path, captured):
    report, run, _ = _gate(tmp_path, captured)
    assert report.passed, [(s.stage, s.headline) for s in report.stages]
    weights = report.stage("weights")
    assert weights.headline == f"{33 + len(TRAINED_NAMES)} tensors bit-identical to the trained weights"
    assert not weights.findings


def test_a_head_redeclared_with_renamed_layers_and_loaded_non_strictly_fails_naming_every_trained_tensor(
        tmp_path, captured):
    report, run, handler = _gate(tmp_path, captured, layers=RENAMED_LAYERS, strict=False)
    weights = report.stage("weights")
    assert weights.status is Status.FAIL and report.first_failure.stage == "weights"
    # The headline: how many trained tensors are missing, the first of them and of the head's own, where the head
    # is, and that it was loaded non-strictly.
    missing, declared = weights.headline.split("; the head declares ", 1)
    assert missing.startswith(f"{len(TRAINED_NAMES)} trained tensors are not in the deployed head")
    assert "tables.0.weight" in missing and f"({len(TRAINED_NAMES)} in all)" in missing
    assert "lookups.0.weight" in declared and "handler.scorer" in declared and "class Scorer" in declared
    assert "strict=False" in declared
    assert sorted(d.name for d in weights.tensor_diffs) == sorted(TRAINED_NAMES)
    (finding,) = weights.findings
    assert finding.detector == "weights.unaccounted" and finding.stage == "weights"
    assert finding.fix.startswith("Change the shipped code: ")
    assert "strict=True" in finding.fix and HEAD_CLASS in finding.fix
    renames = finding.fix.rpartition(": ")[2].split(", ")
    assert renames == ["lookups.0 -> tables.0", "lookups.1 -> tables.1", "project -> fc1", "norm -> bn",
                       "classify -> fc2"]
    assert "renamed" in finding.evidence and "one-to-one" in finding.evidence
    assert finding.where == f"handler.py:{_line(handler, 'scores = self.scorer(')} in __call__"
    assert finding.fix not in weights.notes  # a finding says its fix once, rendered with the finding
    assert not any("deploy the head checkpoint" in note for note in weights.notes)
    # The renamed head is still the head the hooks watch: its stage fails on the reference embeddings.
    assert run.description["candidate"]["head_recognised_by"] == "tensor shapes"
    assert report.stage("embedding").status is Status.PASS and report.stage("head").status is Status.FAIL


def test_a_head_of_another_architecture_loaded_non_strictly_names_what_is_reachable(tmp_path, captured):
    """No module has the trained head's names or shapes: the tensors are in no module the code runs."""
    report, run, _ = _gate(tmp_path, captured, layers=RENAMED_LAYERS, hidden=16, state="{}", strict=False)
    weights = report.stage("weights")
    assert weights.status is Status.FAIL
    assert "head_module" not in run.description["candidate"]
    (finding,) = weights.findings
    assert finding.detector == "weights.unaccounted"
    assert finding.cause.startswith(f"{len(TRAINED_NAMES)} trained head tensors are in no module")
    assert "tables.0.weight" in finding.cause and "fc1.weight" in finding.cause
    # What is reachable instead is named, so the user sees which module they deployed.
    reachable = finding.cause.partition("reachable besides: ")[2]
    assert "handler.scorer.lookups.0.weight" in reachable and "handler.scorer.lookups.1.weight" in reachable
    assert finding.fix.startswith("Change the shipped code: ")
    assert HEAD_CLASS in finding.fix and "strict=True" in finding.fix


def test_a_head_renamed_but_loaded_with_its_trained_values_is_found_by_content(tmp_path, captured):
    renamed = ("{k.replace('tables.', 'lookups.').replace('fc1.', 'project.').replace('bn.', 'norm.')"
               ".replace('fc2.', 'classify.'): v for k, v in state.items()}")
    report, run, _ = _gate(tmp_path, captured, layers=RENAMED_LAYERS, state=renamed)
    weights = report.stage("weights")
    assert report.passed, weights
    identical, _, renamed = weights.headline.partition("; ")
    assert identical == f"{33 + len(TRAINED_NAMES)} tensors bit-identical to the trained weights"
    assert renamed.startswith(f"{len(TRAINED_NAMES)} held under other names")
    assert "head.bn.bias as handler.scorer.norm.bias" in renamed


def test_a_half_backbone_is_named_as_a_dtype_change_not_another_checkpoint(tmp_path, captured):
    report, run, handler = _gate(tmp_path, captured, encoder_cast="\n        self.encoder.half()")
    weights = report.stage("weights")
    assert weights.status is Status.FAIL and report.first_failure.stage == "weights"
    assert run.dtypes["backbone"] == "float16"
    (finding,) = weights.findings
    assert finding.detector == "weights.dtype"
    assert "backbone" in finding.cause and "float16" in finding.cause and "`.half()`" in finding.cause
    assert finding.evidence.startswith("33 of 33 backbone tensors") and "rounded to float16" in finding.evidence
    assert 0 < finding.max_abs < 1e-2  # float16 rounding of weights of this size, not a retrained model
    # Both ways out: the shipped code changed back, or the float16 deployment declared.
    assert finding.fix.startswith("Change the shipped code: keep the backbone in float32")
    assert "handler.encoder" in finding.fix and '[runtime].dtype = "float16"' in finding.fix
    assert finding.spec_fix == '[runtime]\ndtype = "float16"'
    assert finding.where == f"handler.py:{_line(handler, 'embedding = self.encoder')} in __call__"
    assert not any("checkpoint the fixture was made with" in note for note in weights.notes), weights.notes
    assert not weights.tensor_diffs


def test_a_float16_deployment_declared_in_the_spec_accounts_for_the_rounded_weights(tmp_path, captured):
    report, _, _ = _gate(tmp_path, captured, encoder_cast="\n        self.encoder.half()", dtype="float16")
    weights = report.stage("weights")
    assert weights.status is Status.PASS, weights
    identical, _, rounded = weights.headline.partition("; ")
    assert identical == f"{len(TRAINED_NAMES)} tensors bit-identical to the trained weights"
    assert rounded.startswith("33 backbone tensors") and "float16" in rounded and "[runtime].dtype" in rounded


def test_a_bfloat16_head_is_named_as_a_dtype_change(tmp_path, captured):
    report, run, _ = _gate(tmp_path, captured, scorer_cast="\n        self.scorer.to(torch.bfloat16)")
    findings = report.stage("weights").findings
    assert [f.detector for f in findings] == ["weights.dtype"]
    assert "head" in findings[0].cause and "bfloat16" in findings[0].cause and "`.bfloat16()`" in findings[0].cause
    # BatchNorm's integer step counter is not cast: 10 of the 11 tensors are rounded.
    assert findings[0].evidence.startswith(f"{len(TRAINED_NAMES) - 1} of {len(TRAINED_NAMES)} head tensors")


def _run(all_fingerprints, fingerprints, **extra) -> CandidateRun:
    return CandidateRun("python", fingerprints=fingerprints, all_fingerprints=all_fingerprints,
                        description={"candidate": {"head_module": "app.head", "libraries": ["timm"]}}, **extra)


def test_the_spec_runner_keeps_comparing_the_parts_it_loaded(captured):
    """No all_fingerprints: a part the record leaves out is not searched for (the spec pipeline loaded it)."""
    spec, out, _ = captured
    fixture = load_fixture(out)
    head = fixture.manifest["weights"]["head"]["tensors"]
    run = CandidateRun("spec", fingerprints={"head": dict(head)})
    weights = compare_run(run, fixture, spec, budgets=gate_budgets(spec, fixture))["weights"]
    assert weights.headline == f"{len(head)} tensors bit-identical to the trained weights"


def test_a_part_no_reachable_module_could_be_is_not_checked_rather_than_failed(captured):
    """A head computed outside torch (or behind a service) leaves only the backbone to account for."""
    spec, out, _ = captured
    fixture = load_fixture(out)
    backbone = {f"app.encoder.{n}": sha for n, sha in fixture.manifest["weights"]["backbone"]["tensors"].items()}
    run = dataclasses.replace(_run(backbone, {"backbone": fixture.manifest["weights"]["backbone"]["tensors"]}),
                              description={"backbone": {"library": "timm"},
                                           "candidate": {"backbone_module": "app.encoder", "libraries": ["timm"]}})
    weights = compare_run(run, fixture, spec, budgets=gate_budgets(spec, fixture))["weights"]
    assert weights.status is Status.PASS
    identical, _, unchecked = weights.headline.partition("; ")
    assert identical == "33 tensors bit-identical to the trained weights"
    assert unchecked.startswith("head not checked") and f"{len(TRAINED_NAMES)} trained tensors" in unchecked


def test_a_backbone_deployed_through_another_library_is_left_to_the_embedding_stage(captured):
    spec, out, _ = captured
    fixture = load_fixture(out)
    head = fixture.manifest["weights"]["head"]["tensors"]
    prints = {f"app.head.{n}": sha for n, sha in head.items()}
    prints.update({"app.vision.embeddings.patch_embedding.weight": "0" * 64})
    run = dataclasses.replace(_run(prints, {"head": dict(head)}), description={
        "candidate": {"head_module": "app.head", "libraries": ["transformers"]}})
    weights = compare_run(run, fixture, spec, budgets=gate_budgets(spec, fixture))["weights"]
    assert weights.status is Status.PASS
    not_compared = weights.headline.partition("backbone not compared: ")[2]
    assert "timm" in not_compared and "transformers" in not_compared
