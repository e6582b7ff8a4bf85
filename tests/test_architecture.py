"""The package layout's rules, checked on the code: no import cycle, no private name reached across
packages, one decode -> embed loop, and imports at the top of a file unless deferred on purpose."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1] / "parity"
# Calls that run the backbone on pixels. The loop's own entry points (`embed_pixels`, `embed_images`,
# `embed_rows`, `embed_batch`, `extract_pixels`) are what every other module calls instead.
BACKBONE_CALLS = {"embed", "extract_embedding", "extract_embeddings", "forward_features", "forward_head",
                  "get_image_features", "encode_image"}
# Where they may be written: the one batch loop, the pipeline that defines ``embed``, layer localisation
# (two backbones on one batch of pixels the loop made, hooked module by module), and the library adapters
# that define the extraction calls.
LOOP_HOMES = {"model/batches.py", "model/pipeline.py", "model/layers.py", "libraries/timm.py", "libraries/transformers.py",
              "libraries/open_clip.py", "libraries/base.py", "libraries/__init__.py"}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if not nxt.startswith("parity"):
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("parity") and module not in index:
            visit(module)
    return found


def test_no_import_cycle_in_parity():
    graph = grimp.build_graph("parity", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    graph = grimp.ImportGraph()
    for name in ("parity.a", "parity.b", "parity.c"):
        graph.add_module(name)
    graph.add_import(importer="parity.a", imported="parity.b")
    graph.add_import(importer="parity.b", imported="parity.a")
    graph.add_import(importer="parity.c", imported="parity.a")
    assert _cycles(graph) == [["parity.a", "parity.b"]]


def _package(relative: str) -> str:
    parts = relative.split("/")
    return parts[0] if len(parts) > 1 else relative.removesuffix(".py")


def _imported_package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_no_private_name_is_imported_across_packages():
    crossings = []
    for relative, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parity."):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and _imported_package(node.module) != _package(relative):
                    crossings.append(f"{relative}: from {node.module} import {', '.join(private)}")
    assert crossings == []


def test_only_the_batch_loop_runs_the_backbone_on_images():
    callers = []
    for relative, tree in _modules().items():
        if relative in LOOP_HOMES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in BACKBONE_CALLS:
                    callers.append(f"{relative}:{node.lineno} {name}(...)")
    assert callers == []


def test_the_gate_embeds_through_the_batch_loop(example_spec, monkeypatch):
    """At run time too: every backbone call of a check comes from `parity.model.batches`."""
    import sys

    from parity.commands.check import run_check
    from parity.model.pipeline import Pipeline

    callers: list[str] = []
    embed = Pipeline.embed

    def watched(self, pixels):
        callers.append(sys._getframe(1).f_globals["__name__"])
        return embed(self, pixels)

    monkeypatch.setattr(Pipeline, "embed", watched)
    report = run_check(example_spec, sample=4)
    assert report.passed
    assert callers and set(callers) == {"parity.model.batches"}


def test_the_static_check_finds_a_backbone_call_outside_the_loop(tmp_path):
    tree = ast.parse("def f(pipeline, x):\n    return pipeline.embed(x)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in BACKBONE_CALLS]
    assert len(calls) == 1


def _deferred_imports(tree: ast.Module) -> list[ast.stmt]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def test_a_parity_module_imported_inside_a_function_says_why():
    """Imports belong at the top; a deferred one (a heavy library, or code that needs torch from a module
    that must stay light) carries a comment on its line or the line above saying so."""
    unexplained = []
    for relative, tree in _modules().items():
        lines = (ROOT / relative).read_text().splitlines()
        for node in _deferred_imports(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if not any(n.startswith("parity") for n in names):
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                unexplained.append(f"{relative}:{node.lineno}")
    assert unexplained == []


def test_the_layers_contract_covers_every_module():
    """Every module and package of parity sits in a layer of the import-linter contract, so none escapes it."""
    import tomllib

    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers" and c.get("containers") == ["parity"])["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    present = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert present - named == set()
