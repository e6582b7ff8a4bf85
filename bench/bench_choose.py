"""Cost of `parity choose` beyond its cells' own work, printed as a ratio (`make bench`).

One `parity choose` run on the bundled clip_dnn example (its default deployment axes on the CPU:
float32 and bfloat16 at batch sizes 1 and 8), in this process, against what its cells measured:

* wall: the command as `parity choose --spec specs/clip_dnn.toml --device cpu --json F` runs it
  (spec load, pipeline build, decode, preprocessing, every cell's passes, comparisons, the table);
* cells' own time: every backbone batch of every cell as the matrix's own clock timed it
  (`parity.model.batches.extract_pixels` ``timings``, the warm-up batch included: the matrix drops
  it from the cell's latency but a cell cannot run without it), plus each model copy's conversion
  (``CellCost.load_s`` of a non-default dtype), plus one model load (the pipeline's build, its
  library imports included: ``CellCost.load_s`` of the spec's own dtype).

The target is wall <= 1.15x the cells' own time. The CellCost-only estimate (images x repeat /
throughput per trunk pass, which counts the warm-up batch at the timed rate) is printed beside
it. Above the target, a cProfile run of the same command says where the rest goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "clip_dnn.toml"
TARGET = 1.15
# Where a choose run's time goes: (label, function names whose cumulative time is that work). The
# parts do not nest in one another; what they leave of the wall time is the rest (imports, Progress).
PARTS = (
    ("spec and fixture load", ("load_spec", "load_fixture")),
    ("pipeline build (model load)", ("build_pipeline",)),
    ("model copies (deepcopy + .to)", ("deepcopy",)),
    ("image decode", ("load_image",)),
    # normalized_pixels calls unit_pixels (the geometry): counting both would count the geometry twice.
    ("preprocessing (geometry, per-pixel), once per chunk", ("normalized_pixels",)),
    ("backbone batches", ("extract_pixels",)),
    ("comparisons against the reference", ("compare_arrays",)),
    ("table and JSON", ("render_choice", "write_json")),
)


def machine() -> str:
    """CPU model, cores, threads torch uses, and the load average now."""
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                     platform.processor() or platform.machine())
    except OSError:
        model = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"load average (1, 5, 15 min) {load}")


class BatchClock:
    """Records every backbone batch's seconds the matrix measures, per (device, dtype, batch size)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple, list[float]] = defaultdict(list)

    def __enter__(self) -> BatchClock:
        import parity.commands.matrix as matrix

        self._matrix, self._original = matrix, getattr(matrix, "extract_pixels", None)
        if self._original is None:  # the matrix embeds another way now: every pass counts at its CellCost estimate
            return self

        def recorded(model, pixels, modes, *, timings=None, **kwargs):
            own: list[float] = []
            out = self._original(model, pixels, modes, timings=own, **kwargs)
            if timings is not None:
                timings.extend(own)
            self.seconds[(kwargs["device"], str(kwargs["dtype"]).removeprefix("torch."), kwargs["batch_size"])] += own
            return out

        matrix.extract_pixels = recorded
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self._matrix.extract_pixels = self._original


# The timed run's other work, clocked by wrapping the functions that do it where the command calls them
# (label, module, attribute); none calls another. Per-call cost of the wrapper: well under a microsecond.
STEPS = (
    ("spec and fixture load", "parity.cli", "load_spec"),
    ("spec and fixture load", "parity.commands.matrix", "load_fixture"),
    ("image decode", "parity.commands.matrix", "load_image"),
    ("preprocessing (once per image, shared by the cells)", "parity.commands.matrix", "_Engine.normalized_pixels"),
    ("comparisons against the reference", "parity.commands.matrix", "compare_arrays"),
    ("table and JSON", "parity.cli", "render_choice"),
    ("table and JSON", "parity.cli", "write_json"),
)


class Stopwatch:
    """Seconds spent in each of `STEPS` during the run; a step the code no longer has is left out."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def __enter__(self) -> Stopwatch:
        import importlib

        for label, module, attribute in STEPS:
            owner = importlib.import_module(module)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name, None)
            if original is None:
                continue
            setattr(owner, name, self._wrapped(label, original))
            self._undo.append((owner, name, original))
        return self

    def _wrapped(self, label: str, original):
        def clocked(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - began
        return clocked

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def run_choose(spec: Path, out: Path, repeat: int) -> tuple[int, float]:
    """`parity choose` as the command line runs it, in this process: exit status and wall seconds."""
    from parity.cli import main

    argv = ["choose", "--spec", str(spec), "--device", "cpu", "--repeat", str(repeat), "--json", str(out)]
    began = time.perf_counter()
    status = main(argv)
    return status, time.perf_counter() - began


def passes(document: dict) -> dict[tuple, dict]:
    """One cost per trunk pass (cells that share a pass share its CellCost), keyed like `BatchClock`."""
    found = {}
    for cell in document["matrix"]["cells"]:
        cost = cell.get("cost")
        if cost:
            values = dict(cell["cell"]["values"])
            found.setdefault((values["device"], values["dtype"], int(values["batch_size"])), cost)
    return found


def profile(spec: Path, out: Path, repeat: int) -> None:
    """Run the command again under cProfile; print where its time goes."""
    from parity.cli import main

    profiler = cProfile.Profile()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        profiler.enable()
        began = time.perf_counter()
        main(["choose", "--spec", str(spec), "--device", "cpu", "--repeat", str(repeat), "--json", str(out)])
        wall = time.perf_counter() - began
        profiler.disable()
    stats = pstats.Stats(profiler)
    cumulative: dict[str, float] = defaultdict(float)
    for (_, _, name), (_, _, _, ct, _) in stats.stats.items():
        for label, names in PARTS:
            if name in names:
                cumulative[label] += ct
    print(f"\nprofile (cProfile, a second run: {wall:.2f} s wall under the profiler; modules are imported by now):")
    rest = wall - sum(cumulative.values())
    for label, seconds in [*((label, cumulative[label]) for label, _ in PARTS), ("the rest", rest)]:
        print(f"  {label:<52} {seconds:7.2f} s  {100 * seconds / wall:5.1f} %")
    print("  top 15 by own time:")
    stats.sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="spec to choose for (default: the bundled clip_dnn)")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes per cell (parity choose --repeat)")
    parser.add_argument("--profile", action="store_true", help="profile even when the ratio is within the target")
    args = parser.parse_args()

    # machine() imports torch before the timed run: the interpreter's torch import is not the command's.
    print(f"machine: {machine()}")
    print(f"\n$ parity choose --spec {args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec} "
          f"--device cpu --repeat {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        out = Path(tmp) / "choice.json"
        with BatchClock() as clock, Stopwatch() as steps:
            status, wall = run_choose(args.spec, out, args.repeat)
        document = json.loads(out.read_text())
        costs = passes(document)
        batches = sum(sum(s) for s in clock.seconds.values())
        # A pass whose batches did not go through extract_pixels (another runtime) counts at its CellCost estimate.
        unclocked = {key: c for key, c in costs.items() if key not in clock.seconds and c["throughput"] > 0}
        batches += sum(c["images"] * c["repeat"] / c["throughput"] for c in unclocked.values())
        # The spec's own dtype's load_s is the pipeline's build; every other dtype's is its copy's conversion.
        own_dtype = _spec_dtype(args.spec)
        loads = {(key[0], key[1]): c["load_s"] for key, c in costs.items()}
        build = next((s for (_, dtype), s in loads.items() if dtype == own_dtype), 0.0)
        conversions = sum(s for (_, dtype), s in loads.items() if dtype != own_dtype)
        own = batches + conversions + build
        estimate = sum(c["images"] * c["repeat"] / c["throughput"] for c in costs.values() if c["throughput"] > 0)
        estimate += conversions + build
        k = sum(1 for c in document["matrix"]["cells"] if c.get("cost"))
        ratio = wall / own
        print(f"\nexit status {status}; {k} cells ran in {len(costs)} trunk passes")
        print(f"  choose wall time:                          {wall:7.2f} s")
        print(f"  cells' own time:                           {own:7.2f} s = backbone batches {batches:.2f} s "
              f"(warm-ups included) + model copies {conversions:.2f} s + one model load {build:.2f} s")
        for key in unclocked:
            print(f"    {'-'.join(map(str, key)):<22} not clocked batch by batch: its CellCost estimate counts")
        for key, seconds in clock.seconds.items():
            print(f"    {'-'.join(map(str, key)):<22} {len(seconds):3d} batches {sum(seconds):6.2f} s "
                  f"(first/warm-up {seconds[0]:.3f} s)")
        print(f"  CellCost-only estimate:                    {estimate:7.2f} s (images x repeat / throughput per pass "
              f"+ loads; counts the warm-up batch at the timed rate)")
        print(f"  ratio wall / cells' own time: {ratio:.3f}x (target <= {TARGET}x); "
              f"wall / CellCost estimate: {wall / estimate:.3f}x; overhead {wall - own:.2f} s")
        print("  where the overhead goes, clocked in the same run:")
        rest = wall - own - sum(steps.seconds.values())
        for label, seconds in [*steps.seconds.items(), ("the rest (imports of the command's modules, progress)", rest)]:
            print(f"    {label:<56} {seconds:6.2f} s")
        print(f"  load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if ratio > TARGET or args.profile:
            profile(args.spec, Path(tmp) / "profiled.json", args.repeat)


def _spec_dtype(spec: Path) -> str:
    from parity.spec import load_spec

    return load_spec(spec).runtime.dtype


if __name__ == "__main__":
    main()
