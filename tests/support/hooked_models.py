"""The example's ViT with a forward hook on its final norm: a shipped bug that adds no weights, so the
example checkpoint still loads strictly."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def hook_final_norm(patch: pytest.MonkeyPatch, hook: Callable) -> None:
    """Every timm model built while ``patch`` holds runs ``hook`` as a forward hook on its final norm."""
    import timm

    original = timm.create_model

    def create_model(*args, **kwargs):
        model = original(*args, **kwargs)
        if hasattr(model, "norm"):
            model.norm.register_forward_hook(hook)
        return model

    patch.setattr(timm, "create_model", create_model)
