"""parity's ONNX gate beside what a user would run instead (`make bench`), each command in its own process.

1. `parity check --candidate onnx` vs a bare onnxruntime + numpy script that decodes (EXIF, RGB),
   resizes bicubic and center-crops with PIL, normalises in numpy, runs the graph and compares with
   the fixture's `clip.npy` / `outputs.npy`, on the same N = 170 samples (the bundled example's
   images, each copied under 10 names): target <= 1.3x.
2. Fixed cost: parity at N = 1 (target <= 1.5 s + the bare script's own N = 1 time, its session load);
   per-sample cost (N = 170 minus N = 1, per sample; target <= 1.3x the bare script's); peak RSS
   (target <= 2x the bare script's).
3. With Polygraphy installed: `polygraphy run --onnxrt --load-inputs --load-outputs` on the same export, the
   bare script's pre-decoded inputs and the fixture's outputs, interleaved with the others (target: parity <= 1.0x).

BENCH_QUICK=1 runs N = 51. Speed numbers never fail the build: each target prints PASS or MISS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import ROOT, environment, measured, verdict  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK", "").lower() in ("1", "true", "yes")
N = 51 if QUICK else 170
ROUNDS = 1 if QUICK else 3  # interleaved; the best of each, as the machine is shared

# What a user writes instead of a gate: no preprocessing library, no decisions, one comparison.
BARE = r"""
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
job = json.load(open(sys.argv[1]))
session = ort.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32).reshape(3, 1, 1)
std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32).reshape(3, 1, 1)
def pixels(path, size=336):
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = image.size  # short side to size, the long one truncated (torchvision Resize(int)); center crop
    w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    x = np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1).astype(np.float32) / 255
    return (x - mean) / std
embeddings, outputs = [], []
for s in range(0, len(job["images"]), 8):
    batch = np.stack([pixels(p) for p in job["images"][s:s + 8]])
    biases = np.asarray(job["biases"][s:s + 8], np.int64)
    e, o = session.run(["embedding", "outputs"], {"pixels": batch, "input_biases": biases})
    embeddings.append(e), outputs.append(o)
ref_e, ref_o = np.load(job["fixture"] + "/clip.npy"), np.load(job["fixture"] + "/outputs.npy")
ref_e = ref_e.reshape(len(ref_e), -1)  # the fixture keeps (N, 1, D)
worst = max(np.abs(np.concatenate(embeddings) - ref_e).max(), np.abs(np.concatenate(outputs) - ref_o).max())
print("max abs", worst)
"""


def fixture_of(workdir: Path, n: int) -> tuple[Path, Path]:
    """A fixture of ``n`` samples (the bundled example's images, copied under unique names) captured by the
    example's spec, the ONNX spec that gates the export on it, and the bare script's job file."""
    from parity.commands.capture import capture_pipeline
    from parity.model.pipeline import build_pipeline
    from parity.spec import load_spec
    from parity.store.fixtures import load_fixture

    bundled = load_fixture(ROOT / "fixtures" / "clip_dnn")
    images = workdir / f"images_{n}"
    images.mkdir()
    paths, biases = [], []
    for i in range(n):
        row = bundled.rows[i % len(bundled.rows)]
        path = images / f"{i:04d}_{Path(row.image).name}"
        shutil.copyfile(row.image, path)
        paths.append(path)
        biases.append(list(row.input_biases))
    spec_text = (ROOT / "examples" / "onnx" / "parity.toml").read_text().replace('"../../', f'"{ROOT}/')
    spec_text = spec_text.replace(f'fixtures = "{ROOT}/fixtures/clip_dnn"', f'fixtures = "{workdir / f"fixture_{n}"}"')
    spec_text = spec_text.replace('onnx = "clip_dnn.onnx"', f'onnx = "{workdir / "clip_dnn.onnx"}"')
    spec_path = workdir / f"onnx_{n}.toml"
    spec_path.write_text(spec_text)
    capture_pipeline(build_pipeline(load_spec(spec_path)), paths, workdir / f"fixture_{n}", input_biases=biases,
                     golden=[paths[0].name])
    captured = load_fixture(workdir / f"fixture_{n}")
    job = workdir / f"job_{n}.json"
    job.write_text(json.dumps({"onnx": str(workdir / "clip_dnn.onnx"), "fixture": str(captured.root),
                               "images": [str(r.image) for r in captured.rows],
                               "biases": [list(r.input_biases) for r in captured.rows]}))
    return spec_path, job


def main() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_export", ROOT / "examples" / "onnx" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export.export(*export.load_modules(), workdir / "clip_dnn.onnx")
        jobs = {n: fixture_of(workdir, n) for n in (1, N)}
        bare_script = workdir / "bare.py"
        bare_script.write_text(BARE)
        parity_cmd = {n: [sys.executable, "-m", "parity.cli", "check", "--spec", str(s)] for n, (s, _) in jobs.items()}
        bare_cmd = {n: [sys.executable, str(bare_script), str(j)] for n, (_, j) in jobs.items()}
        executable = polygraphy_executable()
        peers = {1: [], N: [("polygraphy", polygraphy_command(executable, workdir, jobs[N][1]))] if executable else []}
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for _ in range(ROUNDS):  # interleaved, so a busy neighbour slows every side alike
            for n in (1, N):
                for name, cmd in (("parity", parity_cmd[n]), ("bare", bare_cmd[n]), *peers[n]):
                    wall, rss, status = measured(cmd, env=env)
                    if status != 0:
                        print(f"   {name} at N = {n} exited {status}")
                    old = best.get((name, n), (float("inf"), 0.0))
                    best[(name, n)] = (min(old[0], wall), max(old[1], rss))
        print(f"\nONNX gate vs the bare onnxruntime + numpy script (best of {ROUNDS}, interleaved):")
        print(f"   {'job':<40} {'N = 1':>8} {f'N = {N}':>9} {'per sample':>11} {'peak RSS':>9}")
        per = {}
        for name in ("parity", "bare"):
            t1, tn = best[(name, 1)][0], best[(name, N)][0]
            per[name] = (tn - t1) / (N - 1)
            print(f"   {name:<40} {t1:7.2f}s {tn:8.2f}s {per[name] * 1e3:8.1f} ms {best[(name, N)][1]:7.0f} MiB")
        ratio = best[("parity", N)][0] / best[("bare", N)][0]
        fixed = best[("parity", 1)][0] - best[("bare", 1)][0]
        per_ratio = per["parity"] / per["bare"] if per["bare"] > 0 else float("inf")
        rss_ratio = best[("parity", N)][1] / best[("bare", N)][1]
        print(f"   parity / bare at N = {N}: {ratio:.2f}x (target <= 1.3x) {verdict(ratio, 1.3)}")
        print(f"   fixed cost at N = 1 beyond the bare script's: {fixed:.2f} s (target <= 1.5 s) {verdict(fixed, 1.5)}")
        print(f"   per-sample cost: {per_ratio:.2f}x the bare script's (target <= 1.3x) {verdict(per_ratio, 1.3)}")
        print(f"   peak RSS: {rss_ratio:.2f}x the bare script's (target <= 2x) {verdict(rss_ratio, 2.0)}")
        if not executable:
            print("   Polygraphy is not installed: the parity vs Polygraphy row is not measured")
            return
        wall, rss = best[("polygraphy", N)]
        ratio = best[("parity", N)][0] / wall
        print(f"   polygraphy run --onnxrt --load-inputs --load-outputs (pre-decoded inputs, no decisions) at N = {N}: "
              f"{wall:.2f} s, {rss:.0f} MiB; parity / polygraphy {ratio:.2f}x (target <= 1.0x) {verdict(ratio, 1.0)}")


def polygraphy_executable() -> str | None:
    """The ``polygraphy`` beside this interpreter (the venv's, off PATH under ``.venv/bin/python``), else on PATH."""
    here = Path(sys.executable).parent / "polygraphy"
    return str(here) if here.is_file() else shutil.which("polygraphy")


def polygraphy_command(executable: str, workdir: Path, job: Path) -> list[str]:
    """`polygraphy run --onnxrt` on the same export: the bare script's pre-decoded inputs (a batch of 8 per
    iteration) and the fixture's embeddings and outputs to compare with, both written with Polygraphy's own
    `save_json` and `RunResults.save` (what its ``--load-inputs`` and ``--load-outputs`` read back)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    spec = json.loads(job.read_text())
    scope: dict = {"JOB": spec}  # the bare script's own preprocessing, up to its loop
    exec(BARE.split("embeddings, outputs = []")[0].replace("job = json.load(open(sys.argv[1]))", "job = JOB"), scope)
    pixels, starts = scope["pixels"], range(0, len(spec["images"]), 8)
    feeds = [{"pixels": np.stack([pixels(p) for p in spec["images"][s:s + 8]]),
              "input_biases": np.asarray(spec["biases"][s:s + 8], np.int64)} for s in starts]
    save_json(feeds, str(workdir / "inputs.json"))
    embeddings, outputs = np.load(Path(spec["fixture"]) / "clip.npy"), np.load(Path(spec["fixture"]) / "outputs.npy")
    embeddings = embeddings.reshape(len(embeddings), -1)  # the fixture keeps (N, 1, D), the graph gives (B, D)
    expected = RunResults()
    expected.add([{"embedding": embeddings[s:s + 8], "outputs": outputs[s:s + 8]} for s in starts],
                 runner_name="fixture")
    expected.save(str(workdir / "outputs.json"))
    # A float32 export of a float32 reference: both outputs within 1e-4 absolute (parity's own budgets are tighter).
    return [executable, "run", spec["onnx"], "--onnxrt", "--load-inputs", str(workdir / "inputs.json"),
            "--load-outputs", str(workdir / "outputs.json"), "--atol", "1e-4", "--rtol", "0"]


if __name__ == "__main__":
    main()
