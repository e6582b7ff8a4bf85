"""Which of a repository's ``nn.Module`` classes loads a head checkpoint with ``strict=True``, and with which kwargs.

Classes are proposed from the sources alone (`parity.commands.scan`): those whose attributes name the
checkpoint's top-level modules. Verifying one imports the module that defines it and builds it, as
``parity check`` will (`parity.model.pipeline.construct_module`), with the repository's folder first on
``sys.path`` for the while; the kwargs tried are the checkpoint's stored hyperparameters, the user's
literal calls of the class, its defaults, then integer widths fitted to the tensor shapes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.model.pipeline import construct_module
from parity.commands.artifacts import Checkpoint, strip_wrapper
from parity.commands.scan import NO_DEFAULT, NOT_LITERAL, ModuleClass
from parity.errors import ParityError
from parity.libraries import CallSite

__all__ = ["HeadMatch", "find_head"]

# Where a nested checkpoint keeps its hyperparameters (Lightning, common training loops).
_HPARAM_ENTRIES = ("hyper_parameters", "hparams", "config", "args", "model_config", "model_args", "kwargs")
# A class is proposed for a head when its attributes name at least this share of the checkpoint's top-level modules.
_MIN_OVERLAP = 0.5
_MAX_CLASSES_TRIED = 4
_MAX_FIT_BUILDS = 400


def _within(module: Any, root: Path) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and root in Path(file).resolve().parents


@contextlib.contextmanager
def _importable(root: Path, package: str) -> Iterator[None]:
    """``package`` importable from ``root`` for a while, then forgotten: a copy of a package of that name
    imported from elsewhere is set aside meanwhile and put back after; parity itself is never touched."""
    if package == __name__.split(".")[0]:
        yield
        return
    before = set(sys.modules)
    aside = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] == package and not _within(module, root)}
    for name in aside:
        del sys.modules[name]
    saved_path = list(sys.path)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if n not in before and n.split(".")[0] == package]:
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
    shapes, _ = strip_wrapper(checkpoint.shapes)
    target = set(shapes.items())
    dims = sorted({d for shape in shapes.values() for d in shape})
    linears = checkpoint.layers_of("Linear")
    # Lists a constructor may take: the hidden widths of the Linear chain, the embedding tables' sizes.
    lists = [widths for widths in ([layer.args[1] for layer in linears[:-1]],
                                   [table.args[0] for table in checkpoint.layers_of("Embedding")]) if widths]
    choices: dict[str, list[Any]] = {}
    current: dict[str, Any] = {}
    for p in cls.params:
        default = p.default
        if isinstance(default, bool) or default is NOT_LITERAL:
            continue
        if default is NO_DEFAULT:  # an int or a list of ints, by the look of the tensors
            choices[p.name] = [*dims, *lists]
            current[p.name] = start.get(p.name, dims[-1] if dims else 1)
        elif isinstance(default, int):
            choices[p.name] = dims
            current[p.name] = start.get(p.name, default)
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
class HeadMatch:
    """The head checkpoint and the class proposed for it. ``verified``: built with ``kwargs``, it loads the
    checkpoint with ``strict=True`` (with ``fix``'s explicit loading fields when set); ``origins``: kwarg →
    where its value came from; ``why``: what is missing when ``cls`` is None or not verified."""

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


def _verify_head(checkpoint: Checkpoint, cls: ModuleClass, calls: Sequence[CallSite]) -> tuple[HeadMatch | None, str]:
    """The first kwargs (stored hyperparameters, the user's calls, the defaults, a fit) that build ``cls``
    so that the checkpoint loads strictly; else None and why."""
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
        ok, fix = checkpoint.loads(module, section="head", target=cls.class_path)
        if ok:
            origin = where or f"{cls.rel}:{cls.line}: the defaults of {cls.name}"
            return HeadMatch(checkpoint, cls, kwargs, {k: origin for k in kwargs}, fix, True), ""
    if not built and "import" in refused:  # the module itself does not import: no kwargs can help
        return None, refused
    for start, where in sources:
        fitted = _fit(cls, checkpoint, start)
        if fitted is None:
            continue
        try:
            module = construct_module(cls.class_path, fitted, where="")
        except ParityError:
            continue
        ok, fix = checkpoint.loads(module, section="head", target=cls.class_path)
        if ok:
            origins = {k: where if k in start and start[k] == v and where else
                       f"fitted to {checkpoint.rel}'s tensor shapes" for k, v in fitted.items()}
            return HeadMatch(checkpoint, cls, fitted, origins, fix, True), ""
    return None, (f"no kwargs found that make {cls.name} load {checkpoint.rel} with strict=True"
                  + (f" ({refused})" if refused else ""))


def find_head(checkpoints: Sequence[Checkpoint], classes: Sequence[ModuleClass], calls: Sequence[CallSite],
               root: Path, *, verify: bool) -> HeadMatch | None:
    """The head checkpoint (one with Linear layers) and the class that loads it strictly."""
    heads = [c for c in checkpoints if c.layers_of("Linear")]
    heads.sort(key=lambda c: ("head" not in c.path.name.lower(), "best" not in c.path.name.lower(), c.parameters))
    first: HeadMatch | None = None
    for checkpoint in heads:
        ranked = _ranked_classes(checkpoint, classes)
        if not ranked:
            first = first or HeadMatch(checkpoint, None, why="no nn.Module class in the repository names its layers")
            continue
        if not verify:
            cls = ranked[0]
            kwargs, where = next(iter(_hparams(checkpoint, cls) + _called(cls, calls)), ({}, ""))
            return HeadMatch(checkpoint, cls, kwargs, {k: f"{where} (not verified: --no-verify)" for k in kwargs},
                         why="not verified (--no-verify): the class was not built")
        reasons = []
        for cls in ranked[:_MAX_CLASSES_TRIED]:
            with _importable(root, cls.module.split(".")[0]):
                found, why = _verify_head(checkpoint, cls, calls)
            if found is not None:
                return found
            reasons.append(why)
        first = first or HeadMatch(checkpoint, ranked[0], why=reasons[0])
    return first
