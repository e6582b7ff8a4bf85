"""Quantized copies of a model for the matrix's ``quantize`` axis (`parity.spec.QUANTIZATIONS`).

``dynamic_int8`` is torch.ao's ``quantize_dynamic``: every ``nn.Linear`` gets int8 weights and
quantizes its float32 input per batch at run time; it runs on the CPU only. Modules named in
``keep`` (and everything under them) stay unquantized, which is how a repair spares them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["DYNAMIC_INT8", "dynamic_int8_copy", "kept"]

DYNAMIC_INT8 = "dynamic_int8"


def kept(name: str, keep: Sequence[str]) -> bool:
    """Whether module ``name`` is ``keep``'s or lies under one of them (``""`` keeps everything)."""
    return any(k == "" or name == k or name.startswith(k + ".") for k in keep)


def dynamic_int8_copy(module: Any, keep: Sequence[str] = ()) -> Any:
    """A float32 CPU copy of ``module`` with every ``nn.Linear`` outside ``keep`` dynamically quantized to int8."""
    import torch

    model = copy.deepcopy(module).float().cpu().eval()
    qconfig: dict[Any, Any] = {torch.nn.Linear: torch.ao.quantization.default_dynamic_qconfig}
    # A name's entry wins over its type's (torch.ao's propagation), so None leaves that Linear in float32.
    qconfig.update({name: None for name, _ in model.named_modules() if name and kept(name, keep)})
    if "" in keep:
        return model
    with warnings.catch_warnings():  # torch announces torch.ao's deprecation (for torchao) on every call
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, qconfig, dtype=torch.qint8, inplace=True)
