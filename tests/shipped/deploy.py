"""Deploying the photo tagger as its team ships it: a folder with the entry file, its package and the model files.

Each deployment is a fresh folder: the entry file of one kind (the Space's ``app.py``, the
Endpoint's ``handler.py`` or the service's ``server.py``), edited by text replacements when a
bug is injected, the ``photo_tags`` package and the model files linked beside it, and a
``parity.toml`` whose ``[candidate]`` names what ships.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.shipped.reference import Reference

PROJECT = Path(__file__).resolve().parent / "project"
# kind -> (folder under project/, entry file)
ENTRIES = {"python": ("space", "app.py"), "endpoint_handler": ("endpoint", "handler.py"),
           "url": ("service", "server.py")}
MODEL_FILES = ("config.json", "backbone.safetensors", "tag_scorer.pth")
CANDIDATES = {
    "python": 'python = "app:predict"\n',
    "endpoint_handler": 'endpoint_handler = "handler.py"\noutput_key = "score"\n',
}
# A service that has not answered its port within this many seconds failed to start.
START_TIMEOUT = 60.0


def deploy(reference: Reference, folder: Path, kind: str, replacements: Mapping[str, str] | None = None) -> Path:
    """The deployment of ``kind`` in ``folder`` with ``replacements`` made in its entry file; returns ``folder``.

    Each replaced text must occur exactly once, so that a bug is injected where it is meant to be.
    """
    source, entry = ENTRIES[kind]
    shutil.copytree(PROJECT / source, folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "photo_tags", folder / "photo_tags", ignore=shutil.ignore_patterns("__pycache__"))
    for name in MODEL_FILES:
        (folder / name).symlink_to(reference.model_dir / name)
    text = (folder / entry).read_text()
    for old, new in (replacements or {}).items():
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {entry}, expected once"
        text = text.replace(old, new)
    (folder / entry).write_text(text)
    return folder


def write_spec(reference: Reference, folder: Path, candidate: str) -> Path:
    """``folder/parity.toml``: the reference spec with ``candidate`` (the body of ``[candidate]``)."""
    path = folder / "parity.toml"
    path.write_text(reference.spec_text(candidate))
    return path


def url_candidate(url: str) -> str:
    return f'url = "{url}"\nsend = "multipart"\noutput_key = "logits"\ntimeout = 30.0\nretries = 0\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_service(folder: Path):
    """``folder/server.py`` imported under a name of its own, its folder first on ``sys.path`` (as uvicorn's cwd)."""
    path = folder / "server.py"
    name = "photo_tags_service_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """The service in ``folder`` on a free 127.0.0.1 port (uvicorn in a thread); yields its /v1/tags URL.

    Raises:
        RuntimeError: it did not start (its model did not load) within `START_TIMEOUT` seconds.
    """
    import uvicorn

    module = _load_service(folder)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(module.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the service in {folder} did not start on port {port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/tags"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
