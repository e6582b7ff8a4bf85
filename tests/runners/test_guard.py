"""The user's code cannot end parity, set its exit status or hold it forever (`parity.runners.guard`).

The candidates are written here, not taken from the examples: a lookup-table app (outputs by
file name, no torch) and a handler that answers by the sha256 of the bytes it is sent. Each
misbehaves on one sample (``chelsea.png``) or while starting. Exits, interrupts and sleeps run in
this process through `parity.cli.main`; ``os._exit`` and a non-daemon thread run on the real
command line in a subprocess, bounded by ``timeout=``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from parity.cli import main
from parity.store.fixtures import load_fixture
from tests.support.paths import EXAMPLE_FIXTURES, ROOT
from tests.support.specs import write_spec

VICTIM = "chelsea.png"
TIMEOUT = 2.0  # [candidate].timeout of the sleeping candidates


def _table(key) -> dict:
    fixture = load_fixture(EXAMPLE_FIXTURES)
    return {key(row.image): fixture.outputs[i].tolist() for i, row in enumerate(fixture.rows)}


def app_spec(tmp: Path, *, at_import: str = "", in_predict: str = "pass", timeout: float = 30.0) -> Path:
    """A spec whose candidate is a lookup app (a module of its own name); ``in_predict`` runs on `VICTIM`."""
    module = f"lookup_{uuid.uuid4().hex[:8]}"  # a stuck import holds its module's lock: never share a name
    table = _table(lambda path: path.name)
    (tmp / f"{module}.py").write_text(
        f"import os, sys, threading, time\n\nTABLE = {table!r}\n{at_import}\n\n\n"
        "def predict(path):\n"
        "    name = os.path.basename(path)\n"
        f"    if name == {VICTIM!r}:\n"
        f"        {in_predict}\n"
        "    return {'scores': TABLE[name]}\n")
    spec = write_spec(tmp)
    spec.write_text(spec.read_text() + f'\n[candidate]\npython = "{module}:predict"\ninputs = ["image_path"]\n'
                                       f'output_key = "scores"\npython_path = "{tmp}"\ntimeout = {timeout}\n')
    return spec


def handler_spec(tmp: Path, *, in_init: str = "pass", in_call: str = "pass", timeout: float = 30.0) -> Path:
    """A spec whose candidate is a handler answering by the sha256 of the image bytes."""
    table = _table(lambda path: hashlib.sha256(path.read_bytes()).hexdigest())
    victim = hashlib.sha256((EXAMPLE_FIXTURES / "images" / VICTIM).read_bytes()).hexdigest()
    (tmp / "handler.py").write_text(
        f"import hashlib, os, sys, time\n\nTABLE = {table!r}\n\n\n"
        "class EndpointHandler:\n"
        "    def __init__(self, path=''):\n"
        f"        {in_init}\n\n"
        "    def __call__(self, data):\n"
        "        digest = hashlib.sha256(data['inputs']).hexdigest()\n"
        f"        if digest == {victim!r}:\n"
        f"            {in_call}\n"
        "        return TABLE[digest]\n")
    spec = write_spec(tmp)
    spec.write_text(spec.read_text() + f'\n[candidate]\nendpoint_handler = "handler.py"\nsend = "bytes"\n'
                                       f"timeout = {timeout}\n")
    return spec


def _check(spec: Path, capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    status = main(["check", "--spec", str(spec)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err, time.monotonic() - start


def _cli(spec: Path, *, limit: float = 120) -> tuple[int, str, float]:
    """``parity check`` on the real command line (``main()`` without argv), in a subprocess of its own."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from parity.cli import main; raise SystemExit(main())",
                           "check", "--spec", str(spec)], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _clean(text: str) -> None:
    assert "Traceback" not in text, text
    assert "internal error" not in text, text


@pytest.mark.parametrize("misbehaviour,says", [
    ("sys.exit(0)", "called sys.exit(0)"),
    ("sys.exit(1)", "called sys.exit(1)"),
    ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
])
def test_an_exit_or_interrupt_in_predict_is_that_samples_error(tmp_path, capsys, misbehaviour, says):
    status, text, _ = _check(app_spec(tmp_path, in_predict=misbehaviour), capsys)
    assert status == 1, text
    assert f"{VICTIM}: lookup_" in text and f":predict {says}" in text
    assert "1 of 17 samples failed" in text  # the others still ran
    _clean(text)


@pytest.mark.parametrize("misbehaviour,says", [
    ("sys.exit(0)", "called sys.exit(0)"),
    ("raise KeyboardInterrupt('stop')", "raised KeyboardInterrupt: stop"),
])
def test_an_exit_or_interrupt_at_import_fails_the_load_stage(tmp_path, capsys, misbehaviour, says):
    status, text, _ = _check(app_spec(tmp_path, at_import=misbehaviour), capsys)
    assert status == 1, text
    assert "load: FAIL - importing lookup_" in text and f":predict {says}" in text
    _clean(text)


def test_a_sleeping_app_is_abandoned_after_its_timeout(tmp_path, capsys):
    """Within 2x the timeout of a clean run: the stuck call is named, the samples after it are not called."""
    (tmp_path / "clean").mkdir()
    status, text, clean = _check(app_spec(tmp_path / "clean", timeout=TIMEOUT), capsys)
    assert status == 0, text
    (tmp_path / "predict").mkdir()
    sleep = f"time.sleep({3 * TIMEOUT})"  # ends soon after the test: the abandoned thread does not outlive it long
    status, text, slow = _check(app_spec(tmp_path / "predict", in_predict=sleep, timeout=TIMEOUT), capsys)
    assert status == 1, text
    assert f"{VICTIM}: lookup_" in text and f"did not return within {TIMEOUT:g} s ([candidate].timeout)" in text
    assert "not called: lookup_" in text and f"did not return on {VICTIM}" in text
    assert slow < clean + 2 * TIMEOUT, (slow, clean)
    _clean(text)
    (tmp_path / "import").mkdir()
    status, text, slow = _check(app_spec(tmp_path / "import", at_import=sleep, timeout=TIMEOUT), capsys)
    assert status == 1, text
    assert "load: FAIL - importing lookup_" in text and f"did not return within {TIMEOUT:g} s" in text
    assert slow < clean + 2 * TIMEOUT, (slow, clean)
    _clean(text)


def test_a_handler_that_exits_per_call_or_sleeps_while_starting(tmp_path, capsys):
    (tmp_path / "call").mkdir()
    status, text, _ = _check(handler_spec(tmp_path / "call", in_call="sys.exit(3)"), capsys)
    assert status == 1, text
    assert f"{VICTIM}: the handler called sys.exit(3)" in text and "1 of 17 samples failed" in text
    _clean(text)
    (tmp_path / "init").mkdir()
    start = time.monotonic()
    status, text, _ = _check(handler_spec(tmp_path / "init", in_init=f"time.sleep({3 * TIMEOUT})",
                                          timeout=TIMEOUT), capsys)
    assert status == 1, text
    assert f"load: FAIL - EndpointHandler(path=...) did not return within {TIMEOUT:g} s" in text
    assert time.monotonic() - start < 4 * TIMEOUT
    _clean(text)


# -- the real command line, in a subprocess --------------------------------------------------------

@pytest.mark.parametrize("where", ["predict", "import"])
def test_os_exit_never_ends_parity(tmp_path, where):
    spec = (app_spec(tmp_path, in_predict="os._exit(0)") if where == "predict"
            else app_spec(tmp_path, at_import="os._exit(0)"))
    status, text, _ = _cli(spec)
    assert status == 1, text
    assert ":predict called os._exit(0)" in text
    assert (f"{VICTIM}: lookup_" if where == "predict" else "load: FAIL - importing lookup_") in text
    _clean(text)


def test_a_non_daemon_thread_or_a_sleeping_call_does_not_keep_parity_running(tmp_path):
    (tmp_path / "thread").mkdir()
    thread = "threading.Thread(target=time.sleep, args=(3600,), daemon=False, name='warmup').start()"
    status, text, _ = _cli(app_spec(tmp_path / "thread", at_import=thread), limit=90)
    assert status == 0 and "PARITY" in text, text
    assert "left running: thread 'warmup'" in text
    _clean(text)
    (tmp_path / "sleep").mkdir()
    status, text, _ = _cli(app_spec(tmp_path / "sleep", in_predict="time.sleep(3600)", timeout=TIMEOUT), limit=90)
    assert status == 1, text
    assert f"did not return within {TIMEOUT:g} s" in text and "left running: lookup_" in text
    _clean(text)
