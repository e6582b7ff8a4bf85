"""The ``endpoint_handler`` candidate: a Hugging Face Inference Endpoints ``handler.py``.

``EndpointHandler(path=<the handler's folder>)`` once, then per sample
``handler({"inputs": <PIL image>, "parameters": {"input_biases": [...]}})`` (``inputs`` as the
file's raw bytes with ``send = "bytes"``); outputs read by ``output_key`` or as the returned list.
The import, the construction and each call are bounded by ``[candidate].timeout`` and cannot
end parity (`parity.runners.guard`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.store.fixtures import Fixture, FixtureRow
from parity.results import CandidateRun
from parity.runners import guard
from parity.runners.app import AppObservation, function_roots, observe, open_image, reachable_modules, to_run
from parity.runners.outputs import output_map
from parity.spec import Spec

__all__ = ["run", "observe_handler", "load_handler", "request"]

Progress = Callable[[int, int], None]


def load_handler(path: Path, *, timeout: float = 30.0):
    """Import ``path`` (its folder first on ``sys.path``, for its own imports) and build its handler.

    Both run on the user-code thread, each within ``timeout`` seconds (`parity.runners.guard`).

    Raises:
        SpecError: no such file, not a ``.py`` file, or it defines no ``EndpointHandler``.
        guard.Stopped: the import or the construction called ``sys.exit``/``os._exit``, raised
            ``KeyboardInterrupt`` or took too long.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"[candidate].endpoint_handler: {path} not found")
    if path.suffix != ".py":
        raise SpecError(f"[candidate].endpoint_handler: {path} is not a .py file; name the handler's Python "
                        "source (handler.py), as Inference Endpoints does")
    folder = str(path.parent.resolve())
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    # One module name per file, so two copies of a handler.py never share a cached module.
    name = "parity_endpoint_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"[candidate].endpoint_handler: {path} cannot be imported as a Python module; name the "
                        "handler's .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        guard.call(module_spec.loader.exec_module, module, timeout=timeout, what=f"importing {path.name}")
    except BaseException:
        sys.modules.pop(name, None)  # as a failed import leaves no module behind
        raise
    cls = getattr(module, "EndpointHandler", None)
    if cls is None:
        raise SpecError(f"{path} defines no EndpointHandler class (the Inference Endpoints contract)")
    return guard.call(lambda: cls(path=folder), timeout=timeout, what="EndpointHandler(path=...)")


def request(row: FixtureRow, send: str | None) -> dict[str, Any]:
    """The request body an endpoint receives for one fixture sample."""
    image = row.image.read_bytes() if send == "bytes" else open_image(row.image)
    body: dict[str, Any] = {"inputs": image}
    if row.input_biases:
        body["parameters"] = {"input_biases": [int(b) for b in row.input_biases]}
    return body


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Build the handler once and call it on every fixture sample with hooks on its modules."""
    candidate = spec.candidate
    if candidate.send not in (None, "pil", "bytes"):
        raise SpecError(f"[candidate].send = {candidate.send!r}: an endpoint handler receives \"pil\" or \"bytes\"")
    try:
        handler = load_handler(Path(candidate.target), timeout=candidate.timeout)
    except SpecError:
        raise
    except guard.Stopped as e:  # it exited, was interrupted or hung while starting
        return CandidateRun("endpoint_handler", errors={"load": str(e)})
    except Exception as e:  # noqa: BLE001 - the handler failing to start is the drift (e.g. its weights do not load)
        return CandidateRun("endpoint_handler",
                            errors={"load": f"EndpointHandler(path=...) raised {type(e).__name__}: {e}"})

    return to_run(observe_handler(spec, fixture, handler, progress=progress), fixture)


def observe_handler(spec: Spec, fixture: Fixture, handler: Any, *, progress: Progress | None = None) -> AppObservation:
    """Call the built ``handler`` on every fixture sample with hooks on the modules its attributes hold."""
    candidate = spec.candidate
    stem = Path(candidate.target).stem

    def call(row: FixtureRow) -> Any:
        return handler(request(row, candidate.send))

    # Looked for again after the first call when a part is missing: a model the handler builds lazily.
    def modules() -> dict[str, Any]:
        roots = {"handler": handler, **{f"handler.{k}": v for k, v in vars(handler).items()}}
        call_method = getattr(type(handler), "__call__", None)
        if call_method is not None:  # the module-level state its __call__ reaches (a global model)
            module = type(handler).__module__ + "."
            for key, value in function_roots(call_method, "handler").items():
                # Globals read as handler.py's, not under the module name the file was imported as.
                roots.setdefault(f"{stem}.{key.removeprefix(module)}" if key.startswith(module) else key, value)
        return reachable_modules(roots)

    return observe("endpoint_handler", call, modules, fixture, output_key=output_map(candidate), progress=progress,
                   what="the handler", base=Path(candidate.target).parent, timeout=candidate.timeout)
