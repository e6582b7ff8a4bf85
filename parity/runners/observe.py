"""Finding the torch modules a user's code runs, whatever wraps them, and recognising its backbone and head.

The code is never changed: functions are followed through decorators (``@torch.no_grad()``,
``@torch.inference_mode()``, ``functools.wraps``, ``torch.compile``), closures, bound methods and
callable objects to the globals and objects they can reach; containers and attributes are
walked a few levels deep. Library code (torch, site-packages, the standard library, parity) is
followed only where it wraps the user's function, never searched for state.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import types
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.store.checkpoints import trained_shapes
from parity.store.fixtures import Fixture

__all__ = ["function_roots", "reachable_modules", "recognise", "Recognised", "trained_shapes", "is_library_file",
           "user_call_site", "compiled_modules", "PARTS"]

PARTS = ("backbone", "head")
# A module is recognised as a part when it shares at least this share of the recorded tensor names
# (or, for a head whose layers were renamed, of the recorded tensor shapes).
_MIN_OVERLAP = 0.5
# How far containers and attributes are followed from a root, and how much is looked at in all:
# a model held as registry["clip"].parts[0] is three levels down.
_DEPTH = 4
_MAX_OBJECTS = 20_000
_MAX_ITEMS = 1_000
_OPAQUE_PACKAGES = ("torch", "numpy", "PIL", "typing", "parity")


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    import torch

    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    dirs |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    dirs |= {str(Path(torch.__file__).parent), str(Path(__file__).resolve().parents[1])}
    return tuple(sorted(str(Path(d).resolve()) + "/" for d in dirs))


@functools.lru_cache(maxsize=4096)
def is_library_file(filename: str | None) -> bool:
    """Whether code in ``filename`` is a library's (torch, site-packages, the standard library, parity)."""
    if not filename or filename.startswith("<"):
        return True
    try:
        resolved = str(Path(filename).resolve())
    except OSError:
        return True
    return resolved.startswith(_library_dirs())


def _code_file(function: Any) -> str | None:
    code = getattr(function, "__code__", None)
    return code.co_filename if code is not None else None


def function_roots(fn: Callable, name: str) -> dict[str, Any]:
    """What a callable can reach: its globals, closure cells and bound object, through its wrappers.

    Followed: ``__wrapped__`` chains (``functools.wraps``, ``@torch.no_grad()``), functions held in
    a wrapper's closure (a decorator without ``wraps``), ``functools.partial``, ``torch.compile``'s
    original function, a bound method's object and function, a callable object's ``__call__``.
    Globals and closure state are taken from the user's functions only: a library wrapper's are
    not the app's.
    """
    roots: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, where: str, level: int) -> None:
        if id(obj) in seen or level > _DEPTH:
            return
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            visit(obj.func, where, level + 1)
            for i, arg in enumerate(obj.args):
                roots.setdefault(f"{where}.args[{i}]", arg)
            for key, arg in obj.keywords.items():
                roots.setdefault(f"{where}.{key}", arg)
        elif isinstance(obj, types.MethodType):
            if not isinstance(obj.__self__, (types.ModuleType, type)):
                roots.setdefault(f"{where}.__self__", obj.__self__)
            visit(obj.__func__, where, level + 1)
        elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) or hasattr(obj, "__wrapped__"):
            visit_function(obj, where, level)
        elif callable(obj) and not isinstance(obj, type):  # a callable object: its state and its class's __call__
            roots.setdefault(where, obj)
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType):
                visit(call, where, level + 1)

    def visit_function(function: Any, where: str, level: int) -> None:
        # Every link of a __wrapped__ chain: each wrapper's closure may hold state of its own.
        for inner in (getattr(function, "__wrapped__", None), getattr(function, "_torchdynamo_orig_callable", None)):
            if inner is not None:
                visit(inner, where, level + 1)
        user = not is_library_file(_code_file(function))
        code = getattr(function, "__code__", None)
        cells = getattr(function, "__closure__", None) or ()
        for cell_name, cell in zip(code.co_freevars if code is not None else (), cells):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, (types.FunctionType, functools.partial)):
                visit(value, cell_name, level + 1)  # the decorated function (a decorator without wraps), a helper
            elif user and callable(value) and not isinstance(value, (type, types.ModuleType)) and not _is_module(value):
                visit(value, cell_name, level + 1)  # a bound method or callable object the closure calls
            elif user:
                roots.setdefault(cell_name, value)
        if not user:
            return
        module = getattr(function, "__module__", None) or "app"
        for key, value in (getattr(function, "__globals__", None) or {}).items():
            if key.startswith("__"):
                continue
            roots.setdefault(f"{module}.{key}", value)
            # A module-level helper built by a factory (embed = make_embedder(model)) holds its model in a cell.
            if isinstance(value, types.FunctionType) and value.__closure__ and not is_library_file(_code_file(value)):
                for cell_name, cell in zip(value.__code__.co_freevars, value.__closure__):
                    try:
                        roots.setdefault(f"{module}.{key}.{cell_name}", cell.cell_contents)
                    except ValueError:
                        continue

    label = name.replace(":", ".")
    visit(fn, label, 0)
    if not roots and not isinstance(fn, types.FunctionType):
        roots[label] = fn
    return roots


def _is_module(value: Any) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def _opaque(value: Any) -> bool:
    """Values whose insides are never the app's state: scalars, tensors, arrays, classes, library code."""
    if value is None or isinstance(value, (str, bytes, bytearray, int, float, complex, bool, type, range,
                                           types.FunctionType, types.BuiltinFunctionType, types.CodeType,
                                           types.FrameType)):
        return True
    if isinstance(value, types.ModuleType):
        return is_library_file(getattr(value, "__file__", None))
    package = type(value).__module__.partition(".")[0]
    return package in _OPAQUE_PACKAGES


def reachable_modules(roots: Mapping[str, Any], *, depth: int = _DEPTH) -> dict[str, Any]:
    """``torch.nn.Module``s among ``roots`` and what they hold, by where they were found.

    ``roots`` maps a readable name (``app.model``) to an object: a function's globals and closure
    cells, or a handler's attributes. Objects' attributes, mappings, sequences and the user's own
    imported modules are followed breadth-first up to ``depth`` levels, each object once; a
    module's children are left to `recognise`. Each module is listed once, under the shortest path.
    """
    import torch

    found: dict[str, Any] = {}
    seen: set[int] = set()
    queue: deque[tuple[str, Any, int]] = deque((name, value, 0) for name, value in roots.items())
    looked = 0
    while queue and looked < _MAX_OBJECTS:
        name, value, level = queue.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        looked += 1
        if isinstance(value, torch.nn.Module):
            found[name] = value
            continue
        if level >= depth or _opaque(value):
            continue
        queue.extend((child_name, child, level + 1) for child_name, child in _children(name, value))
    return found


def _children(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, types.ModuleType):  # the user's own module: its globals
        return [(f"{value.__name__}.{k}", v) for k, v in vars(value).items() if not k.startswith("__")]
    if isinstance(value, types.MethodType):
        return [(f"{name}.__self__", value.__self__)]
    if isinstance(value, functools.partial):
        return [(f"{name}.func", value.func)] + [(f"{name}.args[{i}]", a) for i, a in enumerate(value.args)]
    if isinstance(value, Mapping):
        items = list(value.items())[:_MAX_ITEMS]
        return [(f"{name}[{k!r}]", v) for k, v in items]
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(list(value)[:_MAX_ITEMS])]
    attributes = getattr(value, "__dict__", None)
    out = [(f"{name}.{k}", v) for k, v in attributes.items()] if isinstance(attributes, dict) else []
    for slot in getattr(type(value), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(value, slot):
            out.append((f"{name}.{slot}", getattr(value, slot)))
    return out


def compiled_modules(modules: Mapping[str, Any]) -> list[str]:
    """Where a ``torch.compile``d module (an ``OptimizedModule``, which holds ``_orig_mod``) sits among ``modules``."""
    import torch

    out = []
    for root, module in modules.items():
        for sub, child in module.named_modules():
            if isinstance(getattr(child, "_orig_mod", None), torch.nn.Module):
                out.append(f"{root}.{sub}" if sub else root)
    return out


@dataclass
class Recognised:
    """The app's backbone and head, where they were found, and why a part was not.

    ``root`` names the reachable module each part lies in and ``path`` its path inside it, so the
    part's tensors are ``root.path.name`` among every reachable tensor; ``by_shapes`` holds the
    parts recognised by their tensors' shapes because their names were not the trained ones.
    """

    modules: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    root: dict[str, str] = field(default_factory=dict)
    path: dict[str, str] = field(default_factory=dict)
    by_shapes: set[str] = field(default_factory=set)


def recognise(modules: Mapping[str, Any], fixture: Fixture) -> Recognised:
    """Each recorded part's module: the (sub)module whose state_dict names best match the fingerprinted ones.

    Names, not values, decide, so a module with changed weights or a changed activation class is
    still found and then judged by the weights, head and structure checks. A head found by no
    names is looked for by its tensors' shapes (a head re-declared with its layers renamed),
    outside the backbone.
    """
    recorded = fixture.manifest.get("weights") or {}
    result = Recognised()
    for part in PARTS:
        names = set((recorded.get(part) or {}).get("tensors") or ())
        if not names:
            result.missing[part] = f"the fixture records no {part} weight fingerprints to recognise it by"
            continue
        best: tuple[float, str, str, Any] | None = None
        for root, module in modules.items():
            for sub, child in module.named_modules():
                keys = set(child.state_dict(keep_vars=True))
                if not keys:
                    continue
                overlap = len(keys & names) / len(keys | names)
                if overlap >= _MIN_OVERLAP and (best is None or overlap > best[0]):
                    best = (overlap, root, sub, child)
        if best is None and part == "head":
            best = _by_shapes(modules, trained_shapes(fixture, part), result.modules.get("backbone"))
            if best is not None:
                result.by_shapes.add(part)
        if best is None:
            shown = ", ".join(modules) or "none"
            result.missing[part] = (f"no torch module reachable from the candidate has the trained {part}'s tensor names "
                                    f"(modules found: {shown})")
        else:
            _, root, sub, module = best
            result.modules[part], result.root[part], result.path[part] = module, root, sub
            result.where[part] = f"{root}.{sub}" if sub else root
    if "backbone" in result.modules and "head" in result.modules \
            and result.modules["backbone"] is result.modules["head"]:
        for table in (result.modules, result.where, result.root, result.path):
            del table["head"]
        result.missing["head"] = "the backbone and the head are one module"
    return result


def _by_shapes(modules: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
               backbone: Any) -> tuple[float, str, str, Any] | None:
    """The module outside the backbone whose tensor shapes best match ``shapes`` (multiset overlap)."""
    if not shapes:
        return None
    wanted = Counter(shapes.values())
    inside = {id(m) for m in backbone.modules()} if backbone is not None else set()
    best = None
    for root, module in modules.items():
        named = list(module.named_modules())
        # A module holding the backbone (the app's whole model) is not the head either.
        holders = [sub for sub, child in named if child is backbone]
        for sub, child in named:
            if id(child) in inside or any(not sub or h == sub or h.startswith(sub + ".") for h in holders):
                continue
            held = Counter(tuple(t.shape) for t in child.state_dict(keep_vars=True).values())
            if not held:
                continue
            overlap = sum((held & wanted).values()) / sum((held | wanted).values())
            if overlap >= _MIN_OVERLAP and (best is None or overlap > best[0]):
                best = (overlap, root, sub, child)
    return best


def user_call_site(skip: set[int], *, base: Path | None = None, depth: int = 64) -> str | None:
    """``file.py:LINE in function`` of the innermost frame of the user's code on the stack.

    Frames of library code and frames of the modules in ``skip`` (a module's own ``forward``) are
    passed over; ``base`` shortens the file name to a path relative to it.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        code = frame.f_code
        if not is_library_file(code.co_filename) and id(frame.f_locals.get("self")) not in skip:
            return f"{_short(code.co_filename, base)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return None


def _short(filename: str, base: Path | None) -> str:
    path = Path(filename).resolve()
    for anchor in (Path.cwd(), base):
        if anchor is None:
            continue
        try:
            return str(path.relative_to(Path(anchor).resolve()))
        except ValueError:
            continue
    return str(path)
