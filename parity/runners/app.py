"""Observing the user's own code: find its torch modules, hook them, call it sample by sample.

Shared by the ``python`` and ``endpoint_handler`` runners. Nothing in the user's code is
changed: the backbone and the head are recognised among the modules reachable from the
function (or handler object) by the tensor names the fixture fingerprinted, and forward hooks
record the pixels entering the backbone, the embedding entering the head and the head's output.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.fixtures import Fixture, FixtureRow
from parity.results import CandidateRun
from parity.spec import DEFAULT_LIBRARY, library_names

__all__ = ["AppObservation", "reachable_modules", "recognise", "observe", "to_array", "to_run", "PARTS"]

PARTS = ("backbone", "head")
# A module is recognised as a part when it shares at least this share of the recorded tensor names.
_MIN_OVERLAP = 0.5

Call = Callable[[FixtureRow], Any]


def reachable_modules(roots: Mapping[str, Any]) -> dict[str, Any]:
    """``torch.nn.Module``s among ``roots`` and their attributes one level deep, by where they were found.

    ``roots`` maps a readable name (``app.model``) to an object: a function's globals and closure
    cells, or a handler's attributes. Each module is listed once, under the first name found.
    """
    import torch

    found: dict[str, Any] = {}
    seen: set[int] = set()

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.nn.Module) and id(value) not in seen:
            seen.add(id(value))
            found[name] = value

    for name, value in roots.items():
        add(name, value)
        if isinstance(value, (torch.nn.Module, types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)):
            continue  # a module's children are walked by recognise; libraries and classes are not the app's state
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            for attr, child in attributes.items():
                add(f"{name}.{attr}", child)
        elif isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                add(f"{name}[{i}]", child)
        elif isinstance(value, dict):
            for key, child in value.items():
                add(f"{name}[{key!r}]", child)
    return found


def function_roots(fn: Callable, name: str) -> dict[str, Any]:
    """What a function can reach: its module's globals, its closure cells, a bound method's object."""
    roots: dict[str, Any] = {}
    target = getattr(fn, "__func__", fn)
    if getattr(fn, "__self__", None) is not None and not isinstance(fn.__self__, types.ModuleType):
        roots[f"{name}.__self__"] = fn.__self__
    code = getattr(target, "__code__", None)
    for cell_name, cell in zip(code.co_freevars if code is not None else (), getattr(target, "__closure__", None) or ()):
        try:
            roots[cell_name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    module = getattr(target, "__module__", None) or "app"
    for key, value in (getattr(target, "__globals__", None) or {}).items():
        if not key.startswith("__"):
            roots.setdefault(f"{module}.{key}", value)
    if not roots and not isinstance(fn, types.FunctionType):
        roots[name] = fn  # a callable object: its attributes
    return roots


@dataclass
class Recognised:
    """The app's backbone and head, where they were found, and why a part was not."""

    modules: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def recognise(modules: Mapping[str, Any], fixture: Fixture) -> Recognised:
    """Each recorded part's module: the (sub)module whose state_dict names best match the fingerprinted ones.

    Names, not values, decide, so a module with changed weights or a changed activation class is
    still found and then judged by the weights, head and structure checks.
    """
    recorded = fixture.manifest.get("weights") or {}
    result = Recognised()
    for part in PARTS:
        names = set((recorded.get(part) or {}).get("tensors") or ())
        if not names:
            result.missing[part] = f"the fixture records no {part} weight fingerprints to recognise it by"
            continue
        best: tuple[float, str, Any] | None = None
        for root, module in modules.items():
            for sub, child in module.named_modules():
                keys = set(child.state_dict(keep_vars=True))
                if not keys:
                    continue
                overlap = len(keys & names) / len(keys | names)
                if overlap >= _MIN_OVERLAP and (best is None or overlap > best[0]):
                    best = (overlap, f"{root}.{sub}" if sub else root, child)
        if best is None:
            shown = ", ".join(modules) or "none"
            result.missing[part] = (f"no torch module reachable from the candidate has the trained {part}'s tensor names "
                                    f"(modules found: {shown})")
        else:
            result.modules[part], result.where[part] = best[2], best[1]
    if "backbone" in result.modules and "head" in result.modules \
            and result.modules["backbone"] is result.modules["head"]:
        del result.modules["head"], result.where["head"]
        result.missing["head"] = "the backbone and the head are one module"
    return result


class _Hooks:
    """Forward hooks recording what enters the backbone, what enters the head and what leaves it."""

    def __init__(self, backbone, head) -> None:
        self.active = True
        self.pixels = self.embedding = self.head_output = None
        self._entry: str | None = None
        self._handles: dict[str, Any] = {}
        if backbone is not None:
            # The app may call forward_features() or a submodule rather than the backbone itself:
            # every submodule listens until one is seen receiving the image batch, then only it does.
            for name, module in backbone.named_modules():
                self._handles[name] = module.register_forward_pre_hook(self._pixel_hook(name), with_kwargs=True)
        if head is not None:
            self._handles["head:pre"] = head.register_forward_pre_hook(self._embedding_hook, with_kwargs=True)
            self._handles["head:post"] = head.register_forward_hook(self._output_hook)

    def reset(self) -> None:
        self.pixels = self.embedding = self.head_output = None

    def _pixel_hook(self, name: str):
        def hook(_module, args, kwargs):
            if not self.active or self.pixels is not None:
                return
            x = _first_tensor(args, kwargs, ndim=4)
            if x is not None and x.shape[1] == 3:
                self.pixels = x.detach().float().cpu().clone()
                if self._entry is None:
                    self._entry = name
                    for other, handle in list(self._handles.items()):
                        if other != name and not other.startswith("head:"):
                            handle.remove()
                            del self._handles[other]
        return hook

    def _embedding_hook(self, _module, args, kwargs):
        if self.active and self.embedding is None:
            x = _first_tensor(args, kwargs)
            if x is not None:
                self.embedding = x.detach().float().cpu().reshape(-1, x.shape[-1]).clone()

    def _output_hook(self, _module, _args, output):
        import torch

        if self.active and self.head_output is None and isinstance(output, torch.Tensor):
            self.head_output = output.detach().float().cpu().clone()

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def _first_tensor(args: Iterable, kwargs: Mapping, *, ndim: int | None = None):
    import torch

    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and (ndim is None or value.dim() == ndim):
            return value
    return None


@dataclass
class AppObservation:
    """Everything observed of the app, every fixture row, including the rows it raised on."""

    runner: str
    recognised: Recognised
    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    sample_errors: dict[int, str] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    nondeterministic: list[str] = field(default_factory=list)
    head_outputs: np.ndarray | None = None


def to_array(value: Any, output_key: str | None, *, what: str) -> np.ndarray:
    """The app's return value as a float64 vector: array-like, a torch tensor, or a mapping read by ``output_key``."""
    import torch

    if isinstance(value, Mapping):
        if output_key is None:
            raise ValueError(f"{what} returned a mapping with keys {sorted(map(str, value))}; set [candidate].output_key "
                             "to the one holding the outputs")
        if output_key not in value:
            raise ValueError(f"{what} returned no {output_key!r} (keys: {sorted(map(str, value))}); "
                             "check [candidate].output_key")
        value = value[output_key]
    elif output_key is not None and isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        value = [item[output_key] for item in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} returned {type(value).__name__}, not numbers: {e}") from e
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]  # a batch of one
    if array.ndim != 1:
        raise ValueError(f"{what} returned outputs of shape {array.shape}; expected one vector per sample")
    return array


def observe(runner: str, call: Call, modules: Mapping[str, Any], fixture: Fixture, *,
            output_key: str | None, progress: Callable[[int, int], None] | None = None,
            what: str = "the app") -> AppObservation:
    """Call ``call(row)`` for every fixture row with hooks on the recognised modules.

    An exception from the app on a sample is that sample's error (the others still run).
    """
    from parity.checkpoints import fingerprint

    recognised = recognise(modules, fixture)
    obs = AppObservation(runner, recognised)
    # Before any call: the weights the app loaded, not what a training-mode layer may update later.
    obs.fingerprints = {part: fingerprint(m.state_dict()) for part, m in recognised.modules.items()}
    hooks = _Hooks(recognised.modules.get("backbone"), recognised.modules.get("head"))
    total = len(fixture.rows)
    try:
        for i, row in enumerate(fixture.rows):
            hooks.reset()
            try:
                value = call(row)
                obs.outputs[i] = to_array(value, output_key, what=what)
            except Exception as e:  # noqa: BLE001 - whatever the app raises is that sample's error
                obs.sample_errors[i] = f"{what} raised {type(e).__name__}: {e}"
            if hooks.pixels is not None:
                obs.pixels[i] = hooks.pixels[0].numpy()
            if hooks.embedding is not None:
                obs.embeddings[i] = hooks.embedding[0].numpy()
            if progress:
                progress(i + 1, total)
        hooks.active = False
        _run_head(obs, fixture)
        if "head" not in recognised.modules and obs.outputs:
            _repeat_first(obs, call, output_key, fixture, what)
    finally:
        hooks.remove()
    return obs


def _run_head(obs: AppObservation, fixture: Fixture) -> None:
    """The app's head on the fixture's reference embeddings, twice, in whatever mode the app left it.

    Buffers (a BatchNorm's running statistics in training mode) are restored afterwards, so the
    gate leaves the app as it found it.
    """
    import torch

    head = obs.recognised.modules.get("head")
    if head is None:
        return
    saved = {name: b.detach().clone() for name, b in head.named_buffers()}
    parameter = next(head.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    biases = fixture.biases()
    try:
        with torch.no_grad():
            e = torch.as_tensor(fixture.embeddings).to(device, dtype)
            args = (e,) if biases.shape[1] == 0 else (e, torch.as_tensor(biases).to(device))
            first = head(*args).float().cpu().numpy()
            second = head(*args).float().cpu().numpy()
        obs.head_outputs = first
        if not np.array_equal(first, second, equal_nan=True):
            obs.nondeterministic.append("head")
    except Exception as e:  # noqa: BLE001 - the app's head class is the user's code
        obs.errors["head"] = f"the app's head raised {type(e).__name__} on the reference embeddings: {e}"
    finally:
        with torch.no_grad():
            for name, b in head.named_buffers():
                b.copy_(saved[name])


def _repeat_first(obs: AppObservation, call: Call, output_key: str | None, fixture: Fixture, what: str) -> None:
    """Without a recognised head, one repeated call is the only determinism check there is."""
    i = min(obs.outputs)
    try:
        again = to_array(call(fixture.rows[i]), output_key, what=what)
    except Exception:  # noqa: BLE001 - it already answered this sample once; a second answer is the question
        return
    if not np.array_equal(again, obs.outputs[i], equal_nan=True):
        obs.nondeterministic.append("outputs")


def _library(module, fixture: Fixture, part: str) -> str:
    top = type(module).__module__.partition(".")[0]
    return top if top in library_names() else fixture.pipeline.get(part, {}).get("library", DEFAULT_LIBRARY)


def describe(obs: AppObservation, fixture: Fixture) -> dict[str, Any]:
    """What the app's modules show of their configuration, in the manifest's terms (for explain's diff)."""
    from parity.libraries import activation_classes
    from parity.forensics import summarize_structure

    described: dict[str, Any] = {}
    backbone = obs.recognised.modules.get("backbone")
    if backbone is not None:
        described["backbone"] = {"library": _library(backbone, fixture, "backbone"),
                                 "activation": activation_classes(backbone),
                                 "structure": summarize_structure(backbone)}
        if obs.embeddings:
            described["backbone"]["embedding_dim"] = int(next(iter(obs.embeddings.values())).shape[-1])
    head = obs.recognised.modules.get("head")
    if head is not None:
        described["head"] = {"structure": summarize_structure(head)}
    described["candidate"] = {"runner": obs.runner, **{f"{p}_module": w for p, w in obs.recognised.where.items()}}
    return described


def to_run(obs: AppObservation, fixture: Fixture) -> CandidateRun:
    """The record the comparator judges: failed rows out, observed stages in, the others named unobservable."""
    names = fixture.names
    rows = tuple(i for i in range(len(names)) if i in obs.outputs and i not in obs.sample_errors)
    found, missing = obs.recognised.modules, obs.recognised.missing
    unobservable = {"load": f"the {obs.runner} candidate loads its own weights; the weights stage checks the "
                            "modules it actually uses"}
    pixels = embeddings = None
    errors = dict(obs.errors)
    if "backbone" in found:
        pixels = {names[i]: p for i, p in obs.pixels.items() if names[i] in fixture.golden_pixels}
        if not obs.pixels:
            unobservable["pixels"] = (f"the backbone ({obs.recognised.where['backbone']}) never received an "
                                      "image batch (B, 3, H, W)")
            pixels = None
    else:
        unobservable["pixels"] = missing["backbone"]
    if "head" in found:
        if rows and all(i in obs.embeddings for i in rows):
            embeddings = np.stack([obs.embeddings[i] for i in rows]).astype(np.float32)
        elif rows:
            unobservable["embedding"] = f"the head ({obs.recognised.where['head']}) was not called on every sample"
    else:
        unobservable["embedding"] = missing["head"]
        unobservable["head"] = missing["head"]
    if not found:
        unobservable["weights"] = "no module recognised: " + "; ".join(f"{p}: {r}" for p, r in missing.items())
    outputs = None
    if rows:
        widths = {obs.outputs[i].shape for i in rows}
        if len(widths) == 1:
            outputs = np.stack([obs.outputs[i] for i in rows]).astype(np.float32)
        else:
            errors["outputs"] = f"the outputs' widths differ between samples: {sorted(w[0] for w in widths)}"
    samples = tuple((names[i], message) for i, message in sorted(obs.sample_errors.items()))
    return CandidateRun(
        obs.runner, description=describe(obs, fixture), fingerprints=obs.fingerprints or None, modules=dict(found),
        rows=rows, sample_errors=samples, pixels=pixels, embeddings=embeddings, head_outputs=obs.head_outputs,
        outputs=outputs, nondeterministic=tuple(obs.nondeterministic), errors=errors, unobservable=unobservable,
    )


def open_image(path: Path):
    """The image as PIL decodes the file, nothing converted: the app's own handling is under test."""
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image
