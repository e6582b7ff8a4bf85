"""The app runners see through the ways apps are written: decorators, closures, callable objects, registries,
lazily built and compiled models, batches; and record what they saw (head inputs, model inputs, module states,
dtypes, every reachable tensor, call sites).

Every app here is written for this file, in other styles than the bundled examples: torchvision
preprocessing, models held in objects, registries and caches. They gate the bundled clip_dnn
fixture on three of its rows (a grayscale and two colour images, all with golden pixels).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest

from parity.commands.check import judge_run
from parity.store.checkpoints import fingerprint
from parity.store.fixtures import load_fixture
from parity.results import Status
from parity.runners import run_candidate
from parity.errors import SpecError
from parity.spec import CandidateSpec, load_spec
from tests.support.paths import EXAMPLE_FIXTURES
from tests.support.specs import write_spec

ROWS = [1, 2, 4]  # camera.png (grayscale), chelsea.png, rocket.jpg: each has golden pixels
INNER = ("weights", "decode", "pixels", "embedding", "head", "outputs")

# What every app below shares: the trained parts, loaded strictly, and a torchvision transform that
# equals the reference's (bicubic resize of the short side to 336, centre crop, CLIP mean/std).
KIT = f'''
import functools
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T

from reference.models import MultiLabelRegressionNN

TRAINED = Path({str(EXAMPLE_FIXTURES)!r})
PREPARE = T.Compose([T.Resize(336, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(336), T.ToTensor(),
                     T.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])


def encoder():
    model = timm.create_model("vit_large_patch14_clip_quickgelu_336.openai", pretrained=False,
                              embed_dim=64, depth=2, num_heads=2)
    model.load_state_dict(load_file(TRAINED / "backbone.safetensors"), strict=True)
    return model.eval()


def scorer():
    head = MultiLabelRegressionNN(64, [3, 4], 5, bias_dim=8, hidden_dims=[128, 64], dropout=0.1)
    head.load_state_dict(torch.load(TRAINED / "dnnV1_model_best.pth", weights_only=True), strict=True)
    return head.eval()


def embed(model, pixels):
    return model.forward_head(model.forward_features(pixels), pre_logits=True)
'''


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(EXAMPLE_FIXTURES).subset(ROWS)


def _gate(tmp_path: Path, example_spec, fixture, name: str, body: str, target: str, **candidate):
    """Write ``KIT + body`` as ``<name>.py``, gate ``<name>:<target>`` on the fixture rows: (report, run)."""
    (tmp_path / f"{name}.py").write_text(KIT + textwrap.dedent(body))
    spec = dataclasses.replace(example_spec, candidate=CandidateSpec(
        kind="python", target=f"{name}:{target}", python_path=tmp_path, **candidate))
    run = run_candidate(spec, fixture)
    return judge_run(run, fixture, spec), run


def _line(tmp_path: Path, name: str, text: str) -> int:
    lines = (tmp_path / f"{name}.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def _observed_stage_by_stage(report) -> None:
    for stage in INNER:
        assert report.stage(stage).status is Status.PASS, report.stage(stage)


def test_a_callable_object_with_no_grad_on_call_is_observed_stage_by_stage(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_obj", '''
        class Tagger:
            def __init__(self):
                self.parts = {"encoder": encoder(), "scorer": scorer()}

            @torch.no_grad()
            def __call__(self, image, input_biases):
                pixels = PREPARE(image.convert("RGB")).unsqueeze(0)
                embedding = embed(self.parts["encoder"], pixels)
                return self.parts["scorer"](embedding, torch.tensor([input_biases])).squeeze(0)


        tagger = Tagger()
        ''', "tagger")
    _observed_stage_by_stage(report)
    assert run.description["candidate"]["backbone_module"] == "tagger_obj.tagger.parts['encoder']"
    assert run.call_sites["head"] == f"tagger_obj.py:{_line(tmp_path, 'tagger_obj', 'return self.parts')} in __call__"
    # Entered through forward_features: the innermost line of the app's own code, not timm's.
    assert run.call_sites["backbone"] == f"tagger_obj.py:{_line(tmp_path, 'tagger_obj', 'model.forward_features(')} " \
                                         "in embed"


def test_inference_mode_under_an_own_wraps_decorator_reaches_a_nested_registry(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_registry", '''
        class Bundle:
            def __init__(self):
                self.stages = [encoder(), scorer()]


        REGISTRY = {"tagger": {"v2": Bundle()}}
        CALLS = []


        def counted(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                CALLS.append(fn.__name__)
                return fn(*args, **kwargs)
            return wrapper


        @counted
        @torch.inference_mode()
        def predict(image, input_biases):
            backbone, head = REGISTRY["tagger"]["v2"].stages
            return head(embed(backbone, PREPARE(image.convert("RGB"))[None]), torch.tensor([input_biases]))[0]
        ''', "predict")
    _observed_stage_by_stage(report)
    assert run.description["candidate"]["head_module"] == "tagger_registry.REGISTRY['tagger']['v2'].stages[1]"


def test_a_closure_built_by_a_factory_without_wraps_is_seen_through(tmp_path, example_spec, fixture):
    report, _ = _gate(tmp_path, example_spec, fixture, "tagger_closure", '''
        def timed(fn):
            def inner(*args):  # no functools.wraps: only the closure leads to fn
                return fn(*args)
            return inner


        def make_predict(backbone, head):
            @timed
            @torch.no_grad()
            def predict(image, input_biases):
                pixels = PREPARE(image.convert("RGB"))[None]
                return head(embed(backbone, pixels), torch.tensor([input_biases]))[0].numpy()
            return predict


        predict = make_predict(encoder(), scorer())
        ''', "predict")
    _observed_stage_by_stage(report)


def test_a_bound_method_whose_class_decorates_it(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_method", '''
        class Service:
            def __init__(self):
                self.backbone, self.head = encoder(), scorer()

            @torch.inference_mode()
            def score(self, image, input_biases):
                embedding = embed(self.backbone, PREPARE(image.convert("RGB"))[None])
                return {"scores": self.head(embedding, torch.tensor([input_biases]))[0]}


        score = Service().score
        ''', "score", output_key="scores")
    _observed_stage_by_stage(report)
    assert run.description["candidate"]["head_module"] == "tagger_method.score.__self__.head"


def test_a_model_built_lazily_in_a_cache_is_found_after_the_first_call(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_lazy", '''
        @functools.lru_cache(maxsize=None)
        def load():
            return encoder(), scorer()


        @torch.no_grad()
        def predict(image, input_biases):
            backbone, head = load()  # no attribute reaches the cache: only calling the app shows the model
            return head(embed(backbone, PREPARE(image.convert("RGB"))[None]), torch.tensor([input_biases]))[0]
        ''', "predict")
    _observed_stage_by_stage(report)
    assert len(run.embeddings) == len(ROWS), "the first sample is observed too"
    assert run.description["candidate"]["head_module"] == "predict.head"  # predict's local variable
    assert any("appeared only when the app was first called" in note for note in run.notes), run.notes


def test_a_model_assigned_at_the_first_call_is_observed_on_every_row(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_global", '''
        MODEL = None


        @torch.no_grad()
        def predict(image, input_biases):
            global MODEL
            if MODEL is None:
                MODEL = nn.ModuleDict({"backbone": encoder(), "head": scorer()})
            embedding = embed(MODEL["backbone"], PREPARE(image.convert("RGB"))[None])
            return MODEL["head"](embedding, torch.tensor([input_biases]))[0]
        ''', "predict")
    _observed_stage_by_stage(report)
    assert run.description["candidate"]["head_module"] == "tagger_global.MODEL.head"
    assert sorted(run.model_inputs) == sorted(fixture.names)


def test_compiled_modules_are_observed_eagerly_and_say_so(tmp_path, example_spec, fixture):
    """A warm-up call at import compiles both parts: hooks added afterwards would never fire in the cached graph."""
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_compiled", '''
        BACKBONE = torch.compile(encoder(), backend="eager")
        HEAD = torch.compile(scorer(), backend="eager")
        with torch.no_grad():
            HEAD(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.long))


        @torch.no_grad()
        def predict(image, input_biases):
            embedding = embed(BACKBONE, PREPARE(image.convert("RGB"))[None])
            return HEAD(embedding, torch.tensor([input_biases]))[0]
        ''', "predict")
    _observed_stage_by_stage(report)
    assert run.description["candidate"]["backbone_module"] == "tagger_compiled.BACKBONE._orig_mod"
    assert run.description["candidate"]["head_module"] == "tagger_compiled.HEAD._orig_mod"
    assert set(run.pixels) == {n for n in fixture.names if n in fixture.golden_pixels}
    assert any("torch.compile'd" in note and "force_eager" in note for note in run.notes), run.notes
    assert any(name.startswith("tagger_compiled.HEAD._orig_mod.") for name in run.all_fingerprints)


def test_hooks_on_a_compiled_module_fire_while_it_is_observed():
    """The cached compiled graph need not run hooks added after it was compiled (torch 2.x does not); eagerly it does."""
    import torch

    from parity.runners.app import AppObservation, _eager
    from parity.runners.observe import Recognised

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.ones(1, 4))
    seen = []
    handle = model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            compiled(torch.ones(1, 4))
        before = len(seen)
        with torch.no_grad(), _eager(AppObservation("python", Recognised(), compiled=("model",))):
            compiled(torch.ones(1, 4))
    finally:
        handle.remove()
    assert len(seen) == before + 1


def test_a_batch_app_is_given_batches_and_read_row_by_row(tmp_path, example_spec):
    rows = [0, 1, 2, 4]  # batches of 3 and 1
    fixture = load_fixture(EXAMPLE_FIXTURES).subset(rows)
    spec = dataclasses.replace(example_spec, runtime=dataclasses.replace(example_spec.runtime, batch_size=3))
    received = tmp_path / "received.txt"
    report, run = _gate(tmp_path, spec, fixture, "tagger_batch", f'''
        BACKBONE, HEAD = encoder(), scorer()


        @torch.inference_mode()
        def predict_batch(images, input_biases):
            Path({str(received)!r}).open("a").write(f"{{len(images)}} {{len(input_biases)}}\\n")
            pixels = torch.stack([PREPARE(image.convert("RGB")) for image in images])
            return {{"scores": HEAD(embed(BACKBONE, pixels), torch.tensor(input_biases))}}
        ''', "predict_batch", output_key="scores", batch=True)
    _observed_stage_by_stage(report)
    assert received.read_text().split("\n")[:2] == ["3 3", "1 1"]
    names = fixture.names
    assert [run.model_inputs[n][0] for n in names] == [(3, 3, 336, 336)] * 3 + [(1, 3, 336, 336)]
    assert {n: list(run.head_inputs[n]) for n in names} == {
        n: list(b) for n, b in zip(names, fixture.biases().tolist())}


def test_a_batch_app_returning_the_wrong_number_of_rows_fails_those_rows(tmp_path, example_spec, fixture):
    report, _ = _gate(tmp_path, example_spec, fixture, "tagger_short", '''
        def predict_batch(images, input_biases):
            return [[0.0] * 5]  # one row whatever the batch
        ''', "predict_batch", batch=True)
    decode = report.stage("decode")
    assert decode.status is Status.FAIL and len(decode.sample_errors) == len(ROWS)
    assert "returned outputs of shape (1, 5) for a batch of 3 images" in decode.sample_errors[0][1]


def test_the_batch_field_is_validated_like_the_other_candidate_fields(tmp_path):
    spec = load_spec(write_spec(tmp_path, {}, name="plain.toml"))
    assert spec.candidate.batch is False
    path = write_spec(tmp_path, {}, name="batch.toml")
    path.write_text(path.read_text() + '\n[candidate]\npython = "app:predict"\nbatch = true\n')
    assert load_spec(path).candidate.batch is True
    path.write_text(path.read_text().replace("batch = true", 'batch = "yes"'))
    with pytest.raises(SpecError, match=r"\[candidate\]\.batch must be bool, got 'yes'"):
        load_spec(path)
    path.write_text(path.read_text().replace('python = "app:predict"\nbatch = "yes"',
                                             'endpoint_handler = "handler.py"\nbatch = true'))
    with pytest.raises(SpecError, match="batch = true is for a python function"):
        load_spec(path)


def test_evidence_is_recorded_for_the_rows_the_app_raised_on(tmp_path, example_spec):
    """No mode conversion: a grayscale image reaches the model with one channel, an RGBA one with four."""
    fixture = load_fixture(EXAMPLE_FIXTURES).subset([1, 2, 7])  # camera (L), chelsea (RGB), logo (RGBA)
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_modes", '''
        BACKBONE, HEAD = encoder(), scorer()
        TO_PIXELS = T.Compose([T.Resize(336, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(336),
                               T.ToTensor()])


        @torch.no_grad()
        def predict(image, input_biases):
            pixels = TO_PIXELS(image)[None]  # every channel the file has
            scores = HEAD(embed(BACKBONE, pixels), torch.tensor([input_biases]))
            return scores[0]
        ''', "predict")
    decode = report.stage("decode")
    assert [name for name, _ in decode.sample_errors] == ["camera.png", "logo.png"]
    assert run.model_inputs == {"camera.png": ((1, 1, 336, 336), "float32"),
                                "chelsea.png": ((1, 3, 336, 336), "float32"),
                                "logo.png": ((1, 4, 336, 336), "float32")}
    assert list(run.head_inputs) == ["chelsea.png"]  # the others never reached the head


def test_head_inputs_are_recorded_in_the_pre_hook_even_when_the_app_raises_after(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_swapped", '''
        BACKBONE, HEAD = encoder(), scorer()


        @torch.no_grad()
        def predict(image, input_biases):
            source, scene = input_biases
            scores = HEAD(embed(BACKBONE, PREPARE(image.convert("RGB"))[None]), torch.tensor([[scene % 3, source]]))
            if image.mode == "L":
                raise ValueError("grayscale uploads are not supported")
            return scores[0]
        ''', "predict")
    assert [name for name, _ in report.stage("decode").sample_errors] == ["camera.png"]
    biases = fixture.biases()
    for name, (source, scene) in zip(fixture.names, biases.tolist()):
        assert run.head_inputs[name].dtype == np.int64
        assert run.head_inputs[name].tolist() == [scene % 3, source]


def test_module_states_dtypes_and_fingerprints_are_recorded_before_the_first_call(tmp_path, example_spec, fixture):
    report, run = _gate(tmp_path, example_spec, fixture, "tagger_train", '''
        BACKBONE = encoder()
        HEAD = scorer().train()  # left in training mode: its dropout is active


        @torch.no_grad()
        def predict(image, input_biases):
            BACKBONE.eval()  # too late for the record: states are read before the first call
            BACKBONE.train()
            return HEAD(embed(BACKBONE, PREPARE(image.convert("RGB"))[None]), torch.tensor([input_biases]))[0]
        ''', "predict")
    assert run.module_states["backbone"] == ()
    states = dict(run.module_states["head"])
    assert states["tagger_train.HEAD"] == "MultiLabelRegressionNN"
    assert states["tagger_train.HEAD.mlp.3"] == "Dropout" and states["tagger_train.HEAD.mlp.7"] == "Dropout"
    assert run.dtypes == {"backbone": "float32", "head": "float32"}
    from safetensors.torch import load_file

    trained = fingerprint(load_file(EXAMPLE_FIXTURES / "backbone.safetensors"))
    assert {f"tagger_train.BACKBONE.{k}": v for k, v in trained.items()}.items() <= run.all_fingerprints.items()
    assert report.stage("head").status is Status.FAIL


def test_the_endpoint_runner_records_the_same_evidence(tmp_path, example_spec, fixture):
    handler = tmp_path / "handler.py"
    handler.write_text(KIT + textwrap.dedent('''
        MODELS = {}


        class EndpointHandler:
            def __init__(self, path=""):
                MODELS["clip"] = (encoder(), scorer())  # held by the module, not by the handler

            @torch.inference_mode()
            def __call__(self, data):
                backbone, head = MODELS["clip"]
                pixels = PREPARE(data["inputs"].convert("RGB"))[None]
                biases = torch.tensor([data["parameters"]["input_biases"]])
                return head(embed(backbone, pixels), biases)[0].tolist()
        '''))
    spec = dataclasses.replace(example_spec, candidate=CandidateSpec(kind="endpoint_handler", target=str(handler)))
    run = run_candidate(spec, fixture)
    _observed_stage_by_stage(judge_run(run, fixture, spec))
    assert run.description["candidate"]["head_module"] == "handler.MODELS['clip'][1]"
    assert run.call_sites["head"] == f"handler.py:{_line(tmp_path, 'handler', 'return head(')} in __call__"
    assert set(run.head_inputs) == set(run.model_inputs) == set(fixture.names)
    assert run.dtypes == {"backbone": "float32", "head": "float32"} and run.module_states["head"] == ()
    assert len(run.all_fingerprints) == 45


def test_reachable_modules_stop_at_library_internals_and_their_depth():
    import torch

    from parity.runners.observe import reachable_modules

    class Holder:
        pass

    deep = Holder()
    deep.a = {"b": [Holder()]}
    deep.a["b"][0].c = (torch.nn.Linear(2, 2),)  # deep.a['b'][0].c[0]: five levels down
    shallow = {"m": torch.nn.Linear(2, 2)}
    found = reachable_modules({"app.deep": deep, "app.shallow": shallow, "app.torch": torch, "app.np": np})
    assert list(found) == ["app.shallow['m']"]
    assert list(reachable_modules({"app.deep": deep}, depth=5)) == ["app.deep.a['b'][0].c[0]"]
