"""Capture at the source: the training or extraction code writes the fixture as it produces the data.

    with parity.capture("fixtures/run42", model=backbone, data_config=config, transform=transform,
                        extract="pre_logits") as cap:
        for path in images:
            pixels = transform(load_image(path))
            cap.add(path, embedding=extract(pixels), input_biases=biases[path])
        cap.attach_head(head, class_path="my.models:Head", kwargs=head_kwargs, checkpoint="best.pth")
        cap.set_outputs(head(embeddings, biases))

Everything lands through `stage_fixture` (atomic, checksummed) together with its provenance:
the transform's repr and resolved fields, the model class, activation and extraction call,
library versions, checkpoint hashes, weight fingerprints and the calling code's git revision.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.libraries import describe_backbone, model_name as infer_model_name, weights_file
from parity.model.numerics import probe_numerics
from parity.model.pipeline import describe_head
from parity.preprocess.transform import describe_data_config
from parity.store.checkpoints import fingerprint
from parity.errors import FixtureError
from parity.store.fixtures import (EMBEDDINGS, METADATA, OUTPUTS, PIXELS, environment, regeneration_lock, sha256_file,
                             stage_fixture)
from parity.model.batches import embed_pixels
from parity.spec import DEFAULT_LIBRARY
from parity.store.provenance import git_revision, known_revision

__all__ = ["Capture", "capture", "capture_pipeline", "git_revision", "known_revision"]


def _calling_file() -> Path | None:
    """The first file on the stack outside parity and contextlib: the code that produces the data.

    ``capture_pipeline`` enters ``capture`` from inside parity, so a fixed stack depth would
    record parity's own script and git revision instead of the caller's.
    """
    package = Path(__file__).resolve().parents[1]  # the parity package
    skipped = (package, Path(contextlib.__file__).resolve())
    for frame in inspect.stack(context=0)[1:]:
        path = Path(frame.filename)
        if frame.filename.startswith("<") and not path.is_file():
            continue  # an interactive session or exec'd string: no file to revision
        resolved = path.resolve()
        if resolved == skipped[1] or package in resolved.parents:
            continue
        return resolved
    return None


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


@dataclass
class Capture:
    """Collects samples and provenance; written when the ``capture`` block ends without error."""

    root: Path
    images: list[Path] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[np.ndarray | None] = field(default_factory=list)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)

    def add(self, image: str | Path, *, embedding, pixels=None, outputs=None, input_biases: Sequence[int] = (),
            labels: Sequence[float] = ()) -> None:
        """One sample: its image file, the embedding the pipeline produced, and what the head was given."""
        image = Path(image)
        if any(p.name == image.name for p in self.images):
            raise FixtureError(f"capture: two samples are named {image.name!r}; image names must be unique")
        if not image.is_file():
            raise FixtureError(f"capture: image {image} not found")
        vector = _array(embedding).reshape(-1)
        if self.embeddings and vector.shape != self.embeddings[0].shape:
            raise FixtureError(f"capture: {image.name} has a {vector.shape[0]}-d embedding, the first sample "
                               f"{self.embeddings[0].shape[0]}-d")
        if not np.isfinite(vector).all():
            raise FixtureError(f"capture: {image.name} has a non-finite embedding")
        self.images.append(image)
        self.embeddings.append(vector)
        self.outputs.append(None if outputs is None else _array(outputs).reshape(-1))
        self.rows.append({"row": len(self.rows), "image": f"images/{image.name}",
                          "input_biases": [int(b) for b in input_biases], "labels": [float(v) for v in labels]})
        if pixels is not None:
            self.pixels[image.name] = _array(pixels)

    def set_outputs(self, outputs) -> None:
        """The head's outputs for every sample, in the order added (e.g. after training)."""
        array = _array(outputs)
        if array.ndim != 2 or array.shape[0] != len(self.rows):
            raise FixtureError(f"capture: outputs must be ({len(self.rows)}, L), got {array.shape}")
        self.outputs = list(array)

    def attach_head(self, head, *, class_path: str, kwargs: Mapping[str, Any] | None = None,
                    checkpoint: str | Path | None = None) -> None:
        """Record the head as trained: class, kwargs, structure, fingerprints and its checkpoint file."""
        self.manifest.setdefault("pipeline", {})["head"] = {**describe_head(head, class_path=class_path),
                                                            "kwargs": dict(kwargs or {})}
        self._weights("head", head, checkpoint)

    def note(self, key: str, value: Any) -> None:
        """Any other JSON-serialisable record (training summary, label names...)."""
        self.manifest[key] = value

    def _weights(self, part: str, module, checkpoint: str | Path | None) -> None:
        entry: dict[str, Any] = {"tensors": fingerprint(module.state_dict())}
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if checkpoint.is_dir():  # a transformers directory: config.json, model.safetensors, preprocessor config
                self.folders[checkpoint.name] = checkpoint
                weights = weights_file(checkpoint)
                entry.update(file=f"{checkpoint.name}/{weights.name}", sha256=sha256_file(weights))
            else:
                self.files[checkpoint.name] = checkpoint
                entry.update(file=checkpoint.name, sha256=sha256_file(checkpoint))
        self.manifest.setdefault("weights", {})[part] = entry


@contextlib.contextmanager
def capture(out_dir: str | Path, *, model=None, data_config: Mapping[str, Any] | None = None, transform=None,
            extract: str = "pre_logits", model_name: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
            checkpoint: str | Path | None = None, force: bool = False, extra_files: Mapping[str, Any] = (),
            library: str = DEFAULT_LIBRARY, preprocess: Mapping[str, Any] | None = None, batch_size: int | None = None,
            numerics: Mapping[str, Any] | None = None) -> Iterator[Capture]:
    """Write a fixture from inside the code that produces the reference data.

    Args:
        model: the backbone the embeddings came from (its class, activations and weights are recorded).
        data_config: timm's resolved data config used by ``transform``.
        transform: the exact transform object (its repr is recorded).
        extract: how embeddings were taken, in ``library``'s words (timm ``pre_logits``, ``forward``,
            ``cls``, ``mean_tokens``; transformers ``pooler_output``, ``cls``, ``image_embeds``;
            open_clip ``encode_image``, ``pooled``).
        checkpoint: the backbone checkpoint file, or a transformers directory; copied into the
            fixture with its sha256.
        library: the backbone's library (``timm``, ``transformers``, ``open_clip``).
        preprocess: the preprocessing description for non-timm libraries (see
            `parity.libraries.transformers.describe_preprocess_config`); timm pipelines pass ``data_config``.
        extra_files: ``{name: writer(path)}`` for further files (e.g. an attribution note).
        batch_size: how many images each backbone call took (recorded with the numeric environment).
        numerics: fields of the numeric environment to record instead of the probed ones, when the
            data was computed elsewhere (see `parity.model.numerics.probe_numerics`).
    """
    caller = _calling_file()
    cap = Capture(root=Path(out_dir))
    if model is not None:
        name = model_name or infer_model_name(model, library)
        first = next(model.parameters())
        cap.manifest["pipeline"] = {
            "backbone": describe_backbone(model, name=name, kwargs=dict(model_kwargs or {}), extract=extract,
                                          library=library),
            "runtime": {"device": first.device.type, "dtype": str(first.dtype).replace("torch.", "")},
        }
        cap._weights("backbone", model, checkpoint)
    if data_config is not None:
        cap.manifest.setdefault("pipeline", {})["preprocess"] = describe_data_config(data_config)
    elif preprocess is not None:
        cap.manifest.setdefault("pipeline", {})["preprocess"] = dict(preprocess)
    cap.manifest["producer"] = {"script": caller.name if caller else None,
                                "git_revision": git_revision(caller) if caller else None,
                                "transform": repr(transform) if transform is not None else None,
                                "versions": environment(),
                                "numerics": _numerics(model, batch_size, numerics)}
    # The lock covers the whole regeneration, so a second one is refused before it computes anything.
    held = contextlib.ExitStack()
    held.enter_context(regeneration_lock(cap.root))
    if cap.root.exists() and not force:
        held.close()
        raise FixtureError(f"{cap.root} already exists; refusing to overwrite frozen fixtures.\n"
                           "Note: rebuild on purpose with `make fixtures FORCE=1` (or --force).")
    try:
        yield cap
        if not cap.rows:
            raise FixtureError("capture: no samples were added")
        with stage_fixture(cap.root, force=force) as stage:
            (stage.path / "images").mkdir()
            for image in cap.images:
                shutil.copyfile(image, stage.path / "images" / image.name)
            for name, source in cap.files.items():
                shutil.copyfile(source, stage.path / name)
            for name, source in cap.folders.items():
                shutil.copytree(source, stage.path / name)
            for name, write in dict(extra_files).items():
                write(stage.path / name)
            np.save(stage.path / EMBEDDINGS, np.stack(cap.embeddings)[:, None, :])  # (N, 1, D), as in training
            if all(o is not None for o in cap.outputs):
                np.save(stage.path / OUTPUTS, np.stack(cap.outputs))
            if cap.pixels:
                from safetensors.numpy import save_file

                save_file(cap.pixels, str(stage.path / PIXELS))
            metadata = {k: v for k, v in cap.manifest.pop("metadata", {}).items()}
            (stage.path / METADATA).write_text(json.dumps({**metadata, "rows": cap.rows}, indent=1) + "\n",
                                               encoding="utf-8")
            stage.manifest.update(cap.manifest)
    finally:
        held.close()


def _numerics(model, batch_size: int | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numeric environment the reference is computed in: probed here, then the caller's overrides."""
    device = next(model.parameters()).device if model is not None else "cpu"
    return {**probe_numerics(device, batch_size=batch_size), **dict(overrides or {})}


def capture_pipeline(pipeline, images: Sequence[str | Path], out_dir: str | Path, *,
                     input_biases: Sequence[Sequence[int]] | None = None, golden: Sequence[str] = (),
                     force: bool = False, numerics: Mapping[str, Any] | None = None) -> Path:
    """Freeze what a trusted pipeline (e.g. the training-time path, written as a spec) computes.

    Args:
        pipeline: a `parity.model.pipeline.Pipeline` built from the reference spec.
        images: the sample images, with unique file names.
        input_biases: per-image categorical inputs, for heads that take them.
        golden: image names whose preprocessed pixels are stored too.
        numerics: numeric-environment fields to record instead of the probed ones (see `capture`).

    Returns:
        ``out_dir``, written atomically with the pipeline's configuration, fingerprints and provenance.
    """
    spec = pipeline.spec
    biases = [list(b) for b in input_biases] if input_biases is not None else [[] for _ in images]
    with capture(out_dir, model=pipeline.backbone, model_name=spec.backbone.model, library=spec.backbone.library,
                 model_kwargs=dict(spec.backbone.kwargs), extract=spec.backbone.extract,
                 transform=pipeline.transform, checkpoint=spec.backbone.checkpoint, force=force,
                 batch_size=1, numerics=numerics) as cap:
        cap.manifest["pipeline"] = pipeline.describe()
        for image, bias in zip(images, biases):
            pixels = pipeline.preprocess(image)
            cap.add(image, embedding=embed_pixels(pipeline, pixels[None])[0], input_biases=bias,
                    pixels=pixels if Path(image).name in golden else None)
        cap.set_outputs(pipeline.run_head(np.stack(cap.embeddings), np.array(biases, dtype=np.int64)))
        cap.attach_head(pipeline.head, class_path=spec.head.class_path, kwargs=dict(spec.head.kwargs),
                        checkpoint=spec.head.weights)
    return Path(out_dir)
