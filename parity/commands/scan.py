"""What a repository's Python sources declare, read with `ast` and never run: ``nn.Module`` classes, calls
with literal arguments (``timm.create_model("vit_...", depth=2)``, ``TagScorer(width=64)``) and the entry
points a service ships (a ``predict`` function, an Inference Endpoints handler, a FastAPI or Gradio app)."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.libraries import CallSite

__all__ = ["Source", "ModuleClass", "Param", "Entry", "walk_files", "read_sources", "module_classes", "call_sites",
           "entry_points", "is_test_file", "SKIPPED_DIRS"]

# Folders that hold no code of the user's own: environments, caches, build outputs, VCS data.
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "env", ".env", "__pycache__", "node_modules",
                          "site-packages", "build", "dist", ".tox", ".nox", ".mypy_cache", ".pytest_cache",
                          ".ruff_cache", ".eggs", ".ipynb_checkpoints", "wandb", "mlruns"})
_MAX_SOURCE_BYTES = 1_000_000
_MAX_FILES = 20_000
# Base classes that make a class an nn.Module (a subclass of one of the repository's own counts too).
_MODULE_BASES = ("torch.nn.Module", "torch.nn.modules.module.Module", "lightning.LightningModule",
                 "lightning.pytorch.LightningModule", "pytorch_lightning.LightningModule")
_POSTPROCESS_CALLS = {"sigmoid": "sigmoid", "softmax": "softmax", "log_softmax": "log_softmax"}
NO_DEFAULT = object()
NOT_LITERAL = object()


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` outside `SKIPPED_DIRS` and hidden folders, in a stable order; symbolic
    links are not followed (a link to a dataset elsewhere is not the repository)."""
    count = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")
                         and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink():
                continue
            count += 1
            if count > _MAX_FILES:
                return
            yield path


def is_test_file(rel: str) -> bool:
    """Whether a repository path is test code (its calls count, its functions ship nothing)."""
    parts = rel.split("/")
    name = parts[-1]
    return (any(p in ("tests", "test") for p in parts[:-1]) or name.startswith("test_") or name.endswith("_test.py")
            or name == "conftest.py")


@dataclass(frozen=True)
class Source:
    """One parsed Python file. ``module``: its dotted name from the repository root (None when a part
    of its path is no identifier); ``imports``: local name → what it names (``nn`` → ``torch.nn``)."""

    path: Path
    rel: str
    module: str | None
    tree: ast.Module
    imports: Mapping[str, str]

    def where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', 0)}"

    def qualified(self, node: ast.AST) -> str | None:
        """The dotted name an expression (``nn.Module``, ``timm.create_model``, ``TagScorer``) refers to."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.imports.get(node.id)
        if head is None:
            defined = {n.name for n in self.tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
            head = f"{self.module}.{node.id}" if self.module and node.id in defined else node.id
        return ".".join([head, *reversed(parts)])


def _module_name(rel: str) -> str | None:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


def _imports(tree: ast.Module, module: str | None, is_package: bool) -> dict[str, str]:
    names: dict[str, str] = {}
    package = (module or "").split(".") if is_package else (module or "").split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's own package
                anchor = package[:len(package) - node.level + 1] if node.level <= len(package) + 1 else []
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                if alias.name != "*":
                    names[alias.asname or alias.name] = f"{base}.{alias.name}" if base else alias.name
    return names


def read_sources(root: Path, files: Sequence[Path]) -> tuple[list[Source], list[str]]:
    """The ``.py`` files among ``files`` parsed; and a note for each one that could not be (never run)."""
    sources, notes = [], []
    for path in files:
        if path.suffix != ".py":
            continue
        rel = path.relative_to(root).as_posix()
        try:
            if path.stat().st_size > _MAX_SOURCE_BYTES:
                notes.append(f"skipped {rel}: larger than {_MAX_SOURCE_BYTES // 1000} kB")
                continue
            tree = ast.parse(path.read_bytes(), filename=rel)
        except (SyntaxError, ValueError, OSError) as e:
            notes.append(f"skipped {rel}: not parseable Python ({type(e).__name__}: {e})")
            continue
        module = _module_name(rel)
        sources.append(Source(path, rel, module, tree, _imports(tree, module, path.name == "__init__.py")))
    return sources, notes


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_LITERAL


@dataclass(frozen=True)
class Param:
    """One constructor parameter: its name and literal default (`NO_DEFAULT`, or `NOT_LITERAL`)."""

    name: str
    default: Any = NO_DEFAULT


@dataclass(frozen=True)
class ModuleClass:
    """An ``nn.Module`` subclass defined in the repository.

    ``attributes``: the names its methods assign on ``self`` (a state_dict's top-level names come from
    them); ``params``: its ``__init__`` parameters after ``self``, in order (empty when it defines none).
    """

    name: str
    module: str
    rel: str
    line: int
    bases: tuple[str, ...]
    attributes: frozenset[str]
    params: tuple[Param, ...] = ()

    @property
    def class_path(self) -> str:
        return f"{self.module}:{self.name}"

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


def _attributes(node: ast.ClassDef) -> frozenset[str]:
    names = set()
    for child in ast.walk(node):
        targets: list[ast.AST] = []
        if isinstance(child, ast.Assign):
            targets = list(child.targets)
        elif isinstance(child, (ast.AnnAssign, ast.AugAssign)):
            targets = [child.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
        # self.add_module("name", ...), self.register_buffer("name", ...), self.register_parameter(...)
        if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.args
                and child.func.attr in ("add_module", "register_buffer", "register_parameter", "register_module")
                and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
            names.add(child.args[0].value)
    return frozenset(names)


def _params(node: ast.ClassDef) -> tuple[Param, ...]:
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return ()
    args = init.args
    positional = [*args.posonlyargs, *args.args][1:]
    defaults = [NO_DEFAULT] * (len(positional) - len(args.defaults)) + [_literal(d) for d in args.defaults]
    params = [Param(a.arg, d) for a, d in zip(positional, defaults)]
    params += [Param(a.arg, NO_DEFAULT if d is None else _literal(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return tuple(params)


def module_classes(sources: Sequence[Source]) -> list[ModuleClass]:
    """Every class that subclasses ``nn.Module`` (or a LightningModule), directly or through the repository's own classes."""
    found: dict[str, tuple[Source, ast.ClassDef, tuple[str, ...]]] = {}
    for source in sources:
        if source.module is None:
            continue
        for node in source.tree.body:
            if isinstance(node, ast.ClassDef):
                bases = tuple(q for q in (source.qualified(b) for b in node.bases) if q)
                found[f"{source.module}.{node.name}"] = (source, node, bases)
    modules: set[str] = set()
    changed = True
    while changed:  # subclasses of the repository's own modules, to a fixed point
        changed = False
        for name, (_, _, bases) in found.items():
            if name not in modules and any(b in _MODULE_BASES or b in modules or b.startswith("torch.nn.")
                                           for b in bases):
                modules.add(name)
                changed = True
    out = []
    for name in modules:
        source, node, bases = found[name]
        attributes = set(_attributes(node))
        params = _params(node)
        for base in bases:  # what a parent of the repository's own assigns is the child's too
            if base in found:
                attributes |= _attributes(found[base][1])
                params = params or _params(found[base][1])
        out.append(ModuleClass(node.name, source.module or "", source.rel, node.lineno, bases, frozenset(attributes),
                               params))
    return sorted(out, key=lambda c: (c.rel, c.line))


def call_sites(sources: Sequence[Source]) -> list[CallSite]:
    """Every call in the sources, by the name it calls (as imported), with its literal arguments."""
    calls = []
    for source in sources:
        for node in ast.walk(source.tree):
            if not isinstance(node, ast.Call):
                continue
            name = source.qualified(node.func)
            if name is None:
                continue
            args = tuple(None if isinstance(a, ast.Starred) or (v := _literal(a)) is NOT_LITERAL else v
                         for a in node.args)
            kwargs, opaque = {}, []
            for keyword in node.keywords:
                value = NOT_LITERAL if keyword.arg is None else _literal(keyword.value)
                if value is NOT_LITERAL:
                    opaque.append(keyword.arg or "**")
                else:
                    kwargs[keyword.arg] = value
            calls.append(CallSite(name, args, kwargs, tuple(opaque), source.where(node)))
    return calls


@dataclass(frozen=True)
class Entry:
    """A shipped entry point. ``kind``: ``python`` (a top-level ``predict``), ``endpoint_handler``
    (a class ``EndpointHandler``), ``fastapi`` or ``gradio`` (an app object); ``attr``: the function
    or object's name; ``details``: what the code says about calling it (see `entry_points`)."""

    kind: str
    rel: str
    line: int
    attr: str
    details: Mapping[str, Any] = field(default_factory=dict)


def _calls_in(function: ast.AST, source: Source, functions: Mapping[str, ast.FunctionDef]) -> Iterator[ast.Call]:
    """The calls in ``function`` and in the same file's functions it calls, one level down."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            yield node
            if isinstance(node.func, ast.Name) and node.func.id in functions and functions[node.func.id] is not function:
                yield from (n for n in ast.walk(functions[node.func.id]) if isinstance(n, ast.Call))


def _predict_details(node: ast.FunctionDef, source: Source, functions: Mapping[str, ast.FunctionDef]) -> dict[str, Any]:
    """Its required parameters, the keys of the dict literals it returns, the activation it applies."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    required = [a.arg for a in positional[:len(positional) - len(args.defaults)]]
    keys: list[list[str]] = []
    for child in ast.walk(node):
        if isinstance(child, ast.Return) and isinstance(child.value, ast.Dict):
            literal = [k.value for k in child.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            if literal and len(literal) == len(child.value.keys):
                keys.append(literal)
    post = []
    for call in _calls_in(node, source, functions):
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name in _POSTPROCESS_CALLS:
            post.append((_POSTPROCESS_CALLS[name], source.where(call)))
    return {"params": required, "returns": keys, "postprocess": post}


def _fastapi_details(source: Source, app: str) -> dict[str, Any]:
    """The routes declared on ``app`` (``@app.post("/predict")``) and the name of their file parameter."""
    routes = []
    for node in source.tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == app
                    and decorator.func.attr in ("post", "put") and decorator.args
                    and isinstance(decorator.args[0], ast.Constant) and isinstance(decorator.args[0].value, str)):
                upload = next((a.arg for a in [*node.args.args, *node.args.kwonlyargs]
                               if a.annotation is not None and (source.qualified(a.annotation) or "").endswith("UploadFile")),
                              None)
                routes.append({"path": decorator.args[0].value, "field": upload, "line": node.lineno})
    return {"routes": routes}


def entry_points(sources: Sequence[Source]) -> list[Entry]:
    """The entry points a service ships, outside test code (see `Entry`)."""
    entries = []
    for source in sources:
        if is_test_file(source.rel):
            continue
        functions = {n.name: n for n in source.tree.body if isinstance(n, ast.FunctionDef)}
        for node in source.tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "predict":  # a coroutine is served, not called
                entries.append(Entry("python", source.rel, node.lineno, node.name,
                                     _predict_details(node, source, functions)))
            elif isinstance(node, ast.ClassDef) and node.name == "EndpointHandler":
                entries.append(Entry("endpoint_handler", source.rel, node.lineno, node.name))
        for node in ast.walk(source.tree):
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                target, value = node.targets[0].id, node.value
            elif isinstance(node, ast.With):  # with gr.Blocks() as demo:
                for item in node.items:
                    if isinstance(item.optional_vars, ast.Name):
                        target, value = item.optional_vars.id, item.context_expr
            if not isinstance(value, ast.Call):
                continue
            called = source.qualified(value.func) or ""
            if called in ("fastapi.FastAPI", "fastapi.applications.FastAPI"):
                entries.append(Entry("fastapi", source.rel, node.lineno, target, _fastapi_details(source, target)))
            elif called in ("gradio.Blocks", "gradio.Interface", "gradio.TabbedInterface"):
                entries.append(Entry("gradio", source.rel, node.lineno, target, {"class": called}))
    return entries
