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
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.commands.artifacts import (Checkpoint, Metadata, RowArray, find_arrays, find_checkpoints, find_metadata,
                                       is_fixture_dir, strip_wrapper)
from parity.commands.scan import (NO_DEFAULT, NOT_LITERAL, Entry, ModuleClass, call_sites, entry_points,
                                  module_classes, read_sources, walk_files)
from parity.errors import ParityError, SpecError
from parity.fixtures import MANIFEST
from parity.libraries import BackboneGuess, CallSite, get, guess_backbones
from parity.results import toml_key, toml_literal
from parity.spec import CANDIDATE_KINDS, parse_spec, vocabulary

__all__ = ["Field", "InitResult", "init_spec", "DEFAULT_SPEC", "TODO"]

DEFAULT_SPEC = "parity.toml"
TODO = "TODO"
# Where a nested checkpoint keeps its hyperparameters (Lightning, common training loops).
_HPARAM_ENTRIES = ("hyper_parameters", "hparams", "config", "args", "model_config", "model_args", "kwargs")
# A class is proposed for a head when its attributes name at least this share of the checkpoint's top-level modules.
_MIN_OVERLAP = 0.5
_MAX_CLASSES_TRIED = 4
_MAX_FIT_BUILDS = 400


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


def _loads(checkpoint: Checkpoint, module, *, section: str, target: str) -> tuple[bool, Any]:
    """Whether ``checkpoint`` loads into ``module`` with ``strict=True`` as is (fix None) or with the
    explicit loading fields of a verified fix."""
    from parity.forensics import diagnose_load

    try:
        state, diff = diagnose_load(checkpoint.data, module, section=section, target=target, source=checkpoint.rel)
    except ParityError:
        return False, None
    if state is not None:
        return True, None
    if diff.fix is not None and diff.fix.verified:
        return True, diff.fix
    return False, None


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
            ok, fix = _loads(checkpoint, guess.module, section="backbone", target=f"{guess.library} {guess.model}")
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
        listed = ", ".join(c.rel for c in checkpoints) or "none"
        return Section("backbone", (
            Field("library", None, todo=f"the backbone's library, one of {', '.join(_library_names())}"),
            Field("model", None, todo="the backbone's model name in that library"),
            Field("checkpoint", None, todo=f"the backbone's weights file (checkpoints found, none recognised: "
                                           f"{listed})"),
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


def _library_names() -> tuple[str, ...]:
    from parity.libraries import names

    return names()


# -- the head ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _importable(root: Path) -> Iterator[None]:
    """The repository's own packages importable from ``root`` for a while, then forgotten: another copy of
    a package of the same name is set aside meanwhile, and put back after."""
    tops = {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
            if (p.suffix == ".py" or p.is_dir()) and (p.stem if p.suffix == ".py" else p.name).isidentifier()}
    saved_path = list(sys.path)
    aside = {name: module for name, module in sys.modules.items() if name.split(".")[0] in tops}
    for name in aside:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if n.split(".")[0] in tops]:
            del sys.modules[name]
        sys.modules.update(aside)


def _hparams(checkpoint: Checkpoint, cls: ModuleClass) -> list[tuple[dict[str, Any], str]]:
    """The class's kwargs a nested checkpoint keeps beside its weights (``hyper_parameters``, ``config``...)."""
    names = {p.name for p in cls.params}
    found = []
    for entry in _HPARAM_ENTRIES:
        value = checkpoint.data.get(entry)
        if isinstance(value, Mapping):
            kwargs = {k: v for k, v in value.items() if k in names and _plain(v)}
            if kwargs:
                found.append((kwargs, f"{checkpoint.rel}[{entry!r}]"))
    return found


def _plain(value: Any) -> bool:
    """Whether ``value`` can be written in TOML (what a spec's kwargs hold)."""
    if isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _called(cls: ModuleClass, calls: Sequence[CallSite]) -> list[tuple[dict[str, Any], str]]:
    """The literal arguments of the user's calls of ``cls``, as keyword arguments."""
    found = []
    for call in calls:
        if call.function != cls.qualified:
            continue
        if len(call.args) > len(cls.params) or any(a is None for a in call.args):
            continue
        kwargs = {p.name: v for p, v in zip(cls.params, call.args)}
        kwargs.update({k: v for k, v in call.kwargs.items() if _plain(v)})
        found.append((kwargs, call.where))
    return found


def _shape_items(module) -> set[tuple[str, tuple[int, ...]]]:
    return {(k, tuple(v.shape)) for k, v in module.state_dict().items()}


def _fit(cls: ModuleClass, checkpoint: Checkpoint, start: Mapping[str, Any]) -> dict[str, Any] | None:
    """Integer and integer-list kwargs that make ``cls`` hold the checkpoint's tensor shapes, found by trying
    the checkpoint's own widths one parameter at a time (a bounded search; None when nothing fits)."""
    from parity.pipeline import construct_module

    shapes, _ = strip_wrapper(checkpoint.shapes)
    target = set(shapes.items())
    dims = sorted({d for shape in shapes.values() for d in shape})
    linears = checkpoint.layers_of("Linear")
    lists = [l for l in ([layer.args[1] for layer in linears[:-1]], [t.args[0] for t in checkpoint.layers_of("Embedding")]) if l]
    choices: dict[str, list[Any]] = {}
    current: dict[str, Any] = {}
    for p in cls.params:
        default = p.default
        if isinstance(default, bool) or default is NOT_LITERAL:
            continue
        if default is NO_DEFAULT or isinstance(default, int):
            choices[p.name] = dims
            current[p.name] = start.get(p.name, default if default is not NO_DEFAULT else (dims[-1] if dims else 1))
        elif isinstance(default, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in default):
            choices[p.name] = lists
            current[p.name] = start.get(p.name, list(default))
    current.update({k: v for k, v in start.items() if k not in current})
    builds = 0

    def score(kwargs: Mapping[str, Any]) -> int | None:
        nonlocal builds
        builds += 1
        try:
            return len(_shape_items(construct_module(cls.class_path, dict(kwargs), where="")) ^ target)
        except Exception:  # noqa: BLE001 - the class refuses these values: not a fit
            return None

    best = score(current)
    for _ in range(4):
        if best == 0 or builds > _MAX_FIT_BUILDS:
            break
        improved = False
        for name, values in choices.items():
            for value in values:
                if value == current[name] or builds > _MAX_FIT_BUILDS:
                    continue
                trial = {**current, name: value}
                s = score(trial)
                if s is not None and (best is None or s < best):
                    current, best, improved = trial, s, True
        if not improved:
            break
    if best != 0:
        return None
    defaults = {p.name: p.default for p in cls.params}
    return {k: v for k, v in current.items() if defaults.get(k, NO_DEFAULT) != v or k in start}


@dataclass(frozen=True)
class _Head:
    checkpoint: Checkpoint
    cls: ModuleClass | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)
    fix: Any = None
    verified: bool = False
    why: str = ""


def _ranked_classes(checkpoint: Checkpoint, classes: Sequence[ModuleClass]) -> list[ModuleClass]:
    """Classes whose attributes name most of the checkpoint's top-level modules, best first."""
    shapes, _ = strip_wrapper(checkpoint.shapes)
    tops = {k.split(".")[0] for k in shapes}
    scored = [(len(tops & c.attributes) / len(tops), c) for c in classes if tops]
    return [c for s, c in sorted(scored, key=lambda sc: -sc[0]) if s >= _MIN_OVERLAP]


def _verify_head(checkpoint: Checkpoint, cls: ModuleClass, calls: Sequence[CallSite]) -> tuple[_Head | None, str]:
    """The first kwargs (stored hyperparameters, the user's calls, the defaults, a fit) that build ``cls``
    so that the checkpoint loads strictly; else None and why."""
    from parity.pipeline import construct_module

    tried: list[dict[str, Any]] = []
    refused = ""
    built = False
    sources = _hparams(checkpoint, cls) + _called(cls, calls) + [({}, "")]
    for kwargs, where in sources:
        if kwargs in tried:
            continue
        tried.append(kwargs)
        try:
            module = construct_module(cls.class_path, kwargs, where="")
        except ParityError as e:
            refused = refused or str(e).splitlines()[0]
            continue
        built = True
        ok, fix = _loads(checkpoint, module, section="head", target=cls.class_path)
        if ok:
            origin = where or f"{cls.rel}:{cls.line}: the defaults of {cls.name}"
            return _Head(checkpoint, cls, kwargs, {k: origin for k in kwargs}, fix, True), ""
    if not built and "import" in refused:  # the module itself does not import: no kwargs can help
        return None, refused
    for start, where in sources:
        fitted = _fit(cls, checkpoint, start)
        if fitted is None:
            continue
        module = construct_module(cls.class_path, fitted, where="")
        ok, fix = _loads(checkpoint, module, section="head", target=cls.class_path)
        if ok:
            origins = {k: where if k in start and start[k] == v and where else
                       f"fitted to {checkpoint.rel}'s tensor shapes" for k, v in fitted.items()}
            return _Head(checkpoint, cls, fitted, origins, fix, True), ""
    return None, (f"no kwargs found that make {cls.name} load {checkpoint.rel} with strict=True"
                  + (f" ({refused})" if refused else ""))


def _find_head(checkpoints: Sequence[Checkpoint], classes: Sequence[ModuleClass], calls: Sequence[CallSite],
               root: Path, *, verify: bool) -> _Head | None:
    """The head checkpoint (one with Linear layers) and the class that loads it strictly."""
    heads = [c for c in checkpoints if c.layers_of("Linear")]
    heads.sort(key=lambda c: ("head" not in c.path.name.lower(), "best" not in c.path.name.lower(), c.parameters))
    first: _Head | None = None
    for checkpoint in heads:
        ranked = _ranked_classes(checkpoint, classes)
        if not ranked:
            first = first or _Head(checkpoint, None, why="no nn.Module class in the repository names its layers")
            continue
        if not verify:
            cls = ranked[0]
            kwargs, where = next(iter(_hparams(checkpoint, cls) + _called(cls, calls)), ({}, ""))
            return _Head(checkpoint, cls, kwargs, {k: f"{where} (not verified: --no-verify)" for k in kwargs},
                         why="not verified (--no-verify): the class was not built")
        reasons = []
        with _importable(root):
            for cls in ranked[:_MAX_CLASSES_TRIED]:
                found, why = _verify_head(checkpoint, cls, calls)
                if found is not None:
                    return found
                reasons.append(why)
        first = first or _Head(checkpoint, ranked[0], why=reasons[0])
    return first


def _head_section(head: _Head | None, spec_dir: Path) -> Section:
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


def _input_biases(metadata: Metadata, head: _Head | None) -> tuple[list[str], str]:
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


def _find_artifacts(metadata: Sequence[Metadata], arrays: Sequence[RowArray], head: _Head | None,
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
            if entry.details.get("bytes"):
                fields.append(Field("send", "bytes", f"{entry.rel}: reads its inputs through io.BytesIO"))
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
    head = _find_head(rest, module_classes(sources), calls, root, verify=verify)
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


def _found(backbone: _Backbone | None, head: _Head | None, artifacts: _Artifacts,
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
