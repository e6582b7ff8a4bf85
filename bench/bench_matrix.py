"""Speed of the gate and of variant matrices, printed as ratios (`make bench`).

1. Full gate on the full-size ViT-L/14@336 QuickGELU CLIP (random init) vs a bare timm
   script that loads the same checkpoint and embeds the same images.
2. A 4-mode extraction matrix vs one bare forward (every mode shares one trunk pass).
3. A matrix vs running each of its cells separately.
4. With CUDA: images/s of the full-size model (float32 and bfloat16 autocast).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "fixtures" / "clip_dnn"
MODEL = "vit_large_patch14_clip_quickgelu_336.openai"
HEAD_KWARGS = {"embedding_dim": 1024, "bias_cardinalities": [3, 4], "num_outputs": 5}


REPEATS = 3


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def build_full_size(workdir: Path, n_images: int) -> tuple[Path, list[Path]]:
    """A full-size backbone checkpoint, a head, a fixture and a spec, all in ``workdir``."""
    import timm
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    from parity.store.checkpoints import fingerprint
    from parity.store.fixtures import EMBEDDINGS, METADATA, OUTPUTS, PIXELS, environment, stage_fixture
    from parity.store.images import load_image
    from parity.model.pipeline import describe_backbone, describe_data_config, describe_head
    from reference.models import MultiLabelRegressionNN

    meta = json.loads((EXAMPLE / METADATA).read_text())
    rows = meta["rows"][:n_images]
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    save_file(model.state_dict(), str(workdir / "vit_l14_336.safetensors"))
    head = MultiLabelRegressionNN(**HEAD_KWARGS).eval()
    torch.save(head.state_dict(), workdir / "head.pth")
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    paths = [EXAMPLE / row["image"] for row in rows]
    with torch.inference_mode():
        pixels = torch.stack([transform(load_image(p)) for p in paths])
        embeddings = model.forward_head(model.forward_features(pixels), pre_logits=True)
        biases = torch.tensor([row["input_biases"] for row in rows])
        outputs = head(embeddings, biases)
    with stage_fixture(workdir / "fixture") as stage:
        (stage.path / "images").mkdir()
        for p in paths:
            shutil.copyfile(p, stage.path / "images" / p.name)
        np.save(stage.path / EMBEDDINGS, embeddings[:, None].numpy())
        np.save(stage.path / OUTPUTS, outputs.numpy())
        save_numpy({paths[0].name: pixels[0].numpy()}, str(stage.path / PIXELS))
        (stage.path / METADATA).write_text(json.dumps({"rows": rows}))
        stage.manifest.update({
            "pipeline": {"backbone": describe_backbone(model, name=MODEL, kwargs={}, extract="pre_logits"),
                         "preprocess": describe_data_config(config),
                         "head": describe_head(head, class_path="reference.models:MultiLabelRegressionNN")},
            "producer": {"versions": environment()},
            "weights": {"backbone": {"tensors": fingerprint(model.state_dict())},
                        "head": {"tensors": fingerprint(head.state_dict())}},
        })
    spec = workdir / "spec.toml"
    spec.write_text(
        f'fixtures = "fixture"\n[backbone]\nmodel = "{MODEL}"\ncheckpoint = "vit_l14_336.safetensors"\n'
        f'[head]\nclass = "reference.models:MultiLabelRegressionNN"\nweights = "head.pth"\n'
        f"kwargs = {{ embedding_dim = 1024, bias_cardinalities = [3, 4], num_outputs = 5 }}\n"
        f"[runtime]\nbatch_size = {n_images}\n"
    )
    return spec, paths


def bare_script(checkpoint: Path, paths: list[Path], *, meta: bool = False):
    """What a hand-written check does: create, load, preprocess, forward, pre-logits.

    ``meta`` skips the random init that the checkpoint replaces, as the gate does.
    """
    import contextlib

    import timm
    from safetensors.torch import load_file

    from parity.store.images import load_image

    with torch.device("meta") if meta else contextlib.nullcontext():
        model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(load_file(str(checkpoint)), strict=True, assign=meta)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.inference_mode():
        pixels = torch.stack([transform(load_image(p)) for p in paths])
        return model.forward_head(model.forward_features(pixels), pre_logits=True)


def naive_cells(spec, axes: dict, paths: list[Path], model) -> None:
    """Every cell on its own: preprocess all images, full forward, one extraction."""
    from parity.store.images import load_image
    from parity.preprocess.transform import create_preprocess
    from parity.commands.matrix import resolve_data_config

    base = resolve_data_config(spec)
    for extract, interpolation in itertools.product(axes["extract"], axes["interpolation"]):
        transform = create_preprocess(dict(base, interpolation=interpolation))
        with torch.inference_mode():
            pixels = torch.stack([transform(load_image(p)) for p in paths])
            from parity.model.pipeline import extract_embedding

            extract_embedding(model, pixels, extract)


def gpu_rates(model, *, batch_size: int = 32, size: int = 336) -> dict[str, float]:
    """Images/s of ``model``'s forward_features on CUDA in float32 and under bfloat16 autocast."""
    from parity.commands.matrix import _precision_context

    model = model.to("cuda")
    batch = torch.randn(batch_size, 3, size, size, device="cuda")
    rates = {}
    for precision in ("float32", "autocast_bfloat16"):
        with torch.inference_mode(), _precision_context("cuda", precision, False, "default"):
            model.forward_features(batch[:4])
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                model.forward_features(batch)
            torch.cuda.synchronize()
        rates[precision] = 5 * len(batch) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per pass (each costs ~3.5 s on 2 CPU cores)")
    args = parser.parse_args()

    from parity.commands.check import run_check
    from parity.model.pipeline import build_pipeline
    from parity.spec import load_spec
    from parity.commands.matrix import run_matrix

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA: {torch.cuda.is_available()}; "
          f"targeted ratios use the best of {REPEATS} interleaved runs in rotating order")
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        workdir = Path(tmp)
        (spec_path, paths), setup = _timed(lambda: build_full_size(workdir, args.images))
        spec = load_spec(spec_path)
        print(f"setup: full-size {MODEL} checkpoint and fixture for {len(paths)} images in {setup:.1f} s")

        checkpoint = workdir / "vit_l14_336.safetensors"
        modes = {"extract": ["pre_logits", "forward", "cls", "mean_tokens"], "device": ["cpu"]}
        _, bare = _timed(lambda: bare_script(checkpoint, paths))
        # Interleaved in a rotating order, best of REPEATS: this machine's timings drift by 10-20 %
        # between runs, and whichever job follows another pays for the memory the first one freed.
        jobs = {"bare": lambda: bare_script(checkpoint, paths, meta=True), "gate": lambda: run_check(spec),
                "matrix": lambda: run_matrix(spec, axes=modes)}
        best = dict.fromkeys(jobs, float("inf"))
        results = {}
        for repeat in range(REPEATS):
            names = list(jobs)[repeat % 3:] + list(jobs)[:repeat % 3]
            for name in names:
                results[name], seconds = _timed(jobs[name])
                best[name] = min(best[name], seconds)
        bare_meta, gate, matrix_time = best["bare"], best["gate"], best["matrix"]
        assert results["gate"].passed and results["matrix"].passed, "the bench fixture must pass its own gate"
        print(f"\n1. full gate (checksums, strict load, weight fingerprints, pixels, embeddings, head, outputs)\n"
              f"   vs bare timm script, same init shortcut: {gate:.2f} s vs {bare_meta:.2f} s -> ratio "
              f"{gate / bare_meta:.3f} (overhead {100 * (gate / bare_meta - 1):+.1f} %; target <= +10 %)\n"
              f"   vs bare timm script, plain create_model:  {gate:.2f} s vs {bare:.2f} s -> ratio {gate / bare:.3f}")

        print(f"2. 4-mode extraction matrix vs bare script (one forward, same init shortcut): {matrix_time:.2f} s vs "
              f"{bare_meta:.2f} s -> ratio {matrix_time / bare_meta:.3f} (target <= 1.1)")

        axes = {"extract": ["pre_logits", "forward", "cls", "mean_tokens"], "interpolation": ["bicubic", "bilinear"],
                "device": ["cpu"]}
        _, shared = _timed(lambda: run_matrix(spec, axes=axes))
        model = build_pipeline(spec).backbone
        _, naive = _timed(lambda: naive_cells(spec, axes, paths, model))
        print(f"3. 8-cell matrix vs each cell run separately (model already loaded): {shared:.2f} s vs {naive:.2f} s "
              f"-> speedup {naive / shared:.2f}x")

        if torch.cuda.is_available():
            for precision, rate in gpu_rates(model).items():
                print(f"4. GPU {torch.cuda.get_device_name()}: {precision} {rate:.0f} img/s (batch 32, full-size)")
            cuda_report, cuda_gate = _timed(lambda: run_check(spec, device="cuda"))
            print(f"   gate on cuda: {cuda_gate:.2f} s, verdict {'PASS' if cuda_report.passed else 'DRIFT'}")
        else:
            print("4. GPU section skipped: CUDA is not available")


if __name__ == "__main__":
    main()
