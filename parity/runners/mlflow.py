"""MLflow pyfunc models: loaded in process (``[candidate] mlflow_model = "path/to/model"``), and the scoring
server's protocol for a served one (``[candidate] url = "http://HOST:PORT/invocations"`` with ``format = "mlflow"``).

A request is what ``mlflow models serve`` takes at ``/invocations``: JSON with one of the scoring
server's keys (``send``, one of `SENDS`; default ``dataframe_split``), a row per image. The image
column (``[candidate].field``, default ``image``) holds the base64 of the fixture file's own bytes:
the model's decoding is under test, and a signature that declares the column ``binary`` has MLflow
decode it to bytes first. When the fixture rows carry input biases they go in a column
``input_biases`` (a list per row), or in the columns ``[candidate].form`` maps (``{ source =
"input_biases.0" }``).

In process, ``mlflow.pyfunc.load_model`` loads the model (its ``load_context`` runs, within
``[candidate].timeout``); each request is parsed by MLflow's own scoring-server parser against the
model's signature, so ``predict`` receives what the served model would for the same request, and
its predictions are written as the server writes them (``{"predictions": ...}``). The torch modules
the model reaches (a ``PythonModel``'s attributes and globals, a flavor's wrapped model) are hooked
as the python kind's are (`parity.runners.app`). ``[candidate].batch = true`` sends
``[runtime].batch_size`` rows per ``predict``; by default one, as a served request usually holds.

The answer is read from ``predictions``: an array's row, a DataFrame's row (columns named by label
are put in output order by ``[candidate].labels`` or the fixture's metadata; unnamed columns
``0..L-1`` in their order; one column holding a list per row is that list), or what
``[candidate].output_key`` (a dotted path inside ``predictions``) names.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.extras import require
from parity.store.fixtures import Fixture, FixtureRow
from parity.results import CandidateRun
from parity.runners import guard
from parity.runners.app import AppObservation, function_roots, observe, reachable_modules, to_run
from parity.runners.mlflow_protocol import DEFAULT_SEND, SENDS, payload, request_send, served_predictions
from parity.runners.request_map import RequestMap
from parity.runners.outputs import output_map
from parity.spec import Spec

__all__ = ["run", "SENDS", "DEFAULT_SEND", "request_send", "payload", "served_predictions", "load_model",
           "observe_model", "check_columns"]

Progress = Callable[[int, int], None]

# The file an MLflow model folder holds (mlflow.pyfunc.save_model's output).
MLMODEL = "MLmodel"


def _as_served(raw: Any) -> Any:
    """``predict``'s return value as the scoring server writes it, read back."""
    from mlflow.pyfunc.scoring_server import predictions_to_json

    out = io.StringIO()
    try:
        predictions_to_json(raw, out)
    except (TypeError, ValueError, OverflowError) as e:  # the served model answers HTTP 500 on them: its error
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"its predictions ({type(raw).__name__}) cannot be written as the scoring server's JSON, so "
                      f"the served model fails on them too: {e}") from e
    return served_predictions(json.loads(out.getvalue()))


def _parser(model: Any) -> Callable[[dict[str, Any]], Any]:
    """The scoring server's request parsing for ``model`` (its signature applied, binary columns decoded)."""
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    parse = getattr(scoring_server, "_parse_json_data", None)
    if parse is not None:
        return lambda body: parse(body, model.metadata, schema).data
    return lambda body: scoring_server.infer_and_parse_data(body, schema)  # MLflow before the unified LLM input


def check_columns(model: Any, columns: Sequence[str]) -> None:
    """Refuse a request whose columns miss one the model's signature requires, before any call.

    Raises:
        SpecError: naming the signature's columns and the fields that map the request's.
    """
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.has_input_names():
        return
    required = [spec.name for spec in schema.inputs if getattr(spec, "required", True)]
    missing = [name for name in required if name not in columns]
    if missing:
        raise SpecError(f"the model's signature takes the columns {', '.join(schema.input_names())}; the request "
                        f"parity builds has {', '.join(columns)}, without {', '.join(missing)}. Set "
                        "[candidate].field to the image column and [candidate].form to the others, e.g. "
                        "form = { source = \"input_biases.0\" }")


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No progress bar for "downloading" a local model's files into itself."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def load_model(path: Path, *, timeout: float = 30.0) -> Any:
    """``mlflow.pyfunc.load_model(path)`` on the user-code thread, within ``timeout`` seconds.

    The model's own code runs (its module, ``load_context``): a model the spec names is code its
    author trusts. MLflow itself refuses a pickled ``python_model`` unless the environment allows it.

    Raises:
        SpecError: mlflow is not installed, or ``path`` is not an MLflow model folder.
        guard.Stopped: the load exited, was interrupted or took too long.
    """
    require("mlflow", "[candidate].mlflow_model")
    import mlflow.pyfunc

    if not (Path(path) / MLMODEL).is_file():
        raise SpecError(f"[candidate].mlflow_model = {str(path)!r}: no {MLMODEL} file there; name the folder "
                        "mlflow.pyfunc.save_model wrote (or a downloaded model's folder)")

    def load() -> Any:
        with _quiet_downloads():
            return mlflow.pyfunc.load_model(str(path))

    return guard.call(load, timeout=timeout, what=f"loading the MLflow model {Path(path).name}")


def _roots(model: Any) -> dict[str, Any]:
    """Where the model's torch modules may be: the pyfunc wrapper, a ``PythonModel``'s attributes and the globals its
    ``predict`` reads."""
    roots: dict[str, Any] = {}
    impl = getattr(model, "_model_impl", None)
    python_model = getattr(impl, "python_model", None)
    if python_model is not None:
        roots["python_model"] = python_model
        roots.update((f"python_model.{k}", v) for k, v in vars(python_model).items())
        predict = getattr(type(python_model), "predict", None)
        if isinstance(predict, types.FunctionType):
            module = type(python_model).__module__ + "."
            for key, value in function_roots(predict, "predict").items():
                roots.setdefault(f"model.{key.removeprefix(module)}" if key.startswith(module) else key, value)
    if impl is not None:
        roots.setdefault("pyfunc", impl)  # a flavor's wrapper: mlflow.pytorch's holds the module itself
    return roots


def observe_model(spec: Spec, fixture: Fixture, model: Any, *, progress: Progress | None = None) -> AppObservation:
    """Send every fixture sample to the loaded ``model`` as the scoring server would, with hooks on its modules.

    Raises:
        SpecError: ``send`` is not an MLflow request, or the request lacks a column the signature requires.
    """
    candidate = spec.candidate
    send = request_send(candidate.send)
    request = RequestMap(candidate.field, candidate.form)
    biases = fixture.rows[0].input_biases if fixture.rows else ()
    check_columns(model, [request.field, *request.fields(biases)])
    parse = _parser(model)

    def predict(rows: list[FixtureRow]) -> Any:
        body = payload([(row.image.read_bytes(), row.input_biases) for row in rows], send=send, request=request)
        return _as_served(model.predict(parse(body)))

    call = predict if candidate.batch else (lambda row: predict([row]))
    return observe("mlflow_model", call, lambda: reachable_modules(_roots(model)), fixture,
                   output_key=output_map(candidate), progress=progress, what=f"{Path(candidate.target).name}'s predict",
                   batch_size=spec.runtime.batch_size if candidate.batch else None, base=Path(candidate.target),
                   timeout=candidate.timeout)


def run(spec: Spec, fixture: Fixture, *, device: str | None = None, progress: Progress | None = None) -> CandidateRun:
    """Load the model, send it every fixture sample with hooks on its modules."""
    candidate = spec.candidate
    path = Path(candidate.target)
    request_send(candidate.send)  # a wrong send is said before the model loads
    try:
        model = load_model(path, timeout=candidate.timeout)
    except SpecError:
        raise
    except guard.Stopped as e:
        return CandidateRun("mlflow_model", errors={"load": str(e)})
    except Exception as e:  # noqa: BLE001 - the model failing to load is the drift (its code or weights)
        return CandidateRun("mlflow_model", errors={"load": f"loading {path} raised {type(e).__name__}: {e}"})
    result = to_run(observe_model(spec, fixture, model, progress=progress), fixture)
    described: Mapping[str, Any] = result.description.get("candidate", {})
    result.description["candidate"] = {**described, "mlflow_model": str(path), "send": request_send(candidate.send),
                                       "field": candidate.field, "loader_module": getattr(model, "loader_module", None)}
    return result
