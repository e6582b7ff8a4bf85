"""A Gradio app as the candidate, called through ``gradio_client`` as its users' scripts call it.

- ``[candidate] gradio = "http://127.0.0.1:7860/"``: an app already running (a Space's URL too).
  Only its answers are seen: load, weights, pixels, embedding and head are not observable.
- ``[candidate] gradio_app = "app.py:demo"`` (or ``package.module:demo``): the user's ``gr.Blocks`` /
  ``gr.Interface``, imported from ``[candidate].python_path`` and launched on 127.0.0.1 for the run
  (a free port, no share link, no analytics), closed afterwards whatever happens. A ``demo.launch()``
  the file runs when imported (a Space's ``app.py`` as it ships) returns at once, serving nothing. It
  is called through the same client, and its torch modules are observed as a python app's are
  (`parity.runners.app`): pixels, embedding and head are gated too.

``[candidate].api_name`` names the endpoint (default: the app's only named one). ``inputs`` says
what each of its input components gets (`parity.spec.CANDIDATE_INPUTS`): ``image`` uploads the
fixture file as a browser would (``handle_file``: the app's own decoding is under test, whatever
its ``gr.Image(type=...)``), ``image_path`` sends the file's path as text, ``input_biases`` the row's
biases as a list (a ``gr.JSON``), ``input_biases.N`` the N-th as a number (a ``gr.Number``, a
``gr.Dropdown``). Default: ``image``, then ``input_biases`` when the rows carry them.
Answers are read by `parity.runners.outputs`: a ``gr.Label`` (scores by label, in the order of
``[candidate].labels`` or the fixture's metadata), a list of numbers (``gr.JSON``), a dotted
``output_key`` (``"1"``: the second of several output components).

Bounded: each call has ``[candidate].timeout`` seconds in all; a call past it is cancelled and is
that sample's error, a refused or broken connection is retried ``[candidate].retries`` times, and
after a few consecutive samples without an answer the rest are not sent. Nothing is sent anywhere but
the URL (no Hugging Face token read from the machine: a private Space's goes in ``headers``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from parity.errors import SpecError
from parity.extras import require
from parity.store.fixtures import Fixture, FixtureRow
from parity.results import CandidateRun
from parity.runners import guard
from parity.runners.app import function_roots, observe, reachable_modules, read_vector, to_run
from parity.runners.http import BACKOFF, GIVE_UP_AFTER, MAX_BACKOFF, redact, resolve_headers
from parity.runners.http import check_url as http_url
from parity.runners.outputs import OutputMap, UnreadableOutput, fill_unlisted, fixture_labels, output_map
from parity.runners.python_app import default_inputs, load_function
from parity.spec import CandidateSpec, Spec

__all__ = ["run", "connect", "launched", "Endpoint", "check_url"]

Progress = Callable[[int, int], None]

HOST = "127.0.0.1"
ANALYTICS = "GRADIO_ANALYTICS_ENABLED"
UNOBSERVABLE = "a Gradio app reached at a URL shows its answers only"
# What Blocks.launch gets beyond host and port, where the installed gradio takes it.
LAUNCH = {"prevent_thread_lock": True, "share": False, "inbrowser": False, "quiet": True, "show_error": True,
          "ssr_mode": False, "mcp_server": False}
PORT_TRIES = 3
# Gradio's event stream sends a heartbeat every 15 s: a read that waits longer has lost the app.
STREAM_SILENCE = 20.0
# A launched app's calls: the client's own deadline answers first; the user-code thread's is the backstop.
CANCEL_GRACE = 5.0


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host (`parity.runners.http.check_url`).

    Raises:
        SpecError: anything else (a Space's name is refused: its URL says where the images go).
    """
    return http_url(url, field="gradio",
                    example="the app's http://127.0.0.1:7860/ (a Space's is https://OWNER-NAME.hf.space)")


@contextlib.contextmanager
def _analytics_off() -> Iterator[None]:
    """``GRADIO_ANALYTICS_ENABLED=False`` while parity runs the app: gradio and gradio_client report nothing."""
    before = os.environ.get(ANALYTICS)
    os.environ[ANALYTICS] = "False"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ANALYTICS, None)
        else:
            os.environ[ANALYTICS] = before


@dataclass
class Endpoint:
    """One endpoint of a connected app, and how a fixture row becomes its arguments.

    ``call`` raises what a sample's error says: the client's ``AppError`` (the app raised),
    ``TimeoutError`` (no answer in time: cancelled) or ``ConnectionError`` (no answer at all).
    """

    client: Any
    url: str
    api_name: str
    inputs: tuple[str, ...]
    timeout: float
    retries: int = 0
    returns: tuple[str, ...] = ()
    silent: int = field(default=0, init=False)  # consecutive samples without an answer

    def arguments(self, row: FixtureRow) -> list[Any]:
        from gradio_client import handle_file

        values: list[Any] = []
        for name in self.inputs:
            if name == "image":
                values.append(handle_file(str(row.image)))
            elif name == "image_path":
                values.append(str(row.image))
            elif name == "input_biases":
                values.append([int(b) for b in row.input_biases])
            else:  # input_biases.N, checked against the rows' width by `connect`
                values.append(int(row.input_biases[int(name.partition(".")[2])]))
        return values

    def call(self, row: FixtureRow) -> Any:
        """The endpoint's answer for ``row``."""
        import httpx

        if self.silent >= GIVE_UP_AFTER:
            raise ConnectionError(f"not sent: the app at {self.url} did not answer the {self.silent} samples before it")
        arguments = self.arguments(row)
        for attempt in range(self.retries + 1):
            job = self.client.submit(*arguments, api_name=self.api_name)
            try:
                answer = job.result(timeout=self.timeout)
            except concurrent.futures.TimeoutError:
                self.silent += 1
                # Cancelling ends the client's threads for the job; the app may not answer the request (it can wait
                # for the call it cancels): sent from a thread of its own, never waited for.
                threading.Thread(target=_cancel, args=(job,), name="parity-gradio-cancel", daemon=True).start()
                raise TimeoutError(f"no answer within {self.timeout:g} s (cancelled); raise [candidate].timeout if "
                                   "the app needs longer") from None
            except httpx.TransportError as e:  # refused, reset, a request past its time
                if attempt < self.retries:
                    time.sleep(min(BACKOFF * 2 ** attempt, MAX_BACKOFF))
                    continue
                self.silent += 1
                raise ConnectionError(f"no answer from {self.url}: {type(e).__name__}: {e}"
                                      + (f" (after {attempt + 1} attempts)" if attempt else "")) from None
            self.silent = 0
            return answer
        raise AssertionError("unreachable")  # the loop returns or raises

    def close(self) -> None:
        """Stop the client's heartbeat and threads (one stuck in a read ends at its timeout)."""
        self.client.close()
        for name in ("executor", "helper_executor", "stream_executor"):
            pool = getattr(self.client, name, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _cancel(job: Any) -> None:
    with contextlib.suppress(Exception):
        job.cancel()


def _described(parameter: Mapping[str, Any]) -> str:
    label = parameter.get("label") or parameter.get("parameter_name") or "?"
    return f"{label} ({parameter.get('component', '?')})"


def _proposal(taken: int, width: int) -> list[str] | None:
    """The ``inputs`` an endpoint of ``taken`` inputs most likely means, rows carrying ``width`` biases."""
    if taken == 1:
        return ["image"]
    if width and taken == 1 + width:
        return ["image"] + [f"input_biases.{j}" for j in range(width)]
    if width and taken == 2:
        return ["image", "input_biases"]
    return None


def _check_inputs(candidate: CandidateSpec, fixture: Fixture, api_name: str, url: str,
                  parameters: Sequence[Mapping[str, Any]] | None) -> tuple[str, ...]:
    width = fixture.biases().shape[1]
    inputs = candidate.inputs or default_inputs(fixture)
    if "image_bytes" in inputs:
        raise SpecError("[candidate].inputs: image_bytes does not apply to a Gradio app (its inputs are files and "
                        "JSON values): use image, which uploads the file")
    for name in inputs:
        if name.startswith("input_biases.") and int(name.partition(".")[2]) >= width:
            raise SpecError(f"[candidate].inputs names {name}, but the fixture's rows carry {width} input_biases")
    if parameters is None:
        return tuple(inputs)
    # Declared inputs may leave the last components at their defaults (a slider); the default inputs must fit all.
    required = sum(1 for p in parameters if not p.get("parameter_has_default")) if candidate.inputs else len(parameters)
    if not required <= len(inputs) <= len(parameters):
        proposal = _proposal(len(parameters), width)
        said = "" if candidate.inputs else " (the default)"
        fix = (f"set [candidate].inputs = {proposal}".replace("'", '"') if proposal else
               "set [candidate].inputs to what each one gets: image, image_path, input_biases or input_biases.N")
        raise SpecError(f"[candidate].inputs = {list(inputs)}{said} gives {len(inputs)} input(s); {api_name} of the "
                        f"app at {url} takes {len(parameters)}: {', '.join(map(_described, parameters))}. {fix}")
    return tuple(inputs)


def _check_returns(candidate: CandidateSpec, api_name: str, returns: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    shown = tuple(_described(r) for r in returns)
    if len(returns) > 1 and candidate.output_key is None:
        labels = [i for i, r in enumerate(returns) if r.get("component") == "Label"]
        pick = labels[0] if labels else 0
        raise SpecError(f"{api_name} answers {len(returns)} outputs ({', '.join(shown)}): set [candidate].output_key "
                        f"to the index of the one holding the scores, e.g. output_key = \"{pick}\" for "
                        f"{shown[pick]}")
    return shown


def connect(url: str, candidate: CandidateSpec, fixture: Fixture, *,
            headers: Mapping[str, str] | None = None) -> Endpoint:
    """A client of the app at ``url`` and the endpoint the candidate names, its inputs checked against the app's.

    Raises:
        SpecError: no such endpoint, or inputs or outputs that do not fit it (the message says what to set).
        ConnectionError: the app cannot be reached or does not answer as a Gradio app.
    """
    client_module = require("gradio_client", f"[candidate].{candidate.kind}")
    import httpx  # gradio_client's own HTTP client

    # Each read may wait for the app's event stream, silent up to its heartbeat between messages; a call's
    # answer is bounded by `Endpoint.call`.
    timeout = httpx.Timeout(candidate.timeout, read=max(candidate.timeout, STREAM_SILENCE))
    try:
        # token=False: no Hugging Face token read from this machine is sent; analytics off (the variable too).
        client = client_module.Client(url, token=False, verbose=False, analytics_enabled=False, download_files=False,
                                      headers=dict(headers or {}) or None, httpx_kwargs={"timeout": timeout})
    except Exception as e:  # noqa: BLE001 - whatever the client raised, the app did not answer as a Gradio app
        raise ConnectionError(f"cannot connect to the Gradio app at {url}: {type(e).__name__}: {e}") from None
    try:
        info = client.view_api(print_info=False, return_format="dict") or {}
        named = info.get("named_endpoints", {})
        api_name = candidate.api_name
        if api_name is None:
            if len(named) != 1:
                raise SpecError(f"the Gradio app at {url} has {len(named)} named endpoints "
                                f"({', '.join(named) or 'none'}): set [candidate].api_name to the one to gate")
            api_name = next(iter(named))
        elif api_name not in named:
            raise SpecError(f"[candidate].api_name = {api_name!r}: the Gradio app at {url} has no such endpoint. "
                            f"Accepted values: {', '.join(named) or '(none: the app exposes no named endpoint)'}")
        described = named[api_name]
        inputs = _check_inputs(candidate, fixture, api_name, url, described.get("parameters"))
        returns = _check_returns(candidate, api_name, described.get("returns") or ())
    except BaseException:
        Endpoint(client, url, "", (), candidate.timeout).close()
        raise
    return Endpoint(client, url, api_name, inputs, candidate.timeout, candidate.retries, returns)


# -- a running app: outputs only ------------------------------------------------------------------

def _run_remote(spec: Spec, fixture: Fixture, progress: Progress | None) -> CandidateRun:
    candidate = spec.candidate
    url = check_url(candidate.target)
    headers, secrets = resolve_headers(candidate.headers)
    mapping = _mapping(candidate, fixture)
    width = fixture.outputs.shape[1]
    try:
        endpoint = connect(url, candidate, fixture, headers=headers)
    except ConnectionError as e:
        return CandidateRun("gradio", errors={"load": redact(str(e), secrets)})
    rows: list[int] = []
    outputs: list[np.ndarray] = []
    listed: list[np.ndarray] = []
    sample_errors: list[tuple[str, str]] = []
    try:
        for i, row in enumerate(fixture.rows):
            try:
                values, shown = read_vector(endpoint.call(row), mapping, what="the app")
                if values.shape != (width,):
                    raise UnreadableOutput(f"{values.shape[0]} outputs, the fixture has {width} per sample")
            except UnreadableOutput as e:
                sample_errors.append((row.name, f"parity could not read what the app returned: {e}"))
            except (TimeoutError, ConnectionError) as e:
                sample_errors.append((row.name, redact(f"{url}: {e}", secrets)))
            except Exception as e:  # noqa: BLE001 - the client's AppError (the app raised) and the like
                sample_errors.append((row.name, redact(f"{endpoint.api_name} at {url} raised {type(e).__name__}: "
                                                      f"{e}", secrets)))
            else:
                rows.append(i)
                outputs.append(values.astype(np.float32))
                listed.append(np.ones(width, bool) if shown is None else shown)
            if progress:
                progress(i + 1, len(fixture.rows))
    finally:
        endpoint.close()
    stacked = np.stack(outputs) if outputs else np.zeros((0, width), np.float32)
    note = None
    if outputs:
        stacked, note = fill_unlisted(stacked, np.stack(listed), fixture.outputs[rows])
    sent = {"gradio": url, "api_name": endpoint.api_name, "inputs": list(endpoint.inputs),
            "returns": list(endpoint.returns), **({"headers": sorted(headers)} if headers else {})}
    return CandidateRun("gradio", description={"candidate": sent}, rows=tuple(rows), sample_errors=tuple(sample_errors),
                        outputs=stacked, unobservable={s: UNOBSERVABLE for s in ("load", "weights", "pixels",
                                                                                 "embedding", "head")},
                        notes=(note,) if note else ())


def _mapping(candidate: CandidateSpec, fixture: Fixture) -> OutputMap:
    mapping = output_map(candidate)
    width = fixture.outputs.shape[1]
    if mapping.labels is not None and len(mapping.labels) != width:
        raise SpecError(f"[candidate].labels names {len(mapping.labels)} labels; the fixture has {width} outputs "
                        "per sample")
    return mapping if mapping.labels is not None else replace(mapping, labels=fixture_labels(fixture))


# -- the user's Blocks, launched for the run ----------------------------------------------------

@contextlib.contextmanager
def _launch_deferred(blocks: type) -> Iterator[None]:
    """While the app is imported, ``Blocks.launch`` returns at once, serving nothing: a Space's ``app.py``
    launches its demo when run, which would serve (and block) there."""
    original = blocks.launch

    def deferred(self: Any, *args: Any, **kwargs: Any) -> tuple[None, None, None]:
        return None, None, None  # what launch returns: app, local URL, share URL

    blocks.launch = deferred
    try:
        yield
    finally:
        blocks.launch = original


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _launch(demo: Any, what: str, timeout: float) -> str:
    """``demo`` served on a free 127.0.0.1 port; its URL."""
    accepted = inspect.signature(type(demo).launch).parameters
    options = {k: v for k, v in LAUNCH.items() if k in accepted}
    for attempt in range(PORT_TRIES):
        port = _free_port()
        try:
            guard.call(lambda: demo.launch(server_name=HOST, server_port=port, **options), timeout=timeout,
                       what=f"launching {what}")
            return f"http://{HOST}:{port}/"
        except OSError:  # the port was taken between finding it and binding it
            if attempt == PORT_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _close(demo: Any) -> None:
    quiet = {"verbose": False} if "verbose" in inspect.signature(demo.close).parameters else {}
    with contextlib.suppress(Exception):
        demo.close(**quiet)


@contextlib.contextmanager
def launched(candidate: CandidateSpec) -> Iterator[tuple[Any, str]]:
    """``(demo, url)``: the candidate's Blocks imported and served on 127.0.0.1; closed on leaving, whatever happened.

    Raises:
        SpecError: the target is not a ``gr.Blocks`` (a ``gr.Interface`` is one).
        guard.Stopped: importing or launching exited, was interrupted or took longer than ``[candidate].timeout``.
        Exception: what importing or launching the app raised.
    """
    gr = require("gradio", "[candidate].gradio_app")
    field_name = "[candidate].gradio_app"
    with _launch_deferred(gr.Blocks):
        demo = load_function(candidate.target, candidate.python_path, timeout=candidate.timeout, field=field_name)
    if not isinstance(demo, gr.Blocks):
        raise SpecError(f"{field_name} = {candidate.target!r} is a {type(demo).__name__}, not a gr.Blocks or "
                        "gr.Interface: name the app's demo, e.g. app.py:demo")
    try:
        url = _launch(demo, candidate.target, candidate.timeout)
        yield demo, url
    finally:
        _close(demo)


def _endpoint_function(demo: Any, api_name: str) -> Callable:
    """The Python function behind ``api_name`` (``/predict``), whose modules are observed."""
    for block_fn in getattr(demo, "fns", {}).values():
        if f"/{getattr(block_fn, 'api_name', '')}" == api_name and getattr(block_fn, "fn", None) is not None:
            return block_fn.fn
    raise SpecError(f"[candidate].api_name = {api_name!r}: no Python function serves it in the app")


def _run_app(spec: Spec, fixture: Fixture, progress: Progress | None) -> CandidateRun:
    candidate = spec.candidate
    if candidate.headers:
        raise SpecError("[candidate].headers: a launched app is called on 127.0.0.1 without headers; remove them")
    with contextlib.ExitStack() as stack:
        try:
            demo, url = stack.enter_context(launched(candidate))
            endpoint = connect(url, candidate, fixture)
        except SpecError:
            raise
        except guard.Stopped as e:  # it exited, was interrupted or hung while importing or launching
            hint = (" (an app.py that blocks when imported, e.g. serving with uvicorn.run() or looping, cannot be "
                    "launched for the run: put that under if __name__ == \"__main__\":)"
                    if isinstance(e, guard.TimedOut) else "")
            return CandidateRun("gradio_app", errors={"load": f"{e}{hint}"})
        except ConnectionError as e:
            return CandidateRun("gradio_app", errors={"load": f"the launched app: {e}"})
        except Exception as e:  # noqa: BLE001 - the app failing to start is the drift (e.g. its weights do not load)
            return CandidateRun("gradio_app", errors={"load": f"starting {candidate.target} raised "
                                                              f"{type(e).__name__}: {e}"})
        stack.callback(endpoint.close)  # before the app closes
        function = _endpoint_function(demo, endpoint.api_name)
        observation = observe(
            "gradio_app", endpoint.call, lambda: reachable_modules(function_roots(function, candidate.target)),
            fixture, output_key=_mapping(candidate, fixture), progress=progress,
            what=f"{candidate.target} ({endpoint.api_name})", base=candidate.python_path,
            timeout=candidate.timeout + CANCEL_GRACE)
    return to_run(observation, fixture)


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Call the Gradio app on every fixture sample (``gradio``: at its URL; ``gradio_app``: launched for the run)."""
    candidate = spec.candidate
    if candidate.send is not None:
        raise SpecError(f"[candidate].send does not apply to a {candidate.kind} candidate: gradio_client uploads each "
                        "image as a file. Remove it.")
    with _analytics_off():
        if candidate.kind == "gradio_app":
            return _run_app(spec, fixture, progress)
        return _run_remote(spec, fixture, progress)
