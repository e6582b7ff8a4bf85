"""Services on 127.0.0.1 for the url runner's tests: a threaded stdlib server, a trickling one, the bundled
FastAPI example under uvicorn, a free port."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.support.paths import ROOT
from tests.support.specs import write_spec


def url_spec(directory: Path, url: str, extra: str = "", name: str = "url.toml") -> Path:
    """A copy of the example spec whose [candidate] is the service at ``url`` (``extra``: more fields)."""
    path = write_spec(directory, name=name)
    path.write_text(path.read_text() + f'\n[candidate]\nurl = "{url}"\n{extra}')
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stdlib_service(respond: Callable[[BaseHTTPRequestHandler, bytes], None]) -> Iterator[str]:
    """A tiny threaded HTTP server on 127.0.0.1 whose POST handler is ``respond(handler, body)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            respond(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    with serving(Handler) as port:
        yield f"http://127.0.0.1:{port}/predict"


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """``handler`` served by a threaded stdlib server on a free 127.0.0.1 port (yielded), stopped on leaving."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "application/json") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up first (timeout tests)
        handler.wfile.write(body)


@contextlib.contextmanager
def trickling_service(every: float = 0.5, *, headers: bool = True, limit: float = 30.0) -> Iterator[str]:
    """A service that answers one byte every ``every`` seconds, for at most ``limit`` seconds per request.

    ``headers``: trickle the status line and headers too (else they come at once, then the body trickles).
    Each handler stops when the client goes away, when ``limit`` is reached or when the service stops.
    """
    stop = threading.Event()
    body = b'{"outputs": [' + b"0, " * 10_000 + b"0]}"

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            data = head + body
            if not headers:
                self.wfile.write(head)
                self.wfile.flush()
                data = body
            end = time.monotonic() + limit
            for i in range(len(data)):
                if stop.is_set() or time.monotonic() > end:
                    return
                try:
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                except OSError:  # the client cut the connection: what the test waits for
                    return
                stop.wait(every)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def load_example_service() -> ModuleType:
    """The bundled FastAPI example (examples/http_service/server.py), imported from its file."""
    spec = importlib.util.spec_from_file_location("http_service_example", ROOT / "examples" / "http_service" / "server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def uvicorn_service(app: Any) -> Iterator[str]:
    """uvicorn in a thread on 127.0.0.1; ready within a bounded wait, always stopped."""
    import uvicorn  # an optional extra ([service]): imported only by the tests that serve an app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the example service did not start on port {port} within 60 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/predict"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
