"""The library registry: one adapter per backbone library, and the only place that names them.

Each adapter (`parity.libraries.timm`, `.transformers`, `.open_clip`, or one registered with
`register`) creates its backbone, converts checkpoints into its key layout, takes embeddings at
its own extraction points, builds its eval preprocessing and describes what it built (also from
an ``explain-preprocess`` source such as ``timm:MODEL``, and back into a transform). The rest of
parity asks the registry, by the library a spec, a source or a description names, and never
branches on the name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.errors import CheckpointError, SpecError
from parity.libraries.base import Converter, Library, activation_classes, activation_family
from parity.libraries.open_clip import OpenClip
from parity.libraries.timm import Timm
from parity.libraries.transformers import Transformers
from parity.preprocess.transform import Preprocess
from parity.preprocess.config import PreprocessConfig
from parity.spec import DEFAULT_LIBRARY, Spec, library_names, register_vocabulary, unregister_vocabulary, vocabulary

__all__ = [
    "Library",
    "register",
    "unregister",
    "get",
    "names",
    "create_backbone",
    "backbone_weights",
    "weights_file",
    "checkpoint_converter",
    "extract_embedding",
    "extract_embeddings",
    "extraction_point",
    "equivalent_extract",
    "describe_backbone",
    "model_name",
    "canonical_names",
    "extraction_hint",
    "resolve_preprocess",
    "describe_record",
    "source_forms",
    "resolve_source",
    "create_transform",
    "activation_classes",
    "activation_family",
]

_ADAPTERS: dict[str, Library] = {}


def register(library: Library) -> Library:
    """Make ``library`` available to specs (``[backbone].library`` / ``[preprocess].library``) by its name."""
    _ADAPTERS[library.name] = library
    register_vocabulary(library.vocabulary)
    return library


def unregister(name: str) -> None:
    """Forget a registered library (its spec vocabulary too)."""
    _ADAPTERS.pop(name, None)
    unregister_vocabulary(name)


def names() -> tuple[str, ...]:
    return library_names()


def get(name: str) -> Library:
    """The adapter registered as ``name``.

    Raises:
        SpecError: no such library is registered.
    """
    vocabulary(name)  # the spec's own message for an unknown name
    return _ADAPTERS[name]


for _builtin in (Timm(), Transformers(), OpenClip()):
    register(_builtin)


def create_backbone(spec: Spec, *, meta: bool = False):
    """The module the spec names, with random weights (checkpoints load separately).

    With ``meta`` the parameters are shapes only: no time is spent on a random init
    that a checkpoint will replace (about 4 s for ViT-L on two cores).

    Raises:
        SpecError: the model name, class or kwargs cannot be used, or the library is missing.
    """
    bb = spec.backbone
    try:
        return get(bb.library).create(spec, meta=meta)
    except SpecError:
        raise
    except Exception as e:  # a wrongly typed config or kwarg surfaces as any type inside the library
        raise SpecError(f"{spec.path}: {bb.library} cannot create [backbone].model {bb.model!r} "
                        f"with {dict(bb.kwargs)}: {type(e).__name__}: {e}") from e


def backbone_weights(spec: Spec) -> Path | None:
    """The weight file the backbone loads from (a library may keep it inside a checkpoint directory)."""
    return get(spec.backbone.library).weights(spec)


def weights_file(directory: Path) -> Path:
    """The weight file inside a checkpoint directory (e.g. what ``save_pretrained`` writes).

    Raises:
        CheckpointError: no library keeps its weights in such a directory.
    """
    for adapter in _ADAPTERS.values():
        found = adapter.directory_weights(directory)
        if found is not None:
            return found
    raise CheckpointError(f"{directory} is a directory, not a checkpoint file, and no library keeps its "
                          "weights in such a directory; pass the checkpoint file")


def checkpoint_converter(spec: Spec) -> Converter | None:
    """The key conversion for the spec's library and checkpoint format (``None``: keys are the library's own).

    Raises:
        SpecError: no conversion between the two exists.
    """
    return get(spec.backbone.library).converter(spec)


def extract_embeddings(model, pixels, modes: Sequence[str], *, library: str = DEFAULT_LIBRARY) -> dict[str, Any]:
    """Run the backbone once and take every embedding ``modes`` name in ``library``.

    The pipeline (one mode) and the variant matrix (several from one pass) both extract here,
    so a matrix cell with the spec's configuration computes exactly what the gate computes.
    """
    adapter = get(library)
    trunk = adapter.trunk(model, pixels, modes[0])
    # A mode that picks a token is a view of the whole (B, tokens, D) output: a copy of its own lets
    # that go, instead of every kept embedding holding its batch's tokens alive.
    return {mode: adapter.take(model, trunk, mode).clone() for mode in modes}


def extract_embedding(model, pixels, mode: str, *, library: str = DEFAULT_LIBRARY):
    """Run the backbone and take the embedding the way ``mode`` names it in ``library``."""
    return extract_embeddings(model, pixels, (mode,), library=library)[mode]


def extraction_point(library: str, extract: str) -> str:
    """What ``extract`` returns in ``library``, in words that compare across libraries."""
    adapter = _ADAPTERS.get(library)
    return adapter.points.get(extract, f"{library} {extract}") if adapter else f"{library} {extract}"


def equivalent_extract(library: str, point: str) -> str | None:
    """``library``'s extraction mode that returns ``point`` (the first, where several do), or ``None``."""
    adapter = _ADAPTERS.get(library)
    return next((mode for mode, p in adapter.points.items() if p == point), None) if adapter else None


def model_name(model, library: str) -> str | None:
    """What ``[backbone].model`` would say for ``model`` in ``library``, when the module itself tells."""
    adapter = _ADAPTERS.get(library)
    return adapter.model_name(model) if adapter else None


def extraction_hint(library: str) -> str:
    """Which extraction mode of ``library`` returns the projection and which the pooled features."""
    adapter = _ADAPTERS.get(library)
    return adapter.extraction_hint if adapter else ""


def canonical_names(entries: Mapping[str, Any], library: str) -> dict[str, Any]:
    """Tensor or module names as every class of ``library`` shares them (the same weights then
    compare by fingerprint, not by a class's naming)."""
    adapter = _ADAPTERS.get(library)
    prefix = adapter.wrapper_prefix if adapter else None
    if prefix is None:
        return dict(entries)
    return {name.removeprefix(prefix): value for name, value in entries.items() if name != prefix[:-1]}


def describe_backbone(model, *, name: str | None, kwargs: Mapping, extract: str, normalize: str = "none",
                      library: str = DEFAULT_LIBRARY) -> dict[str, Any]:
    """Static facts about a backbone that a strict state_dict load cannot see."""
    return get(library).describe_backbone(model, name=name, kwargs=kwargs, extract=extract, normalize=normalize)


def resolve_preprocess(spec: Spec, backbone):
    """The transform ``[preprocess]`` resolves to, and the configuration it came from (``[preprocess].library``'s).

    Raises:
        SpecError: the library's configuration cannot be found or is not supported.
    """
    return get(spec.preprocess.library).resolve_preprocess(spec, backbone)


def describe_record(record: Mapping[str, Any], *, source: str):
    """The comparable description of the preprocessing a manifest or a resolved spec records.

    A record names its library (``library``); one without is a timm data config (what older
    manifests and `parity.commands.capture.capture` with ``data_config`` write).

    Raises:
        SpecError: the record's library is unknown or the record lacks a field its library needs.
    """
    library = record.get("library", DEFAULT_LIBRARY)
    try:
        return get(library).describe_preprocess(record, source=source)
    except KeyError as e:
        raise SpecError(f"{source}: the {library} preprocessing record has no {e.args[0]!r}") from e


def source_forms() -> tuple[str, ...]:
    """Every ``explain-preprocess`` source form the registered libraries describe (``timm:MODEL_NAME``, ...)."""
    return tuple(form for adapter in _ADAPTERS.values() for form in adapter.source_forms.values())


def resolve_source(text: str) -> PreprocessConfig:
    """Describe a command-line source ``PREFIX:VALUE`` with the library that registered ``PREFIX``
    (built in: ``timm:MODEL``, ``open_clip:MODEL[@TAG]``, ``hf:PATH``, ``hf-slow:PATH``).

    Raises:
        SpecError: an unknown prefix (the message lists the accepted forms) or an unknown model or path.
    """
    prefix, sep, rest = text.partition(":")
    forms = ", ".join(source_forms())
    if not sep or not rest:
        raise SpecError(f"preprocessing source {text!r} is not PREFIX:VALUE; expected one of {forms}")
    adapter = next((a for a in _ADAPTERS.values() if prefix in a.source_forms), None)
    if adapter is None:
        raise SpecError(f"unknown preprocessing source prefix {prefix!r} in {text!r}; expected one of {forms}")
    return adapter.describe_source(prefix, rest, text)


def create_transform(config: PreprocessConfig) -> Preprocess:
    """Build the transform a description stands for, with the library it names (``config.library``).

    Raises:
        SpecError: no registered library builds such descriptions, or that library cannot
            reproduce every field of the description.
    """
    described = {name: adapter for adapter in _ADAPTERS.values() for name in adapter.description_libraries}
    if config.library not in described:
        raise SpecError(f"no transform for library {config.library!r}; expected one of {tuple(described)}")
    return described[config.library].create_transform(config)
