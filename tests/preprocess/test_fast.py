"""numpy_preprocess against the libraries' own transforms: the same float32 pixels, max abs 0.

Exact equality holds on any machine because both sides run the same operations in the same
process: Pillow's resize (integer fixed point on uint8 in both), then one IEEE float32 rounding
per step (u8 / 255, * 255, - mean, / std) in the same order. Pixels stored by another machine
(the fixture's golden pixels) are held to a stated budget instead.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from parity.preprocess.fast import TorchPreprocessOnly, numpy_preprocess
from parity.store.images import decode_image
from parity.libraries import create_backbone, create_transform, describe_record, get, resolve_preprocess
from parity.model.pipeline import preprocess_record
from parity.preprocess.transform import (create_hf_preprocess, create_open_clip_preprocess, create_preprocess,
                               describe_data_config)
from parity.preprocess.config import PreprocessConfig
from parity.spec import CHANNEL_ORDERS, CROP_MODES, INTERPOLATIONS, MEAN_STD_PRESETS, VALUE_SCALES, load_spec

ROOT = Path(__file__).resolve().parents[2]
# (width, height): single pixels, odd sides, both orientations, extreme aspect ratios
SIZES = ((1, 1), (2, 3), (7, 5), (31, 17), (64, 64), (97, 203), (300, 149), (40, 420))
VARIANTS = tuple(itertools.product(CHANNEL_ORDERS, VALUE_SCALES, MEAN_STD_PRESETS))


def _image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over a gradient: every resampling filter's taps see both sharp edges and smooth ramps."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(-60, 61, (height, width, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def _describe(record: dict) -> PreprocessConfig:
    """A manifest record as the runners read it back: through JSON, then the library's description."""
    return describe_record(json.loads(json.dumps(record)), source="test")


def assert_same(reference, config: PreprocessConfig, images) -> None:
    fast = numpy_preprocess(config)
    for image in images:
        try:
            expected = reference(image).numpy()
        except ValueError as e:  # e.g. a side resized to 0 pixels: Pillow refuses it either way
            with pytest.raises(type(e), match=re.escape(str(e))):
                fast(image)
            continue
        got = fast(image)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert got.shape == expected.shape, (image.size, config)
        if not np.array_equal(got, expected):
            diff = np.abs(got.astype(np.float64) - expected)
            raise AssertionError(f"{image.size} under {config}: {int((diff > 0).sum())} / {diff.size} values "
                                 f"differ, max abs {diff.max():.3g}")


def _timm_record(interpolation, crop_mode, crop_pct, input_size, variant, backend="pil") -> tuple[dict, dict]:
    channel_order, value_scale, preset = variant
    mean, std = MEAN_STD_PRESETS[preset]
    data_config = dict(input_size=input_size, interpolation=interpolation, crop_mode=crop_mode, crop_pct=crop_pct,
                       mean=mean, std=std)
    record = describe_data_config(data_config, resize_backend=backend, channel_order=channel_order,
                                  value_scale=value_scale)
    return data_config, record


@pytest.mark.parametrize("crop_mode", CROP_MODES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_timm_eval_transform(interpolation, crop_mode):
    """Every interpolation and crop mode, crop_pct below, at and above 1, square and non-square targets."""
    cases = itertools.product((0.875, 0.9, 1.0, 1.15), ((3, 224, 224), (3, 48, 64), (3, 65, 33)))
    for k, (crop_pct, input_size) in enumerate(cases):
        variant = VARIANTS[k % len(VARIANTS)]
        data_config, record = _timm_record(interpolation, crop_mode, crop_pct, input_size, variant)
        reference = create_preprocess(data_config, channel_order=variant[0], value_scale=variant[1])
        images = [_image(w, h, k) for w, h in SIZES[k % 3::3]]
        assert_same(reference, _describe(record), images)


@settings(max_examples=40, deadline=None)
@given(interpolation=st.sampled_from(INTERPOLATIONS), crop_mode=st.sampled_from(CROP_MODES),
       crop_pct=st.floats(0.3, 1.6), side=st.tuples(st.integers(1, 72), st.integers(1, 72)),
       image=st.tuples(st.integers(1, 150), st.integers(1, 150)), variant=st.sampled_from(VARIANTS),
       seed=st.integers(0, 2**16))
def test_timm_eval_transform_drawn(interpolation, crop_mode, crop_pct, side, image, variant, seed):
    assume(min(side) / crop_pct >= 1)  # a resize to 0 pixels: the description divides by it when built
    data_config, record = _timm_record(interpolation, crop_mode, crop_pct, (3, *side), variant)
    reference = create_preprocess(data_config, channel_order=variant[0], value_scale=variant[1])
    assert_same(reference, _describe(record), [_image(*image, seed)])


def _encoded(mode: str) -> bytes:
    """An image stored in ``mode``, as a file would hold it."""
    rgb = _image(53, 37, 7)
    if mode == "I;16":
        wide = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
        image, fmt = Image.fromarray(wide), "PNG"  # uint16: mode I;16
    elif mode == "P+transparency":
        image, fmt = rgb.convert("P"), "PNG"
        image.info["transparency"] = 3
    elif mode == "CMYK":
        image, fmt = rgb.convert("CMYK"), "JPEG"
    elif mode == "exif":
        image, fmt = rgb, "JPEG"
        exif = image.getexif()
        exif[0x0112] = 6  # rotated 90 degrees: decode turns it upright first
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", exif=exif)
        return buffer.getvalue()
    else:
        image, fmt = rgb.convert(mode), "PNG"
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"transparency": 3} if mode == "P+transparency" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16", "1", "exif"])
def test_every_image_mode_as_decoded(mode):
    """Decoded by parity.store.images first, as every runner does; then the same pixels whichever way preprocessed."""
    image, _ = decode_image(_encoded(mode))
    for interpolation, crop_mode in (("bicubic", "center"), ("lanczos", "border"), ("box", "squash")):
        data_config, record = _timm_record(interpolation, crop_mode, 0.9, (3, 40, 30), ("rgb", "unit", "imagenet"))
        assert_same(create_preprocess(data_config), _describe(record), [image])


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_open_clip_image_transform(interpolation, resize_mode):
    """open_clip's eval transform: its ResizeKeepRatio, CenterCropOrPad with fill_color, squash without a crop."""
    for k, (size, fill) in enumerate(itertools.product((224, (48, 64), (65, 33)), (0, 200))):
        channel_order, value_scale, preset = VARIANTS[k % len(VARIANTS)]
        mean, std = MEAN_STD_PRESETS[preset]
        reference = create_open_clip_preprocess(size, mean=mean, std=std, interpolation=interpolation,
                                                resize_mode=resize_mode, fill_color=fill,
                                                channel_order=channel_order, value_scale=value_scale)
        cfg = {"size": size, "mode": "RGB", "mean": mean, "std": std, "interpolation": interpolation,
               "resize_mode": resize_mode, "fill_color": fill}
        record = describe_data_config({"library": "open_clip", **cfg}, channel_order=channel_order,
                                      value_scale=value_scale)
        images = [_image(w, h, k) for w, h in SIZES[k % 2::2]]
        assert_same(reference, _describe(record), images)


def _hf_config(resample: int, size: dict, crop: dict | None, rescale: float | None, normalize: bool) -> dict:
    config = {"image_processor_type": "CLIPImageProcessor", "size": size, "resample": resample,
              "do_normalize": normalize, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    config.update({"crop_size": crop} if crop else {"do_center_crop": False})
    config.update({"rescale_factor": rescale} if rescale else {"do_rescale": False})
    return config


@pytest.mark.parametrize("resample", range(6))
def test_transformers_slow_processor(resample):
    """CLIPImageProcessorPil: shortest_edge and height/width sizes, crops that pad, any rescale, normalize off."""
    cases = itertools.product(({"shortest_edge": 224}, {"shortest_edge": 31}, {"height": 50, "width": 70}),
                              ({"height": 224, "width": 224}, {"height": 41, "width": 30}, None),
                              (1 / 255, 1 / 127.5, None), (True, False))
    for k, (size, crop, rescale, normalize) in enumerate(cases):
        if crop is None and "shortest_edge" in size and k % 2:
            continue  # no crop: the output follows the image; kept for half the cases to bound the time
        config = _hf_config(resample, size, crop, rescale, normalize)
        channel_order, value_scale, _ = VARIANTS[k % len(VARIANTS)]
        reference = create_hf_preprocess(config, processor="slow", channel_order=channel_order,
                                         value_scale=value_scale)
        record = {"library": "transformers", "processor": "slow", "channel_order": channel_order,
                  "value_scale": value_scale, **config}
        assert_same(reference, _describe(record), [_image(w, h, k) for w, h in SIZES[k % 4::4]])


def test_unit_pixels_are_every_librarys():
    """All 256 byte values: torchvision's to_tensor (float32 / 255) and transformers' rescale (float64 * 1/255,
    then float32) give the same [0, 1] value, which is the one numpy_preprocess makes."""
    import torch
    from torchvision.transforms.functional import to_tensor
    from transformers.image_transforms import rescale

    from parity.preprocess.fast import NumpyPreprocess

    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    ours = NumpyPreprocess.unit(values)
    torchvision = to_tensor(Image.fromarray(values)).numpy()
    transformers = rescale(values.transpose(2, 0, 1), 1 / 255)
    assert np.array_equal(ours, torchvision) and np.array_equal(ours, transformers)
    byte = (torch.from_numpy(torchvision) * 255).numpy()
    assert np.array_equal(ours * np.float32(255), byte)


def _spec_files() -> list[Path]:
    return sorted([*ROOT.glob("specs/*.toml"), *ROOT.glob("examples/*/parity.toml")])


@pytest.mark.parametrize("path", _spec_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_bundled_spec_preprocessing(path):
    """What build_pipeline would assemble for each bundled spec, against its recorded description."""
    spec = load_spec(path)
    backbone = create_backbone(spec, meta=get(spec.backbone.library).meta_create)
    transform, config = resolve_preprocess(spec, backbone)
    described = _describe(preprocess_record(spec, config))
    if described.resize_backend != "pil":  # the transformers fast processor resizes with torch
        with pytest.raises(TorchPreprocessOnly, match="resize_backend 'tensor'"):
            numpy_preprocess(described)
        return
    assert_same(transform, described, [_image(w, h, 3) for w, h in SIZES])


def test_user_written_specs(tmp_path):
    """Specs written here, not bundled: a timm backbone with a partly pinned [preprocess] (the rest from its
    pretrained_cfg), and fully pinned fields of another style (border, lanczos, bgr bytes, non-square)."""
    dnn = ROOT / "fixtures" / "clip_dnn"
    tables = {
        "partly.toml": 'interpolation = "hamming"\ncrop_mode = "squash"\ncrop_pct = 0.95\n',
        "pinned.toml": ('interpolation = "lanczos"\ncrop_mode = "border"\ncrop_pct = 0.8\ninput_size = [3, 96, 72]\n'
                        'mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\nchannel_order = "bgr"\n'
                        'value_scale = "byte"\n'),
    }
    for name, table in tables.items():
        (tmp_path / name).write_text(textwrap.dedent(f"""\
            name = "user"
            fixtures = "{dnn}"
            [backbone]
            library = "timm"
            model = "vit_large_patch14_clip_quickgelu_336.openai"
            kwargs = {{ embed_dim = 64, depth = 2, num_heads = 2 }}
            checkpoint = "{dnn / 'backbone.safetensors'}"
            extract = "pre_logits"
            [preprocess]
            """) + table + textwrap.dedent(f"""\
            [head]
            class = "reference.models:MultiLabelRegressionNN"
            weights = "{dnn / 'dnnV1_model_best.pth'}"
            kwargs = {{ embedding_dim = 64, bias_cardinalities = [3, 4], num_outputs = 5, bias_dim = 8 }}
            """))
        spec = load_spec(tmp_path / name)
        transform, config = resolve_preprocess(spec, create_backbone(spec, meta=True))
        assert_same(transform, _describe(preprocess_record(spec, config)), [_image(w, h, 5) for w, h in SIZES])


def test_bundled_fixture_records():
    """Each fixture's recorded preprocessing, rebuilt by its library from the description; the transformers
    fixture's processor config also as the slow (PIL) processor, which numpy reproduces."""
    images = [_image(w, h, 11) for w, h in SIZES]
    for manifest in sorted(ROOT.glob("fixtures/*/manifest.json")):
        record = json.loads(manifest.read_text())["pipeline"]["preprocess"]
        described = _describe(record)
        if described.resize_backend != "pil":
            with pytest.raises(TorchPreprocessOnly):
                numpy_preprocess(described)
            record = {**record, "processor": "slow"}
            described = _describe(record)
        assert_same(create_transform(described), described, images)


@pytest.mark.parametrize("backend", ["tensor", "tensor_noaa"])
def test_torch_resize_backends_are_refused(backend):
    _, record = _timm_record("bicubic", "center", 0.9, (3, 224, 224), ("rgb", "unit", "imagenet"), backend)
    with pytest.raises(TorchPreprocessOnly, match="use the library transform"):
        numpy_preprocess(_describe(record))


def test_non_rgb_image_is_refused():
    from parity.errors import FixtureError

    _, record = _timm_record("bilinear", "center", 0.9, (3, 32, 32), ("rgb", "unit", "imagenet"))
    with pytest.raises(FixtureError, match="takes RGB images .* got mode L"):
        numpy_preprocess(_describe(record))(Image.new("L", (40, 40)))


def test_golden_pixels_without_torch():
    """In a fresh interpreter: the fixture's recorded preprocessing, described, built and run on its golden
    images, equals the stored golden pixels within 1e-6 (float32 rounding of values within +-3; observed 0),
    and torch, torchvision, timm, transformers and open_clip were never imported."""
    script = textwrap.dedent("""\
        import sys
        import numpy as np
        from parity.preprocess.fast import numpy_preprocess
        from parity.store.fixtures import load_fixture
        from parity.store.images import decode_image
        from parity.libraries import describe_record

        fixture = load_fixture("fixtures/clip_dnn")
        preprocess = numpy_preprocess(describe_record(fixture.pipeline["preprocess"], source="fixture"))
        worst = 0.0
        for row in fixture.rows:
            if row.name in fixture.golden_pixels:
                pixels = preprocess(decode_image(row.image)[0])
                worst = max(worst, float(np.abs(pixels - fixture.golden_pixels[row.name]).max()))
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in
                       ("torch", "torchvision", "timm", "transformers", "open_clip"))
        print(worst, len(fixture.golden_pixels), heavy)
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    worst, golden, heavy = done.stdout.split(maxsplit=2)
    assert heavy.strip() == "[]", heavy
    assert int(golden) > 0 and float(worst) <= 1e-6


def test_timing_print(capsys):
    """Not asserted: numpy vs the library transform per image on the bundled timm configuration."""
    record = json.loads((ROOT / "fixtures/clip_dnn/manifest.json").read_text())["pipeline"]["preprocess"]
    described = _describe(record)
    reference, fast = create_transform(described), numpy_preprocess(described)
    image = _image(640, 480, 0)
    for name, run in (("torch", reference), ("numpy", fast)):
        run(image)
        start = time.perf_counter()
        for _ in range(10):
            run(image)
        with capsys.disabled():
            print(f"\n{name}: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms per 640x480 image", end="")
