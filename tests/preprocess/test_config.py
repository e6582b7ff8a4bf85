"""Preprocessing descriptions across timm, open_clip and transformers, checked against the real libraries."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from PIL import Image

from parity.errors import SpecError
from parity.preprocess.transform import (
    MEAN_STD_PRESETS,
    PROCESSOR_BACKEND,
    create_hf_preprocess,
    create_hf_processor,
    create_open_clip_preprocess,
)
from parity.libraries import create_transform, resolve_source
from parity.libraries.open_clip import describe_open_clip
from parity.libraries.timm import describe_timm
from parity.libraries.transformers import describe_hf
from parity.preprocess.config import PreprocessConfig, crop_box
from parity.preprocess.diff import explain_preprocess
from tests.support.paths import EXAMPLE_FIXTURES

pytest.importorskip("open_clip")
pytest.importorskip("transformers.models.clip")

IMAGES = EXAMPLE_FIXTURES / "images"
SHIFTED = ("coins.png", "rocket.jpg", "text.png")
UNSHIFTED = ("astronaut.png", "chelsea.png")
TIMM_B32 = "timm:vit_base_patch32_clip_quickgelu_224.openai"
OPEN_CLIP_B32 = "open_clip:ViT-B-32-quickgelu"
MEAN, STD = MEAN_STD_PRESETS["openai_clip"]


def explain(a: PreprocessConfig, b: PreprocessConfig, **options):
    """`explain_preprocess` running the libraries' own transforms, as `parity explain-preprocess` does."""
    return explain_preprocess(a, b, transform=create_transform, **options)


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: Image.open(IMAGES / name).convert("RGB") for name in SHIFTED + UNSHIFTED}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A CLIP preprocessor_config.json as transformers saves it (the slow class saves the same type name)."""
    from transformers.models.clip import CLIPImageProcessor

    directory = tmp_path_factory.mktemp("hf")
    CLIPImageProcessor().to_json_file(directory / "preprocessor_config.json")
    return directory


@pytest.fixture(scope="module")
def sources(hf_dir) -> dict[str, PreprocessConfig]:
    return {"timm": resolve_source(TIMM_B32), "open_clip": resolve_source(OPEN_CLIP_B32),
            "fast": resolve_source(f"hf:{hf_dir}"), "slow": resolve_source(f"hf-slow:{hf_dir}")}


def test_timm_crop_pct_against_open_clip(sources, images):
    timm_, open_clip_ = sources["timm"], sources["open_clip"]
    assert (timm_.resize_size, open_clip_.resize_size) == (248, 224)  # floor(224 / 0.9) = 248
    assert timm_.crop_pct == pytest.approx(224 / 248) and open_clip_.crop_pct == 1.0

    explanation = explain(timm_, open_clip_, images=[("astronaut.png", images["astronaut.png"])])

    assert {"resize_size", "crop_pct"} <= set(explanation.fields)
    assert not explanation
    effect = {d.field: d.effect for d in explanation.differences}["resize_size"]
    # Each library's resize, the crop they share, and which one zooms in.
    assert "timm" in effect and "248" in effect and "open_clip" in effect and " 224 " in effect
    assert "224x224" in effect and "timm crops tighter" in effect
    (astronaut,) = explanation.images
    assert astronaut.shift is None and astronaut.max_abs > 0.5  # different zoom, not a shift


def test_open_clip_against_hf_slow_differs_only_by_crop_offset(sources, images):
    explanation = explain(sources["open_clip"], sources["slow"], images=list(images.items()))

    # convert_rgb (alpha dropped vs composited on white) cannot act on RGB images
    assert explanation.fields == ("crop_offset_rounding", "convert_rgb")
    crop = explanation.differences[0]
    assert (crop.a, crop.b) == ("round_half_even", "floor")
    assert "one-pixel crop shift" in crop.effect
    by_name = {image.name: image for image in explanation.images}
    for name in SHIFTED:
        assert by_name[name].shift == (0, -1), name
        assert by_name[name].max_abs > 1.0, name
    for name in UNSHIFTED:
        assert by_name[name].shift == (0, 0), name
        assert by_name[name].max_abs == 0, name


def test_predicted_shift_explains_every_differing_pixel(sources, images):
    a, b = create_transform(sources["open_clip"]), create_transform(sources["slow"])
    for name in SHIFTED:
        dy, dx = (q - p for p, q in zip(crop_box(sources["open_clip"], images[name])[:2],
                                        crop_box(sources["slow"], images[name])[:2]))
        assert (dy, dx) == (0, -1)
        ua, ub = a.geometry(images[name]), b.geometry(images[name])
        # b's crop starts one column left: its columns 1.. are a's columns ..-1, bit for bit
        assert ub[:, :, 1:].equal(ua[:, :, :-1]), name


@pytest.mark.parametrize("size, left_round, left_floor", [
    ((303, 384), 30, 29),   # coins: resized 224x283, excess 59 -> 29.5
    ((427, 640), 56, 55),   # rocket: 224x335, excess 111 -> 55.5
    ((172, 448), 180, 179),  # text: 224x583, excess 359 -> 179.5
    ((328, 400), 24, 24),   # horse: 224x273, excess 49 -> 24.5 rounds half to even: no shift
    ((300, 451), 56, 56),   # chelsea: 224x336, even excess
])
def test_crop_box_rounding_rules(sources, size, left_round, left_floor):
    torchvision_box = crop_box(sources["open_clip"], size)
    hf_box = crop_box(sources["slow"], size)
    assert torchvision_box.left == left_round and hf_box.left == left_floor
    assert torchvision_box.top == hf_box.top == 0
    assert torchvision_box[2:] == hf_box[2:]


def test_hf_slow_against_fast_differs_by_resize_kernel(sources, images):
    explanation = explain(sources["slow"], sources["fast"], images=list(images.items()))

    assert explanation.fields == ("resize_backend",)
    assert (explanation.differences[0].a, explanation.differences[0].b) == ("pil", "tensor")
    for image in explanation.images:
        assert image.shift == (0, 0)
        # PIL and torch bicubic round differently: one or two uint8 levels on a few pixels
        assert 0 < image.max_abs_unit <= 2 / 255 + 1e-6, image.name
        assert image.mean_abs < 1e-3, image.name


@pytest.mark.parametrize("key", ["timm", "open_clip", "fast", "slow"])
def test_description_against_itself(sources, images, key):
    explanation = explain(sources[key], sources[key], images=[("chelsea.png", images["chelsea.png"])])

    assert explanation.differences == ()
    assert explanation.images[0].max_abs == 0
    assert bool(explanation) is True


@pytest.mark.parametrize("processor", ["fast", "slow"])
def test_create_hf_preprocess_matches_the_processor(hf_dir, images, processor):
    transform = create_hf_preprocess(hf_dir / "preprocessor_config.json", processor=processor)
    reference = create_hf_processor(hf_dir, processor=processor)

    assert transform.resize_backend == PROCESSOR_BACKEND
    for name, image in images.items():
        expected = reference(image, return_tensors="pt")["pixel_values"][0]
        assert (transform(image) - expected).abs().max() <= 1e-6, name
        unit = transform.geometry(image)
        assert 0 <= unit.min() and unit.max() <= 1, name


def test_create_open_clip_preprocess_matches_open_clip(images):
    import open_clip

    reference = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD)
    transform = create_open_clip_preprocess(224, mean=MEAN, std=STD)
    for name, image in images.items():
        assert transform(image).equal(reference(image)), name


def test_timm_source_reads_the_same_config_as_a_meta_model():
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(TIMM_B32.removeprefix("timm:"), pretrained=False)
    from_model = describe_timm(timm.data.resolve_model_data_config(model), source=TIMM_B32)
    assert resolve_source(TIMM_B32) == from_model


def test_sources_accept_a_file_or_its_directory_and_a_pretrained_tag(hf_dir):
    assert describe_hf(hf_dir, processor="slow", source="x") == describe_hf(
        hf_dir / "preprocessor_config.json", processor="slow", source="x")
    tagged = resolve_source(f"{OPEN_CLIP_B32}@openai")
    assert tagged.source == f"{OPEN_CLIP_B32}@openai"
    assert dataclasses.replace(tagged, source=OPEN_CLIP_B32) == resolve_source(OPEN_CLIP_B32)


def test_padding_and_squash_geometry():
    squash = describe_open_clip(224, mean=MEAN, std=STD, resize_mode="squash")
    assert squash.crop_offset_rounding is None and squash.pad_fill is None  # never any slack or padding
    pads = describe_hf({"size": {"shortest_edge": 203}}, processor="slow")
    assert (pads.pad_offset_rounding, pads.pad_fill) == ("floor", (0, 0, 0))
    assert describe_hf({"size": {"shortest_edge": 203}}, processor="fast").pad_offset_rounding == "ceil"
    # 203 short side, 224 crop: 21 pixels of padding, the odd one first (slow) or last (fast)
    assert crop_box(pads, (203, 300)).top == -11
    border = describe_timm({"input_size": (3, 224, 224), "crop_pct": 1.0, "crop_mode": "border", "mean": MEAN})
    assert border.resize == "longest_edge" and border.pad_fill == (123, 117, 104)


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "preprocessor_config.json"
    with pytest.raises(SpecError) as info:
        create_hf_preprocess(missing)
    message = str(info.value)
    assert message.startswith(f"preprocessor config not found: {missing}\n")
    assert "preprocessor_config.json" in message.splitlines()[1]  # what to pass instead
    with pytest.raises(SpecError, match="preprocessor config not found"):
        resolve_source(f"hf:{tmp_path}")


def test_unknown_source_prefix_lists_the_forms():
    with pytest.raises(SpecError) as info:
        resolve_source("torchvision:resnet50")
    message = str(info.value)
    assert "'torchvision'" in message and "'torchvision:resnet50'" in message
    assert message.partition("expected one of ")[2].split(", ") == [
        "timm:MODEL_NAME", "hf:PATH", "hf-slow:PATH", "open_clip:MODEL_NAME[@PRETRAINED_TAG]"]
    with pytest.raises(SpecError, match="is not PREFIX:VALUE"):
        resolve_source("vit_base_patch32_clip_224")
    with pytest.raises(SpecError, match="unknown timm model 'no_such_model'"):
        resolve_source("timm:no_such_model")
    with pytest.raises(SpecError, match="unknown open_clip model 'No-Such-Model'"):
        resolve_source("open_clip:No-Such-Model")


def test_unsupported_processor_type_names_the_field(tmp_path):
    config = tmp_path / "preprocessor_config.json"
    config.write_text('{"image_processor_type": "SiglipImageProcessor"}')
    with pytest.raises(SpecError, match=r"^image_processor_type = 'SiglipImageProcessor' is not supported"):
        create_hf_preprocess(config)
    with pytest.raises(SpecError, match="image_processor_type"):
        describe_hf(tmp_path, processor="slow")
    with pytest.raises(SpecError, match=r"processor must be one of \('fast', 'slow'\), got 'medium'"):
        create_hf_preprocess({}, processor="medium")
    config.write_text("[1, 2]")
    with pytest.raises(SpecError, match="must hold a JSON object"):
        create_hf_preprocess(config)


def test_a_description_its_library_cannot_reproduce_is_refused(sources):
    edited = dataclasses.replace(sources["timm"], crop_offset_rounding="floor")
    with pytest.raises(SpecError) as info:
        create_transform(edited)
    message = str(info.value)
    assert message.startswith("timm cannot reproduce")
    assert "crop_offset_rounding = 'floor'" in message and "'round_half_even'" in message
    # The registry knows which library builds a description; an unknown one is refused with the known ones.
    with pytest.raises(SpecError) as info:
        create_transform(dataclasses.replace(sources["timm"], library="tensorflow"))
    message = str(info.value)
    assert "'tensorflow'" in message
    assert all(f"'{name}'" in message.partition("expected one of ")[2]
               for name in ("timm", "transformers-fast", "transformers-slow", "open_clip"))


def test_missing_extras_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(SpecError, match=r"pip install 'parity\[open-clip\]'"):
        create_open_clip_preprocess(224, mean=MEAN, std=STD)
    monkeypatch.setitem(sys.modules, "transformers.models.clip", None)
    with pytest.raises(SpecError, match=r"pip install 'parity\[hf\]'"):
        create_hf_preprocess({})


def test_measuring_images_needs_the_transform_factory(sources, images):
    """preprocess_diff knows no library: without the registry's factory it cannot run a transform."""
    a, b = sources["timm"], sources["open_clip"]
    assert explain_preprocess(a, b).fields == explain(a, b).fields  # fields alone need no transform
    with pytest.raises(SpecError, match="pass transform=parity.libraries.create_transform"):
        explain_preprocess(a, b, images=[("chelsea.png", images["chelsea.png"])])
