"""Spec text: a spec as the TOML it is loaded from, and a printed fix merged into it as a user pastes it.

A diagnosis prints its fix as TOML tables (`parity.results.Change.merged_toml`) and, apart from
them, the fields to remove. `load_fixed` loads exactly that text merged into the spec's own TOML
(table by table: the named keys replaced, the rest kept), so a fix confirmed is the fix printed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.results import Tolerance, toml_key, toml_literal
from parity.spec import Spec, parse_spec, vocabulary

__all__ = ["spec_document", "render_spec", "render_document", "merge_fix", "load_fixed", "apply_toml_fix"]

_REMOVAL = re.compile(r"remove \[([A-Za-z_]\w*)\]\.([A-Za-z_]\w*)")


def spec_document(spec: Spec) -> dict[str, Any]:
    """The TOML data ``spec`` is loaded from: its file's while the file still loads to ``spec``, else ``spec``
    written out (`render_spec`), e.g. a spec changed in memory or given ``--candidate`` on the command line."""
    try:
        data = tomllib.loads(spec.path.read_text(encoding="utf-8"))
        if parse_spec(data, path=spec.path) == spec:
            return data
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, SpecError):
        pass
    return render_spec(spec)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _table(part: Any, *, always: Sequence[str] = (), skip: Sequence[str] = (),
           rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A spec section's fields as TOML keys: those that differ from the dataclass default, and ``always``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if f.name in skip or value is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.name in always or value != default:
            out[(rename or {}).get(f.name, f.name)] = _plain(value)
    return out


def render_spec(spec: Spec) -> dict[str, Any]:
    """``spec`` as TOML data that `parse_spec` reads back to it (paths absolute).

    Fields whose parse default depends on another field (a library's extraction mode, processor
    and checkpoint format) are always written; the others only when they differ from the default.
    """
    doc: dict[str, Any] = {"name": spec.name}
    if spec.fixtures is not None:
        doc["fixtures"] = str(spec.fixtures)
    doc["backbone"] = _table(spec.backbone, always=("model", "library", "checkpoint_format", "extract"))
    processors = vocabulary(spec.preprocess.library).processors
    doc["preprocess"] = _table(spec.preprocess, always=("library",) + (("processor",) if processors else ()),
                               skip=() if processors else ("processor",))
    doc["head"] = _table(spec.head, always=("class_path", "weights"), rename={"class_path": "class"})
    doc["runtime"] = _table(spec.runtime)
    decisions = _table(spec.decisions)
    if decisions:
        doc["decisions"] = decisions
    if spec.tolerances:
        doc["tolerance"] = {stage: {k: v for k, v in (("atol", t.atol), ("rtol", t.rtol), ("min_cosine", t.min_cosine))
                                    if v is not None} for stage, t in spec.tolerances.items()
                            if isinstance(t, Tolerance)}
    if spec.matrix:
        doc["matrix"] = {axis: _plain(values) for axis, values in spec.matrix.items()}
    def candidate_table(candidate) -> dict[str, Any]:
        return {candidate.kind: candidate.target,
                **_table(candidate, always=("python_path",), skip=("kind", "target", "name"))}

    if spec.candidate.kind != "spec":
        doc["candidate"] = candidate_table(spec.candidate)
    if spec.candidates:
        doc["candidates"] = {name: candidate_table(c) for name, c in spec.candidates.items()}
    reference = _table(spec.reference)
    if reference:
        doc["reference"] = reference
    return doc


def render_document(document: Mapping[str, Any]) -> str:
    """TOML text of ``document`` (top-level keys first, then one table per section, nested tables inline)."""
    top = [f"{toml_key(k)} = {toml_literal(v)}" for k, v in document.items() if not isinstance(v, Mapping)]
    tables = [f"[{toml_key(k)}]\n" + "".join(f"{toml_key(key)} = {toml_literal(value)}\n" for key, value in v.items())
              for k, v in document.items() if isinstance(v, Mapping)]
    return "\n".join(["\n".join(top) + "\n"] + tables) if top else "\n".join(tables)


def merge_fix(document: Mapping[str, Any], toml_text: str, removals: Sequence[str] = ()) -> dict[str, Any]:
    """``document`` with the fix merged in table by table (its keys replaced, the rest kept), then ``removals``
    (``remove [section].field``) taken out.

    Raises:
        SpecError: the fix is not valid TOML, or a removal is not of that form.
    """
    try:
        fix = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"the fix is not valid TOML: {e}\n{toml_text}") from e
    merged = copy.deepcopy(dict(document))
    for key, value in fix.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    for removal in removals:
        match = _REMOVAL.fullmatch(removal.strip())
        if match is None:
            raise SpecError(f"not a removal: {removal!r} (expected 'remove [section].field')")
        section = merged.get(match[1])
        if isinstance(section, dict):
            section.pop(match[2], None)
    return merged


def load_fixed(spec: Spec, toml_text: str, removals: Sequence[str] = (), *,
               document: Mapping[str, Any] | None = None) -> Spec:
    """The spec a user gets by pasting ``toml_text`` into ``spec``'s TOML and removing ``removals``: the
    merged document is written out as text and that text is loaded (paths relative to ``spec``'s folder).

    Args:
        document: ``spec_document(spec)``, when the caller already has it.

    Raises:
        SpecError: the fix is not valid TOML, or the spec with it is not valid (a field its library refuses).
    """
    base = spec_document(spec) if document is None else document
    text = render_document(merge_fix(base, toml_text, removals))
    return parse_spec(tomllib.loads(text), path=spec.path)


def apply_toml_fix(spec_path: str | Path, toml_text: str, *, remove: Sequence[str] = (),
                   directory: str | Path | None = None) -> Path:
    """Write ``spec_path``'s spec with a printed fix applied to a new file and return its path.

    The file goes into ``directory`` (default: the spec's own folder, so that its relative paths resolve
    as the original's); its ``name`` stays the original's. The caller removes it.

    Raises:
        SpecError: the spec or the fix is not valid TOML.
    """
    spec_path = Path(spec_path)
    try:
        document = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"cannot read the spec {spec_path}: {e}") from e
    merged = merge_fix(document, toml_text, remove)
    merged.setdefault("name", spec_path.stem)
    handle, name = tempfile.mkstemp(prefix=f".{spec_path.stem}.fixed-", suffix=".toml",
                                    dir=directory if directory is not None else spec_path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(render_document(merged))
    return Path(name)
