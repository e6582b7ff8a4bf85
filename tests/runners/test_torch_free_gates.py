"""Candidates that hold their own model need nothing from torch: `parity check` of a url candidate and of a
service log runs in a fresh interpreter without importing torch, torchvision or timm.

The services and logs here are written in this file from the fixture's values (a lookup by image bytes,
a log of the fixture's own samples), not the bundled examples.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from parity.store.fixtures import load_fixture
from tests.support.http_service import answer, stdlib_service, url_spec
from tests.support.paths import EXAMPLE_FIXTURES, ROOT
from tests.support.specs import write_spec

HEAVY = ("torch", "torchvision", "timm")


def _check_in_a_fresh_interpreter(spec: Path) -> tuple[int, list[str], str]:
    """``parity check --spec`` in a new interpreter: its exit status, the heavy modules it imported, its output."""
    script = textwrap.dedent(f"""\
        import sys
        from parity.cli import main
        rc = main(["check", "--spec", {str(spec)!r}])
        print("RESULT", rc, sorted(m for m in sys.modules if m.partition(".")[0] in {HEAVY!r}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "RESULT" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    _, rc, heavy = done.stdout[done.stdout.index("RESULT"):].split(maxsplit=2)
    return int(rc), json.loads(heavy.strip().replace("'", '"')), done.stdout


def _lookup(handler, body: bytes) -> None:
    """Answers a JSON request with the fixture's outputs for the sent image (found by its bytes' sha256)."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    table = {hashlib.sha256(row.image.read_bytes()).hexdigest(): i for i, row in enumerate(fixture.rows)}
    request = json.loads(body)
    i = table[hashlib.sha256(base64.b64decode(request["image"])).hexdigest()]
    answer(handler, 200, json.dumps({"scores": fixture.outputs[i].tolist()}).encode())


def test_a_url_candidate_is_gated_without_torch(tmp_path):
    with stdlib_service(_lookup) as url:
        spec = url_spec(tmp_path, url, 'send = "json"\noutput_key = "scores"\n')
        rc, heavy, out = _check_in_a_fresh_interpreter(spec)
    assert rc == 0, out[-3000:]  # the service answers the fixture's outputs: the gate passes
    assert heavy == [], heavy


def test_a_log_of_the_fixture_samples_is_gated_without_torch(tmp_path):
    """A log whose images are the fixture's is judged against the fixture: no reference to compute, no torch.
    (A log of other images needs the spec's pipeline for its reference, and that pipeline is torch's.)"""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    log = tmp_path / "requests.jsonl"
    log.write_text("".join(json.dumps({"image": str(row.image.resolve()), "input_biases": list(row.input_biases),
                                       "embedding": fixture.embeddings[i].reshape(-1).tolist(),
                                       "outputs": fixture.outputs[i].tolist()}) + "\n"
                           for i, row in enumerate(fixture.rows)))
    spec = write_spec(tmp_path, name="logged.toml")
    spec.write_text(spec.read_text() + f'\n[candidate]\nlogged = "{log}"\n')
    rc, heavy, out = _check_in_a_fresh_interpreter(spec)
    assert rc == 0, out[-3000:]
    assert heavy == [], heavy
