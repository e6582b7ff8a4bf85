"""How a fixture sample becomes a service request's fields: shared by the url runner and the MLflow protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from parity.errors import SpecError

__all__ = ["RequestMap"]


@dataclass(frozen=True)
class RequestMap:
    """How a fixture sample becomes a request: the file field, the other fields, the headers (values resolved)."""

    field: str = "image"
    form: Mapping[str, str] | None = None  # request field -> "input_biases" or "input_biases.N"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def fields(self, biases: Sequence[int]) -> dict[str, Any]:
        """The request's fields besides the image: ``input_biases`` by default, else as ``form`` maps them."""
        if self.form is None:
            return {"input_biases": list(biases)} if biases else {}
        picked: dict[str, Any] = {}
        for name, source in self.form.items():
            _, _, index = source.partition(".")
            if not index:
                picked[name] = list(biases)
            elif int(index) < len(biases):
                picked[name] = int(biases[int(index)])
            else:
                raise SpecError(f"[candidate].form.{name} = {source!r}, but the fixture's rows carry "
                                f"{len(biases)} input_biases")
        return picked
