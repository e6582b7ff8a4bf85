"""Bad-input cases run as command lines in one process (`tests.support.bad_input_runner`), and the checks
every outcome must pass: the expected exit status, the message naming the problem, no traceback, no
verdict printed before a refusal, within its time, and every pre-existing byte where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    """One bad input: how to build it (returns the argv), what must come out, and how fast.

    ``refused``: exit 2 before any work is done, so no verdict may be printed; ``seconds``: the
    case's own time limit (a hang is a failure, recorded by the runner's alarm); ``sys_path``: where
    the case's own modules (a user's head class) are imported from.
    """

    name: str
    build: Callable[[Path], list[str]]
    expect: tuple[int, ...] = (2,)
    says: tuple[str, ...] = ()
    refused: bool = False
    seconds: int = 60
    sys_path: tuple[str, ...] = ()  # prepended to sys.path for the case ("MODULES": `run_corpus`'s modules)


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every regular file under ``root`` (links not followed) and its bytes."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def changed(before: dict[Path, bytes]) -> list[str]:
    """The files of a `snapshot` that are gone or hold other bytes now."""
    return [f"{p}: {'removed' if not p.is_file() else 'changed'}" for p, data in before.items()
            if not p.is_file() or p.read_bytes() != data]


def run_corpus(cases: list[Case], work: Path, *, timeout: float = 600, modules: Mapping[str, str] | None = None,
               peak_rss: int | None = None) -> list[str]:
    """Build and run every case in one runner process; the problems found (empty: all clean).

    Args:
        modules: module name -> source, written to one folder that a case's ``sys_path`` names as ``"MODULES"``.
        peak_rss: bytes the runner process's peak resident memory must stay under, over every case.
    """
    folder = work / "modules"
    folder.mkdir()
    for name, source in (modules or {}).items():
        (folder / f"{name}.py").write_text(source)
    runs = []
    for i, case in enumerate(cases):
        directory = work / f"case{i}"
        directory.mkdir()
        runs.append({"name": case.name, "argv": case.build(directory), "seconds": case.seconds,
                     "sys_path": [str(folder) if p == "MODULES" else p for p in case.sys_path]})
    before = snapshot(work)
    (work / "cases.json").write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, "-m", "tests.support.bad_input_runner", str(work / "cases.json"),
                           str(work / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return [f"the runner failed:\n{proc.stderr[-3000:]}"]
    results = {r["name"]: r for r in json.loads((work / "results.json").read_text())}
    problems = []
    for case in cases:
        r = results[case.name]
        text = r["stdout"] + r["stderr"]
        if r["escaped"]:
            problems.append(f"{case.name}: escaped main():\n{r['escaped'][-1500:]}")
        elif r["rc"] not in case.expect:
            problems.append(f"{case.name}: exit {r['rc']}, expected {case.expect}\n{text[-1500:]}")
        elif "Traceback" in text:
            problems.append(f"{case.name}: printed a traceback\n{text[-1500:]}")
        elif case.refused and any(word in r["stdout"] for word in ("PARITY", "DRIFT", "NO VERDICT")):
            problems.append(f"{case.name}: ran before refusing its output target\n{text[-1500:]}")
        else:
            problems += [f"{case.name}: output does not say {s!r}\n{text[-1500:]}" for s in case.says if s not in text]
    problems += [f"data loss: {line}" for line in changed(before) if "cases.json" not in line]
    peak = max((r["maxrss_bytes"] for r in results.values()), default=0)
    if peak_rss is not None and peak >= peak_rss:
        problems.append(f"peak RSS {peak / 2**30:.2f} GiB, over {peak_rss / 2**30:.2f} GiB")
    return problems


def unwritable_directory(tmp: Path) -> Path:
    """A directory this process cannot create files in (a read-only one; as root, /sys)."""
    if os.geteuid() != 0:
        directory = tmp / "read-only"
        directory.mkdir()
        directory.chmod(0o500)
        return directory
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no unwritable directory on this machine (root and /sys writable)")
