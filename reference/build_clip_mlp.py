"""Rebuild the second bundled example: transformers CLIPVisionModel + MLP identity classifier.

This is the training side of the verification system: it extracts ``pooler_output`` with a
transformers ``CLIPVisionModel`` and its ``CLIPImageProcessor`` (read from the model's
directory, as ``from_pretrained`` would), trains an MLP with CrossEntropy on augmented views
of a few identities, and writes everything through parity's atomic fixture writer.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from parity.judge.decisions import pair_cosines
from parity.store.images import load_image
from parity.commands.capture import capture
from reference.build_fixtures import run_builder
from reference.models import MLPClassifier

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "fixtures" / "clip_mlp"
SEED = 0

# openai/clip-vit-base-patch32's vision tower (patch 32 at 224 px, QuickGELU), shrunk in width and depth.
MODEL = "CLIPVisionModel"
CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "projection_dim": 32}
HEAD_CLASS = "reference.models:MLPClassifier"
# Each identity is one public-domain or CC0 photo from scikit-image's wheel; its views are crops of it.
IDENTITIES = {
    "astronaut": ("astronaut.png", "Eileen Collins, NASA Great Images database; public domain."),
    "chelsea": ("chelsea.png", "Chelsea the cat, Stefan van der Walt; CC0."),
    "coffee": ("coffee.png", "Coffee cup, Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0."),
    "rocket": ("rocket.jpg", "DSCOVR launch on Falcon 9, SpaceX; public domain."),
    "ihc": ("ihc.png", "Immunohistochemistry, Center for Microscopy And Molecular Imaging; no known copyright "
                       "restrictions."),
    "hubble": ("hubble_deep_field.jpg", "Hubble eXtreme Deep Field, NASA; public domain."),
}
# (left, top, right, bottom) as fractions of the photo. Odd pixel sizes make the resized image
# exceed the crop by an odd number of pixels on some views: where libraries round crop offsets apart.
VIEWS = {"a": (0.0, 0.0, 1.0, 1.0), "b": (0.03, 0.05, 0.81, 0.92), "c": (0.2, 0.1, 0.97, 0.99)}
MAX_SIDE = 301
# Golden pixels: a square view, and views whose resized side exceeds the crop by an odd (astronaut_b,
# chelsea_a) and an even number of pixels (chelsea_b).
GOLDEN = ("astronaut_a.png", "astronaut_b.png", "chelsea_a.png", "chelsea_b.png")
HEAD_KWARGS = {"embedding_dim": CONFIG["hidden_size"], "num_classes": len(IDENTITIES), "hidden_dims": [128],
               "dropout": 0.1}
AUGMENTATIONS = 24
STEPS = 200


def create_backbone():
    """The shrunk CLIPVisionModel with seeded weights rescaled to fan-in variance.

    With transformers' init (std 0.02) every image gets nearly the same feature; rescaling
    each weight matrix makes the embedding depend on the image, as a trained model's does.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    model = CLIPVisionModel(CLIPVisionConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "position_embedding" not in name:
                param.normal_(0.0, param[0].numel() ** -0.5)
    return model


def write_views(source: Path, work: Path) -> list[tuple[Path, int]]:
    """Three crops per identity, downscaled so the longest side is at most MAX_SIDE: (path, class)."""
    from PIL import Image

    views = []
    for label, (identity, (file, _)) in enumerate(IDENTITIES.items()):
        photo = load_image(source / file)
        scale = MAX_SIDE / max(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
        for view, (x0, y0, x1, y1) in VIEWS.items():
            box = (round(x0 * photo.width), round(y0 * photo.height), round(x1 * photo.width), round(y1 * photo.height))
            path = work / f"{identity}_{view}.png"
            photo.crop(box).save(path)
            views.append((path, label))
    return views


def augmented(paths: list[tuple[Path, int]]) -> tuple[list, np.ndarray]:
    """Seeded random crops and flips of every view: the classifier's training images."""
    from torchvision import transforms

    torch.manual_seed(SEED)
    augment = transforms.Compose([transforms.RandomResizedCrop(200, scale=(0.5, 1.0)),
                                  transforms.RandomHorizontalFlip()])
    images, labels = [], []
    for path, label in paths:
        image = load_image(path)
        for _ in range(AUGMENTATIONS):
            images.append(augment(image))
            labels.append(label)
    return images, np.array(labels)


def embed(model, processor, images: list) -> np.ndarray:
    """The training-time extraction: ``pooler_output`` for the processor's pixels, in batches of 32."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            pixels = processor(images[start:start + 32], return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=pixels).pooler_output)
    return torch.cat(out).numpy()


def train_head(embeddings: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """Full-batch Adam on CrossEntropy; returns the final state_dict and a summary."""
    torch.manual_seed(SEED)
    head = MLPClassifier(**HEAD_KWARGS)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    e, y = torch.from_numpy(embeddings), torch.from_numpy(labels)
    head.train()
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(head(e), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    with torch.no_grad():
        accuracy = float((head(e).argmax(1) == y).float().mean())
    return copy.deepcopy(head.state_dict()), {"steps": STEPS, "first_loss": losses[0], "last_loss": losses[-1],
                                              "train_accuracy": accuracy, "optimizer": "Adam lr=3e-3",
                                              "training_images": len(labels)}


def verification_threshold(embeddings: np.ndarray) -> float:
    """The middle of the widest gap between pair cosines near their median: no pair sits close to it."""
    cosines = np.sort(pair_cosines(embeddings)[2])
    middle = cosines[len(cosines) // 4: 3 * len(cosines) // 4 + 1]
    k = int(np.diff(middle).argmax())
    return round(float(middle[k] + middle[k + 1]) / 2, 4)


def build(out: Path, *, source: Path, force: bool = False) -> Path:
    """Write the complete example fixture to ``out`` through the capture API (atomically)."""
    from transformers import CLIPImageProcessor

    from parity.libraries.transformers import describe_preprocess_config

    torch.set_num_threads(1)  # bit-for-bit repeatable training on any core count
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone_dir = work / "backbone"
        backbone = create_backbone()
        backbone.save_pretrained(backbone_dir)
        processor = CLIPImageProcessor()  # openai/clip-vit-base-patch32's settings are the defaults
        processor.save_pretrained(backbone_dir)
        processor = CLIPImageProcessor.from_pretrained(backbone_dir, local_files_only=True)

        views = write_views(source, work)
        attribution = (
            "# Images\n\nCrops of photos from scikit-image's `skimage/data` (BSD-3-Clause package; each photo's "
            "own terms below), downscaled to at most 301 px. Each photo is one identity; `_a`, `_b`, `_c` are "
            "its views.\n\n" + "".join(f"- `{identity}_*.png` from `{file}`: {credit}\n"
                                        for identity, (file, credit) in IDENTITIES.items())
        )
        images, labels = augmented(views)
        train_embeddings = embed(backbone, processor, images)
        state, training = train_head(train_embeddings, labels)
        head = MLPClassifier(**HEAD_KWARGS)
        head.load_state_dict(state, strict=True)
        head.eval()
        torch.save(state, work / "mlp_classifier.pth")

        with capture(out, model=backbone, model_name=MODEL, model_kwargs={}, library="transformers",
                     extract="pooler_output", checkpoint=backbone_dir, transform=processor,
                     preprocess=describe_preprocess_config(backbone_dir / "preprocessor_config.json",
                                                           processor="fast"),
                     force=force, extra_files={"images/ATTRIBUTION.md": lambda p: p.write_text(attribution)}) as cap:
            paths = [path for path, _ in views]
            embeddings = embed(backbone, processor, [load_image(p) for p in paths])
            pixels = processor([load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
            for i, (path, label) in enumerate(views):
                cap.add(path, embedding=embeddings[i], pixels=pixels[i] if path.name in GOLDEN else None,
                        labels=[float(label)])
            with torch.no_grad():
                logits = head(torch.from_numpy(embeddings))
            cap.set_outputs(logits)
            cap.attach_head(head, class_path=HEAD_CLASS, kwargs=HEAD_KWARGS, checkpoint=work / "mlp_classifier.pth")
            accuracy = float((logits.argmax(1).numpy() == np.array([label for _, label in views])).mean())
            cap.note("name", "clip_mlp")
            cap.note("metadata", {"class_names": list(IDENTITIES), "verification_threshold":
                                  verification_threshold(embeddings)})
            cap.note("head_training", {**training, "fixture_accuracy": accuracy})
            cap.note("golden_pixels", list(GOLDEN))
            cap.manifest["producer"]["seed"] = SEED
    return out


def main(argv: list[str] | None = None) -> int:
    return run_builder(argv, build=build, default_out=DEFAULT_OUT, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
