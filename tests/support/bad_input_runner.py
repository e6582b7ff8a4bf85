"""Runs many ``parity`` command lines in one process, each under a time limit, for the bad-input corpus.

``python -m tests.support.bad_input_runner CASES.json RESULTS.json``: CASES is a list of
``{"name", "argv"}``; for each, `parity.cli.main(argv)` runs exactly as ``python -m parity.cli``
would, with its output captured. An exception that escapes ``main`` is recorded with its
traceback, a case past its time limit as a hang. Each case's address space is capped at the size
when it starts plus ``headroom`` bytes, so a case that tries to allocate gigabytes fails instead
of swapping; the peak RSS is reported. The cap is set again before each case: what an earlier case
left mapped (a failed Ray connection keeps ~1.2 GiB of address space) is not the next case's.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

CASE_SECONDS = 90
HEADROOM = 2 << 30


class _Hang(BaseException):
    """Raised by the alarm: a BaseException so that no ``except Exception`` in the code under test hides it."""


def _alarm(_signum, _frame):
    raise _Hang()


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run(cases: list[dict], *, headroom: int = HEADROOM) -> list[dict]:
    from parity.cli import main

    import torch  # noqa: F401  (imported before the cap: its mappings are not a case's allocation)

    signal.signal(signal.SIGALRM, _alarm)
    results = []
    for case in cases:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = _vm_size() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        out, err = io.StringIO(), io.StringIO()
        start, escaped, rc = time.monotonic(), "", None
        sys.path[:0] = case.get("sys_path", [])  # where a case's own head modules live
        signal.alarm(case.get("seconds", CASE_SECONDS))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(case["argv"])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        except _Hang:
            escaped = f"hang: still running after {case.get('seconds', CASE_SECONDS)} s"
        except BaseException:  # noqa: BLE001  (every escape is a finding, recorded with its traceback)
            escaped = traceback.format_exc()
        finally:
            signal.alarm(0)
        results.append({"name": case["name"], "rc": rc, "escaped": escaped, "stdout": out.getvalue()[-4000:],
                        "stderr": err.getvalue()[-4000:], "seconds": round(time.monotonic() - start, 2),
                        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return results


if __name__ == "__main__":
    cases_path, results_path = Path(sys.argv[1]), Path(sys.argv[2])
    results_path.write_text(json.dumps(run(json.loads(cases_path.read_text()))))
