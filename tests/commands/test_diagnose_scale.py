"""A 20,000-line service log is diagnosed in bounded memory.

The model is written here (a timm ViT at 32 px, one block, and a linear head), not the bundled
example: each line costs a decode and a small forward, so twenty thousand of them run in seconds.
Peak RSS is measured per run in its own process (``os.wait4`` gives that child's own rusage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.support.paths import ROOT

WIDTH = 16
DISTINCT = 12  # distinct images, repeated along the log
# Peak RSS the 20,000-line run may add over the 1,000-line one. Holding every row's pixels would
# add 20,000 x 12 KiB = 234 MiB, every decoded image 60 MiB; the log's own parsed values
# (16 + 3 floats and a row record per line) stay well under this.
GROWTH_BUDGET_MIB = 48


class TinyHead(nn.Module):
    """Linear -> tanh, no input_biases: a classifier-like head written for this test."""

    def __init__(self, embedding_dim: int = WIDTH, num_outputs: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_outputs)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(embedding))


def _service(directory: Path) -> Path:
    """A spec for the tiny model with its weights, and the images it served."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=1)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    save_file(backbone.state_dict(), str(directory / "backbone.safetensors"))
    torch.save(TinyHead().state_dict(), directory / "head.pth")
    rng = np.random.default_rng(0)
    (directory / "images").mkdir()
    for i in range(DISTINCT):
        Image.fromarray(rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)).save(directory / "images" / f"r{i}.png")
    spec = directory / "service.toml"
    spec.write_text(
        'name = "tiny_service"\n[backbone]\nlibrary = "timm"\nmodel = "vit_tiny_patch16_224"\n'
        "kwargs = { img_size = 32, patch_size = 16, embed_dim = 16, depth = 1, num_heads = 1 }\n"
        'checkpoint = "backbone.safetensors"\nextract = "pre_logits"\n'
        '[preprocess]\ninterpolation = "bilinear"\ncrop_pct = 1.0\ncrop_mode = "center"\ninput_size = [3, 32, 32]\n'
        "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n"
        f'[head]\nclass = "{__name__}:TinyHead"\nweights = "head.pth"\nkwargs = {{}}\n'
        "[runtime]\nbatch_size = 256\n")
    return spec


def _write_log(spec_path: Path, lines: int, path: Path) -> Path:
    """What the service logged: its pipeline's embedding and outputs for each request, repeating the images."""
    from parity.model.pipeline import build_pipeline
    from parity.spec import load_spec

    pipeline = build_pipeline(load_spec(spec_path), fingerprints=False)
    records = []
    for i in range(DISTINCT):
        image = spec_path.parent / "images" / f"r{i}.png"
        embedding = pipeline.embed(pipeline.preprocess(image)[None])
        records.append(json.dumps({"image": f"images/{image.name}", "embedding": embedding[0].tolist(),
                                   "outputs": pipeline.run_head(embedding)[0].tolist()}) + "\n")
    with open(path, "w") as f:
        f.writelines(records[i % DISTINCT] for i in range(lines))
    return path


# Linux counts the pages a child had before exec (its fork of the parent) in the child's peak RSS:
# forked from this test process, which holds torch and a pipeline, a run would report at least
# this process's RSS. A small launcher process forks the measured one instead.
MEASURE = r"""
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def _diagnose(spec: Path, log: Path) -> tuple[float, int, str]:
    """Peak RSS (MiB), exit status and output of ``parity diagnose --logged`` in its own process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    measured = log.with_suffix(".rss")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(measured), sys.executable, "-m", "parity.cli",
                           "diagnose", "--spec", str(spec), "--logged", str(log)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=spec.parent)
    out = proc.stdout.decode(errors="replace")
    assert measured.is_file(), out
    rss, status = measured.read_text().split()
    return int(rss) / 1024, int(status), out


@pytest.mark.slow
def test_a_20000_line_log_is_diagnosed_in_bounded_memory(tmp_path):
    spec = _service(tmp_path)
    small, large = _write_log(spec, 1_000, tmp_path / "small.jsonl"), _write_log(spec, 20_000, tmp_path / "large.jsonl")
    small_rss, small_status, small_out = _diagnose(spec, small)
    large_rss, large_status, large_out = _diagnose(spec, large)
    assert small_status == 0, small_out
    assert large_status == 0, large_out
    assert "20000" in large_out.replace(",", "") or "20 000" in large_out, large_out
    growth = large_rss - small_rss
    assert growth < GROWTH_BUDGET_MIB, (f"peak RSS {small_rss:.0f} MiB at 1,000 lines, {large_rss:.0f} MiB at "
                                        f"20,000 (+{growth:.0f}, budget {GROWTH_BUDGET_MIB} MiB)")
