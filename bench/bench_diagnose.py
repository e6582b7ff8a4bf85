"""Cost of explaining a red gate (`make bench`, row 6): `parity diagnose` on the Space's ``predict`` with a
bug injected (bilinear resize in the app) vs `parity check` on the same app. Both in-process, interleaved,
best of ``--repeats``. Target: ratio <= 3.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "examples" / "hf_space"
REPEATS = 3
TRANSFORM = "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))"
BILINEAR = ("transform = T.Compose([T.Resize(336, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(336), "
            "T.ToTensor(), T.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])")


def bugged_space(directory: Path) -> Path:
    """A copy of the Space whose app resizes with bilinear, beside a link to the bundled fixtures."""
    app = directory / "examples" / "hf_space"
    app.mkdir(parents=True)
    text = (SPACE / "app.py").read_text()
    assert TRANSFORM in text, "the Space's transform line moved; update the bench"
    text = text.replace(TRANSFORM, BILINEAR).replace("import timm\n", "import timm\nfrom torchvision import transforms as T\n")
    (app / "app.py").write_text(text)
    shutil.copy(SPACE / "parity.toml", app / "parity.toml")
    os.symlink(ROOT / "fixtures", directory / "fixtures")
    return app / "parity.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the Space imports the trained head class from reference/

    from parity.commands.check import run_check
    from parity.commands.diagnose import diagnose_candidate
    from parity.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(bugged_space(Path(tmp)))

        def check() -> None:
            assert not run_check(spec).passed, "the injected bug must fail the gate"

        def diagnose() -> None:
            assert diagnose_candidate(spec).drift

        jobs = {"check": check, "diagnose": diagnose}
        check()  # warm-up: the app's import and first-call allocations
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for repeat in range(args.repeats):
            for name in itertools.islice(itertools.cycle(jobs), repeat, repeat + len(jobs)):
                start = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    ratio = best["diagnose"] / best["check"]
    print(f"6. diagnose on the shipped app with a bilinear resize injected vs its check: {best['diagnose']:.2f} s vs "
          f"{best['check']:.2f} s -> ratio {ratio:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
