"""The MLflow scoring server's protocol: ``/invocations`` requests and answers, without mlflow itself.

Shared by the url runner (``format = "mlflow"``) and the in-process ``mlflow_model`` runner, which writes each request
exactly as it would be sent.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from parity.errors import SpecError
from parity.runners.outputs import UnreadableOutput
from parity.runners.request_map import RequestMap
from parity.spec import MLFLOW_SEND

__all__ = ["SENDS", "DEFAULT_SEND", "request_send", "payload", "served_predictions"]

SENDS = MLFLOW_SEND
DEFAULT_SEND = "dataframe_split"

def request_send(send: str | None) -> str:
    """``[candidate].send`` of an MLflow request, `DEFAULT_SEND` when unset.

    Raises:
        SpecError: not one of `SENDS`.
    """
    if send is None:
        return DEFAULT_SEND
    if send not in SENDS:
        raise SpecError(f"[candidate].send = {send!r} is not an MLflow request. Accepted values: {', '.join(SENDS)}")
    return send


def _row(data: bytes, biases: Sequence[int], request: RequestMap) -> dict[str, Any]:
    """One request row: the image's base64 in the image column, the input biases as ``request`` maps them."""
    return {request.field: base64.b64encode(data).decode("ascii"), **request.fields(biases)}


def payload(samples: Sequence[tuple[bytes, Sequence[int]]], *, send: str = DEFAULT_SEND,
            request: RequestMap = RequestMap()) -> dict[str, Any]:
    """The scoring server's JSON request for ``samples`` (an image file's bytes and its input biases each).

    Raises:
        SpecError: ``send`` is not one of `SENDS`, or ``request.form`` names a bias the rows lack.
    """
    request_send(send)
    rows = [_row(data, biases, request) for data, biases in samples]
    columns = list(rows[0]) if rows else [request.field]
    if send == "dataframe_split":
        return {send: {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}}
    if send == "inputs":  # column -> values: the TF-serving columnar form
        return {send: {c: [row[c] for row in rows] for c in columns}}
    return {send: rows}  # dataframe_records, instances: one object per row


def _in_order(predictions: Any) -> Any:
    """``predictions`` with a DataFrame's unnamed columns (``"0"`` .. ``"L-1"``) and its one list-valued column read
    as rows of numbers; anything else as it is."""
    if not isinstance(predictions, list) or not predictions or not all(
            isinstance(r, dict) and r for r in predictions):
        return predictions
    keys = set(predictions[0])
    if any(set(r) != keys for r in predictions):
        return predictions
    if keys == {str(i) for i in range(len(keys))}:
        return [[r[str(i)] for i in range(len(keys))] for r in predictions]
    if len(keys) == 1 and all(isinstance(v, list) for r in predictions for v in r.values()):
        (key,) = keys
        return [r[key] for r in predictions]
    return predictions


def served_predictions(answer: Any) -> Any:
    """What an ``/invocations`` answer predicts, in rows (see the module's notes).

    Raises:
        UnreadableOutput: not a scoring server's answer (no ``predictions``).
    """
    if not isinstance(answer, dict) or "predictions" not in answer:
        keys = ", ".join(map(str, answer)) if isinstance(answer, dict) else f"a JSON {type(answer).__name__}"
        raise UnreadableOutput(f"the answer has no 'predictions' ({keys or 'no keys'}): not an MLflow scoring "
                               "server's answer; leave out format = \"mlflow\" for a service of another protocol")
    return _in_order(answer["predictions"])
