"""The training side of the photo tagger: a tiny real timm CLIP tower, the trained tag scorer and its fixture.

Built once per test session (a few seconds): the backbone is timm's ViT-B/16 OpenAI CLIP
definition shrunk in width and depth with seeded weights, the head is `TagScorer` (BatchNorm,
Dropout, two ``input_biases`` columns) trained briefly on synthetic tags, and the fixture is
frozen by `parity.commands.capture.capture_pipeline` from the reference spec, the way a training job would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.support.paths import EXAMPLE_FIXTURES

SEED = 0
BACKBONE = "vit_base_patch16_clip_224.openai"
BACKBONE_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
# timm's pretrained config for this model: resize the short side to 224 / 0.9 = 248, crop 224.
IMAGE_SIZE, CROP_PCT = 224, 0.9
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TAGS = ("people", "animals", "text", "outdoors")
SCORER_KWARGS = {"embed_dim": 64, "n_sources": 4, "n_scenes": 4, "context_dim": 6, "hidden": 48,
                 "n_tags": len(TAGS), "p_drop": 0.2}
HEAD_CLASS = "tests.shipped.project.photo_tags.heads:TagScorer"

# (file, how it is derived from the bundled example's image of the same stem, source id, scene id).
# Every mode a user uploads: RGB, L, P, LA, RGBA, a JPEG, an EXIF-rotated photo, non-square ones.
IMAGES = (
    ("astronaut.png", "copy", 0, 1),
    ("chelsea.png", "copy", 1, 3),              # RGB 451x300
    ("chelsea_exif_rotated.png", "copy", 2, 0),  # stored rotated, EXIF orientation 6
    ("coffee_palette.png", "palette", 3, 2),    # P, from coffee.png (600x400)
    ("camera.png", "copy", 0, 2),               # L
    ("page_alpha.png", "luminance_alpha", 1, 0),  # LA, from page.png (384x191)
    ("logo.png", "copy", 2, 3),                 # RGBA
    ("horse.png", "copy", 3, 1),                # RGBA 400x328
    ("rocket.jpg", "copy", 0, 3),               # JPEG 640x427
    ("coins.png", "copy", 1, 2),                # L 384x303
)
GOLDEN = ("chelsea.png", "chelsea_exif_rotated.png", "coffee_palette.png", "camera.png", "page_alpha.png",
          "logo.png", "rocket.jpg")


@dataclass(frozen=True)
class Reference:
    """Where the session's reference lives: the model repository files, the fixture and the spec text."""

    model_dir: Path
    fixture: Path
    images: tuple[Path, ...]

    def spec_text(self, candidate: str = "") -> str:
        """The reference spec (absolute paths), with a ``[candidate]`` table appended when given."""
        return reference_spec(self.model_dir, self.fixture) + (f"\n[candidate]\n{candidate}" if candidate else "")


def backbone_tables(model_dir: Path, *, extract: str | None = "pre_logits") -> str:
    """The ``[backbone]`` and ``[preprocess]`` tables of the photo tagger's backbone, which the tests' other user
    repositories (a Gradio Space, an MLflow model) reuse under heads of their own."""
    extract_line = f'extract = "{extract}"\n' if extract else ""
    return f"""[backbone]
library = "timm"
model = "{BACKBONE}"
kwargs = {{ embed_dim = 64, depth = 2, num_heads = 2 }}
checkpoint = "{model_dir / 'backbone.safetensors'}"
{extract_line}
[preprocess]
interpolation = "bicubic"
crop_pct = {CROP_PCT}
crop_mode = "center"
input_size = [3, {IMAGE_SIZE}, {IMAGE_SIZE}]
mean = {list(CLIP_MEAN)}
std = {list(CLIP_STD)}
"""


def reference_spec(model_dir: Path, fixture: Path) -> str:
    """How the training job made its embeddings and outputs, as a parity spec."""
    return f"""name = "photo_tags"
fixtures = "{fixture}"

{backbone_tables(model_dir)}exif_transpose = true

[head]
class = "{HEAD_CLASS}"
weights = "{model_dir / 'tag_scorer.pth'}"
kwargs = {{ embed_dim = 64, n_sources = 4, n_scenes = 4, context_dim = 6, hidden = 48, n_tags = 4, p_drop = 0.2 }}

# A tag is shown when its logit is positive.
[decisions]
threshold = 0.0

[runtime]
device = "cpu"
dtype = "float32"
batch_size = 8
"""


def _prepare_images(folder: Path) -> tuple[Path, ...]:
    from PIL import Image

    folder.mkdir(parents=True)
    paths = []
    for name, how, _, _ in IMAGES:
        path = folder / name
        if how == "copy":
            shutil.copyfile(EXAMPLE_FIXTURES / "images" / name, path)
        elif how == "palette":
            with Image.open(EXAMPLE_FIXTURES / "images" / "coffee.png") as image:
                image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path)
        else:  # luminance + alpha: a scanned page with a soft transparent border
            with Image.open(EXAMPLE_FIXTURES / "images" / "page.png") as image:
                luminance = image.convert("L")
            alpha = Image.new("L", luminance.size, 255)
            alpha.paste(96, (0, 0, luminance.size[0], 12))
            Image.merge("LA", (luminance, alpha)).save(path)
        paths.append(path)
    return tuple(paths)


def _backbone() -> torch.nn.Module:
    """Seeded weights rescaled to fan-in variance, so that embeddings depend on the image (as trained ones do)."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(BACKBONE, pretrained=False, **BACKBONE_KWARGS).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and name != "pos_embed":
                param.normal_(0.0, param[0].numel() ** -0.5)
    return model


def _train_scorer(embeddings: torch.Tensor, biases: torch.Tensor) -> dict[str, torch.Tensor]:
    """A short full-batch training on synthetic tags: BatchNorm's running statistics are the data's."""
    from tests.shipped.project.photo_tags.heads import TagScorer

    generator = torch.Generator().manual_seed(SEED)
    centred = embeddings - embeddings.mean(0)
    targets = (centred @ torch.randn(embeddings.shape[1], len(TAGS), generator=generator) > 0).float()
    torch.manual_seed(SEED)
    scorer = TagScorer(**SCORER_KWARGS)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=3e-3)
    scorer.train()
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scorer(embeddings, biases), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return scorer.eval().state_dict()


def freeze_shipped(root: Path, *, files: str, head: torch.nn.Module, head_file: str, config: Mapping[str, Any],
                   spec: Callable[[Path, Path], str], biases: Sequence[Sequence[int]]) -> tuple[Path, Path, tuple[Path, ...]]:
    """A deployment's training side under ``root``: the tagger's backbone and ``head`` saved in ``root/files``
    with their config.json (the backbone's keys plus ``config``), the images, ``reference.toml`` written by
    ``spec(files_dir, fixture)``, and the fixture frozen from it; one thread, as on any machine.

    Returns:
        The files' folder, the fixture's folder and the images.
    """
    from safetensors.torch import save_file

    from parity.commands.capture import capture_pipeline
    from parity.model.pipeline import build_pipeline
    from parity.spec import load_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder, fixture = root / files, root / "fixture"
        folder.mkdir(parents=True)
        images = _prepare_images(root / "images")
        save_file(_backbone().state_dict(), str(folder / "backbone.safetensors"))
        torch.save(head.state_dict(), folder / head_file)
        (folder / "config.json").write_text(json.dumps({
            "backbone": BACKBONE, "backbone_kwargs": BACKBONE_KWARGS, "image_size": IMAGE_SIZE, "crop_pct": CROP_PCT,
            "mean": CLIP_MEAN, "std": CLIP_STD, **config}, indent=2))
        spec_path = root / "reference.toml"
        spec_path.write_text(spec(folder, fixture))
        capture_pipeline(build_pipeline(load_spec(spec_path)), images, fixture,
                         input_biases=[list(b) for b in biases], golden=GOLDEN)
    finally:
        torch.set_num_threads(threads)
    return folder, fixture, images


def build_reference(root: Path) -> Reference:
    """Model repository files, images and the frozen fixture under ``root``; one thread, as on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(root)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path) -> Reference:
    from safetensors.torch import save_file

    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline
    from parity.spec import load_spec
    from tests.shipped.project.photo_tags.heads import TagScorer

    model_dir, fixture = root / "model", root / "fixture"
    model_dir.mkdir(parents=True)
    images = _prepare_images(root / "images")
    save_file(_backbone().state_dict(), str(model_dir / "backbone.safetensors"))
    torch.manual_seed(SEED)
    torch.save(TagScorer(**SCORER_KWARGS).state_dict(), model_dir / "tag_scorer.pth")  # untrained, replaced below
    (model_dir / "config.json").write_text(json.dumps({
        "backbone": BACKBONE, "backbone_kwargs": BACKBONE_KWARGS, "image_size": IMAGE_SIZE, "crop_pct": CROP_PCT,
        "mean": CLIP_MEAN, "std": CLIP_STD, "tags": TAGS, "scorer_kwargs": SCORER_KWARGS}, indent=2))
    spec_path = root / "reference.toml"
    spec_path.write_text(reference_spec(model_dir, fixture))

    biases = np.array([[source, scene] for _, _, source, scene in IMAGES], dtype=np.int64)
    pipeline = build_pipeline(load_spec(spec_path))
    embeddings = pipeline.embed(torch.stack([pipeline.preprocess(path) for path in images]))
    torch.save(_train_scorer(embeddings, torch.from_numpy(biases)), model_dir / "tag_scorer.pth")

    capture_pipeline(build_pipeline(load_spec(spec_path)), images, fixture, input_biases=biases.tolist(),
                     golden=GOLDEN)
    return Reference(model_dir=model_dir, fixture=fixture, images=images)
