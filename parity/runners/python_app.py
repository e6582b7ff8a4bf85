"""The ``python`` candidate: a function the service calls (Gradio's ``fn``), gated sample by sample.

Call contract: ``predict(image)`` with the PIL image exactly as the fixture file decodes (no
conversion: the app's own handling is under test), or ``predict(image, input_biases)`` (a list
of ints) when the fixture rows carry input biases; ``[candidate].inputs`` maps other signatures
(`parity.spec.CANDIDATE_INPUTS`). The return value is array-like, a torch tensor, or a mapping
read by ``output_key``. With ``[candidate].batch = true`` each argument is a list of
``[runtime].batch_size`` rows' values and the function returns one output row per image.
The import and each call are bounded by ``[candidate].timeout`` and cannot end parity
(`parity.runners.guard`).
"""

from __future__ import annotations

import importlib
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

__all__ = ["run", "observe_function", "load_function", "default_inputs", "argument"]

Progress = Callable[[int, int], None]


def load_function(target: str, python_path: Path | None, *, timeout: float = 30.0,
                  field: str = "[candidate].python") -> Callable:
    """Import ``module:function`` (or ``/path/to/app.py:function``) with ``python_path`` first on ``sys.path``.

    A file under ``python_path`` is imported by its dotted name from there (``deploy/app.py`` as
    ``deploy.app``), so that its own absolute imports work; a file elsewhere, from its folder.
    ``field`` names the spec field in messages.

    The module's code runs: a spec's import path is code its author trusts. A module of the same
    name imported from elsewhere (another copy of the app) is imported afresh from ``python_path``.
    The import runs on the user-code thread, within ``timeout`` seconds (`parity.runners.guard`).

    Raises:
        SpecError: the module or the function cannot be found.
        guard.Stopped: the import called ``sys.exit``/``os._exit``, raised ``KeyboardInterrupt`` or took too long.
    """
    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if python_path is None or not file.is_relative_to(python_path):
            python_path = file.parent
        module_name = ".".join(file.relative_to(python_path).with_suffix("").parts)
    if python_path is not None:
        path = str(python_path)
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        cached = sys.modules.get(module_name)
        origin = getattr(cached, "__file__", None)
        if cached is not None and (origin is None or Path(origin).resolve().parent != python_path.resolve()):
            del sys.modules[module_name]
    try:
        module = guard.call(importlib.import_module, module_name, timeout=timeout, what=f"importing {target}")
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the app itself imports something missing: that is the app's error
        raise SpecError(f"{field} = {target!r}: no module {module_name!r} in {python_path} "
                        "(set [candidate].python_path to the app's folder)") from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise SpecError(f"{field} = {target!r}: module {module.__file__} has no function {attr!r}")
    return function


def default_inputs(fixture: Fixture) -> tuple[str, ...]:
    return ("image", "input_biases") if fixture.biases().shape[1] else ("image",)


def argument(name: str, row: FixtureRow) -> Any:
    """One positional argument of `parity.spec.CANDIDATE_INPUTS` for a fixture row."""
    if name == "image":
        return open_image(row.image)
    if name == "input_biases":
        return [int(b) for b in row.input_biases]
    if name == "image_bytes":
        return row.image.read_bytes()
    return str(row.image)


def observe_function(spec: Spec, fixture: Fixture, function: Callable, *,
                     progress: Progress | None = None) -> AppObservation:
    """Call the app's ``function`` (`load_function`) on every fixture sample, or batch with
    ``[candidate].batch``, with hooks on the modules it reaches."""
    candidate = spec.candidate
    inputs = candidate.inputs or default_inputs(fixture)
    if candidate.batch:
        def call(rows: list[FixtureRow]) -> Any:
            return function(*([argument(name, row) for row in rows] for name in inputs))
    else:
        def call(row: FixtureRow) -> Any:
            return function(*(argument(name, row) for name in inputs))

    # Looked for again after the first call when a part is missing: a model the app builds lazily.
    def modules() -> dict[str, Any]:
        return reachable_modules(function_roots(function, candidate.target))

    return observe("python", call, modules, fixture, output_key=output_map(candidate), progress=progress,
                   what=f"{candidate.target}", batch_size=spec.runtime.batch_size if candidate.batch else None,
                   base=candidate.python_path, timeout=candidate.timeout)


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Import the app, call its function on every fixture sample with hooks on its modules."""
    candidate = spec.candidate
    try:
        function = load_function(candidate.target, candidate.python_path, timeout=candidate.timeout)
    except SpecError:
        raise
    except guard.Stopped as e:  # it exited, was interrupted or hung while importing: it did not start
        return CandidateRun("python", errors={"load": str(e)})
    except Exception as e:  # noqa: BLE001 - the app failing to start is the drift (e.g. its weights do not load)
        return CandidateRun("python", errors={"load": f"importing {candidate.target} raised {type(e).__name__}: {e}"})
    return to_run(observe_function(spec, fixture, function, progress=progress), fixture)
