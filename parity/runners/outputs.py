"""Reading a candidate's answer in the shape it ships: numbers, a dotted path into nested JSON, or scores by label.

Declared in the spec, never by changing the shipped code:

- ``[candidate].output_key = "predictions.0.scores"``: a dotted path, integer parts index lists
  (a part that is not an integer, applied to a list, is applied to each item: a batch of mappings);
- scores by label: a ``{label: score}`` mapping, Gradio ``gr.Label``'s
  ``{"label": top, "confidences": [{"label", "confidence"}]}`` or a Hugging Face pipeline list
  ``[{"label", "score"}]``, put in output order by ``[candidate].labels`` or, when absent, by the
  label names the fixture's metadata records (``labels``, ``label_names`` or ``class_names``).
  A top-k list that leaves labels out is judged on the labels it holds: the others are not
  compared (they take the reference's values, and a note says how many scores were compared).

What cannot be read is an `UnreadableOutput`: parity could not read the answer, which is not the
candidate raising.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.store.fixtures import METADATA, Fixture, cached_sha256
from parity.spec import CandidateSpec

__all__ = ["OutputMap", "UnreadableOutput", "read", "label_scores", "fixture_labels", "fill_unlisted", "output_map"]

# Top-level metadata fields that name the outputs, in order of preference.
LABEL_FIELDS = ("labels", "label_names", "class_names")


class UnreadableOutput(ValueError):
    """The candidate answered, but not in a shape parity can read as one vector of outputs per sample."""


@dataclass(frozen=True)
class OutputMap:
    """How to read an answer: ``key`` (dotted path), ``labels`` (output order of scores given by label)."""

    key: str | None = None
    labels: tuple[str, ...] | None = None


def output_map(candidate: CandidateSpec) -> OutputMap:
    """The ``[candidate]`` fields that say how to read its answers."""
    return OutputMap(key=candidate.output_key, labels=candidate.labels)


def fixture_labels(fixture: Fixture) -> tuple[str, ...] | None:
    """The output names the fixture's metadata records, when they are as many as the outputs; else None."""
    path = fixture.root / METADATA
    entry = fixture.manifest.get("files", {}).get(METADATA, {})
    try:
        # The metadata was verified when the fixture loaded; read again only if unchanged since.
        if not path.is_file() or cached_sha256(path) != entry.get("sha256"):
            return None
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    width = fixture.outputs.shape[1] if fixture.outputs.ndim == 2 else None
    for name in LABEL_FIELDS:
        names = meta.get(name) if isinstance(meta, dict) else None
        if (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names) and len(names) == width):
            return tuple(names)
    return None


def _follow(value: Any, key: str, what: str) -> Any:
    """``value`` read along the dotted path ``key``."""
    done: list[str] = []
    for part in key.split("."):
        where = f"{'.'.join(done)}" or "the answer"
        if isinstance(value, Mapping):
            if part not in value:
                keys = ", ".join(sorted(map(str, value))) or "none"
                raise UnreadableOutput(f"{what} returned no {key!r}: {where} has no {part!r} (keys: {keys}); "
                                       "check [candidate].output_key")
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            if not -len(value) <= int(part) < len(value):
                raise UnreadableOutput(f"{what} returned no {key!r}: {where} is a list of {len(value)}, "
                                       f"index {part} is out of range; check [candidate].output_key")
            value = value[int(part)]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            value = [_follow(v, part, what) for v in value]  # one mapping per image of a batch
        else:
            raise UnreadableOutput(f"{what} returned no {key!r}: {where} is a {type(value).__name__}, "
                                   f"not a mapping with {part!r}; check [candidate].output_key")
        done.append(part)
    return value


def label_scores(value: Any) -> dict[str, Any] | None:
    """``{label: score}`` when ``value`` gives scores by label (a label dict, gr.Label, an HF list); else None."""
    if isinstance(value, Mapping) and isinstance(value.get("confidences"), list):  # gr.Label as served
        return _pairs(value["confidences"], "confidence")
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) or _is_scalar_tensor(v) for v in value.values()):
        return dict(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) and "label" in v for v in value):
        return _pairs(value, "score")
    return None


def _is_scalar_tensor(value: Any) -> bool:
    return type(value).__name__ in ("Tensor", "ndarray") and getattr(value, "ndim", None) == 0


def _pairs(items: Sequence[Any], score: str) -> dict[str, Any]:
    scores: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, Mapping) or score not in item or "label" not in item:
            raise UnreadableOutput(f"an entry of the list of scores by label is not {{'label', {score!r}}}: "
                                   f"{str(item)[:80]}")
        label = str(item["label"])
        if label in scores:
            raise UnreadableOutput(f"label {label!r} is listed twice")
        scores[label] = item[score]
    return scores


def _by_label(scores: Mapping[str, Any], labels: tuple[str, ...] | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    shown = ", ".join(repr(k) for k in list(scores)[:6]) + (" ..." if len(scores) > 6 else "")
    if labels is None:
        raise UnreadableOutput(f"{what} returned scores by label ({shown}) and no output order is known: set "
                               "[candidate].labels to the labels in the order of the head's outputs (or record "
                               "them as label_names in the fixture's metadata); if these are not labels, set "
                               "[candidate].output_key to the key holding the outputs")
    unknown = [k for k in scores if k not in labels]
    if unknown:
        raise UnreadableOutput(f"{what} returned scores for labels not in the output order: "
                               f"{', '.join(map(repr, unknown[:6]))} (known: {', '.join(labels)}); "
                               "check [candidate].labels")
    values = np.full(len(labels), np.nan)
    listed = np.zeros(len(labels), dtype=bool)
    for j, label in enumerate(labels):
        if label in scores:
            number = scores[label]
            number = number.item() if _is_scalar_tensor(number) else number
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise UnreadableOutput(f"{what} returned a score for {label!r} that is not a number: {number!r}"[:200])
            values[j], listed[j] = float(number), True
    return values, listed


def read(value: Any, mapping: OutputMap, *, what: str) -> tuple[Any, np.ndarray | None]:
    """The answer read by ``mapping``: ``(numbers, None)`` or, for scores by label, ``(vector, listed)``.

    ``numbers`` is still to be converted (array-like, a tensor); ``vector`` is float64 with NaN
    where a truncated list does not list a label, and ``listed`` says which entries it lists.
    A list of answers by label (one per image of a batch) gives a 2-D vector and mask.

    Raises:
        UnreadableOutput: the path does not lead anywhere, or scores by label cannot be ordered.
    """
    if mapping.key is not None:
        value = _follow(value, mapping.key, what)
    scores = label_scores(value)
    if scores is not None:
        return _by_label(scores, mapping.labels, what)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (list, tuple, Mapping)) and label_scores(v) is not None for v in value):
        read_rows = [_by_label(label_scores(v), mapping.labels, what) for v in value]  # type: ignore[arg-type]
        return np.stack([r[0] for r in read_rows]), np.stack([r[1] for r in read_rows])
    if isinstance(value, Mapping):
        raise UnreadableOutput(f"{what} returned a mapping with keys {sorted(map(str, value))}; set "
                               "[candidate].output_key to the one holding the outputs (a dotted path such as "
                               "predictions.0.scores reaches into nested JSON)")
    return value, None


def fill_unlisted(outputs: np.ndarray, listed: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Outputs with the scores a top-k list left out taken from ``reference``, and a note saying how many were
    compared (None when every score was listed)."""
    if listed.all():
        return outputs, None
    filled = np.where(listed, outputs, reference).astype(outputs.dtype)
    return filled, (f"scores by label: {int(listed.sum())} of {listed.size} scores compared ({listed.shape[0]} "
                    f"samples, {int(listed.sum(axis=1).min())} to {int(listed.sum(axis=1).max())} labels each); a "
                    "label missing from a truncated list is not compared (it takes the reference's value)")
