"""load_image: every mode becomes RGB the same way, EXIF orientation first, bad files are FixtureErrors."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from parity.errors import FixtureError
from parity.store.images import decode_image, load_image

EXIF_ORIENTATION = 0x0112


def _rgb(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale(tmp_path):
    Image.new("L", (2, 1), 77).save(tmp_path / "l.png")
    assert _rgb(tmp_path / "l.png").tolist() == [[[77, 77, 77]] * 2]


def test_grayscale_with_alpha_drops_the_alpha(tmp_path):
    Image.new("LA", (1, 1), (77, 0)).save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png").tolist() == [[[77, 77, 77]]]


def test_rgba_drops_the_alpha_without_premultiplying(tmp_path):
    Image.new("RGBA", (1, 1), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert _rgb(tmp_path / "rgba.png").tolist() == [[[10, 20, 30]]]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").info.get("transparency") == 0
    assert _rgb(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 25600, 65535]], dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    assert _rgb(tmp_path / "i16.png")[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 means "rotate 90 degrees clockwise to display": the stored left half ends up on top."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    assert load_image(tmp_path / "rotated.jpg", exif_transpose=False).size == (40, 20)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 50  # top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 50  # bottom: blue


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(FixtureError, match="cannot decode image .*empty.png"):
        load_image(tmp_path / "empty.png")


def test_text_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image\n")
    with pytest.raises(FixtureError, match="cannot decode image .*notes.jpg"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(FixtureError, match="cannot decode image"):
        load_image(tmp_path / "a.png")


def test_missing_file(tmp_path):
    with pytest.raises(FixtureError) as info:
        load_image(tmp_path / "nope.png")
    assert str(info.value) == f"image not found: {tmp_path / 'nope.png'}"
    assert isinstance(info.value, OSError)


def test_32_bit_integer_images_in_the_16_bit_range_are_scaled_like_16_bit(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)).save(path)
    image, note = decode_image(path)
    assert np.asarray(image)[0, 0, 0] == 128 and note == "I -> RGB (16-bit range scaled to 8-bit)"


@pytest.mark.parametrize(("array", "reason"), [
    (np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "mode F (32-bit float) with values 0.0..1.0"),
    (np.arange(-8, 8, dtype=np.int32).reshape(4, 4), "mode I (32-bit integer) with values -8..7"),
])
def test_images_with_no_faithful_8_bit_mapping_are_refused_with_the_reason(tmp_path, array, reason):
    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(FixtureError, match=re.escape(reason)):
        decode_image(path)


def test_a_resize_that_would_be_huge_is_refused_before_it_allocates():
    from parity.store.images import check_resize

    check_resize((3, 2000), 336.0)  # 75M pixels after the resize: allowed
    with pytest.raises(FixtureError, match=r"1x20000 resized to a shortest edge of 336 would be 2.26e\+09 pixels"):
        check_resize((1, 20000), 336.0)


def test_a_fixture_image_that_changed_after_loading_is_refused(tmp_path):
    from parity.errors import FixtureChangedError
    from parity.store.fixtures import FixturePath

    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert decode_image(FixturePath(path, sha256=expected))[0].size == (8, 8)
    Image.new("RGB", (8, 8), "white").save(path)
    with pytest.raises(FixtureChangedError, match="changed after its fixture was verified"):
        decode_image(FixturePath(path, sha256=expected))
