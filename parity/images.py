"""Decoding: the one image loader shared by the reference and the candidate."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from parity.errors import FixtureError

__all__ = ["decode_image", "decode_input", "load_image"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def decode_image(path: str | Path | bytes, *, exif_transpose: bool = True) -> tuple[Image.Image, str]:
    """Decode ``path`` (or encoded image ``bytes``) to RGB and say what conversion that took
    (``""`` when it already was RGB).

    Order matters and is the same for reference and candidate: EXIF orientation first
    (converting first would drop the tag), then one explicit conversion per mode.

    Raises:
        FixtureError: missing file, not an image, truncated data, or a decompression bomb.
    """
    if isinstance(path, (bytes, bytearray)):
        import io

        source, path = io.BytesIO(path), f"<{len(path)} bytes>"
    else:
        source = path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a release gate refuses both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                oriented = ImageOps.exif_transpose(image) if exif_transpose else image
                return _to_rgb(oriented)
    except FileNotFoundError as e:
        raise FixtureError(f"image not found: {path}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FixtureError(f"refusing {path}: decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FixtureError(f"cannot decode image {path}: {e}") from e


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    mode = image.mode
    if mode == "RGB":
        return image.copy(), ""
    if mode in _SIXTEEN_BIT:
        # convert("RGB") would clip every value above 255 to white; scale to 8 bits instead.
        eight = image.point(lambda v: v / 256).convert("L")
        return eight.convert("RGB"), f"{mode} -> RGB (16-bit scaled to 8-bit)"
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB"), "P with transparency -> RGBA -> RGB (alpha dropped)"
    note = {"RGBA": "alpha dropped", "LA": "alpha dropped", "PA": "alpha dropped", "CMYK": "naive CMYK inversion"}
    return image.convert("RGB"), f"{mode} -> RGB" + (f" ({note[mode]})" if mode in note else "")


def decode_input(image, *, exif_transpose: bool = True) -> tuple[Image.Image, str]:
    """Any image a service is handed, as RGB, with the conversion it took (see `decode_image`).

    Paths and encoded ``bytes`` are decoded by `decode_image`; a PIL image of any mode and a
    numpy ``(H, W)`` or ``(H, W, C)`` uint8 array (C = 1, 3 or 4, RGB(A) channel order) go
    through the same EXIF step and the same per-mode conversion.

    Raises:
        FixtureError: the input cannot be decoded, or is an array of another dtype or shape.
    """
    if isinstance(image, (str, Path, bytes, bytearray)):
        return decode_image(image, exif_transpose=exif_transpose)
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image)
    if type(image).__module__ == "numpy" and hasattr(image, "dtype"):
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
            raise FixtureError(f"cannot decode a numpy array of dtype {array.dtype} and shape {array.shape}: "
                               "expected uint8 (H, W) or (H, W, C) with C = 1, 3 or 4 (RGB/RGBA order). "
                               "Note: convert float arrays with (a * 255).round().astype(np.uint8).")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        decoded, note = _to_rgb(Image.fromarray(np.ascontiguousarray(array)))
        return decoded, f"numpy {array.dtype} {tuple(array.shape)}" + (f": {note}" if note else "")
    raise FixtureError(f"cannot decode a {type(image).__name__}: expected a path, encoded bytes, a PIL image "
                       "or a numpy uint8 (H, W, C) array")


def load_image(path: str | Path, *, exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` to an RGB image (see `decode_image`)."""
    return decode_image(path, exif_transpose=exif_transpose)[0]
