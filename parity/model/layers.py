"""Layer localisation: the first module where two backbones fed the same pixels diverge."""

from __future__ import annotations

from typing import Any

from parity.libraries import extract_embedding
from parity.results import LayerDivergence
from parity.spec import DEFAULT_LIBRARY

__all__ = ["first_divergent_layer"]

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
