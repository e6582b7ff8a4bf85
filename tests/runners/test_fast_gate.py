"""The gate of a candidate that holds its own model, fast: no torch for a whole-pipeline ONNX graph, decoding in
worker threads ahead of inference, a bad image failing only its sample, a broken graph failing before any decode."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import parity.model.batches as batches
from parity.commands.check import run_check
from parity.model.batches import Decoded, decoded_batches, local_batches
from parity.model.fast_pixels import NumpyPixels, recorded_pixels
from parity.model.pipeline import build_pipeline
from parity.results import Status
from parity.runners import onnx as onnx_runner
from parity.spec import load_spec
from parity.store.fixtures import load_fixture
from parity.store.images import decode_image
from tests.support.paths import ROOT
from tests.support.specs import reseal

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

_spec = importlib.util.spec_from_file_location("onnx_export_example", ROOT / "examples" / "onnx" / "export.py")
export_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_example)


def gate_spec(directory: Path, model: Path, edit: dict[str, str] | None = None) -> Path:
    """The ONNX example's spec, gating ``model`` on the bundled fixture, with ``edit`` (old -> new) applied."""
    text = (ROOT / "examples" / "onnx" / "parity.toml").read_text()
    text = text.replace('"clip_dnn.onnx"', f'"{model}"').replace('"../../', f'"{ROOT}/')
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "gate.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """The example exported whole and head only, in this (torch) process."""
    backbone, head = export_example.load_modules()
    out = tmp_path_factory.mktemp("graphs")
    return {part: export_example.export(backbone, head, out / f"{part}.onnx", part=part) for part in ("both", "head")}


NUMERICS = {"autocast_dtype": None, "batch_size": 8, "cpu_capability": "AVX2", "device": "cpu", "device_name": "x86",
            "float32_matmul_precision": "highest", "matmul_allow_tf32": False, "threads": 1, "torch": "2.5.0"}


@pytest.mark.parametrize("records_numerics", [False, True])
def test_a_whole_pipeline_graph_is_gated_without_torch(graphs, records_numerics, fixture_copy, tmp_path):
    """In a fresh interpreter: `parity check` of the whole-pipeline export passes and never imports torch, also
    on a fixture that recorded the torch numerics of its reference (which a torch candidate would probe)."""
    edit = None
    if records_numerics:
        reseal(fixture_copy, lambda manifest: manifest.setdefault("producer", {}).update(numerics=NUMERICS))
        edit = {f'fixtures = "{ROOT}/fixtures/clip_dnn"': f'fixtures = "{fixture_copy}"'}
    spec = gate_spec(tmp_path, graphs["both"], edit)
    script = textwrap.dedent(f"""\
        import sys
        from parity.cli import main
        rc = main(["check", "--spec", {str(spec)!r}])
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "timm"))
        print("RESULT", rc, heavy)
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = done.stdout[done.stdout.index("RESULT"):].split(maxsplit=2)
    assert result[1] == "0", done.stdout[-3000:]  # the gate passed
    assert result[2].strip() == "[]", result[2]


def test_numpy_pixels_are_the_spec_transform_and_golden(graphs):
    """The whole graph's pixels come from numpy and equal the spec's library transform (max abs 0 here; the
    golden pixels are the fixture's, so the pixels stage passes)."""
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"]))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    fast, why = recorded_pixels(spec, fixture)
    assert isinstance(fast, NumpyPixels), why
    pipeline = build_pipeline(spec)
    for row in fixture.rows[:4]:
        image, _ = pipeline.decode(row.image)
        assert np.array_equal(fast.pixels(image, name=row.image), pipeline.pixels(image).numpy())
    run = onnx_runner.run(spec, fixture)
    assert run.description["candidate"]["pixels"].startswith("numpy")


def test_a_spec_pinning_other_preprocessing_keeps_the_library_transform(graphs, tmp_path):
    """[preprocess] that differs from the fixture's record: the library transform makes the spec's pixels,
    and the pixels stage sees the drift (numpy would have hidden it behind the fixture's record)."""
    spec = load_spec(gate_spec(tmp_path, graphs["both"], {'interpolation = "bicubic"': 'interpolation = "bilinear"'}))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    fast, why = recorded_pixels(spec, fixture)
    assert fast is None and "interpolation" in why
    report = run_check(spec)
    assert report.stage("pixels").status is Status.FAIL


def test_a_head_only_graph_runs_behind_the_spec_backbone_with_torch(graphs, tmp_path):
    spec = load_spec(gate_spec(tmp_path, graphs["head"]))
    run = onnx_runner.run(spec, load_fixture(ROOT / "fixtures" / "clip_dnn"))
    assert run.description["candidate"]["pixels"].startswith("the spec's library transform (the graph holds only the head")
    assert "backbone" in run.fingerprints  # the spec's backbone, loaded strictly
    report = run_check(spec)
    assert report.passed, report.first_failure


def _records(source, fixture, workers: int, monkeypatch) -> tuple:
    monkeypatch.setenv(batches.DECODE_WORKERS_ENV, str(workers))
    decoded = Decoded()
    pixels = [np.stack([np.asarray(x) for x in batch]) for _, batch in decoded_batches(source, fixture, decoded)
              if batch]
    return decoded, pixels


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_torch_kernels_run_only_in_the_calling_thread(graphs, backend, monkeypatch):
    """Decode threads run PIL alone (decode; resize and crop with the pil backend); to-tensor, a tensor resize
    and normalize run in the calling thread, so no decode thread starts an OpenMP team of its own."""
    import threading

    from parity.preprocess.transform import Preprocess

    edit = {"batch_size = 8": "batch_size = 4", 'resize_backend = "pil"': f'resize_backend = "{backend}"'}
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"], edit))
    where: dict[str, set] = {"pil": set(), "tensor": set()}
    pil_part, tensor_part = Preprocess.pil_part, Preprocess.tensor_part

    def spy(part, real):
        def call(self, image):
            where[part].add(threading.current_thread().name)
            return real(self, image)
        return call

    import torch

    torch_in_threads: list[str] = []

    def profile(frame, event, arg):  # every torch function or tensor method a decode thread calls
        if event == "c_call" and threading.current_thread().name.startswith("parity-decode") and (
                (getattr(arg, "__module__", None) or "").startswith("torch")
                or isinstance(getattr(arg, "__self__", None), torch.Tensor)):
            torch_in_threads.append(getattr(arg, "__qualname__", repr(arg)))

    monkeypatch.setattr(Preprocess, "pil_part", spy("pil", pil_part))
    monkeypatch.setattr(Preprocess, "tensor_part", spy("tensor", tensor_part))
    threading.setprofile(profile)  # threads started from here on: the decode pool's
    try:
        decoded, pixels = _records(build_pipeline(spec), load_fixture(ROOT / "fixtures" / "clip_dnn"), 2, monkeypatch)
    finally:
        threading.setprofile(None)
    assert len(decoded.rows) == sum(len(p) for p in pixels) > 0
    # torchvision's usage log and its jit checks on a PIL image: no tensor is made, no kernel runs
    bookkeeping = {"_log_api_usage_once", "_get_tracing_state", "_is_tracing"}
    assert {name.rsplit(".", 1)[-1] for name in torch_in_threads} <= bookkeeping, sorted(set(torch_in_threads))
    assert where["tensor"] == {threading.current_thread().name}
    assert where["pil"] and all(name.startswith("parity-decode") for name in where["pil"])
    pipeline, image = build_pipeline(spec), decode_image(load_fixture(ROOT / "fixtures" / "clip_dnn").rows[0].image)[0]
    staged = pipeline.staged(image)
    assert (staged.size != image.size) is (backend == "pil")  # the tensor backend resizes with torch: not here
    assert np.array_equal(pipeline.finish_pixels(staged).numpy(), pipeline.transform(image).numpy())


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_parallel_decoding_gives_the_serial_records(graphs, kind, monkeypatch):
    """Worker threads (4, more than this fixture's batches need) and one thread: the same rows, errors,
    conversions and pixels, bit for bit (one process, one machine), in fixture order."""
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"], {"batch_size = 8": "batch_size = 3"}))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    source = recorded_pixels(spec, fixture)[0] if kind == "numpy" else build_pipeline(spec)
    serial, serial_pixels = _records(source, fixture, 1, monkeypatch)
    parallel, parallel_pixels = _records(source, fixture, 4, monkeypatch)
    assert serial.rows == parallel.rows == sorted(parallel.rows) and len(serial.rows) == len(fixture.rows)
    assert serial.sample_errors == parallel.sample_errors and serial.conversions == parallel.conversions
    assert serial.pixels.keys() == parallel.pixels.keys() and serial.pixels
    assert all(np.array_equal(serial.pixels[k], parallel.pixels[k]) for k in serial.pixels)
    assert len(serial_pixels) == len(parallel_pixels)
    assert all(np.array_equal(a, b) for a, b in zip(serial_pixels, parallel_pixels))


class _Crashing(NumpyPixels):
    """numpy pixels that raise what a degenerate image makes Pillow raise, on one named image."""

    bad = ""

    def pixels(self, rgb, *, name="image"):
        if str(name) == self.bad:
            raise ValueError("height and width must be > 0")
        return super().pixels(rgb, name=name)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_torch_step_that_raises_fails_only_its_sample(graphs, workers, monkeypatch):
    """The torch part of the spec's transform (in the calling thread) raising on one image: that sample's error."""
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"], {"batch_size = 8": "batch_size = 4"}))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    pipeline = build_pipeline(spec)
    bad = fixture.rows[6].image
    real = pipeline.finish_pixels

    def finish(staged):
        if getattr(staged, "info", {}).get("bad"):
            raise RuntimeError("a torch kernel refused this image")
        return real(staged)

    def staged(rgb, *, name="image"):
        out = type(pipeline).staged(pipeline, rgb, name=name)
        if str(name) == str(bad):
            out.info["bad"] = True  # marks the image for the calling thread's step
        return out

    monkeypatch.setattr(pipeline, "finish_pixels", finish)
    monkeypatch.setattr(pipeline, "staged", staged)
    decoded, pixels = _records(pipeline, fixture, workers, monkeypatch)
    assert sum(len(p) for p in pixels) == len(fixture.rows) - 1 and 6 not in decoded.rows
    assert decoded.rows == [i for i in range(len(fixture.rows)) if i != 6]
    assert decoded.sample_errors == [(fixture.rows[6].name, f"preprocessing {bad} raised RuntimeError: "
                                                            "a torch kernel refused this image")]


@pytest.mark.parametrize("workers", [1, 3])
def test_an_image_whose_preprocessing_raises_fails_only_its_sample(graphs, workers, monkeypatch):
    monkeypatch.setenv(batches.DECODE_WORKERS_ENV, str(workers))
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"]))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    fast = recorded_pixels(spec, fixture)[0]
    crashing = _Crashing(fast.spec, fast.record, fast.preprocess)
    crashing.bad = str(fixture.rows[5].image)
    decoded = Decoded()
    got = [rows for rows, _ in decoded_batches(crashing, fixture, decoded)]
    assert sum(len(r) for r in got) == len(fixture.rows) - 1 and 5 not in decoded.rows
    assert decoded.sample_errors == [(fixture.rows[5].name, decoded.sample_errors[0][1])]
    assert "ValueError" in decoded.sample_errors[0][1]
    # The gate as a whole: the decode stage names the sample, the run completes.
    monkeypatch.setattr(onnx_runner, "recorded_pixels", lambda spec, fixture: (crashing, ""))
    report = run_check(spec)
    assert report.stage("decode").status is Status.FAIL
    assert report.stage("embedding").comparison.total > 0


def test_the_local_engine_still_embeds_in_order(graphs, monkeypatch):
    """The spec's pipeline through `local_batches` with worker threads: every row embedded, in order."""
    monkeypatch.setenv(batches.DECODE_WORKERS_ENV, "3")
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"], {"batch_size = 8": "batch_size = 5"}))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    results = list(local_batches(build_pipeline(spec), fixture))
    rows = [r for result in results for r in result.rows]
    assert rows == list(range(len(fixture.rows)))
    embeddings = np.concatenate([r.embeddings for r in results])
    assert np.abs(embeddings - fixture.embeddings).max() < 1e-4  # float32 budget of this tiny backbone


class _NarrowHead:
    """A head written here, not the example's: embedding (B, 64) + biases (B, 2) -> 4 outputs with BatchNorm."""

    @staticmethod
    def export(path: Path) -> Path:
        import torch
        from torch import nn

        class Head(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Linear(64 + 2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

            def forward(self, embedding, input_biases):
                return self.body(torch.cat([embedding, input_biases.float()], dim=1))

        head = Head().eval()
        args = (torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.long))
        torch.onnx.export(head, args, str(path), input_names=["embedding", "input_biases"], output_names=["outputs"],
                          dynamic_axes={"embedding": {0: "batch"}, "input_biases": {0: "batch"},
                                        "outputs": {0: "batch"}}, dynamo=False)
        return path


def _count_decodes(monkeypatch) -> list:
    calls: list = []
    real = batches.decode_image

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(batches, "decode_image", counting)
    return calls


def test_a_graph_of_the_wrong_width_fails_before_any_decode(tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    with warnings.catch_warnings():  # the exporter's deprecation notes
        warnings.simplefilter("ignore")
        model = _NarrowHead.export(tmp_path / "narrow.onnx")
    report = run_check(load_spec(gate_spec(tmp_path, model)))
    assert not report.passed and report.first_failure.stage == "load"
    assert "4 wide" in report.stage("load").headline and "5 wide" in report.stage("load").headline
    assert calls == []


def test_a_broken_onnx_file_is_refused_before_any_decode(tmp_path, monkeypatch):
    from parity.cli import EXIT_USAGE, main

    calls = _count_decodes(monkeypatch)
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    assert main(["check", "--spec", str(gate_spec(tmp_path, model))]) == EXIT_USAGE
    assert calls == []



@pytest.mark.parametrize("workers", [1, 3])
def test_a_fixture_changed_under_the_run_still_aborts_it(graphs, workers, monkeypatch):
    from parity.errors import FixtureChangedError

    monkeypatch.setenv(batches.DECODE_WORKERS_ENV, str(workers))
    spec = load_spec(gate_spec(Path(graphs["both"]).parent, graphs["both"]))
    fixture = load_fixture(ROOT / "fixtures" / "clip_dnn")
    changed, real = str(fixture.rows[9].image), batches.decode_image

    def decode(path, **kwargs):
        if str(path) == changed:
            raise FixtureChangedError(f"{path} changed after its fixture was verified")
        return real(path, **kwargs)

    monkeypatch.setattr(batches, "decode_image", decode)
    with pytest.raises(FixtureChangedError):
        list(decoded_batches(recorded_pixels(spec, fixture)[0], fixture, Decoded()))
