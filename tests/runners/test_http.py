"""The url runner: a running service on 127.0.0.1 is gated on its outputs; its failures are per-sample errors."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import numpy as np
import pytest

import parity.runners.http as http_runner
from parity.commands.check import run_check
from parity.cli import EXIT_DRIFT, EXIT_USAGE, main
from parity.errors import SpecError
from parity.store.fixtures import load_fixture
from parity.results import Status, Verdict
from parity.spec import load_spec
from tests.support.paths import EXAMPLE_FIXTURES, ROOT
from tests.support.http_service import (answer, free_port, load_example_service, stdlib_service, url_spec,
                                        uvicorn_service)

OBSERVABLE_ONLY = ("load", "weights", "pixels", "head")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(http_runner, "BACKOFF", 0.01)


# -- the example FastAPI service, served by uvicorn on a free loopback port -------------------

@pytest.fixture(scope="module")
def example():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart")
    return load_example_service()


@pytest.mark.parametrize("send", ["multipart", "json"])
def test_the_example_service_passes_the_gate(example, send, tmp_path):
    with uvicorn_service(example.create_app(example.Predictor())) as url:
        report = run_check(load_spec(url_spec(tmp_path, url, f'send = "{send}"\n')))
    assert report.passed, report.first_failure
    assert report.stage("outputs").status is Status.PASS
    assert report.stage("outputs").comparison.total == report.stage("outputs").comparison.total > 0
    assert report.stage("decisions").status is Status.PASS
    for stage in OBSERVABLE_ONLY + ("embedding",):
        assert report.stage(stage).status is Status.SKIP
        assert report.stage(stage).headline.startswith("not observable: an HTTP service shows its outputs only")


def test_a_service_deployed_with_bilinear_resize_fails_at_outputs(example, tmp_path):
    with uvicorn_service(example.create_app(example.Predictor(interpolation="bilinear"))) as url:
        spec = url_spec(tmp_path, url)
        assert main(["check", "--spec", str(spec)]) == EXIT_DRIFT
        report = run_check(load_spec(spec))
    assert not report.passed
    assert report.first_failure.stage == "outputs"
    assert report.stage("decode").status is Status.PASS  # every sample answered


def test_the_example_script_serves_until_stopped(example, tmp_path):
    """The shipped entry point (python server.py --port N), as a process, then stopped."""
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "http_service" / "server.py"),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {process.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        fixture = load_fixture(EXAMPLE_FIXTURES)
        row = fixture.rows[0]
        outputs, _ = http_runner.post_sample(f"http://127.0.0.1:{port}/predict", row.image, row.input_biases)
        np.testing.assert_allclose(outputs, fixture.outputs[0], atol=1e-5, rtol=1.3e-6)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


# -- services written here, independent of the example ------------------------------------------

def _lookup_service(key: str | None, *, embedding: bool):
    """Answers each JSON request from the fixture, looked up by the image bytes' sha256."""
    fixture = load_fixture(EXAMPLE_FIXTURES)
    table = {hashlib.sha256(row.image.read_bytes()).hexdigest(): i for i, row in enumerate(fixture.rows)}

    def respond(handler, body):
        request = json.loads(body)
        i = table[hashlib.sha256(base64.b64decode(request["image"])).hexdigest()]
        assert request["input_biases"] == list(fixture.rows[i].input_biases)
        outputs = fixture.outputs[i].tolist()
        reply = outputs if key is None else {key: outputs, **({"embedding": fixture.embeddings[i].tolist()}
                                                              if embedding else {})}
        answer(handler, 200, json.dumps(reply).encode())
    return respond


def test_a_json_service_answering_a_bare_list(tmp_path):
    with stdlib_service(_lookup_service(None, embedding=False)) as url:
        report = run_check(load_spec(url_spec(tmp_path, url, 'send = "json"\n')))
    assert report.passed, report.first_failure


def test_a_service_that_also_answers_its_embedding_has_that_stage_compared(tmp_path):
    with stdlib_service(_lookup_service("scores", embedding=True)) as url:
        report = run_check(load_spec(url_spec(tmp_path, url, 'send = "json"\noutput_key = "scores"\n')))
        assert report.passed, report.first_failure
        assert report.stage("embedding").status is Status.PASS
        assert report.stage("embedding").comparison.total > 0
        wrong_key = run_check(load_spec(url_spec(tmp_path, url, 'send = "json"\n')))
    assert wrong_key.stage("decode").status is Status.FAIL
    assert "has no 'outputs' (keys: scores, embedding)" in wrong_key.stage("decode").sample_errors[0][1]


def test_retries_recover_from_a_transient_503(tmp_path):
    seen: dict[str, int] = {}
    inner = _lookup_service("outputs", embedding=False)

    def flaky(handler, body):
        digest = hashlib.sha256(body).hexdigest()
        seen[digest] = seen.get(digest, 0) + 1
        if seen[digest] == 1:
            answer(handler, 503, b"warming up", "text/plain")
        else:
            inner(handler, body)

    with stdlib_service(flaky) as url:
        report = run_check(load_spec(url_spec(tmp_path, url, 'send = "json"\nretries = 1\n')))
    assert report.passed, report.first_failure
    assert sorted(set(seen.values())) == [2]


# -- failures: per-sample errors naming the sample, exit 1, never a traceback --------------------

def _sample_errors(report) -> dict[str, str]:
    decode = report.stage("decode")
    assert decode.status is Status.FAIL
    return dict(decode.sample_errors)


def test_a_refused_connection_is_a_per_sample_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/predict"  # nothing listens there
    spec = url_spec(tmp_path, url, "retries = 1\n")
    report = run_check(load_spec(spec))
    errors = _sample_errors(report)
    fixture = load_fixture(EXAMPLE_FIXTURES)
    assert list(errors) == fixture.names
    first = errors[fixture.names[0]]
    assert first.startswith(url) and "cannot reach" in first and "after 2 attempts" in first
    # After a few silent samples the rest are not sent: a dead service costs seconds.
    assert errors[fixture.names[-1]].startswith(f"not sent: the service at {url} did not answer")
    assert report.verdict is Verdict.DRIFT and report.first_failure.stage == "decode" and not report.passed
    assert report.stage("outputs").status is Status.SKIP and report.stage("decisions").status is Status.SKIP

    assert main(["check", "--spec", str(spec)]) == EXIT_DRIFT
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert fixture.names[0] in out.out and "cannot reach" in out.out


def test_a_service_slower_than_the_timeout(tmp_path):
    def slow(handler, body):
        time.sleep(1.0)
        answer(handler, 200, b'{"outputs": [0, 0, 0, 0, 0]}')

    with stdlib_service(slow) as url:
        started = time.monotonic()
        report = run_check(load_spec(url_spec(tmp_path, url, "timeout = 0.2\nretries = 0\n")))
        elapsed = time.monotonic() - started
    errors = _sample_errors(report)
    first = next(iter(errors.values()))
    assert "no answer within 0.2 s (timeout)" in first
    assert elapsed < 10  # three timeouts, then the rest not sent
    assert not report.passed


@pytest.mark.parametrize("status, body, expected", [
    (500, b"model exploded", "the service answered HTTP 500 Internal Server Error: model exploded (after 2"),
    (200, b"<html>not json</html>", "the answer is not JSON"),
    (200, b'{"outputs": [1, 2]}', "2 outputs, the fixture has 5 per sample"),
    (200, b'{"outputs": [1, null, 2, 3, 4]}', "holds non-finite values"),
    (200, b'{"outputs": "high"}', "is not a list of numbers"),
    (200, b"42", "the answer is a JSON int"),
])
def test_bad_answers_are_per_sample_errors(status, body, expected, tmp_path):
    calls: list[int] = []

    def respond(handler, _body):
        calls.append(1)
        answer(handler, status, body)

    with stdlib_service(respond) as url:
        report = run_check(load_spec(url_spec(tmp_path, url, "retries = 1\n")))
    errors = _sample_errors(report)
    fixture = load_fixture(EXAMPLE_FIXTURES)
    assert list(errors) == fixture.names  # an answering service gets every sample sent
    assert all(expected in message for message in errors.values()), errors
    # Only a 5xx is retried; a malformed answer would be malformed again.
    assert len(calls) == len(fixture.rows) * (2 if status >= 500 else 1)
    assert not report.passed


def test_multipart_body_carries_the_file_and_the_biases(tmp_path):
    seen: list[tuple[str, bytes]] = []

    def respond(handler, body):
        seen.append((handler.headers["Content-Type"], body))
        answer(handler, 200, b'{"outputs": [0, 0, 0, 0, 0]}')

    fixture = load_fixture(EXAMPLE_FIXTURES)
    row = fixture.rows[1]
    with stdlib_service(respond) as url:
        http_runner.post_sample(url, row.image, row.input_biases)
    kind, body = seen[0]
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert parts["image"].get_filename() == row.image.name
    assert parts["image"].get_content_type() == "image/png"
    assert parts["image"].get_payload(decode=True) == row.image.read_bytes()
    assert json.loads(parts["input_biases"].get_content()) == list(row.input_biases)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "127.0.0.1:8000/predict"])
def test_only_http_urls_are_accepted(url, tmp_path, capsys):
    with pytest.raises(SpecError, match="expected an http:// or https:// URL"):
        run_check(load_spec(url_spec(tmp_path, url)))
    assert main(["check", "--spec", str(url_spec(tmp_path, url))]) == EXIT_USAGE
