"""Speed of gating a served candidate (`make bench`, row 7): the bundled HTTP service
(examples/http_service/server.py, a real uvicorn process on a free 127.0.0.1 port) gated as
`parity check --candidate url:...` does once the spec and fixture are loaded (``run_candidate``
then ``judge_run``) vs the same requests (same multipart body and field, same order) sent by a
plain ``urllib`` loop that parses the JSON answers into a numpy array and compares nothing.
Interleaved, median of ``--repeats``. Target: ratio <= 1.15. The whole CLI (a fresh process:
imports, spec, fixture, gate, report) is timed apart, outside the ratio. ``--profile`` prints
where the gate's time goes (cProfile, top 10).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "http_service" / "server.py"
SPEC = ROOT / "examples" / "http_service" / "parity.toml"
REPEATS = 3
TARGET = 1.15
# One torch thread in the service, as a worker usually runs: on a shared machine its threads otherwise
# contend with everything else and a forward takes ~30x longer and swings, burying the client's cost.
SERVER_THREADS = 1
START_TIMEOUT = 120.0  # seconds for the service to load its model and answer /health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(threads: int) -> Iterator[str]:
    """The example service as its own process on 127.0.0.1 with ``threads`` torch threads; its /predict
    URL once it answers /health.

    Stopped on the way out whatever the exit (an error, Ctrl-C, SIGTERM): its own session keeps the
    terminal's Ctrl-C away from it, so only this bench stops it, terminate then kill.
    """
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    answer.read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the example service did not start on port {port}:\n"
                                     + process.stderr.read().decode(errors="replace")[-2000:]) from None
                time.sleep(0.2)
        yield f"{base}/predict"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def timed(jobs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each job ``repeats`` times, interleaved, the order rotated each round: wall seconds, and this
    process's CPU seconds (the client's own work, which the service's scheduling does not blur)."""
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for repeat in range(repeats):
        for name in itertools.islice(itertools.cycle(jobs), repeat, repeat + len(jobs)):
            start, used = time.perf_counter(), time.process_time()
            jobs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - used)
    return wall, cpu


def bench(repeats: int, profile: bool, cli: bool, threads: int) -> None:
    import numpy as np

    from parity.commands.check import judge_run
    from parity.runners import run_candidate
    from parity.runners.http import encode_multipart
    from parity.spec import load_spec, select_candidate
    from parity.store.fixtures import load_fixture

    with served(threads) as url:
        spec = select_candidate(load_spec(SPEC), f"url:{url}", base=ROOT)
        fixture = load_fixture(spec.fixture_root())
        assert spec.candidate.kind == "url" and (spec.candidate.send or "multipart") == "multipart"
        field = spec.candidate.field
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1
        split: dict[str, list[float]] = {"run_candidate": [], "judge_run": []}
        # Seconds per request: the plain loop's, and the gate's between its progress calls (parity's
        # per-sample reading included): medians over every request, steadier than whole runs.
        each: dict[str, list[float]] = {"gate": [], "plain": []}

        def plain() -> np.ndarray:
            outputs = []
            for row in fixture.rows:
                start = time.perf_counter()
                fields = [("input_biases", json.dumps(list(row.input_biases)))] if row.input_biases else []
                body, kind = encode_multipart(fields, [(field, row.image.name, row.image.read_bytes())])
                request = urllib.request.Request(url, data=body, headers={"Content-Type": kind,
                                                                          "Accept": "application/json"})
                with opener.open(request, timeout=spec.candidate.timeout) as answer:
                    outputs.append(np.asarray(json.loads(answer.read())["outputs"], dtype=np.float32))
                each["plain"].append(time.perf_counter() - start)
            return np.stack(outputs)

        def gate() -> None:
            marks = [time.perf_counter()]
            run = run_candidate(spec, fixture, progress=lambda done, total: marks.append(time.perf_counter()))
            middle = time.perf_counter()
            report = judge_run(run, fixture, spec)
            split["run_candidate"].append(middle - marks[0])
            split["judge_run"].append(time.perf_counter() - middle)
            each["gate"].extend(b - a for a, b in itertools.pairwise(marks))
            assert report.passed, "the example service must pass its gate for the timing to mean anything"

        def command() -> None:
            argv = [sys.executable, "-c", "from parity.cli import main; raise SystemExit(main())",
                    "check", "--spec", str(SPEC), "--candidate", f"url:{url}"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True)
            assert done.returncode == 0, f"parity check exited {done.returncode}:\n{done.stdout.decode()[-2000:]}"

        # Warm-up: the service's first forward, lazy imports and first-call allocations in both paths.
        np.testing.assert_allclose(plain(), fixture.outputs, atol=1e-4, rtol=1e-4)
        gate()
        for values in itertools.chain(split.values(), each.values()):
            values.clear()
        jobs: dict[str, Callable[[], object]] = {"gate": gate, "plain": plain}
        if cli:
            jobs["cli"] = command
        times, cpu = timed(jobs, repeats)

        median = {name: statistics.median(values) for name, values in times.items()}
        ratio = median["gate"] / median["plain"]
        verdict = "PASS" if ratio <= TARGET else "MISS"
        print(f"7. served candidate (examples/http_service on 127.0.0.1, multipart, {threads} torch "
              f"thread{'s' * (threads != 1)}) gated through the url runner (run_candidate + judge_run) vs the same "
              f"requests in a plain urllib loop, N = {len(fixture.rows)} images, median of {repeats}: "
              f"{median['gate']:.3f} s vs {median['plain']:.3f} s -> ratio {ratio:.3f} "
              f"(overhead {100 * (ratio - 1):+.1f} %; target <= {TARGET}) {verdict}")
        print(f"   the gate's time: requests (run_candidate) {statistics.median(split['run_candidate']):.3f} s, "
              f"judging (judge_run) {statistics.median(split['judge_run']):.3f} s; per request (median of "
              f"{len(each['plain'])}): gate {1e3 * statistics.median(each['gate']):.1f} ms, plain "
              f"{1e3 * statistics.median(each['plain']):.1f} ms")
        print(f"   client CPU (this process, median): gate {1e3 * statistics.median(cpu['gate']):.1f} ms, plain "
              f"{1e3 * statistics.median(cpu['plain']):.1f} ms; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f} (a loaded machine moves the service's time, and so both wall times)")
        print(f"   each run (s): gate {', '.join(f'{t:.3f}' for t in times['gate'])}; "
              f"plain {', '.join(f'{t:.3f}' for t in times['plain'])}")
        if cli:
            print(f"   the whole CLI (`parity check --candidate url:...` in a fresh process: imports, spec, fixture, "
                  f"gate, report), not in the ratio: {median['cli']:.2f} s")
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(gate)
            print("   cProfile of one gate, top 10 by own time, then by cumulative time:")
            for key in ("tottime", "cumulative"):
                pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(10)
        elif ratio > TARGET:
            print("   over the target: rerun with --profile to see where the gate's extra time goes")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--profile", action="store_true", help="print a cProfile top 10 of one gate (after the timed runs)")
    parser.add_argument("--server-threads", type=int, default=SERVER_THREADS,
                        help="the service's torch threads (default %(default)s: one per worker, as services run; more "
                             "threads on a loaded machine make every forward wait on the others)")
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip timing the whole CLI")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    # SIGTERM unwinds like Ctrl-C, so the service is stopped either way.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        bench(args.repeats, args.profile, args.cli, args.server_threads)
    except KeyboardInterrupt:
        print("interrupted; the service was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
