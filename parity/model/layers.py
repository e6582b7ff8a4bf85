"""Layer localisation: the first module where two backbones fed the same pixels diverge, and the first
module whose outputs for the same images depend on their batch-mates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from parity.libraries import extract_embedding
from parity.results import LayerDivergence
from parity.spec import DEFAULT_LIBRARY

__all__ = ["first_divergent_layer", "first_batch_dependent_module"]


def first_divergent_layer(reference, candidate, pixels, *, atol: float = 1e-5, rtol: float = 1.3e-6,
                          extract: tuple[str, str] = ("cls", DEFAULT_LIBRARY),
                          candidate_extract: tuple[str, str] | None = None) -> LayerDivergence | None:
    """Feed both backbones the same pixels and return the first module whose output diverges.

    ``extract`` is the (mode, library) each backbone runs with (`parity.libraries.extract_embedding`);
    modules are matched by name, so two libraries' backbones share none.

    The reference's module outputs are kept as they are produced; the candidate's are compared
    as they are produced and dropped, so memory stays near one forward pass of activations.
    """
    import torch

    outputs: dict[str, Any] = {}
    order: list[str] = []

    def keep(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                outputs[name] = output.detach().float()
                order.append(name)
        return hook

    found: list[LayerDivergence] = []

    def check(name):
        def hook(_module, _inputs, output):
            ref = outputs.get(name)
            if found or ref is None or not isinstance(output, torch.Tensor) or ref.shape != output.shape:
                return
            delta = (output.detach().float() - ref).abs()
            if bool((delta > atol + rtol * ref.abs()).any()):
                found.append(LayerDivergence(name, order.index(name), len(order), float(delta.max())))
        return hook

    mode, library = extract
    cand_mode, cand_library = candidate_extract or extract
    handles = [m.register_forward_hook(keep(n)) for n, m in reference.named_modules() if n]
    with torch.inference_mode():
        extract_embedding(reference, pixels, mode, library=library)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(check(n)) for n, m in candidate.named_modules() if n]
    with torch.inference_mode():
        extract_embedding(candidate, pixels.to(next(candidate.parameters()).dtype), cand_mode, library=cand_library)
    for h in handles:
        h.remove()
    return found[0] if found else None


def first_batch_dependent_module(parts: Mapping[str, Any], run: Callable[[int, int], Any], count: int, *,
                                 atol: float, rtol: float) -> LayerDivergence | None:
    """The first module, in the order modules finish, whose outputs for the same images differ between one
    batch of ``count`` images and the images run one at a time.

    Args:
        parts: the modules to hook by name prefix, e.g. ``{"backbone": model, "head": head}``; a module is
            named ``backbone.encoder.layers.0.mlp`` (the part's own forward is named by the prefix alone).
        run: ``run(start, stop)`` runs the whole path (backbone, then head) on images ``start:stop``.
        atol, rtol: a module's outputs differ where ``|batched - alone| > atol * max(1, max|alone|) + rtol *
            |alone|``: the budget relative to the module's own scale, so float noise of large activations does
            not count.

    Only outputs that are tensors with the images along their first dimension are compared.
    """
    import torch

    batched: dict[str, Any] = {}
    alone: dict[str, list] = {}
    order: list[str] = []

    def named():
        for prefix, module in parts.items():
            for name, sub in module.named_modules():
                yield (f"{prefix}.{name}" if name else prefix), sub

    def hook(name: str, images: int, store: Callable[[str, Any], None]):
        def record(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == images:
                store(name, output.detach().float().cpu())
        return record

    def first(name, output):
        if name not in batched:
            batched[name] = output
            order.append(name)

    def each(name, output):
        alone.setdefault(name, []).append(output)

    for images, store, calls in ((count, first, [(0, count)]), (1, each, [(i, i + 1) for i in range(count)])):
        handles = [m.register_forward_hook(hook(n, images, store)) for n, m in named()]
        try:
            with torch.inference_mode():
                for start, stop in calls:
                    run(start, stop)
        finally:
            for h in handles:
                h.remove()
    for index, name in enumerate(order):
        singles = alone.get(name, [])
        if len(singles) != count:  # called more or fewer times alone than batched: not comparable
            continue
        one, ref = torch.cat(singles), batched[name]
        if one.shape != ref.shape:
            continue
        delta = (ref - one).abs()
        scale = max(1.0, float(one.abs().max())) if one.numel() else 1.0
        if bool((delta > atol * scale + rtol * one.abs()).any()):
            return LayerDivergence(name, index, len(order), float(delta.max()))
    return None
