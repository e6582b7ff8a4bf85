"""Golden pixels of real images, shipped preprocessing written here (PIL and numpy), named by the detector.

The shipped code below is the test's own: a timm-style resize and crop in PIL for clip_dnn, the
transformers CLIPImageProcessor called directly for clip_mlp, and each bug written by hand.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from parity.explain.detectors import detect
from parity.store.fixtures import Fixture, FixtureRow
from parity.results import CandidateRun
from tests.support.paths import CLASSIFIER_FIXTURES
from tests.support.judging import judged

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def opened(path, *, exif: bool = True) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return (ImageOps.exif_transpose(image) if exif else image).convert("RGB")


def to_pixels(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD, *, scale: float = 255.0) -> np.ndarray:
    x = np.asarray(image, np.float32).transpose(2, 0, 1) / np.float32(scale)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def resize_crop(image: Image.Image, *, short: int = 336, crop: int = 336, resample=Image.Resampling.BICUBIC):
    """Short side to ``short`` (long side truncated), then a centre crop, in PIL."""
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(size, resample)
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    return image.crop((left, top, left + crop, top + crop))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def findings_for(fixture, spec, shipped, *, where: str = "svc/app.py:64 in predict"):
    by_name = {row.name: row for row in fixture.rows}
    pixels = {name: shipped(by_name[name].image) for name in fixture.golden_pixels}
    run = CandidateRun("python", pixels=pixels, call_sites={"backbone": where})
    stages = judged(run, fixture, spec)
    assert not stages["pixels"]  # the shipped code really changed the pixels
    return detect(run, fixture, stages, spec).get("pixels", ())


def test_the_independent_reference_matches_the_fixture(dnn):
    fixture, _ = dnn
    for row in fixture.rows:
        if row.name in fixture.golden_pixels:
            assert np.abs(to_pixels(resize_crop(opened(row.image))) - fixture.golden_pixels[row.name]).max() < 1e-5


def test_bilinear_interpolation(dnn):
    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(opened(p), resample=Image.Resampling.BILINEAR)))
    assert finding.detector == "pixels.interpolation"
    assert finding.evidence.startswith("bilinear reproduces the shipped pixels: max abs ")
    assert finding.max_abs < 1e-5
    shipped, _, reference = finding.cause.partition("; ")
    assert "bilinear" in shipped and "bicubic" in reference
    assert finding.fix.startswith("Change the shipped code: ") and "bicubic" in finding.fix
    assert finding.fix.endswith("(at svc/app.py:64 in predict)")


def test_crop_pct(dnn):
    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(opened(p), short=384)))
    assert finding.detector == "pixels.crop_pct"
    # The fit, with its parameters: crop_pct 0.875 is a short side of 384 before the 336x336 crop.
    assert "crop_pct 0.875" in finding.evidence and "384" in finding.evidence and "336x336" in finding.evidence
    assert finding.fix.startswith("Change the shipped code: ") and "336" in finding.fix and "336x336" in finding.fix


def test_exif_orientation_not_applied(dnn):
    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(opened(p, exif=False))))
    assert finding.detector == "pixels.exif"
    assert "`ImageOps.exif_transpose(image)`" in finding.fix


def test_jpeg_quality_is_estimated(dnn):
    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(jpeg(opened(p), 85))))
    assert finding.detector == "pixels.jpeg"
    assert finding.evidence.startswith("JPEG re-encoding at quality 85 reproduces the shipped pixels")
    assert "at quality 85" in finding.cause


@pytest.mark.parametrize("mean, std, scale, detector, words", [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0, "pixels.mean_std", "the imagenet mean"),
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 255.0, "pixels.mean_std", "does not normalise with a mean/std"),
    (CLIP_MEAN, CLIP_STD, 1.0, "pixels.value_scale", "normalises 0-255 pixel values"),
    ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 255.0, "pixels.mean_std", "mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3)"),
])
def test_per_pixel_steps(dnn, mean, std, scale, detector, words):
    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(opened(p)), mean, std, scale=scale))
    assert finding.detector == detector
    assert words in finding.cause
    assert "Change the shipped code: " in finding.fix


def test_bgr_and_a_squash_before_a_transformers_processor(mlp):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(CLASSIFIER_FIXTURES / "backbone")

    def service(path):  # an HTTP service: squash to the model's size, hand OpenCV-ordered pixels over
        bgr = np.asarray(opened(path).resize((224, 224)))[..., ::-1].copy()
        return processor(Image.fromarray(bgr), return_tensors="np")["pixel_values"][0]

    (finding,) = findings_for(*mlp, service)
    assert finding.detector == "pixels.squash+channel_order"
    fit = finding.evidence.partition(" reproduces")[0]
    assert "squash" in fit and "bicubic" in fit and "BGR" in fit
    assert "remove the resize before preprocessing" in finding.fix and "cv2.COLOR_BGR2RGB" in finding.fix


def test_jpeg_before_a_transformers_processor(mlp):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(CLASSIFIER_FIXTURES / "backbone")
    (finding,) = findings_for(*mlp, lambda p: processor(jpeg(opened(p), 70), return_tensors="np")["pixel_values"][0])
    assert finding.detector == "pixels.jpeg" and "quality 70" in finding.evidence


@pytest.mark.parametrize("change", [
    lambda image: image.filter(ImageFilter.GaussianBlur(0.6)),
    lambda image: Image.fromarray(np.clip(np.asarray(image, np.int16) + 3, 0, 255).astype(np.uint8)),
])
def test_nothing_named_for_changes_no_detector_models(dnn, change):
    assert findings_for(*dnn, lambda p: to_pixels(resize_crop(change(opened(p))))) == ()


def test_transparency_composited_onto_white_on_a_fixture_of_its_own(tmp_path, dnn):
    _, spec = dnn
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (80, 120, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 120, dtype=np.uint8)[None, :]  # transparent on the left
    path = tmp_path / "sticker.png"
    Image.fromarray(rgba, "RGBA").save(path)
    record = {"input_size": [3, 64, 64], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
              "mean": CLIP_MEAN.tolist(), "std": CLIP_STD.tolist(), "resize_backend": "pil", "channel_order": "rgb",
              "value_scale": "unit", "exif_transpose": True}
    golden = to_pixels(resize_crop(opened(path), short=64, crop=64))  # convert("RGB"): alpha dropped
    fixture = Fixture(root=tmp_path, manifest={"pipeline": {"preprocess": record}},
                      rows=(FixtureRow("sticker.png", path, (0,)),), embeddings=np.zeros((1, 4), np.float32),
                      outputs=np.zeros((1, 2), np.float32), golden_pixels={"sticker.png": golden})

    def white(p):
        with Image.open(p) as image:
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return to_pixels(resize_crop(Image.alpha_composite(background, image.convert("RGBA")).convert("RGB"),
                                         short=64, crop=64))

    (finding,) = findings_for(fixture, spec, white)
    assert finding.detector == "pixels.alpha"
    assert "composites transparent images onto white" in finding.cause


def test_jpeg_from_another_encoder_is_an_estimate_within_a_loose_budget(dnn):
    def other_encoder(image: Image.Image, quality: int) -> Image.Image:
        """An encoder with quantisation tables of its own: Pillow's at ``quality``, a third of the entries + 1."""
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        tables = Image.open(io.BytesIO(buffer.getvalue())).quantization
        own = [[v + (i % 3 == 0) for i, v in enumerate(table)] for table in tables.values()]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", qtables=own)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    (finding,) = findings_for(*dnn, lambda p: to_pixels(resize_crop(other_encoder(opened(p), 85))))
    assert finding.detector == "pixels.jpeg"
    # The closest fit is named with its quality, and said not to be within the budget.
    assert "JPEG" in finding.evidence and "about quality 85" in finding.evidence
    assert "not within the pixel budget" in finding.evidence
    assert finding.max_abs > 1e-3  # stated, not hidden


def test_the_variants_never_include_the_reference_itself(dnn, mlp):
    from parity.explain.detectors.geometry import geometry_variants
    from parity.explain.detectors.pixels import Finish, per_pixel_variants, reference_unit
    from parity.libraries import describe_record

    reference = Finish("rgb", "unit", "reference", tuple(CLIP_MEAN.tolist()), tuple(CLIP_STD.tolist()))
    variants = per_pixel_variants(reference)
    assert variants and all(1 <= len(v.changed) <= 2 for v in variants)
    assert not any(v.how.norm == "openai_clip" for v in variants)  # the reference's own preset
    fixture, _ = dnn
    name = next(iter(fixture.golden_pixels))
    unit = reference_unit(fixture.golden_pixels[name], reference)
    assert np.array_equal(unit * 255, np.round(unit * 255))  # back on the 8-bit grid
    for fx in (dnn[0], mlp[0]):
        config = describe_record(fx.pipeline["preprocess"], source="test")
        built = geometry_variants(config)
        assert {"interpolation", "crop_pct", "squash"} <= {name for name, *_ in built}
        assert not any(label == config.interpolation for name, label, *_ in built if name == "interpolation")


def test_torch_tensor_resize_without_antialiasing(dnn):
    import torchvision.transforms.functional as TF

    def shipped(path):  # resize the uint8 tensor with torch, antialias off (torchvision's default before 0.17)
        x = TF.pil_to_tensor(opened(path))
        x = TF.center_crop(TF.resize(x, 336, interpolation=TF.InterpolationMode.BICUBIC, antialias=False), 336)
        return to_pixels(Image.fromarray(x.permute(1, 2, 0).numpy()))

    (finding,) = findings_for(*dnn, shipped)
    assert finding.detector == "pixels.resize_backend+antialias"
    shipped_side, _, reference_side = finding.cause.partition("; ")
    assert "torch" in shipped_side and "without antialiasing" in shipped_side
    assert "Pillow" in reference_side and "antialias=True" in reference_side
