"""Images as the shipped code hands them to the model: modes it never converts, and the changes it commonly makes.

`image_modes` names the modes of the samples that failed when no sample that passed shares
them; `SHIPPED_IMAGE_TRANSFORMS` are the PIL-to-PIL changes a service commonly makes before
the model's preprocessing (channel swap, squash, JPEG re-encoding, EXIF not applied, grayscale),
which the pixel detectors try and which diagnose applies where pixels cannot be observed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from PIL import Image

from parity.explain.detectors.evidence import Evidence
from parity.results import Finding

__all__ = ["ShippedTransform", "SHIPPED_IMAGE_TRANSFORMS", "JPEG_QUALITIES", "swap_channels", "squash",
           "reencode_jpeg", "grayscale", "composite_white", "has_alpha", "image_modes", "findings"]

# The qualities diagnose tries where pixels are not observed (the pixel detector estimates q itself).
JPEG_QUALITIES = (95, 90, 85, 75, 50)
_RGB_MODES = ("RGB",)
# What torch and PIL say when a 1-, 2- or 4-channel image reaches an RGB model.
_SHAPE_ERROR = re.compile(r"channel|size of tensor|shape|dimension|mode", re.IGNORECASE)


def swap_channels(image: Image.Image) -> Image.Image:
    """RGB -> BGR (what an OpenCV-decoded array looks like to a model trained on RGB)."""
    r, g, b = image.convert("RGB").split()
    return Image.merge("RGB", (b, g, r))


def squash(image: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Both sides to ``size`` = (height, width), aspect ratio lost (Pillow's ``resize`` default is bicubic)."""
    height, width = size
    return image.resize((width, height), resample)


def reencode_jpeg(image: Image.Image, quality: int, *, subsampling: int | None = None) -> Image.Image:
    """The image after a JPEG round trip through Pillow at ``quality``; ``subsampling`` 0 (4:4:4),
    1 (4:2:2) or 2 (4:2:0, Pillow's default when None)."""
    buffer = io.BytesIO()
    options = {} if subsampling is None else {"subsampling": int(subsampling)}
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality), **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def composite_white(image: Image.Image) -> Image.Image:
    """Transparency composited onto white (what transformers' image processors do to an RGBA input)."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def grayscale(image: Image.Image) -> Image.Image:
    """Luma only, as three equal channels (``convert("L")`` where ``convert("RGB")`` was meant)."""
    return image.convert("L").convert("RGB")


@dataclass(frozen=True)
class ShippedTransform:
    """A change a shipped service commonly makes to an image before the model's own preprocessing.

    ``apply(image, size)`` takes the RGB image as parity decodes it (`parity.store.images.decode_image`
    with ``exif_transpose``) and the model's input size (height, width), and returns the image
    the shipped code hands to its preprocessing.
    """

    name: str
    description: str
    cause: str
    fix: str
    apply: Callable[[Image.Image, tuple[int, int]], Image.Image]
    exif_transpose: bool = True


def _jpeg(quality: int) -> ShippedTransform:
    return ShippedTransform(
        f"jpeg_q{quality}", f"JPEG re-encoding at quality {quality}",
        f"the shipped code (or its client) re-encodes each image as JPEG at quality {quality} before the model",
        "Change the shipped code: send and read the original image bytes unchanged (no JPEG re-encoding on the "
        "way to the model), or re-encode losslessly (PNG)",
        lambda image, size: reencode_jpeg(image, quality))


SHIPPED_IMAGE_TRANSFORMS: Mapping[str, ShippedTransform] = {t.name: t for t in (
    ShippedTransform(
        "bgr", "channels swapped to BGR",
        "the shipped code feeds the model BGR images (channels reversed, as OpenCV decodes them)",
        "Change the shipped code: convert to RGB before preprocessing (`cv2.cvtColor(image, cv2.COLOR_BGR2RGB)`, "
        "or `array[..., ::-1]`)",
        lambda image, size: swap_channels(image)),
    ShippedTransform(
        "squash", "a squash to the model's input size (Pillow bicubic)",
        "the shipped code resizes each image to the model's input size before preprocessing, aspect ratio lost "
        "(`image.resize((W, H))`)",
        "Change the shipped code: remove the resize before preprocessing (the preprocessing resizes the short "
        "side and center-crops by itself)",
        lambda image, size: squash(image, size)),
    ShippedTransform(
        "squash_bilinear", "a squash to the model's input size (Pillow bilinear)",
        "the shipped code resizes each image to the model's input size with bilinear before preprocessing, "
        "aspect ratio lost",
        "Change the shipped code: remove the resize before preprocessing (the preprocessing resizes the short "
        "side and center-crops by itself)",
        lambda image, size: squash(image, size, Image.Resampling.BILINEAR)),
    *(_jpeg(q) for q in JPEG_QUALITIES),
    ShippedTransform(
        "no_exif", "EXIF orientation not applied",
        "the shipped code ignores the EXIF orientation: photos taken rotated reach the model rotated",
        "Change the shipped code: call `ImageOps.exif_transpose(image)` right after opening the image",
        lambda image, size: image, exif_transpose=False),
    ShippedTransform(
        "grayscale", "grayscale",
        "the shipped code converts images to grayscale (`convert(\"L\")`) before the model",
        "Change the shipped code: convert with `image.convert(\"RGB\")`",
        lambda image, size: grayscale(image)),
)}


def image_modes(modes: Mapping[str, str], failed: Collection[str]) -> tuple[list[str], list[str]] | None:
    """(modes of the failed samples, modes of the others) when they never overlap and RGB is not among
    the failed ones: the shipped code breaks on those modes. ``None`` otherwise."""
    if not failed or any(n not in modes for n in failed):
        return None
    failed_modes = sorted({modes[n] for n in failed})
    passed_modes = sorted({m for n, m in modes.items() if n not in failed})
    if set(failed_modes) & (set(passed_modes) | set(_RGB_MODES)):
        return None
    return failed_modes, passed_modes


def _shapes(inputs: Mapping[str, tuple], names: Collection[str]) -> list[str]:
    seen: dict[str, str] = {}
    for name in names:
        if name in inputs:
            shape, dtype = inputs[name]
            seen.setdefault(str(tuple(shape)), str(dtype).removeprefix("torch."))
    return [f"{shape} {dtype}" for shape, dtype in seen.items()]


def _channels_wrong(shape: tuple[int, ...]) -> bool:
    # (B, C, H, W) or (C, H, W) with C = 3 is what an RGB model takes
    return not ((len(shape) == 4 and shape[1] == 3) or (len(shape) == 3 and shape[0] == 3))


def findings(evidence: Evidence) -> dict[str, list[Finding]]:
    """Image modes the shipped code does not convert, on the failing decode and pixels stages."""
    run, fixture = evidence.run, evidence.fixture
    found: dict[str, list[Finding]] = {}
    cases: list[tuple[str, list[str]]] = []
    if evidence.failing("decode") and run.sample_errors:
        cases.append(("decode", [n for n, _ in run.sample_errors]))
    if evidence.failing("pixels") and run.pixels:
        wrong = [n for n, p in run.pixels.items() if getattr(p, "shape", (3,))[:1] != (3,)]
        if wrong:
            cases.append(("pixels", wrong))
    for stage, failed in cases:
        modes = {row.name: m[0] for row in fixture.rows if (m := evidence.mode(row.name)) is not None}
        split = image_modes(modes, set(failed))
        if split is None:
            continue
        failed_modes, passed_modes = split
        inputs = {n: run.model_inputs[n] for n in failed if n in run.model_inputs}
        if inputs and not any(_channels_wrong(tuple(shape)) for shape, _ in inputs.values()):
            continue  # the model got 3 channels: the failure is elsewhere
        if not inputs and stage == "decode":
            errors = dict(run.sample_errors)
            # without the model's inputs, each error must itself speak of channels or shapes
            if not all(_SHAPE_ERROR.search(errors.get(n, "")) and "more than 1 value per channel" not in errors[n]
                       for n in failed):
                continue
        reached = _shapes(run.model_inputs, failed)
        errors = dict(run.sample_errors)
        example = next((n for n in failed if n in errors), None)
        text = (f"the {len(failed)} sample(s) that failed are all of mode {', '.join(failed_modes)}; the "
                f"{len(modes) - len([n for n in failed if n in modes])} that passed are "
                f"{', '.join(passed_modes) or 'none'}")
        if reached:
            text += f"; what reached the model from them: {'; '.join(reached)}"
        if example is not None and stage == "decode":
            text += f" ({example}: {errors[example][:160]})"
        where = evidence.where("preprocess", "backbone")
        found.setdefault(stage, []).append(Finding(
            detector="images.mode", stage=stage,
            cause=f"the shipped code passes {', '.join(failed_modes)} images to preprocessing without converting "
                  "them to RGB",
            evidence=text,
            fix=("Change the shipped code: convert every image with `image.convert(\"RGB\")` (after "
                 f"`ImageOps.exif_transpose`) before preprocessing{evidence.at('preprocess', 'backbone')}"),
            where=where))
    return found
