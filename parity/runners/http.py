"""A running HTTP service as the candidate (``[candidate] url = "http://127.0.0.1:8000/predict"``).

Each fixture image is posted as the file's own bytes (the service's decoding is under test):

- ``send = "multipart"`` (default): a ``multipart/form-data`` body with the file in field
  ``image`` and, when the fixture rows carry them, ``input_biases`` as a JSON array in a form field;
- ``send = "json"``: ``{"image": "<base64 of the file>", "input_biases": [...]}``.

``[candidate].field`` renames the file field (``image``), ``form`` replaces ``input_biases`` with
the fields it maps (`RequestMap`), ``headers`` are sent with each request, ``env:NAME`` values
read from the environment and never shown (`resolve_headers`, `redact`).

The response is JSON: an object whose ``[candidate].output_key`` (default ``outputs``; a dotted
path) holds the outputs, a bare list, or scores by label (`parity.runners.outputs`). An object may also carry ``embedding``, then compared as its own stage.
Nothing else of the service is visible: load, weights, pixels and the head are reported as
not observable.

``format = "mlflow"``: an MLflow scoring server's ``/invocations`` (``mlflow models serve``): the
request and the answer are its own (`parity.runners.mlflow_protocol`: ``send`` one of its JSON keys, the
image as a base64 column, the outputs read from ``predictions``).

Every request has ``[candidate].timeout`` seconds in all, from connecting to the last byte of
the answer (a service that trickles its answer a byte at a time is cut off at the deadline, not
let through because each read is quick); a refused connection, a timeout or a 5xx answer is
retried ``[candidate].retries`` times with a bounded backoff. What still fails is a
per-sample error naming the sample, and after a few consecutive unreachable samples the rest
are not sent (each gets that error) so that a dead service costs seconds, not minutes.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import mimetypes
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from parity.errors import SpecError
from parity.store.fixtures import Fixture
from parity.results import CandidateRun
from parity.runners import mlflow_protocol
from parity.runners.request_map import RequestMap
from parity.runners.outputs import (OutputMap, UnreadableOutput, fill_unlisted, fixture_labels, label_scores,
                                    output_map, read)
from parity.spec import Spec

__all__ = ["run", "ServiceError", "post_sample", "encode_multipart", "read_outputs", "Request", "exchange",
           "check_url", "resolve_headers", "redact"]

Progress = Callable[[int, int], None]
T = TypeVar("T")

SENDS = ("multipart", "json")
UNOBSERVABLE = "an HTTP service shows its outputs only"
MAX_RESPONSE_BYTES = 16 << 20
# Backoff before retry k (0-based): BACKOFF * 2**k seconds, never more than MAX_BACKOFF.
BACKOFF, MAX_BACKOFF = 0.2, 2.0
# After this many consecutive samples the service did not answer at all, the rest are not sent.
GIVE_UP_AFTER = 3


class ServiceError(Exception):
    """One sample's request failed; ``transient`` when retrying may help (no answer, a timeout, a 5xx)."""

    def __init__(self, message: str, *, transient: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.transient, self.unreachable = transient, unreachable


def check_url(url: str, *, field: str = "url", example: str = "http://127.0.0.1:8000/predict") -> str:
    """The URL, if it is one parity may post fixture images to (``field``, ``example``: for the message).

    Raises:
        SpecError: not an http(s) URL with a host (``file:``, ``ftp:`` and the like are refused).
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError as e:
        raise SpecError(f"[candidate].{field} = {url!r} is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"[candidate].{field} = {url!r}: expected an http:// or https:// URL with a host, "
                        f"e.g. {example}")
    return url


def encode_multipart(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type: text ``fields`` (name, value) and
    ``files`` (name, filename, bytes), as a browser form would send them (RFC 7578)."""
    boundary = f"parity-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for name, value in fields:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        chunks.append(value.encode() + b"\r\n")
    for name, filename, data in files:
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        safe = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                      f"Content-Type: {kind}\r\n\r\n".encode())
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Request:
    """One HTTP request as sent: ``body`` None for a GET."""

    url: str
    body: bytes | None
    headers: dict[str, str]
    method: str = "POST"


def resolve_headers(headers: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Header values with ``env:NAME`` read from the environment, and the values read so (never to be shown).

    Raises:
        SpecError: a named variable is not set (its name is said, never a value).
    """
    resolved, secrets = {}, []
    for key, value in headers.items():
        if value.startswith("env:"):
            name = value[4:]
            if not os.environ.get(name):
                raise SpecError(f"[candidate].headers.{key} reads the environment variable {name}, which is not "
                                f"set: export {name} before running parity")
            value = os.environ[name]
            if "\n" in value or "\r" in value:
                raise SpecError(f"[candidate].headers.{key}: the environment variable {name} holds a line break, "
                                "which no header value may")
            secrets.append(value)
        resolved[key] = value
    return resolved, tuple(secrets)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret header value replaced (a service may echo a request back in its error)."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _request(url: str, image: Path, biases: Sequence[int], send: str, mapping: RequestMap = RequestMap(),
             format: str | None = None) -> Request:
    data = image.read_bytes()
    if format == "mlflow":
        body = json.dumps(mlflow_protocol.payload([(data, biases)], send=send, request=mapping)).encode()
        kind = {"Content-Type": "application/json", "Accept": "application/json"}
        return Request(url, body, {**mapping.headers, **kind})
    fields = mapping.fields(biases)
    if send == "json":
        payload: dict[str, Any] = {mapping.field: base64.b64encode(data).decode("ascii"), **fields}
        body, kind = json.dumps(payload).encode(), "application/json"
    else:
        # A form field is text: a list as a JSON array, a single input_bias as its number.
        text = [(name, value if isinstance(value, str) else json.dumps(value)) for name, value in fields.items()]
        body, kind = encode_multipart(text, [(mapping.field, image.name, data)])
    return Request(url, body, {**mapping.headers, "Content-Type": kind, "Accept": "application/json"})


class _Deadline:
    """Cuts a connection off when its request's time is up, whatever it is doing then.

    A socket timeout bounds each read, not the request: a service that sends one byte every
    half second never trips it. When the time is up the watchdog (`_Watchdog`) shuts the socket
    down, which ends any read or write in progress (the caller then reports the timeout, not the
    broken read it caused).
    """

    def __init__(self, connection: http.client.HTTPConnection, timeout: float) -> None:
        self.connection, self.timeout = connection, timeout
        self.end = time.monotonic() + timeout
        self.expired = threading.Event()

    def _cut(self) -> None:
        self.expired.set()  # before reading .sock: a socket connected after this sees it set
        sock = self.connection.sock
        if sock is not None:
            try:
                # The plain socket's shutdown, also for TLS: it wakes a blocked read without touching SSL state.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def remaining(self) -> float:
        """Seconds left; raises TimeoutError when none are."""
        left = self.end - time.monotonic()
        if left <= 0 or self.expired.is_set():
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        return left

    def __enter__(self) -> _Deadline:
        _watchdog.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _watchdog.remove(self)


class _Watchdog:
    """One daemon thread that cuts off each request whose deadline passes.

    One for all requests, started on first use: a timer thread per request cost each request a
    thread's start (about 0.5 ms of CPU, more on a busy machine, as much as the rest of the client).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._active: set[_Deadline] = set()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread next looks by itself

    def add(self, deadline: _Deadline) -> None:
        with self._cond:
            self._active.add(deadline)
            if self._thread is None or not self._thread.is_alive():  # first use, or a forked child
                self._thread = threading.Thread(target=self._loop, name="parity-http-deadlines", daemon=True)
                self._thread.start()
            elif deadline.end < self._wake_at:
                self._cond.notify()

    def remove(self, deadline: _Deadline) -> None:
        with self._cond:
            self._active.discard(deadline)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [d for d in self._active if d.end <= now]
                self._active.difference_update(due)
                if not due:
                    self._wake_at = min((d.end for d in self._active), default=float("inf"))
                    self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)
                    continue
            for deadline in due:  # outside the lock: a shutdown may take a moment
                deadline._cut()


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):  # a forked child gets a fresh lock (the parent's may have been held)
    os.register_at_fork(after_in_child=_watchdog._reset)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    # No proxies (http.client reads no environment): fixture images go straight to the named service.
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return kind(parts.hostname, parts.port, timeout=timeout), target


def _read_body(response: http.client.HTTPResponse, deadline: _Deadline, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        sock = deadline.connection.sock
        if sock is not None:
            sock.settimeout(deadline.remaining())
        chunk = response.read1(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _send_once(request: Request, timeout: float) -> bytes:
    """One request and its answer's body, all within ``timeout`` seconds.

    Raises:
        ServiceError: no connection, no (complete) answer in time, an HTTP error status, or a broken answer.
    """
    connection, target = _connection(request.url, timeout)
    connected = False
    try:
        with _Deadline(connection, timeout) as deadline:
            try:
                connection.timeout = deadline.remaining()
                connection.connect()
                connected = True
                deadline.remaining()  # the timer may have fired while the socket was being made
                connection.request(request.method, target, body=request.body, headers=request.headers)
                response = connection.getresponse()
                body = _read_body(response, deadline, MAX_RESPONSE_BYTES)
                deadline.remaining()  # a cut-off answer may read as a short one
            except (TimeoutError, socket.timeout, OSError, http.client.HTTPException) as e:
                if deadline.expired.is_set() or isinstance(e, (TimeoutError, socket.timeout)):
                    raise ServiceError(f"no answer within {timeout:g} s (timeout)", transient=True,
                                       unreachable=True) from e
                if not connected:
                    raise ServiceError(f"cannot reach {request.url}: {e}", transient=True, unreachable=True) from e
                if isinstance(e, http.client.HTTPException):  # a bad status line, a truncated body
                    raise ServiceError(f"a broken HTTP answer: {type(e).__name__}: {e}", transient=True) from e
                # reset or closed mid-answer
                raise ServiceError(f"the connection failed: {type(e).__name__}: {e}", transient=True,
                                   unreachable=True) from e
    finally:
        connection.close()
    if response.status >= 300:
        detail = body[:500].decode("utf-8", "replace").strip()
        where = f" (to {response.getheader('Location')}; set [candidate].url to that address)" \
            if 300 <= response.status < 400 and response.getheader("Location") else ""
        raise ServiceError(f"the service answered HTTP {response.status} {response.reason}{where}"
                           + (f": {detail}" if detail else ""), transient=response.status >= 500)
    if len(body) > MAX_RESPONSE_BYTES:
        raise ServiceError(f"the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB")
    return body


def read_outputs(body: bytes, output_key: str | OutputMap | None, *,
                 format: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(outputs, embedding or None)`` from a response body.

    Outputs are read by ``output_key`` (a dotted path; default: the object's ``outputs`` or a bare
    list), or from scores by label in the label order (`parity.runners.outputs`): NaN marks a label
    a truncated list leaves out, never anything else. ``format = "mlflow"``: read from the answer's
    ``predictions`` (``output_key`` inside them), one row.

    Raises:
        ServiceError: not JSON, no outputs where said, or not a list of finite numbers.
    """
    snippet = body[:80].decode("utf-8", "replace")
    try:
        answer = json.loads(body)
    except RecursionError as e:
        raise ServiceError(f"the answer nests too deeply to be outputs: {snippet!r}...") from e
    except ValueError as e:  # not JSON, not UTF-8, or an integer longer than Python reads (4300 digits)
        if "integer string conversion" in str(e):
            raise ServiceError(f"the answer holds an integer of more than {sys.get_int_max_str_digits()} digits: "
                               f"not an output: {snippet!r}...") from e
        raise ServiceError(f"the answer is not JSON ({str(e)[:200]}): {snippet!r}") from e
    mapping = output_key if isinstance(output_key, OutputMap) else OutputMap(key=output_key)
    key = mapping.key or "outputs"
    embedding = answer.get("embedding") if isinstance(answer, dict) else None
    if format == "mlflow":
        try:
            answer, key, embedding = mlflow_protocol.served_predictions(answer), mapping.key or "predictions", None
        except UnreadableOutput as e:
            raise ServiceError(str(e)) from e
    if not isinstance(answer, (dict, list)):
        raise ServiceError(f"the answer is a JSON {type(answer).__name__}; expected an object or a list of outputs")
    if mapping.key is None and isinstance(answer, dict) and format is None:
        if "outputs" in answer:
            answer = answer["outputs"]
        elif label_scores(answer) is None:
            raise ServiceError(f"the answer has no {key!r} (keys: {', '.join(map(str, answer)) or 'none'}); set "
                               "[candidate].output_key to the one holding the outputs (a dotted path such as "
                               "predictions.0.scores reaches into nested JSON)")
    try:
        values, listed = read(answer, mapping, what="the service")
    except UnreadableOutput as e:
        raise ServiceError(f"parity could not read the answer: {e}") from e
    if listed is None:
        return _vector(values, key), None if embedding is None else _vector(embedding, "embedding")
    if format == "mlflow" and listed.ndim == 2 and listed.shape[0] == 1:
        values, listed = values[0], listed[0]  # the request's one row of scores by label (a DataFrame's record)
    if listed.ndim != 1:
        raise ServiceError(f"the answer holds {listed.shape[0]} lists of scores by label; expected one per sample")
    if not np.isfinite(values[listed]).all():
        raise ServiceError("the scores by label hold non-finite values (NaN, infinity or null)")
    return values.astype(np.float32), None if embedding is None else _vector(embedding, "embedding")


def _vector(values: Any, what: str) -> np.ndarray:
    """One sample's values: JSON numbers (``null`` reads as NaN), as the log runner reads them; a
    string such as ``"0.12"`` is not a number (a service that answers strings has a bug of its own)."""
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
        values = values[0]  # a batch of one
    if not isinstance(values, list) or not values:
        raise ServiceError(f"{what!r} is not a list of numbers: {_shown(values)}" if not isinstance(values, list)
                           else f"{what!r} must be one list of numbers per sample, got an empty list")
    if all(isinstance(v, list) for v in values):
        raise ServiceError(f"{what!r} must be one list of numbers per sample, got {len(values)} lists")
    if not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ServiceError(f"{what!r} is not a list of numbers (JSON numbers, not strings, booleans or lists): "
                           f"{_shown(values)}")
    try:
        array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        array = np.array([np.inf])
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ServiceError(f"{what!r} holds non-finite values (NaN, infinity or null, or a number beyond float32)")
    return array


def _shown(values: Any) -> str:
    try:
        text = json.dumps(values)
    except (ValueError, TypeError, RecursionError):
        text = type(values).__name__
    return text[:80]


def post_sample(url: str, image: Path, biases: Sequence[int], *, send: str = "multipart", timeout: float = 30.0,
                retries: int = 2, output_key: str | OutputMap | None = None, request: RequestMap = RequestMap(),
                secrets: Sequence[str] = (), format: str | None = None,
                sleep: Callable[[float], None] = time.sleep) -> tuple[np.ndarray, np.ndarray | None]:
    """Post one image and read its outputs, retrying what may pass on a second try.

    ``request``: the file field, other fields and headers; ``secrets``: header values no message may show;
    ``format``: the service's protocol (None: parity's plain one; ``mlflow``: the scoring server's).

    Raises:
        ServiceError: the last attempt's failure.
    """
    built = _request(url, image, biases, send, request, format)
    return exchange(built, timeout=timeout, retries=retries, secrets=secrets, sleep=sleep,
                    read=lambda body: read_outputs(body, output_key, format=format))


def exchange(request: Request, *, timeout: float = 30.0, retries: int = 2, secrets: Sequence[str] = (),
             sleep: Callable[[float], None] = time.sleep, read: Callable[[bytes], T] = bytes) -> T:
    """Send ``request`` and return ``read(body)`` of its answer, retrying what may pass on a second try
    (no answer, a timeout, a 5xx) with a bounded backoff; no message shows a value in ``secrets``.

    Raises:
        ServiceError: the last attempt's failure, or what ``read`` raised (never retried unless transient).
    """
    for attempt in range(retries + 1):
        try:
            return read(_send_once(request, timeout))
        except ServiceError as e:
            if not e.transient or attempt == retries:
                message = redact(str(e), secrets)
                if attempt:
                    raise ServiceError(f"{message} (after {attempt + 1} attempts)", transient=e.transient,
                                       unreachable=e.unreachable) from None
                if secrets:
                    raise ServiceError(message, transient=e.transient, unreachable=e.unreachable) from None
                raise
            sleep(min(BACKOFF * 2 ** attempt, MAX_BACKOFF))
    raise AssertionError("unreachable")  # the loop returns or raises


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Post every fixture sample to the service and record its outputs (and embeddings if it gives them)."""
    candidate = spec.candidate
    url = check_url(candidate.target)
    default, sends = "multipart", SENDS
    if candidate.format == "mlflow":
        default, sends = mlflow_protocol.DEFAULT_SEND, mlflow_protocol.SENDS
    send = candidate.send or default
    if send not in sends:
        protocol = " with format = \"mlflow\"" if candidate.format else ""
        raise SpecError(f"[candidate].send = {send!r} does not apply to a url candidate{protocol}: use one of "
                        f"{', '.join(sends)}")
    width = fixture.outputs.shape[1]
    if candidate.labels is not None and len(candidate.labels) != width:
        raise SpecError(f"[candidate].labels names {len(candidate.labels)} labels; the fixture has {width} outputs "
                        "per sample")
    headers, secrets = resolve_headers(candidate.headers)
    request = RequestMap(candidate.field, candidate.form, headers)
    mapping = output_map(candidate)
    if mapping.labels is None:
        mapping = dataclasses.replace(mapping, labels=fixture_labels(fixture))
    if fixture.rows:
        request.fields(fixture.rows[0].input_biases)  # a form field naming a bias the rows lack: said once
    listed: list[np.ndarray] = []
    rows: list[int] = []
    sample_errors: list[tuple[str, str]] = []
    outputs: list[np.ndarray] = []
    embeddings: list[np.ndarray | None] = []
    silent = 0  # consecutive samples the service did not answer at all
    total = len(fixture.rows)
    for i, row in enumerate(fixture.rows):
        if silent >= GIVE_UP_AFTER:
            sample_errors.append((row.name, f"not sent: the service at {url} did not answer the {silent} samples "
                                            "before it"))
        else:
            try:
                values, embedding = post_sample(url, row.image, row.input_biases, send=send, timeout=candidate.timeout,
                                                retries=candidate.retries, output_key=mapping, request=request,
                                                secrets=secrets, format=candidate.format)
                if values.shape[0] != width:
                    raise ServiceError(f"{values.shape[0]} outputs, the fixture has {width} per sample")
            except ServiceError as e:
                silent = silent + 1 if e.unreachable else 0
                sample_errors.append((row.name, f"{url}: {e}"))
            except OSError as e:  # the fixture image itself cannot be read
                sample_errors.append((row.name, f"cannot read {row.image}: {e}"))
            else:
                silent = 0
                rows.append(i)
                listed.append(~np.isnan(values))  # NaN only where a truncated list left a label out
                outputs.append(values)
                embeddings.append(embedding)
        if progress:
            progress(i + 1, total)
    unobservable = {stage: UNOBSERVABLE for stage in ("load", "weights", "pixels", "head")}
    embedded = np.stack(embeddings) if embeddings and all(e is not None and e.shape == embeddings[0].shape
                                                          for e in embeddings) else None
    if embedded is None:
        unobservable["embedding"] = UNOBSERVABLE + " (answer with an 'embedding' list to compare it)"
    stacked = np.stack(outputs) if outputs else np.zeros((0, width), np.float32)
    note = None
    if outputs:
        stacked, note = fill_unlisted(stacked, np.stack(listed), fixture.outputs[rows])
    # What was sent, never a header's value (only the names of the headers and where their values come from).
    sent = {"url": url, **({"format": candidate.format} if candidate.format else {}), "send": send,
            "field": request.field,
            **({"form": dict(request.form)} if request.form is not None else {}),
            **({"headers": sorted(request.headers)} if request.headers else {})}
    return CandidateRun(
        "url", description={"candidate": sent}, rows=tuple(rows),
        sample_errors=tuple(sample_errors), outputs=stacked,
        embeddings=embedded, unobservable=unobservable, notes=(note,) if note else (),
    )
