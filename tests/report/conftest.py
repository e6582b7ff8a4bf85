"""`parity check --report` run once for the report tests: on the example and on a bilinear candidate."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from parity.cli import main
from tests.support.reports import DRIFT
from tests.support.specs import write_spec


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path, str]]:
    """name -> (exit status, report directory, stderr): stderr in a file and a step summary, as in CI."""
    root = tmp_path_factory.mktemp("reports")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARITY_PROGRESS_INTERVAL", "0")
        patch.setenv("GITHUB_STEP_SUMMARY", str(root / "summary.md"))
        for name, replacements in (("passing", None), ("drifted", DRIFT)):
            spec = write_spec(root, replacements, name=f"{name}.toml")
            log = root / f"{name}.stderr"
            with log.open("w") as stderr, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                code = main(["check", "--spec", str(spec), "--report", str(root / name)])
            results[name] = (code, root / name, log.read_text())
    return results
