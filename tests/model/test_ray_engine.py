"""The Ray engine (``[runtime].engine = "ray"``) gives the record the local engine gives.

A local Ray instance (``num_cpus=2``) is started once for the module; the tests that need it skip
when Ray is not installed (it is the optional ``parity[ray]`` extra). The tests of the spec fields,
the CLI flags and the missing-extra error run without Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.cli import EXIT_USAGE, main
from parity.errors import FixtureChangedError, SpecError
from parity.store.fixtures import load_fixture
from parity.runners import run_candidate
from parity.spec import Spec, load_spec
from tests.support.paths import CLASSIFIER_SPEC, EXAMPLE_SPEC, ROOT
from tests.support.specs import reseal, write_spec

NOT_INSTALLED = "ray is not installed: pip install 'parity[ray]'"


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for the module, shut down after it; its workers import this checkout."""
    ray = pytest.importorskip("ray", reason=NOT_INSTALLED)
    pytest.importorskip("ray.data", reason=NOT_INSTALLED)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def _engine(spec: Spec, engine: str, **runtime) -> Spec:
    return dataclasses.replace(spec, runtime=dataclasses.replace(spec.runtime, engine=engine, **runtime))


def _both(spec: Spec, fixtures: Path | None = None):
    """The local engine's record and the Ray engine's, on the same fixture in this process."""
    fixture = load_fixture(spec.fixture_root(fixtures))
    local = run_candidate(_engine(spec, "local"), fixture)
    seen: list[tuple[int, int]] = []
    remote = run_candidate(_engine(spec, "ray"), fixture, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (len(fixture.rows), len(fixture.rows))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    return local, remote


def _same_array(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and np.array_equal(a, b)


def _messages(run) -> tuple[tuple[str, str], ...]:
    """Per-sample errors without the object addresses Pillow's messages carry (they differ run to run)."""
    return tuple((name, re.sub(r" at 0x[0-9a-f]+", "", message)) for name, message in run.sample_errors)


def _assert_same_record(local, remote) -> None:
    assert remote.rows == local.rows
    assert _messages(remote) == _messages(local)
    assert dict(remote.conversions) == dict(local.conversions)
    assert dict(remote.errors) == dict(local.errors)
    assert remote.nondeterministic == local.nondeterministic
    assert remote.fingerprints == local.fingerprints and remote.description == local.description
    assert set(remote.pixels) == set(local.pixels)
    for name, pixels in local.pixels.items():
        assert np.array_equal(remote.pixels[name], pixels), name
    for stage in ("embeddings", "head_outputs", "outputs"):
        assert _same_array(getattr(local, stage), getattr(remote, stage)), stage


@pytest.mark.parametrize("spec_path", [EXAMPLE_SPEC, CLASSIFIER_SPEC], ids=["timm", "transformers"])
def test_ray_embeddings_are_bit_identical_to_the_local_engine(ray_instance, spec_path):
    local, remote = _both(load_spec(spec_path))
    assert local.embeddings is not None and len(local.rows) > 8  # more than one batch
    assert np.array_equal(remote.embeddings, local.embeddings)
    _assert_same_record(local, remote)


def test_ray_batches_like_the_local_engine_at_any_batch_size(ray_instance, tmp_path, monkeypatch):
    """17 samples in batches of 5: four batches, the last one short, in fixture order from two actors."""
    import torch

    from parity.model.pipeline import build_pipeline
    from parity.model.ray_engine import ray_batches

    spec = load_spec(write_spec(tmp_path, {"batch_size = 8": "batch_size = 5"}))
    fixture = load_fixture(spec.fixture_root())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two one-CPU actors fit the two CPUs; the local run uses as many threads
    try:
        results = list(ray_batches(build_pipeline(_engine(spec, "ray")), fixture, actors=2))
        local = run_candidate(spec, fixture)
    finally:
        torch.set_num_threads(threads)
    assert [r.rows for r in results] == [list(range(s, min(s + 5, 17))) for s in range(0, 17, 5)]
    assert np.array_equal(np.concatenate([r.embeddings for r in results]), local.embeddings)


def test_ray_keeps_decode_errors_per_sample(ray_instance, fixture_copy):
    (fixture_copy / "images" / "coins.png").write_bytes(b"not an image")
    reseal(fixture_copy)
    local, remote = _both(load_spec(EXAMPLE_SPEC), fixture_copy)
    assert [name for name, _ in remote.sample_errors] == ["coins.png"]
    assert "cannot decode image" in remote.sample_errors[0][1] and "coins.png" in remote.sample_errors[0][1]
    assert len(remote.rows) == 16 and remote.embeddings.shape[0] == 16
    _assert_same_record(local, remote)


def test_ray_backbone_failure_keeps_the_decode_log(ray_instance, fixture_copy, tmp_path):
    (fixture_copy / "images" / "coins.png").write_bytes(b"not an image")
    reseal(fixture_copy)
    # A 224 px input into the 336 px model: timm refuses it in every batch.
    spec = load_spec(write_spec(tmp_path, {"input_size = [3, 336, 336]": "input_size = [3, 224, 224]"}))
    local, remote = _both(spec, fixture_copy)
    assert remote.embeddings is None and "the backbone raised" in remote.errors["embedding"]
    assert [name for name, _ in remote.sample_errors] == ["coins.png"]
    assert remote.pixels and remote.conversions  # golden pixels and conversions recorded before the backbone
    _assert_same_record(local, remote)


def test_ray_refuses_an_image_changed_after_verification(ray_instance, fixture_copy):
    spec = _engine(load_spec(EXAMPLE_SPEC), "ray")
    fixture = load_fixture(fixture_copy)
    (fixture_copy / "images" / "coins.png").write_bytes((fixture_copy / "images" / "brick.png").read_bytes())
    with pytest.raises(FixtureChangedError, match="coins.png changed after its fixture was verified"):
        run_candidate(spec, fixture)


def test_engine_ray_without_ray_is_a_usage_error_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--engine", "ray"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "pip install 'parity[ray]'" in err and "Traceback" not in err
    from parity.model.ray_engine import import_ray

    with pytest.raises(SpecError, match=r"parity\[ray\]"):
        import_ray()


@pytest.fixture
def seen_specs(monkeypatch):
    """The spec each command would run (its engine replaced by a stub that records it)."""
    import parity.commands.check
    import parity.commands.diagnose
    import parity.model.ray_engine
    import parity.commands.matrix

    specs: list[Spec] = []

    def record(spec, *args, **kwargs):
        specs.append(spec)
        raise SpecError("recorded")  # stops the command: exit 2

    for module, name in ((parity.commands.check, "run_check"), (parity.commands.diagnose, "diagnose"), (parity.commands.matrix, "run_matrix")):
        monkeypatch.setattr(module, name, record)
    # The flags are under test, not Ray: no import, no session.
    monkeypatch.setattr(parity.model.ray_engine, "import_ray", lambda: None)
    monkeypatch.setattr(parity.model.ray_engine, "ray_session", lambda address: contextlib.nullcontext())
    return specs


@pytest.mark.parametrize("command", ["check", "diagnose", "matrix"])
def test_engine_flags_override_the_spec(seen_specs, tmp_path, command):
    on_ray = write_spec(tmp_path, {'batch_size = 8': 'batch_size = 8\nengine = "ray"\nray_address = "auto"'})
    assert load_spec(on_ray).runtime.engine == "ray"
    cases = [
        (EXAMPLE_SPEC, [], ("local", None)),
        (EXAMPLE_SPEC, ["--engine", "ray"], ("ray", None)),
        (EXAMPLE_SPEC, ["--engine", "ray", "--ray-address", "10.0.0.5:6379"], ("ray", "10.0.0.5:6379")),
        (on_ray, [], ("ray", "auto")),
        (on_ray, ["--ray-address", "ray://head:10001"], ("ray", "ray://head:10001")),
        (on_ray, ["--engine", "local"], ("local", None)),
    ]
    for spec_path, flags, expected in cases:
        assert main([command, "--spec", str(spec_path), *flags]) == EXIT_USAGE
        runtime = seen_specs.pop().runtime
        assert (runtime.engine, runtime.ray_address) == expected, flags


def test_ray_address_needs_the_ray_engine(seen_specs, capsys):
    assert main(["check", "--spec", str(EXAMPLE_SPEC), "--ray-address", "auto"]) == EXIT_USAGE
    assert "--ray-address auto needs the Ray engine: add --engine ray" in capsys.readouterr().err
    assert not seen_specs
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--spec", str(EXAMPLE_SPEC), "--engine", "bogus"])
    assert exit_.value.code == EXIT_USAGE


@pytest.mark.parametrize(("runtime", "says"), [
    ('engine = "spark"', "[runtime].engine = 'spark' is not accepted. Accepted values: local, ray"),
    ('engine = "local"\nray_address = "auto"', "[runtime].ray_address is set but [runtime].engine = 'local'"),
    ('engine = "ray"\nray_address = " "', "[runtime].ray_address = ' ' is not an address"),
    ('engine = "ray"\nray_address = 6379', "[runtime].ray_address must be str"),
])
def test_runtime_engine_fields_are_validated(tmp_path, runtime, says):
    spec_path = write_spec(tmp_path, {"batch_size = 8": f"batch_size = 8\n{runtime}"})
    with pytest.raises(SpecError) as error:
        load_spec(spec_path)
    assert says in str(error.value)


def test_runtime_engine_defaults_to_local():
    runtime = load_spec(EXAMPLE_SPEC).runtime
    assert (runtime.engine, runtime.ray_address) == ("local", None)


@pytest.mark.parametrize(("device", "resources", "threads", "expected"), [
    ("cpu", {"CPU": 2.0}, 2, (1, "cpu", 2, {"num_cpus": 2})),
    ("cpu", {"CPU": 16.0}, 4, (3, "cpu", 4, {"num_cpus": 4})),  # room for 4, but 3 batches
    ("cpu", {"CPU": 6.0}, 4, (1, "cpu", 4, {"num_cpus": 4})),
    ("cpu", {"CPU": 16.0}, 32, (1, "cpu", 16, {"num_cpus": 16})),
    ("cuda", {"CPU": 32.0, "GPU": 4.0}, 8, (3, "cuda", None, {"num_gpus": 1})),  # 3 batches: 3 actors
    ("cuda:1", {"CPU": 32.0, "GPU": 2.0}, 8, (2, "cuda", None, {"num_gpus": 1})),
])
def test_actor_pool_follows_the_cluster(monkeypatch, device, resources, threads, expected):
    """One GPU per actor on CUDA, the driver's thread count per CPU actor; never more actors than batches."""
    import torch

    from parity.model.ray_engine import _pool

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cluster = type("Cluster", (), {"cluster_resources": staticmethod(lambda: resources)})
    pipeline = type("P", (), {"device": torch.device(device)})
    assert _pool(cluster, pipeline, 3, None) == expected


def test_cuda_on_a_cluster_without_gpus_is_a_usage_error():
    import torch

    from parity.model.ray_engine import _pool

    cluster = type("Cluster", (), {"cluster_resources": staticmethod(lambda: {"CPU": 8.0})})
    with pytest.raises(SpecError, match="the Ray cluster has no GPU"):
        _pool(cluster, type("P", (), {"device": torch.device("cuda")}), 3, None)


def test_an_actor_with_other_weights_stops_the_run(example_spec):
    """The actor's side, in this process: its checkpoints' fingerprints must equal the driver's."""
    import torch

    from parity.errors import CheckpointError
    from parity.model.ray_engine import EmbedActor, _decode

    fixture = load_fixture(example_spec.fixture_root())
    row = fixture.rows[0]
    batches = [[(0, row.name, str(row.image), row.image.sha256)]]
    from parity.model.pipeline import build_pipeline

    driver = build_pipeline(example_spec)
    good = EmbedActor(example_spec, "cpu", None, batches, [row.name], driver.fingerprints)
    out = good({"batch": np.array([0])})
    result = _decode(out["meta"][0], out["arrays"][0])
    assert result.rows == [0] and set(result.pixels) == {row.name} and result.embeddings.shape == (1, 64)
    assert np.array_equal(result.embeddings, driver.embed(torch.from_numpy(result.pixels[row.name])[None]).numpy())

    prints = {part: dict(tensors) for part, tensors in driver.fingerprints.items()}
    prints["head"][sorted(prints["head"])[0]] = "0" * 64
    other = EmbedActor(example_spec, "cpu", None, batches, [], prints)
    out = other({"batch": np.array([0])})
    with pytest.raises(CheckpointError, match=r"a Ray worker loaded other weights than this process: head\."):
        _decode(out["meta"][0], out["arrays"][0])


def test_ray_runs_a_users_own_head_and_fixture_like_the_local_engine(ray_instance, tmp_path):
    """A BatchNorm head (tests.support.heads, not the bundled one) frozen by capture_pipeline over
    some example images: the Ray workers import the user's class and give the local record."""
    import torch

    from parity.commands.check import judge_run
    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline
    from tests.support.paths import EXAMPLE_FIXTURES
    from tests.support.heads import BatchNormHead, trained_head

    weights = tmp_path / "head.pth"
    torch.save(trained_head(BatchNormHead).state_dict(), weights)
    spec = load_spec(write_spec(tmp_path, {
        'class = "reference.models:MultiLabelRegressionNN"': 'class = "tests.support.heads:BatchNormHead"',
        f'weights = "{EXAMPLE_FIXTURES}/dnnV1_model_best.pth"': f'weights = "{weights}"',
        "kwargs = { embedding_dim = 64, bias_cardinalities = [3, 4], num_outputs = 5, bias_dim = 8, "
        "hidden_dims = [128, 64], dropout = 0.1 }": "kwargs = {}",
    }))
    rows = load_fixture(EXAMPLE_FIXTURES).rows[:6]
    fixture_dir = capture_pipeline(build_pipeline(spec), [r.image for r in rows], tmp_path / "fixture",
                                   input_biases=[r.input_biases for r in rows], golden=[rows[0].image.name])
    local, remote = _both(spec, fixture_dir)
    _assert_same_record(local, remote)
    fixture = load_fixture(fixture_dir)
    assert judge_run(remote, fixture, _engine(spec, "ray")).passed
