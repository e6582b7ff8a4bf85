"""What one backbone library adapter provides; `parity.libraries` keeps one per library.

An adapter owns everything parity knows about its library: the spec vocabulary it accepts
(`parity.spec.LibraryVocabulary`), how the backbone is created, how checkpoints in each layout
become the module's keys, the library's own extraction points, its eval preprocessing, and
the facts about a built module that a strict load cannot see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from parity.errors import SpecError
from parity.store.forensics import summarize_structure
from parity.preprocess.transform import Preprocess
from parity.preprocess.config import PreprocessConfig
from parity.spec import LibraryVocabulary, Spec

__all__ = ["Library", "Converter", "activation_classes", "activation_family"]

# (state_dict, module) → the state_dict in the module's key layout.
Converter = Callable[[Mapping, Any], dict]
# Leaf-module names that hold a block's activation in each library (QuickGELU vs GELU keeps every key).
_ACTIVATION_NAMES = ("act", "activation_fn", "gelu")


def activation_family(name: str) -> str:
    """An activation class name without its library's suffix: ``QuickGELUActivation`` → ``QuickGELU``."""
    return name.removesuffix("Activation")


def activation_classes(model) -> list[str]:
    """The activation classes of the blocks: QuickGELU vs GELU leaves every key identical."""
    return sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in _ACTIVATION_NAMES})


class Library:
    """One library's adapter. Subclasses set `vocabulary` and override what their library does differently."""

    vocabulary: LibraryVocabulary
    # checkpoint_format → conversion into this library's module keys; the library's own format
    # loads as is unless it is listed here too.
    converters: Mapping[str, Converter] = {}
    # extraction mode → what it returns, in words shared across libraries (see `extraction_point`).
    points: Mapping[str, str] = {}
    # A prefix some of the library's classes put around the same tower (compared without it).
    wrapper_prefix: str | None = None
    # For a note on an embedding of the wrong width: which mode returns the projection, which the features.
    extraction_hint: str = ""
    # Whether `create(meta=True)` builds shapes without memory (a factory that moves the model refuses it).
    meta_create: bool = True
    # `parity explain-preprocess` sources this library describes: prefix → the form shown to people
    # (``{"timm": "timm:MODEL_NAME"}`` reads ``timm:vit_base_patch32_clip_224`` with `describe_source`).
    source_forms: Mapping[str, str] = {}

    @property
    def name(self) -> str:
        return self.vocabulary.name

    @property
    def description_libraries(self) -> tuple[str, ...]:
        """The ``PreprocessConfig.library`` values this library's descriptions carry (default: its name)."""
        return (self.name,)

    def create(self, spec: Spec, *, meta: bool = False):
        """The module ``[backbone]`` names, with random weights (``meta``: shapes only)."""
        raise NotImplementedError

    def model_name(self, model) -> str | None:
        """What ``[backbone].model`` would say for ``model`` when the module itself tells (else ``None``)."""
        return None

    def sibling_models(self, model: str) -> tuple[str, ...]:
        """Model names that build the same keys with another computation (e.g. another activation):
        what diagnosis tries when the weights load and the backbone still computes differently."""
        return ()

    def weights(self, spec: Spec) -> Path | None:
        """The weight file the backbone loads from (default: ``[backbone].checkpoint`` itself)."""
        return spec.backbone.checkpoint

    def directory_weights(self, directory: Path) -> Path | None:
        """The weight file in a checkpoint directory of this library's, or ``None`` if it has no such layout."""
        return None

    def converter(self, spec: Spec) -> Converter | None:
        """The key conversion for ``[backbone].checkpoint_format`` (``None``: keys are the library's own).

        Raises:
            SpecError: no conversion between the two exists.
        """
        fmt = spec.backbone.checkpoint_format
        if fmt in self.converters:
            return self.converters[fmt]
        if fmt == self.name:
            return None
        accepted = sorted(self.converters) + ([] if self.name in self.converters else [self.name])
        raise SpecError(f"{spec.path}: a {fmt} checkpoint cannot be converted for a {self.name} "
                        f"backbone. Accepted checkpoint_format values: {', '.join(accepted)}")

    def trunk(self, model, pixels, mode: str):
        """The shared part of the forward pass that ``mode`` is taken from (default: the whole forward).

        Several modes are taken from one trunk only where the vocabulary allows the matrix: then
        the trunk must not depend on ``mode``.
        """
        return model(pixels)

    def take(self, model, trunk, mode: str):
        """The embedding ``mode`` names, from `trunk`'s output."""
        return trunk

    def embedding_dim(self, model, extract: str) -> int | None:
        return getattr(model, "num_features", None)

    def describe(self, model) -> dict[str, Any]:
        """Library-specific facts about a built module, beyond `describe_backbone`'s shared ones."""
        return {}

    def resolve_preprocess(self, spec: Spec, backbone) -> tuple[Preprocess, dict[str, Any]]:
        """The eval transform ``[preprocess]`` resolves to with this library, and the configuration it came from."""
        raise SpecError(f"{spec.path}: [preprocess].library = {self.name!r} has no eval preprocessing; "
                        "choose another [preprocess].library")

    def data_config(self, spec: Spec) -> dict[str, Any]:
        """The preprocessing configuration the variant matrix varies, without building the model
        (only for a library whose vocabulary allows the matrix)."""
        raise SpecError(f"{spec.path}: the variant matrix cannot vary {self.name} preprocessing")

    def describe_preprocess(self, record: Mapping[str, Any], *, source: str) -> PreprocessConfig:
        """The comparable description (`parity.preprocess.config.PreprocessConfig`) of a recorded configuration."""
        raise SpecError(f"{source}: parity cannot describe {self.name} preprocessing field by field")

    def describe_source(self, prefix: str, rest: str, text: str) -> PreprocessConfig:
        """The description of command-line source ``text`` = ``prefix:rest`` (``prefix`` one of `source_forms`).

        Raises:
            SpecError: an unknown model or path.
        """
        raise SpecError(f"{text}: parity cannot describe {self.name} preprocessing from a source")

    def create_transform(self, config: PreprocessConfig) -> Preprocess:
        """Build, with this library, the transform ``config`` stands for (``config.library`` is one of
        `description_libraries`).

        Raises:
            SpecError: this library cannot reproduce every field of the description.
        """
        raise SpecError(f"{self.name} cannot build a transform from a description ({config.source})")

    def unset_preprocess_origin(self, spec: Spec) -> str | None:
        """Where an unset ``[preprocess]`` field takes its value from, in words, when the configuration
        `resolve_preprocess` returns holds it under the field's own name; ``None`` when it does not
        (an unset field then has no resolved value to show)."""
        return None

    def describe_backbone(self, model, *, name: str | None, kwargs: Mapping, extract: str,
                          normalize: str = "none") -> dict[str, Any]:
        """Static facts about a backbone that a strict state_dict load cannot see.

        An unknown ``name`` is left out of the record: unknown is not a value to drift from.
        """
        return {
            "library": self.name,
            **({"model": name} if name is not None else {}),
            "kwargs": dict(kwargs),
            "extract": extract,
            "normalize": normalize,
            "activation": activation_classes(model),
            "embedding_dim": self.embedding_dim(model, extract),
            "structure": summarize_structure(model),
            **self.describe(model),
        }
