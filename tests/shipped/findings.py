"""Reading what the gate said: the findings in a report or diagnosis JSON, and the spec fixes it printed."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from parity.spec import parse_spec

FINDING_KEYS = {"detector", "stage", "cause", "evidence", "fix"}


def findings(*documents: Any) -> list[dict[str, Any]]:
    """Every finding (a `parity.results.Finding` as JSON) anywhere in ``documents``, in order."""
    found: list[dict[str, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            if FINDING_KEYS <= value.keys():
                found.append(dict(value))
                return
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    for document in documents:
        walk(document)
    return found


def printed_spec_fixes(diagnosis: Mapping[str, Any], check: Mapping[str, Any]) -> Iterator[str]:
    """Each spec fix printed for a user to paste: the diagnosis's ``fix_toml`` and every finding's ``spec_fix``."""
    yield from diagnosis.get("fix_toml") or ()
    for finding in findings(diagnosis, check):
        if finding.get("spec_fix"):
            yield finding["spec_fix"]


def words_present(text: str, words: tuple[str, ...]) -> list[str]:
    """The entries of ``words`` missing from ``text``; an entry ``"a|b"`` is present when either is."""
    return [word for word in words if not any(alternative in text for alternative in word.split("|"))]


def _merge(base: dict[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in change.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, Mapping) else value
    return merged


def apply_spec_fix(spec_path: Path, fix: str) -> dict[str, Any]:
    """The spec's table with the printed ``fix`` pasted in, after checking that it is a change parity accepts.

    Raises:
        tomllib.TOMLDecodeError: ``fix`` is not TOML.
        AssertionError: it sets only the spec's current values.
        parity.errors.SpecError: the spec with it is refused (e.g. a field the library does not take).
    """
    change = tomllib.loads(fix)
    current = tomllib.loads(spec_path.read_text())
    merged = _merge(current, change)
    # A fix that only removes fields has nothing to set (TOML cannot say "remove"); it is pasted as its comment.
    assert merged != current or not change, f"the printed fix {fix!r} proposes the spec's current values"
    parse_spec(merged, path=spec_path)
    return merged
