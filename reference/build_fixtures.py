"""Rebuild the bundled example's frozen training-time data (`make fixtures`).

This is the training side: it extracts embeddings the way the training pipeline did
(timm transform from the model's pretrained_cfg, ``forward_head(forward_features(x),
pre_logits=True)``), trains the head briefly and deterministically, and writes
everything through parity's atomic fixture writer.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from parity.commands.capture import capture
from parity.errors import ParityError
from parity.store.images import load_image
from reference.models import MultiLabelRegressionNN

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "fixtures" / "clip_dnn"
SEED = 0

# timm's real ViT-L/14@336 QuickGELU CLIP definition, shrunk by keyword overrides.
MODEL = "vit_large_patch14_clip_quickgelu_336.openai"
MODEL_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
HEAD_CLASS = "reference.models:MultiLabelRegressionNN"
BIAS_NAMES = ("source", "scene")
BIAS_CARDINALITIES = (3, 4)
LABEL_NAMES = ("aesthetic", "sharpness", "exposure", "clutter", "warmth")
HEAD_KWARGS = {
    "embedding_dim": MODEL_KWARGS["embed_dim"],
    "bias_cardinalities": list(BIAS_CARDINALITIES),
    "num_outputs": len(LABEL_NAMES),
    "bias_dim": 8,
    "hidden_dims": [128, 64],
    "dropout": 0.1,
}
EPOCHS = 300

# Public-domain / CC0 photos shipped inside scikit-image's wheel (see ATTRIBUTION below).
IMAGES = {
    "astronaut.png": "Eileen Collins, NASA Great Images database; public domain.",
    "camera.png": "Camera man, Lav Varshney; CC0 (grayscale).",
    "chelsea.png": "Chelsea the cat, Stefan van der Walt; CC0 (non-square).",
    "coffee.png": "Coffee cup, Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0 (non-square).",
    "rocket.jpg": "DSCOVR launch on Falcon 9, SpaceX; public domain (JPEG, non-square).",
    "coins.png": "Greek coins from Pompeii, Brooklyn Museum Collection; no known copyright restrictions (grayscale).",
    "moon.png": "Surface of the moon; scikit-image sample data (grayscale).",
    "logo.png": "scikit-image logo; scikit-image sample data (RGBA).",
    "horse.png": "Horse silhouette, Andreas Preuss (marauder), openclipart; CC0 (RGBA).",
    "page.png": "Scanned page; scikit-image sample data (grayscale, 2:1).",
    "text.png": "Corner test image, Wikipedia; public domain (grayscale, 2.6:1).",
    "clock_motion.png": "Motion-blurred clock, Stefan van der Walt; public domain (grayscale).",
    "grass.png": "Grass, linolafett via DeviantArt; CC0 (grayscale crop).",
    "brick.png": "Brick wall, CC0Textures; CC0 (grayscale).",
    "hubble_deep_field.jpg": "Hubble eXtreme Deep Field, NASA; public domain (JPEG, non-square).",
    "retina.jpg": "Fundus photograph, Mikael Häggström via Wikimedia; CC0 (JPEG, 1411x1411).",
}
# Derived from chelsea.png: stored rotated, with the EXIF orientation that turns it upright.
EXIF_IMAGE = "chelsea_exif_rotated.png"
# Golden pixels cover each decoding path: RGB non-square, grayscale, RGBA, JPEG, EXIF-rotated.
GOLDEN = ("chelsea.png", "camera.png", "logo.png", "rocket.jpg", EXIF_IMAGE)


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ParityError("scikit-image is needed to rebuild fixtures: pip install -e '.[fixtures]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_exif_rotated(source: Path, dest: Path) -> None:
    """A PNG whose pixels are rotated and whose EXIF orientation (6) says how to show it upright."""
    from PIL import Image

    with Image.open(source) as image:
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        image.transpose(Image.Transpose.ROTATE_90).save(dest, exif=exif.tobytes())


def create_backbone() -> torch.nn.Module:
    """The shrunk model with seeded random weights.

    timm's init (std 0.02) leaves the class token dominated by its own embedding, so every
    image gets nearly the same feature (pairwise cosine > 0.997). Rescaling each weight
    matrix to fan-in variance makes the embedding depend on the image, as a trained
    model's does (mean pairwise cosine about 0.64 on the bundled photos).
    """
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(MODEL, pretrained=False, **MODEL_KWARGS).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and name != "pos_embed":
                param.normal_(0.0, param[0].numel() ** -0.5)
    return model


def extract_embeddings(model: torch.nn.Module, transform, paths: list[Path]) -> tuple[np.ndarray, dict]:
    """The training-time extraction: (N, D) pre-logits embeddings and the pixels they came from."""
    pixels = {p.name: transform(load_image(p)) for p in paths}
    with torch.no_grad():
        batch = torch.stack(list(pixels.values()))
        embeddings = model.forward_head(model.forward_features(batch), pre_logits=True)
    return embeddings.numpy(), pixels


def synthetic_targets(embeddings: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Targets that depend on both the embedding and each bias column, plus a little noise."""
    rng = np.random.default_rng(SEED)
    weights = rng.normal(size=(embeddings.shape[1], len(LABEL_NAMES))) / np.sqrt(embeddings.shape[1])
    signal = embeddings @ weights
    for column, cardinality in enumerate(BIAS_CARDINALITIES):
        signal += rng.normal(scale=0.5, size=(cardinality, len(LABEL_NAMES)))[biases[:, column]]
    return (np.tanh(signal) + rng.normal(scale=0.02, size=signal.shape)).astype(np.float32)


def train_head(embeddings: np.ndarray, biases: np.ndarray, targets: np.ndarray) -> tuple[dict, dict]:
    """Full-batch Adam on MSE; returns the best state_dict by training loss and a summary."""
    torch.manual_seed(SEED)
    head = MultiLabelRegressionNN(**HEAD_KWARGS)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    e, b, t = torch.from_numpy(embeddings), torch.from_numpy(biases), torch.from_numpy(targets)
    best_loss, best_state, first_loss = float("inf"), None, None
    head.train()
    for _ in range(EPOCHS):
        loss = torch.nn.functional.mse_loss(head(e, b), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first_loss = loss.item() if first_loss is None else first_loss
        if loss.item() < best_loss:
            best_loss, best_state = loss.item(), copy.deepcopy(head.state_dict())
    return best_state, {"epochs": EPOCHS, "first_loss": first_loss, "best_loss": best_loss, "optimizer": "Adam lr=3e-3"}


def build(out: Path, *, source: Path, force: bool = False) -> Path:
    """Write the complete example fixture to ``out`` through the capture API (atomically)."""
    import tempfile

    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # bit-for-bit repeatable training on any core count
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in IMAGES:
            shutil.copyfile(source / name, work / name)
        write_exif_rotated(source / "chelsea.png", work / EXIF_IMAGE)
        paths = [work / name for name in (*IMAGES, EXIF_IMAGE)]

        backbone = create_backbone()
        save_file(backbone.state_dict(), str(work / "backbone.safetensors"))
        config = timm.data.resolve_model_data_config(backbone)
        transform = timm.data.create_transform(**config, is_training=False)
        attribution = (
            "# Images\n\nCopied unchanged from scikit-image's `skimage/data` (BSD-3-Clause package; "
            "each image's own terms below).\n\n" + "".join(f"- `{n}`: {a}\n" for n, a in IMAGES.items())
            + f"- `{EXIF_IMAGE}`: `chelsea.png` stored rotated by 90 degrees with EXIF orientation 6 "
            "(display rotated back); same terms.\n"
        )
        with capture(out, model=backbone, model_name=MODEL, model_kwargs=MODEL_KWARGS, data_config=config,
                     transform=transform, extract="pre_logits", checkpoint=work / "backbone.safetensors",
                     force=force, extra_files={"images/ATTRIBUTION.md": lambda p: p.write_text(attribution)}) as cap:
            embeddings, pixels = extract_embeddings(backbone, transform, paths)
            n = len(paths)
            biases = np.stack([np.arange(n) % BIAS_CARDINALITIES[0], (np.arange(n) * 7 // 3) % BIAS_CARDINALITIES[1]], 1)
            targets = synthetic_targets(embeddings, biases)
            for i, path in enumerate(paths):
                cap.add(path, embedding=embeddings[i], pixels=pixels[path.name] if path.name in GOLDEN else None,
                        input_biases=biases[i], labels=[round(float(v), 6) for v in targets[i]])

            state, training = train_head(embeddings, biases, targets)
            torch.save(state, work / "dnnV1_model_best.pth")
            head = MultiLabelRegressionNN(**HEAD_KWARGS)
            head.load_state_dict(state, strict=True)
            with torch.no_grad():
                cap.set_outputs(head.eval()(torch.from_numpy(embeddings), torch.from_numpy(biases)))
            cap.attach_head(head, class_path=HEAD_CLASS, kwargs=HEAD_KWARGS, checkpoint=work / "dnnV1_model_best.pth")
            cap.note("name", "clip_dnn")
            cap.note("metadata", {"bias_names": list(BIAS_NAMES), "label_names": list(LABEL_NAMES)})
            cap.note("head_training", training)
            cap.note("golden_pixels", list(GOLDEN))
            cap.manifest["producer"]["seed"] = SEED
    return out


def run_builder(argv: list[str] | None, *, build, default_out: Path, description: str) -> int:
    """The command line both example builders share: --out, --source, --force; exit 2 on a refusal."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help="fixture directory to (re)build")
    parser.add_argument("--source", type=Path, default=None, help="folder with the photos (default: skimage/data)")
    parser.add_argument("--force", action="store_true", help="replace an existing fixture directory")
    args = parser.parse_args(argv)
    try:
        out = build(args.out, source=args.source or skimage_data_dir(), force=args.force)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fixtures written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_builder(argv, build=build, default_out=DEFAULT_OUT, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
