"""Observing the user's own code: find its torch modules, hook them, call it sample by sample (or batch by batch).

Shared by the ``python`` and ``endpoint_handler`` runners. Nothing in the user's code is
changed: the backbone and the head are recognised among the modules reachable from the
function (or handler object) by the tensor names the fixture fingerprinted (`parity.runners.observe`),
and forward pre-hooks record what enters the backbone, the embedding and the other arguments
entering the head, and where the user's code called each. Before the first call, every
reachable tensor is fingerprinted and each part's training flags and dtype are recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from parity.libraries import activation_classes
from parity.store.checkpoints import fingerprint
from parity.store.fixtures import Fixture
from parity.results import CandidateRun
from parity.runners import guard
from parity.runners.observe import (PARTS, Recognised, compiled_modules, function_roots, is_library_file,
                                     reachable_modules, recognise, user_call_site)
from parity.runners.outputs import OutputMap, UnreadableOutput, fill_unlisted, fixture_labels, read
from parity.spec import DEFAULT_LIBRARY, library_names
from parity.store.forensics import summarize_structure

__all__ = ["AppObservation", "function_roots", "reachable_modules", "recognise", "observe", "to_array", "to_rows",
           "to_run", "PARTS", "read_vector", "read_rows"]

# ``call(row)``, or ``call(rows)`` for an app that takes a batch.
Call = Callable[[Any], Any]
Modules = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
_PARITY = str(Path(__file__).resolve().parents[1]) + os.sep


@dataclass
class AppObservation:
    """Everything observed of the app, every fixture row, including the rows it raised on.

    Per row index: ``pixels``, ``embeddings``, ``outputs``, ``sample_errors``, ``head_inputs``
    (the head's other tensor arguments), ``model_inputs`` ((shape, dtype) of what entered the
    backbone). Per part: ``fingerprints``, ``module_states``, ``dtypes``, ``call_sites``.
    ``all_fingerprints``: every tensor of every reachable module; ``notes``: how the app was
    observed when that is not plain (a compiled module run eagerly, modules built lazily).
    ``timeout`` bounds each call (seconds); ``abandoned`` says which call did not return in time,
    after which the app is called no more.
    """

    runner: str
    recognised: Recognised
    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    listed: dict[int, np.ndarray] = field(default_factory=dict)  # scores a truncated top-k list held
    sample_errors: dict[int, str] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    nondeterministic: list[str] = field(default_factory=list)
    head_outputs: np.ndarray | None = None
    head_inputs: dict[int, Any] = field(default_factory=dict)
    model_inputs: dict[int, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    module_states: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    all_fingerprints: dict[str, str] = field(default_factory=dict)
    call_sites: dict[str, str] = field(default_factory=dict)
    libraries: tuple[str, ...] = ()
    compiled: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    timeout: float = 30.0
    abandoned: str | None = None  # the call that did not return in time: the app is not called again


class _Hooks:
    """Forward pre-hooks recording what enters the backbone and the head, row by row, for one call.

    ``expect`` is the number of rows the current call carries: hooks record until they have that
    many (an app that calls its model once per image of a batch is read the same way as one that
    calls it once per batch).
    """

    def __init__(self, recognised: Recognised, *, base: Path | None) -> None:
        self.active = True
        self.expect = 1
        self.base = base
        self.call_sites: dict[str, str] = {}
        self._entry: str | None = None
        self._handles: dict[str, Any] = {}
        self._inside = {part: {id(m) for m in module.modules()} for part, module in recognised.modules.items()}
        self.reset()
        backbone, head = recognised.modules.get("backbone"), recognised.modules.get("head")
        if backbone is not None:
            # The app may call forward_features() or a submodule rather than the backbone itself:
            # every submodule listens until one is seen receiving the image batch, then only it does.
            for name, module in backbone.named_modules():
                self._handles[name] = module.register_forward_pre_hook(self._pixel_hook(name), with_kwargs=True)
        if head is not None:
            self._handles["head:pre"] = head.register_forward_pre_hook(self._head_hook, with_kwargs=True)

    def reset(self, expect: int = 1) -> None:
        self.expect = expect
        self.pixels: list = []
        self.embeddings: list = []
        self.head_inputs: list = []
        self.model_input: tuple[tuple[int, ...], str] | None = None

    def _site(self, part: str) -> None:
        if part not in self.call_sites:  # one stack walk per part, not per call
            site = user_call_site(self._inside.get(part, set()), base=self.base)
            if site is not None:
                self.call_sites[part] = site

    def _pixel_hook(self, name: str):
        def hook(_module, args, kwargs):
            if not self.active:
                return
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            if self.model_input is None:  # whatever it is: 2-D, 4 channels, uint8
                self.model_input = (tuple(x.shape), str(x.dtype).replace("torch.", ""))
                self._site("backbone")
            if x.dim() != 4 or x.shape[1] != 3 or len(self.pixels) >= self.expect:
                return
            if self._entry is None:
                self._entry = name
                for other, handle in list(self._handles.items()):
                    if other != name and not other.startswith("head:"):
                        handle.remove()
                        del self._handles[other]
            batch = x.detach().float().cpu()
            self.pixels += [batch[k].clone() for k in range(min(batch.shape[0], self.expect - len(self.pixels)))]
        return hook

    def _head_hook(self, _module, args, kwargs) -> None:
        import torch

        if not self.active:
            return
        self._site("head")
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        # The embedding is the first floating-point argument; the others (input_biases) are recorded as passed.
        first = next((j for j, t in enumerate(tensors) if t.is_floating_point() and t.dim() >= 1), None)
        if first is None or len(self.embeddings) >= self.expect:
            return
        x = tensors[first]
        rows = x.detach().float().cpu().reshape(-1, x.shape[-1])
        others = [t.detach().cpu().numpy().copy() for j, t in enumerate(tensors) if j != first]
        for k in range(min(rows.shape[0], self.expect - len(self.embeddings))):
            self.embeddings.append(rows[k].clone())
            self.head_inputs.append(_row_of(others, k, rows.shape[0]))

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def _row_of(others: list[np.ndarray], k: int, rows: int) -> Any:
    """Row ``k`` of each other head argument that carries the batch dimension; the argument itself otherwise."""
    picked = [o[k] if o.ndim >= 1 and o.shape[0] == rows and (o.ndim >= 2 or rows > 1) else o for o in others]
    if not picked:
        return None
    return picked[0] if len(picked) == 1 else tuple(picked)


def _first_tensor(args, kwargs):
    import torch

    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def _holds_text(value: Any) -> bool:
    """Whether the returned values are text (``["0.12", ...]``), which numpy would silently parse as numbers."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # ragged and the like: the conversion names it
        return False
    if array.dtype.kind in "US":
        return True
    return array.dtype.kind == "O" and any(isinstance(v, (str, bytes)) for v in array.flat)


def _mapping(output_key: str | OutputMap | None) -> OutputMap:
    return output_key if isinstance(output_key, OutputMap) else OutputMap(key=output_key)


def _as_array(value: Any, output_key: str | OutputMap | None, *, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The answer as float64 numbers, and which entries a list of scores by label listed (None: all)."""
    import torch

    value, listed = read(value, _mapping(output_key), what=what)
    if listed is not None:
        return value, listed
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        value = [v.detach().float().cpu().numpy() for v in value]
    if _holds_text(value):
        shown = repr(value)
        raise UnreadableOutput(f"{what} returned text, not numbers: {shown[:80]}{' ...' if len(shown) > 80 else ''} "
                               "(numbers as strings such as '0.12' are not outputs: return floats, as a list, an "
                               "array or a tensor)")
    try:
        return np.asarray(value, dtype=np.float64), None
    except (TypeError, ValueError) as e:
        shown = repr(value)
        raise UnreadableOutput(f"{what} returned {type(value).__name__}, not numbers: {e} ({shown[:80]}"
                               f"{' ...' if len(shown) > 80 else ''}); set [candidate].output_key or "
                               "[candidate].labels to say where the outputs are") from e


def read_vector(value: Any, output_key: str | OutputMap | None, *, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One sample's answer as a float64 vector, and which entries it listed (None: all).

    Raises:
        UnreadableOutput: parity cannot read the answer as one vector.
    """
    array, listed = _as_array(value, output_key, what=what)
    if array.ndim == 2 and array.shape[0] == 1:
        array, listed = array[0], None if listed is None else listed[0]  # a batch of one
    if array.ndim != 1:
        raise UnreadableOutput(f"{what} returned outputs of shape {array.shape}; expected one vector per sample")
    return array, listed


def read_rows(value: Any, output_key: str | OutputMap | None, n: int, *,
              what: str) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """A batch's answer as ``n`` float64 vectors, and which entries each listed (None: all).

    Raises:
        UnreadableOutput: parity cannot read the answer as one row per image.
    """
    array, listed = _as_array(value, output_key, what=what)
    if array.ndim == 1 and n == 1:
        array, listed = array[None], None if listed is None else listed[None]
    if array.ndim != 2 or array.shape[0] != n:
        raise UnreadableOutput(f"{what} returned outputs of shape {array.shape} for a batch of {n} images; "
                               f"expected one row per image, ({n}, L)")
    return list(array), [None] * n if listed is None else list(listed)


def to_array(value: Any, output_key: str | OutputMap | None, *, what: str) -> np.ndarray:
    """The app's return value as a float64 vector: array-like, a torch tensor, a mapping read by ``output_key``
    (a dotted path) or scores by label (NaN for a label a truncated list leaves out)."""
    return read_vector(value, output_key, what=what)[0]


def to_rows(value: Any, output_key: str | OutputMap | None, n: int, *, what: str) -> list[np.ndarray]:
    """A batch app's return value as ``n`` float64 vectors, one per image of the batch."""
    return read_rows(value, output_key, n, what=what)[0]


def observe(runner: str, call: Call, modules: Modules, fixture: Fixture, *, output_key: str | OutputMap | None,
            progress: Callable[[int, int], None] | None = None, what: str = "the app",
            batch_size: int | None = None, base: Path | None = None, timeout: float = 30.0) -> AppObservation:
    """Call the app on every fixture row with hooks on the recognised modules.

    ``call(row)`` per row, or ``call(rows)`` per batch of ``batch_size`` rows (an app that takes a
    batch). ``modules``: the reachable modules, or a function finding them again: a part not
    found before the first call is looked for again after it (a model built lazily, or cached
    where no attribute reaches it: every module the first call ran is a candidate), and the first
    call is then repeated with hooks so that no row goes unobserved. An exception from the app is
    the error of that call's rows (the others still run), and so is a ``sys.exit``, ``os._exit`` or
    ``KeyboardInterrupt`` (`parity.runners.guard`); a call past ``timeout`` seconds is abandoned and
    the app not called again (the rows left are named as not called). ``base`` shortens call sites'
    file names. ``output_key``: how to read the answers (`parity.runners.outputs`); scores by label
    without declared labels take the order the fixture's metadata records.
    """
    output_key = _mapping(output_key)
    if output_key.labels is None:
        output_key = replace(output_key, labels=fixture_labels(fixture))
    discover = modules if callable(modules) else (lambda: modules)
    found = dict(discover())
    obs = AppObservation(runner, recognise(found, fixture), timeout=timeout)
    _inspect(obs, found)
    size = batch_size or 1
    total = len(fixture.rows)
    chunks = [list(range(start, min(start + size, total))) for start in range(0, total, size)]
    hooks = _Hooks(obs.recognised, base=base)
    looked_again = False
    try:
        k = 0
        while k < len(chunks):
            lazy = k == 0 and not looked_again and any(p not in obs.recognised.modules for p in PARTS)
            with _called_modules(lazy) as called:
                _call_chunk(obs, hooks, call, fixture, chunks[k], output_key, what, batched=batch_size is not None)
            if lazy and obs.abandoned is None:
                looked_again = True
                again = _with_called(dict(discover()), called)
                recognised = recognise(again, fixture)
                new = [p for p in recognised.modules if p not in obs.recognised.modules]
                if new:
                    hooks.remove()
                    obs = AppObservation(runner, recognised, timeout=timeout)
                    _inspect(obs, again)
                    obs.notes.append(f"the {' and '.join(new)} ({', '.join(recognised.where[p] for p in new)}) "
                                     f"appeared only when the app was first called: observed from then on, the first "
                                     f"{'batch' if batch_size else 'sample'} called again")
                    hooks = _Hooks(recognised, base=base)
                    continue
            if progress:
                progress(chunks[k][-1] + 1, total)
            k += 1
        hooks.active = False
        obs.call_sites = dict(hooks.call_sites)
        if obs.abandoned is not None:
            obs.notes.append(f"the app's head was not run on the reference embeddings: {obs.abandoned}")
        else:
            _run_head(obs, fixture)
        if "head" not in obs.recognised.modules and obs.outputs and obs.abandoned is None:
            _repeat_first(obs, call, fixture, chunks, output_key, what, batched=batch_size is not None)
    finally:
        hooks.remove()
    return obs


def _call_chunk(obs: AppObservation, hooks: _Hooks, call: Call, fixture: Fixture, chunk: Sequence[int],
                output_key: str | None, what: str, *, batched: bool) -> None:
    """One call of the app on ``chunk``'s rows: its outputs, or its error on each row, and what the hooks saw."""
    hooks.reset(len(chunk))
    for i in chunk:  # a row observed again (after a lazy build) keeps only what this call shows
        for table in (obs.outputs, obs.listed, obs.sample_errors, obs.pixels, obs.embeddings, obs.head_inputs, obs.model_inputs):
            table.pop(i, None)
    if obs.abandoned is not None:
        obs.sample_errors.update((i, f"not called: {obs.abandoned}") for i in chunk)
        return
    try:
        value = guard.call(_called_eagerly, obs, call, [fixture.rows[i] for i in chunk] if batched
                           else fixture.rows[chunk[0]], timeout=obs.timeout, what=what)
        try:
            rows, listed = (read_rows(value, output_key, len(chunk), what=what) if batched
                            else tuple([x] for x in read_vector(value, output_key, what=what)))
        except UnreadableOutput as e:  # the app answered: parity could not read the answer
            obs.sample_errors.update((i, f"parity could not read what {what} returned: {e}") for i in chunk)
        else:
            obs.outputs.update(zip(chunk, rows))
            obs.listed.update((i, m) for i, m in zip(chunk, listed) if m is not None)
    except guard.TimedOut as e:
        # The app is still running that call, with the hooks' state: nothing more is read from it or asked of it.
        hooks.active = False
        obs.abandoned = f"{what} did not return on {fixture.rows[chunk[0]].name} within {obs.timeout:g} s"
        obs.sample_errors.update((i, str(e)) for i in chunk)
        return
    except guard.Stopped as e:
        obs.sample_errors.update((i, str(e)) for i in chunk)
    except Exception as e:  # noqa: BLE001 - whatever the app raises is the error of the rows it was given
        message = f"{what} raised {type(e).__name__}: {e}"
        obs.sample_errors.update((i, message) for i in chunk)
    for j, i in enumerate(chunk):
        if j < len(hooks.pixels):
            obs.pixels[i] = hooks.pixels[j].numpy()
        if j < len(hooks.embeddings):
            obs.embeddings[i] = hooks.embeddings[j].numpy()
            if hooks.head_inputs[j] is not None:
                obs.head_inputs[i] = hooks.head_inputs[j]
        if hooks.model_input is not None:
            obs.model_inputs[i] = hooks.model_input


def _inspect(obs: AppObservation, found: Mapping[str, Any]) -> None:
    """Before any call: every reachable tensor's fingerprint, each part's training flags, dtype and libraries.

    The weights the app loaded, not what a training-mode layer may update later.
    """
    unique: dict[int, Any] = {}
    names: dict[str, int] = {}
    for root, module in found.items():
        for name, tensor in module.state_dict(keep_vars=True).items():
            unique.setdefault(id(tensor), tensor)
            names[f"{root}.{name}"] = id(tensor)
    # A tensor reachable under several names (a part held by two objects, tied weights) is hashed once.
    prints = fingerprint({str(key): tensor for key, tensor in unique.items()})
    obs.all_fingerprints = {name: prints[str(key)] for name, key in names.items()}
    recognised = obs.recognised
    for part, module in recognised.modules.items():
        prefix = recognised.where[part] + "."
        keys = list(module.state_dict(keep_vars=True))
        derived = {k: obs.all_fingerprints.get(prefix + k) for k in keys}
        obs.fingerprints[part] = derived if None not in derived.values() else fingerprint(module.state_dict())
        obs.module_states[part] = tuple((f"{recognised.where[part]}.{sub}" if sub else recognised.where[part],
                                         type(m).__name__) for sub, m in module.named_modules() if m.training)
        floating = Counter()
        for p in module.parameters():
            if p.is_floating_point():
                floating[str(p.dtype).replace("torch.", "")] += p.numel()
        if floating:
            obs.dtypes[part] = ",".join(d for d, _ in floating.most_common())
    libraries = {type(m).__module__.partition(".")[0] for module in found.values() for m in module.modules()}
    obs.libraries = tuple(sorted(libraries & set(library_names())))
    obs.compiled = tuple(compiled_modules(found))
    if obs.compiled:
        these = "it" if len(obs.compiled) == 1 else "them"
        obs.notes.append(f"{' and '.join(obs.compiled)} {'is' if len(obs.compiled) == 1 else 'are'} torch.compile'd: "
                         f"hooks cannot fire inside compiled code, so the app was observed running {these} eagerly "
                         "(torch.compiler.set_stance(\"force_eager\")); the compiled kernels' own rounding was "
                         "not gated")


def _called_eagerly(obs: AppObservation, call: Call, rows: Any) -> Any:
    """``call(rows)`` with compiled modules run eagerly: on the user-code thread, where the stance must hold."""
    with _eager(obs):
        return call(rows)


@contextlib.contextmanager
def _eager(obs: AppObservation) -> Iterator[None]:
    """Compiled modules run eagerly, so that the hooks on their original module fire."""
    import torch

    stance = getattr(torch.compiler, "set_stance", None)
    if not obs.compiled or stance is None:
        yield
        return
    with stance("force_eager"):
        yield


@contextlib.contextmanager
def _called_modules(active: bool) -> Iterator[list[tuple[str, Any]]]:
    """``(name, module)`` of every torch module called while the context is open (when ``active``), and of
    the modules the calling frames hold: the app's locals (``predict.backbone``) and the objects whose
    methods called them (a backbone entered through ``forward_features`` is never called itself)."""
    called: list[tuple[str, Any]] = []
    if not active:
        yield called
        return
    import sys

    import torch

    seen: set[int] = set()

    def hook(module, _args):
        if id(module) in seen:
            return
        seen.add(id(module))
        called.append((f"(called) {type(module).__name__}", module))
        frame = sys._getframe(1)
        while frame is not None and not frame.f_code.co_filename.startswith(_PARITY):  # the app's call ends at parity
            user = not is_library_file(frame.f_code.co_filename)
            for var, value in frame.f_locals.items():
                if isinstance(value, torch.nn.Module) and id(value) not in seen and (user or var == "self"):
                    seen.add(id(value))
                    called.append((f"{frame.f_code.co_name}.{var}" if user else f"(called) {type(value).__name__}",
                                   value))
            frame = frame.f_back

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield called
    finally:
        handle.remove()


def _with_called(found: dict[str, Any], called: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``found`` plus the outermost modules the app called, or its frames held, that no reachable module holds."""
    held = {id(m) for module in found.values() for m in module.modules()}
    for name, module in sorted(called, key=lambda item: -sum(1 for _ in item[1].modules())):  # containers first
        if id(module) in held:
            continue
        held |= {id(m) for m in module.modules()}
        found[name if name not in found else f"{name}#{len(found)}"] = module
    return found


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
    # A head built under inference_mode holds inference tensors: only inference mode may update them.
    inference = any(t.is_inference() for t in itertools.chain(head.parameters(), head.buffers()))
    grad_off = torch.inference_mode if inference else torch.no_grad

    def twice() -> tuple[np.ndarray, np.ndarray]:
        with grad_off():  # per thread, as torch's grad mode is: entered where the head runs
            e = torch.as_tensor(fixture.embeddings).to(device, dtype)
            args = (e,) if biases.shape[1] == 0 else (e, torch.as_tensor(biases).to(device))
            return head(*args).float().cpu().numpy(), head(*args).float().cpu().numpy()

    what = "the app's head on the reference embeddings"
    try:
        first, second = guard.call(twice, timeout=obs.timeout, what=what)
        obs.head_outputs = first
        if not np.array_equal(first, second, equal_nan=True):
            obs.nondeterministic.append("head")
    except guard.Stopped as e:
        obs.errors["head"] = str(e)
    except Exception as e:  # noqa: BLE001 - the app's head class is the user's code
        obs.errors["head"] = f"the app's head raised {type(e).__name__} on the reference embeddings: {e}"
    finally:
        with grad_off():
            for name, b in head.named_buffers():
                b.copy_(saved[name])


def _repeat_first(obs: AppObservation, call: Call, fixture: Fixture, chunks: Sequence[Sequence[int]],
                  output_key: str | None, what: str, *, batched: bool) -> None:
    """Without a recognised head, one repeated call (the same rows, the same batch) is the only determinism
    check there is."""
    chunk = next((c for c in chunks if all(i in obs.outputs for i in c)), None)
    if chunk is None:
        return
    try:
        value = guard.call(_called_eagerly, obs, call, [fixture.rows[i] for i in chunk] if batched
                           else fixture.rows[chunk[0]], timeout=obs.timeout, what=what)
        again = (to_rows(value, output_key, len(chunk), what=what) if batched
                 else [to_array(value, output_key, what=what)])
    except Exception:  # noqa: BLE001 - it already answered these rows once; a second answer is the question
        return
    if any(not np.array_equal(a, obs.outputs[i], equal_nan=True) for a, i in zip(again, chunk)):
        obs.nondeterministic.append("outputs")


def _library(module, fixture: Fixture, part: str) -> str:
    top = type(module).__module__.partition(".")[0]
    return top if top in library_names() else fixture.pipeline.get(part, {}).get("library", DEFAULT_LIBRARY)


def describe(obs: AppObservation, fixture: Fixture) -> dict[str, Any]:
    """What the app's modules show of their configuration, in the manifest's terms (for explain's diff)."""
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
    described["candidate"] = {"runner": obs.runner, **{f"{p}_module": w for p, w in obs.recognised.where.items()},
                              "libraries": list(obs.libraries)}
    for part in sorted(obs.recognised.by_shapes):
        described["candidate"][f"{part}_recognised_by"] = "tensor shapes"
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
            if any(i in obs.listed for i in rows):
                listed = np.stack([obs.listed.get(i, np.ones(outputs.shape[1], bool)) for i in rows])
                outputs, note = fill_unlisted(outputs, listed, fixture.outputs[list(rows)])
                if note:
                    obs.notes.append(note)
        else:
            errors["outputs"] = f"the outputs' widths differ between samples: {sorted(w[0] for w in widths)}"
    samples = tuple((names[i], message) for i, message in sorted(obs.sample_errors.items()))
    return CandidateRun(
        obs.runner, description=describe(obs, fixture), fingerprints=obs.fingerprints or None, modules=dict(found),
        rows=rows, sample_errors=samples, pixels=pixels, embeddings=embeddings, head_outputs=obs.head_outputs,
        outputs=outputs, nondeterministic=tuple(obs.nondeterministic), errors=errors, unobservable=unobservable,
        head_inputs={names[i]: v for i, v in sorted(obs.head_inputs.items())},
        model_inputs={names[i]: v for i, v in sorted(obs.model_inputs.items())},
        module_states=dict(obs.module_states), dtypes=dict(obs.dtypes), all_fingerprints=dict(obs.all_fingerprints),
        call_sites=dict(obs.call_sites), notes=tuple(obs.notes),
    )


def open_image(path: Path):
    """The image as PIL decodes the file, nothing converted: the app's own handling is under test."""
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image
