"""Speed of gating shipped code (`make bench`, row 5): the Space's ``predict`` gated through the
python runner (module recognition, weight fingerprints, forward hooks, the head on the reference
embeddings, the comparator) vs calling the same ``predict`` over the same images in a plain loop.
Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "hf_space" / "parity.toml"
REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the Space imports the trained head class from reference/

    from PIL import Image

    from parity.commands.check import judge_run
    from parity.store.fixtures import load_fixture
    from parity.runners import run_candidate
    from parity.runners.python_app import load_function
    from parity.spec import load_spec

    spec = load_spec(SPEC)
    fixture = load_fixture(spec.fixture_root())
    predict = load_function(spec.candidate.target, spec.candidate.python_path)  # imported once, as a service does

    def plain() -> None:
        for row in fixture.rows:
            image = Image.open(row.image)
            image.load()
            predict(image, list(row.input_biases))

    def gated() -> None:
        report = judge_run(run_candidate(spec, fixture), fixture, spec)
        assert report.passed, "the shipped app must pass its gate for the timing to mean anything"

    jobs = {"plain": plain, "gated": gated}
    plain()  # warm-up: first-call allocations and lazy imports in both paths
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for repeat in range(args.repeats):
        order = list(itertools.islice(itertools.cycle(jobs), repeat, repeat + len(jobs)))
        for name in order:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    ratio = best["gated"] / best["plain"]
    print(f"5. shipped app gated through the python runner (hooks, fingerprints, head twice, comparator) vs its "
          f"predict in a plain loop, {len(fixture.rows)} images: {best['gated']:.2f} s vs {best['plain']:.2f} s -> "
          f"ratio {ratio:.3f} (overhead {100 * (ratio - 1):+.1f} %; target <= 1.15)")


if __name__ == "__main__":
    main()
