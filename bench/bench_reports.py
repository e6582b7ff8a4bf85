"""Time to render all four report files for a large run, and their sizes (`make bench`).

A synthetic check report (random arrays, no model) with SAMPLES samples in the embedding and
outputs stages and a few golden images, written by `parity.report.files.write_reports`. The budget
is 5 s for 3,000 samples and an HTML page under 5 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from parity.judge.arrays import compare_arrays
from parity.results import Report, StageResult, Status, Tolerance

BUDGET_S = 5.0
HTML_BUDGET = 5_000_000


def synthetic_report(samples: int, seed: int = 0) -> Report:
    rng = np.random.default_rng(seed)
    names = [f"img_{i:05d}.jpg" for i in range(samples)]
    tol = Tolerance(atol=1e-5, rtol=1.3e-6, min_cosine=0.99999)
    embedding = rng.normal(size=(samples, 768)).astype(np.float32)
    outputs = rng.normal(size=(samples, 5))
    pixels = rng.normal(size=(8, 3, 224, 224))

    def stage(name: str, candidate, reference, **kwargs) -> StageResult:
        comparison = compare_arrays(candidate, reference, tolerance=tol, names=names[:len(reference)], **kwargs)
        return StageResult(name, Status.PASS if comparison else Status.FAIL, "", comparison=comparison)

    return Report("synthetic.toml", "fixtures/synthetic", "cpu", "float32", (
        StageResult("load", Status.PASS, "strict"),
        stage("pixels", pixels + rng.normal(scale=0.01, size=pixels.shape), pixels),
        stage("embedding", embedding + rng.normal(scale=1e-3, size=embedding.shape), embedding, cosine=True),
        stage("head", outputs + rng.normal(scale=1e-7, size=outputs.shape), outputs),
        stage("outputs", outputs + rng.normal(scale=1e-4, size=outputs.shape), outputs),
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    import matplotlib.figure  # noqa: F401  (import time is reported apart from rendering)

    from parity.report.files import write_reports

    imported = time.perf_counter() - start
    report = synthetic_report(args.samples)
    times, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            paths = write_reports(report, Path(tmp) / str(i), summary=False)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        sizes = {kind: path.stat().st_size for kind, path in paths.items()}
    median = statistics.median(times)
    print(f"reports: {args.samples} samples, all four files in {median:.2f} s (median of {args.repeats}; "
          f"budget {BUDGET_S:g} s; CPU {statistics.median(cpu):.2f} s; matplotlib import {imported:.2f} s) "
          + ("OK" if median < BUDGET_S else "OVER BUDGET")
          # Wall time on a loaded machine is mostly waiting: the load says how far to trust it.
          + f" [load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs]")
    print("reports: sizes " + ", ".join(f"{paths[kind].name} {size / 1000:.0f} KB" for kind, size in sizes.items())
          + f" (HTML budget {HTML_BUDGET / 1e6:g} MB) " + ("OK" if sizes["html"] < HTML_BUDGET else "OVER BUDGET"))


if __name__ == "__main__":
    main()
