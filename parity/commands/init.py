"""``parity init``: a spec scaffolded from what a repository already holds, every value with its origin.

    result = init_spec(Path("."))          # writes ./parity.toml
    print(result.text, result.todos, shlex.join(result.freeze))

What is inferred, and from what:

- ``[backbone]``: the checkpoint a registered library recognises (`parity.libraries.guess_backbones`):
  from the user's own ``timm.create_model("...", ...)`` calls with literal arguments, else from the
  tensors alone; the checkpoint must load into the proposed module with ``strict=True``.
- ``[head]``: another checkpoint, and the repository's ``nn.Module`` class whose attributes name its
  tensors; the kwargs from the checkpoint's own hyperparameters, the user's literal calls of the
  class, its defaults, or fitted to the tensor shapes, whichever loads the weights strictly.
- ``extract``: the extraction point whose width is the stored embeddings'.
- the ``parity freeze`` arguments: metadata whose rows name existing images, the ``.npy`` with one row
  per entry, ``--map`` for the fields (integer fields matched to the head's embedding tables).
- ``[candidates.NAME]``: a top-level ``predict`` function, an ``EndpointHandler``, a FastAPI app (its URL
  is a TODO: parity cannot know where it runs) and a Gradio app object.

Sources are read with `ast`, never run. Verifying the head (on by default, ``verify=False`` to skip)
imports the module that defines the proposed class and builds it, as ``parity check`` will: that is
the only user code run, and it is the code the spec names. A value that cannot be inferred is written
as a string starting with ``TODO``, which `parity.spec.load_spec` refuses by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.commands.artifacts import (Checkpoint, Metadata, RowArray, find_arrays, find_checkpoints, find_metadata,
                                       is_fixture_dir, strip_wrapper)
from parity.commands.heads import HeadMatch, find_head
from parity.commands.scan import Entry, call_sites, entry_points, module_classes, read_sources, walk_files
from parity.errors import SpecError
from parity.store.fixtures import MANIFEST
from parity.libraries import BackboneGuess, CallSite, get, guess_backbones, names
from parity.results import toml_key, toml_literal
from parity.spec import CANDIDATE_KINDS, parse_spec, vocabulary

__all__ = ["Field", "InitResult", "init_spec", "DEFAULT_SPEC", "TODO"]

DEFAULT_SPEC = "parity.toml"
TODO = "TODO"


@dataclass(frozen=True)
class Field:
    """One spec line: ``key = value  # origin``, or ``key = "TODO: todo"`` when ``todo`` is set."""

    key: str
    value: Any = None
    origin: str = ""
    todo: str = ""

    def line(self) -> str:
        key = ".".join(toml_key(part) for part in self.key.split("."))
        if self.todo:
            return f"{key} = {toml_literal(f'{TODO}: {self.todo}')}"
        text = f"{key} = {toml_literal(self.value)}"
        return f"{text}  # {self.origin}" if self.origin else text


@dataclass(frozen=True)
class Section:
    name: str
    fields: tuple[Field, ...]
    comments: tuple[str, ...] = ()
    enabled: bool = True  # False: written commented out (a kind this parity does not know)


@dataclass(frozen=True)
class InitResult:
    """What ``parity init`` wrote and what comes next.

    ``todos``: ``[section].field: what to set`` for each value left to the user; ``found``: what was
    recognised, in words; ``notes``: what was skipped or could not be decided; ``freeze`` and
    ``check``: the next commands (argv, paths relative to the current directory); ``missing``:
    what ``freeze`` still needs that the repository does not hold.
    """

    spec: Path
    text: str
    todos: tuple[str, ...]
    found: tuple[str, ...]
    notes: tuple[str, ...]
    freeze: tuple[str, ...]
    check: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.todos


def _shown(path: Path) -> str:
    """``path`` as the user types it from the current directory."""
    try:
        return os.path.relpath(path, Path.cwd())
    except ValueError:  # another drive
        return str(path)


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


# -- the backbone ------------------------------------------------------------------------------------

def _loading_fields(fix, source: str) -> list[Field]:
    """``state_dict_key`` / ``key_map`` / ``drop_keys`` from a verified key fix."""
    if fix is None:
        return []
    why = f"{source}: " + "; ".join(fix.causes) if fix.causes else source
    fields = [Field("state_dict_key", fix.state_dict_key, why)] if fix.state_dict_key else []
    if fix.key_map:
        fields.append(Field("key_map", dict(fix.key_map), why))
    if fix.drop_keys:
        fields.append(Field("drop_keys", list(fix.drop_keys), why))
    return fields


@dataclass(frozen=True)
class _Backbone:
    checkpoint: Checkpoint
    guess: BackboneGuess
    fix: Any


def _find_backbone(checkpoints: Sequence[Checkpoint], calls: Sequence[CallSite]) -> _Backbone | None:
    """The first checkpoint a library recognises, with the first proposal it loads into strictly."""
    for checkpoint in sorted(checkpoints, key=lambda c: -c.parameters):
        shapes, _ = strip_wrapper(checkpoint.shapes)
        for guess in guess_backbones(shapes, calls, source=checkpoint.rel):
            if guess.module is None:
                continue
            ok, fix = checkpoint.loads(guess.module, section="backbone", target=f"{guess.library} {guess.model}")
            if ok:
                return _Backbone(checkpoint, guess, fix)
    return None


def _extract(backbone: _Backbone | None, embeddings: RowArray | None) -> Field | None:
    """The extraction point whose width is the stored embeddings' (the library's default first)."""
    if backbone is None:
        return None
    library = backbone.guess.library
    modes = vocabulary(library).extract_modes
    if embeddings is None:
        return Field("extract", modes[0], f"{library}'s default extraction point (no stored embeddings found to "
                                          "check it against)")
    adapter = get(library)
    for mode in modes:
        try:
            width = adapter.embedding_dim(backbone.guess.module, mode)
        except Exception:  # noqa: BLE001 - a mode this module cannot tell the width of
            width = None
        if width == embeddings.width:
            return Field("extract", mode, f"{embeddings.rel} is {width} wide: the width of {library}'s {mode!r}")
    return Field("extract", None, todo=f"the extraction point that made {embeddings.rel} ({embeddings.width} wide); "
                                       f"none of {', '.join(modes)} has that width with this [backbone]")


def _backbone_section(backbone: _Backbone | None, checkpoints: Sequence[Checkpoint], spec_dir: Path,
                      extract: Field | None) -> Section:
    if backbone is None:
        listed = ", ".join(c.rel for c in checkpoints)
        seen = f"checkpoints found, none recognised: {listed}" if listed else "no checkpoint file found"
        return Section("backbone", (
            Field("library", None, todo=f"the backbone's library, one of {', '.join(names())}"),
            Field("model", None, todo="the backbone's model name in that library"),
            Field("checkpoint", None, todo=f"the backbone's weights file ({seen})"),
        ), ("No checkpoint was recognised as a backbone: no library's model loads one with strict=True.",))
    guess, checkpoint = backbone.guess, backbone.checkpoint
    origin = guess.origins.get("model", "")
    fields = [Field("library", guess.library, origin or f"{checkpoint.rel}: recognised by the {guess.library} adapter")]
    fields.append(Field("model", guess.model, origin, todo=guess.todos.get("model", "")))
    for key, value in guess.kwargs.items():
        fields.append(Field(f"kwargs.{key}", value, guess.origins.get(f"kwargs.{key}", ""),
                            todo=guess.todos.get(f"kwargs.{key}", "")))
    fields.append(Field("checkpoint", _relative(checkpoint.path, spec_dir),
                        f"loads into this model with strict=True ({len(checkpoint.shapes)} tensors)"))
    fields += _loading_fields(backbone.fix, checkpoint.rel)
    if extract is not None:
        fields.append(extract)
    return Section("backbone", tuple(fields))


# -- the head ----------------------------------------------------------------------------------------

def _head_section(head: HeadMatch | None, spec_dir: Path) -> Section:
    if head is None:
        return Section("head", (
            Field("class", None, todo="your head's class, as 'package.module:ClassName'"),
            Field("weights", None, todo="your head's weights file (no checkpoint with Linear layers was found)"),
        ))
    cls = head.cls
    weights = Field("weights", _relative(head.checkpoint.path, spec_dir),
                    f"{len(head.checkpoint.shapes)} tensors: " + ", ".join(l.call for l in head.checkpoint.layers
                                                                           if l.kind != "Tensors")[:120])
    if cls is None:
        return Section("head", (Field("class", None, todo=f"the class that loads {head.checkpoint.rel}: {head.why}"),
                                weights))
    if head.verified:
        origin = f"{cls.rel}:{cls.line}: loads {head.checkpoint.rel} with strict=True"
        fields = [Field("class", cls.class_path, origin), weights]
        fields += [Field(f"kwargs.{k}", v, head.origins.get(k, "")) for k, v in head.kwargs.items()]
        fields += _loading_fields(head.fix, head.checkpoint.rel)
        return Section("head", tuple(fields), ("kwargs that shape no tensor (dropout, an activation) are the class's",
                                               "defaults: set them if training used others."))
    if head.kwargs:  # --no-verify: proposed, not built
        fields = [Field("class", cls.class_path, f"{cls.rel}:{cls.line}: its attributes name the checkpoint's "
                                                 f"modules ({head.why})"), weights]
        fields += [Field(f"kwargs.{k}", v, head.origins.get(k, "")) for k, v in head.kwargs.items()]
        return Section("head", tuple(fields))
    return Section("head", (
        Field("class", cls.class_path, f"{cls.rel}:{cls.line}: its attributes name the checkpoint's modules"),
        weights,
        Field("kwargs", None, todo=f"{cls.name}'s constructor arguments for {head.checkpoint.rel} ({head.why}), "
                                   "as an inline table, e.g. { width = 64 }"),
    ))


# -- the artifacts freeze takes ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Artifacts:
    metadata: Metadata | None
    embeddings: RowArray | None
    outputs: RowArray | None
    maps: tuple[str, ...]
    origins: tuple[str, ...]


def _input_biases(metadata: Metadata, head: HeadMatch | None) -> tuple[list[str], str]:
    """Integer fields matched to the head's embedding tables by cardinality, in the tables' order."""
    if head is None:
        return [], ""
    tables = head.checkpoint.layers_of("Embedding")
    if not tables:
        return [], ""
    chosen: list[str] = []
    for table in tables:
        rows = table.args[0]
        fitting = [f for f, (low, high) in metadata.integers.items() if f not in chosen and low >= 0 and high < rows]
        exact = [f for f in fitting if metadata.integers[f][1] == rows - 1]
        if not fitting:
            break
        chosen.append((exact or fitting)[0])
    tables_shown = ", ".join(f"{t.path} ({t.args[0]} rows)" for t in tables)
    return chosen, (f"input_biases={','.join(chosen)}: integer fields whose values index the head's embedding tables "
                    f"{tables_shown}, in the tables' order (set [head].input_biases_order if the head takes them "
                    "in another)")


def _find_artifacts(metadata: Sequence[Metadata], arrays: Sequence[RowArray], head: HeadMatch | None,
                    backbone: _Backbone | None) -> _Artifacts:
    widths = set()
    if backbone is not None:
        adapter = get(backbone.guess.library)
        for mode in vocabulary(backbone.guess.library).extract_modes:
            with contextlib.suppress(Exception):
                widths.add(adapter.embedding_dim(backbone.guess.module, mode))
    outputs_width = head.checkpoint.layers_of("Linear")[-1].args[1] if head is not None and head.checkpoint.layers_of(
        "Linear") else None
    for meta in metadata:
        rows = [a for a in arrays if a.shape[0] == meta.rows and a.width is not None]
        embeddings = sorted((a for a in rows if not widths or a.width in widths),
                            key=lambda a: (not re.search(r"emb|clip|feat", a.path.name, re.I), a.rel))
        if not embeddings:
            continue
        chosen = embeddings[0]
        origins = [f"--embeddings {chosen.rel}: {chosen.shape} float rows, one per row of {meta.rel}"]
        outputs = next((a for a in rows if a is not chosen and a.width == outputs_width
                        and re.search(r"output|pred|logit|score", a.path.name, re.I)), None)
        maps = [f"image={meta.image_field}"]
        origins.append(f"image={meta.image_field}: the field naming existing images under {_shown(meta.images)}")
        biases, why = _input_biases(meta, head)
        if biases:
            maps.append(f"input_biases={','.join(biases)}")
            origins.append(why)
        if outputs_width and len(meta.numbers) == outputs_width:
            maps.append(f"labels={','.join(meta.numbers)}")
            origins.append(f"labels={','.join(meta.numbers)}: the numeric fields, as many as the head's outputs")
        if outputs is not None:
            origins.append(f"--outputs {outputs.rel}: {outputs.shape}, as wide as the head's outputs")
        return _Artifacts(meta, chosen, outputs, tuple(maps), tuple(origins))
    return _Artifacts(metadata[0] if metadata else None, None, None, (), ())


# -- deploy candidates -------------------------------------------------------------------------------

def _inputs(params: Sequence[str], biases: Sequence[str]) -> tuple[list[str] | None, str]:
    """`parity.spec.CANDIDATE_INPUTS` for a predict function's required parameters, or a reason they cannot be."""
    inputs = []
    for i, name in enumerate(params):
        lowered = name.lower()
        if "bytes" in lowered:
            inputs.append("image_bytes")
        elif "path" in lowered or lowered in ("file", "filename", "fname"):
            inputs.append("image_path")
        elif i == 0 or "image" in lowered or "img" in lowered:
            inputs.append("image")
        elif "bias" in lowered or name in biases or i == 1:
            inputs.append("input_biases")
        else:
            return None, name
    if len(set(inputs)) != len(inputs):
        return None, params[-1]
    return inputs, ""


def _candidate_sections(entries: Sequence[Entry], root: Path, spec_dir: Path, biases: Sequence[str]) -> list[Section]:
    sections: list[Section] = []
    taken: set[str] = set()

    def name_for(rel: str, kind: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(rel).stem) or kind
        name = stem if stem not in CANDIDATE_KINDS else f"{stem}_{kind}"
        while name in taken:
            name = f"{name}_{kind}" if not name.endswith(kind) else f"{name}2"
        taken.add(name)
        return name

    target_root = _relative(root, spec_dir)
    for entry in entries:
        file = _relative(root / entry.rel, spec_dir)
        where = f"{entry.rel}:{entry.line}"
        if entry.kind == "python":
            params = entry.details["params"]
            fields = [Field("python", f"{file}:{entry.attr}", f"{where}: def {entry.attr}({', '.join(params)})")]
            if target_root != ".":
                fields.append(Field("python_path", target_root, "the repository root, where its imports resolve"))
            inputs, stuck = _inputs(params, biases)
            if inputs is None:
                fields.append(Field("inputs", None, todo=f"what each argument of {entry.attr}({', '.join(params)}) is, "
                                                         f"in order; {stuck!r} is none of image, input_biases, "
                                                         "image_bytes, image_path"))
            elif inputs:
                fields.append(Field("inputs", inputs, f"{where}: the parameters {', '.join(params)}"))
            keys = {tuple(k) for k in entry.details["returns"]}
            if len(keys) == 1 and len(next(iter(keys))) == 1:
                fields.append(Field("output_key", next(iter(keys))[0], f"{where}: returns a dict with this one key"))
            elif keys:
                listed = ", ".join(sorted({k for ks in keys for k in ks}))
                fields.append(Field("output_key", None, todo=f"the key of the returned dict that holds the head's "
                                                             f"outputs ({listed})"))
            post = {kind for kind, _ in entry.details["postprocess"]}
            if len(post) == 1:
                kind = post.pop()
                fields.append(Field("postprocess", kind, f"{entry.details['postprocess'][0][1]}: {kind} after the "
                                                         "head (check that it applies to the head's outputs)"))
            sections.append(Section(f"candidates.{name_for(entry.rel, 'python')}", tuple(fields)))
        elif entry.kind == "endpoint_handler":
            fields = [Field("endpoint_handler", file, f"{where}: class EndpointHandler")]
            sections.append(Section(f"candidates.{name_for(entry.rel, 'handler')}", tuple(fields)))
        elif entry.kind == "fastapi":
            routes = entry.details["routes"]
            route = routes[0] if routes else {"path": "/predict", "field": None}
            module = entry.rel.removesuffix(".py").replace("/", ".")
            fields = [Field("url", None, todo=f"the URL of the running service: start it (e.g. uvicorn {module}:"
                                              f"{entry.attr} --port 8000) and set e.g. "
                                              f"http://127.0.0.1:8000{route['path']}")]
            if route.get("field") and route["field"] != "image":
                fields.append(Field("field", route["field"], f"{entry.rel}:{route['line']}: the UploadFile "
                                                             "parameter of the route"))
            sections.append(Section(f"candidates.{name_for(entry.rel, 'service')}", tuple(fields),
                                    (f"{where}: FastAPI app {entry.attr!r}" + (f", route POST {route['path']}"
                                                                               if routes else ""),)))
        elif entry.kind == "gradio":
            known = "gradio_app" in CANDIDATE_KINDS
            sections.append(Section(
                f"candidates.{name_for(entry.rel, 'gradio')}",
                (Field("gradio_app", f"{file}:{entry.attr}", f"{where}: {entry.details['class']} object"),),
                () if known else ("this parity has no gradio_app candidate kind yet: uncomment once it does",),
                enabled=known))
    return sections


# -- the spec text -----------------------------------------------------------------------------------

def _render(sections: Sequence[Section], header: Sequence[str], top: Sequence[Field]) -> str:
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [f.line() for f in top]
    for section in sections:
        lines.append("")
        lines += [f"# {c}" for c in section.comments]
        prefix = "" if section.enabled else "# "
        lines.append(f"{prefix}[{'.'.join(toml_key(p) for p in section.name.split('.'))}]")
        lines += [prefix + f.line() for f in section.fields]
    return "\n".join(lines) + "\n"


def _todos(sections: Sequence[Section], top: Sequence[Field]) -> list[str]:
    todos = [f"{f.key}: {f.todo}" for f in top if f.todo]
    for section in sections:
        if section.enabled:
            todos += [f"[{section.name}].{f.key}: {f.todo}" for f in section.fields if f.todo]
    return todos


def _check_out(out: Path, *, force: bool) -> None:
    if out.is_dir():
        raise SpecError(f"--out {out} is a directory; name the spec file to write, e.g. {out / DEFAULT_SPEC}")
    if out.suffix != ".toml":
        raise SpecError(f"--out {out}: a spec is a .toml file; name one, e.g. {out.with_suffix('.toml')}")
    if out.exists() and not force:
        raise SpecError(f"{out} already exists; parity init does not overwrite a spec. Pass --force to replace it, "
                        "or --out another path")
    if out.is_symlink():
        raise SpecError(f"--out {out} is a symbolic link; parity does not write through links")


def init_spec(root: str | Path = ".", *, out: str | Path | None = None, force: bool = False,
              verify: bool = True) -> InitResult:
    """Scaffold a spec from what ``root`` holds and write it to ``out`` (default ``root/parity.toml``).

    Args:
        verify: build the proposed head class to check that its checkpoint loads strictly (imports the
            module that defines it); False proposes it from the sources alone.

    Returns:
        What was written, what is left to set, and the next commands.

    Raises:
        SpecError: ``root`` is not a directory, or ``out`` exists (without ``force``) or cannot be written.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SpecError(f"{root} is not a directory; pass the repository to scaffold a spec for (parity init DIR)")
    out = Path(out).resolve() if out is not None else root / DEFAULT_SPEC
    _check_out(out, force=force)
    spec_dir = out.parent
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name) or "spec"
    fixture = root / "fixtures" / name

    every = list(walk_files(root))
    # What parity wrote (a fixture, this spec) is not the user's: fixtures hold copies of the artifacts.
    made = {fixture, *(p.parent for p in every if p.name == MANIFEST and is_fixture_dir(p.parent))}
    files = [p for p in every if p != out and not any(folder == p or folder in p.parents for folder in made)]
    sources, notes = read_sources(root, files)
    calls = call_sites(sources)
    checkpoints, checkpoint_notes = find_checkpoints(root, files)
    notes += checkpoint_notes
    backbone = _find_backbone(checkpoints, calls)
    rest = [c for c in checkpoints if backbone is None or c is not backbone.checkpoint]
    head = find_head(rest, module_classes(sources), calls, root, verify=verify)
    artifacts = _find_artifacts(find_metadata(root, files), find_arrays(root, files), head, backbone)
    biases = [m.partition("=")[2] for m in artifacts.maps if m.startswith("input_biases=")]
    biases = biases[0].split(",") if biases else []

    sections = [_backbone_section(backbone, checkpoints, spec_dir, _extract(backbone, artifacts.embeddings)),
                Section("preprocess", (), ("Unset fields resolve as the backbone's library does (timm: the model's",
                                           "pretrained_cfg). `parity freeze` checks them on the stored embeddings and",
                                           "names the change when they differ.")),
                _head_section(head, spec_dir)]
    sections += _candidate_sections(entry_points(sources), root, spec_dir, biases)
    top = [Field("name", name, "the repository's folder name"),
           Field("fixtures", _relative(fixture, spec_dir), "where the `parity freeze` command below writes the fixture")]

    spec_arg = _shown(out)
    freeze = ["parity", "freeze", "--spec", spec_arg]
    missing = []
    if artifacts.embeddings is not None and artifacts.metadata is not None:
        freeze += ["--embeddings", _shown(artifacts.embeddings.path), "--metadata", _shown(artifacts.metadata.path),
                   "--images", _shown(artifacts.metadata.images)]
    else:
        if artifacts.metadata is None:
            missing.append("metadata: a JSON or CSV file with one row per stored embedding, naming each image "
                           "(none whose rows name existing image files was found)")
        missing.append("embeddings: the stored embeddings, (N, D) or (N, 1, D) .npy with one row per metadata "
                       "entry (none found" + (f" with {artifacts.metadata.rows} rows" if artifacts.metadata else "")
                       + ")")
        freeze += ["--embeddings", "EMBEDDINGS.npy", "--metadata",
                   _shown(artifacts.metadata.path) if artifacts.metadata else "METADATA.json",
                   "--images", _shown(artifacts.metadata.images) if artifacts.metadata else "IMAGES_DIR"]
    freeze += ["--out", _shown(fixture)]
    for item in artifacts.maps:
        freeze += ["--map", item]
    if artifacts.outputs is not None:
        freeze += ["--outputs", _shown(artifacts.outputs.path)]
    check = ("parity", "check", "--spec", spec_arg)

    header = ["Made by `parity init`: each value says where it came from. A value starting with \"TODO\" is yours",
              "to set; `parity check` refuses the spec, naming the field, until none is left.", "",
              "Next: freeze the reference from the training artifacts, then gate:",
              f"  {shlex.join(freeze)}",
              *(f"    {line}" for line in artifacts.origins),
              f"  {shlex.join(check)}"]
    text = _render(sections, header, top)
    todos = _todos(sections, top)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a defect: what init writes must be TOML
        raise RuntimeError(f"parity init wrote invalid TOML: {e}\n{text}") from e
    if not todos:
        parse_spec(document, path=out)  # what is complete must load as it is
    found = _found(backbone, head, artifacts, sections)
    if spec_dir != root and head is not None and head.cls is not None:
        package = head.cls.module.split(".")[0]
        notes.append(f"[head].class {head.cls.class_path} is imported from the spec's folder ({_shown(spec_dir)}) or "
                     f"the installed packages, and {package} lives in {_shown(root)}: install the repository, run "
                     f"parity with PYTHONPATH={_shown(root)}, or write the spec in {_shown(root)} (the default)")
    _write(out, text)
    return InitResult(out, text, tuple(todos), tuple(found), tuple(notes), tuple(freeze), check, tuple(missing))


def _found(backbone: _Backbone | None, head: HeadMatch | None, artifacts: _Artifacts,
           sections: Sequence[Section]) -> list[str]:
    found = []
    if backbone is not None:
        model = backbone.guess.model or "(model: TODO)"
        found.append(f"backbone: {backbone.checkpoint.rel} -> {backbone.guess.library} {model}")
    if head is not None:
        what = head.cls.class_path if head.cls else "no class (TODO)"
        state = "loads with strict=True" if head.verified else head.why
        found.append(f"head: {head.checkpoint.rel} -> {what} ({state})")
    if artifacts.metadata is not None:
        found.append(f"metadata: {artifacts.metadata.rel} ({artifacts.metadata.rows} rows)"
                     + (f", embeddings {artifacts.embeddings.rel}" if artifacts.embeddings else ""))
    for section in sections:
        if section.name.startswith("candidates."):
            first = section.fields[0]
            value = first.value if not first.todo else "TODO"
            found.append(f"candidate {section.name.split('.', 1)[1]}: {first.key} = {value}"
                         + ("" if section.enabled else " (commented out)"))
    return found


def _write(out: Path, text: str) -> None:
    """Write the spec whole or not at all."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".toml", dir=out.parent)
    except OSError as e:
        raise SpecError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
