"""Decoding: the one image loader shared by the reference and the candidate."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from parity.errors import FixtureChangedError, FixtureError

__all__ = ["decode_image", "decode_input", "load_image", "check_resize", "MAX_RESIZED_PIXELS"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# A resize to the model's size can make a tiny image huge (1x20000 -> 336x6.7M pixels): bound the result.
MAX_RESIZED_PIXELS = 1 << 27


def decode_image(path: str | Path | bytes, *, exif_transpose: bool = True, sha256: str = "") -> tuple[Image.Image, str]:
    """Decode ``path`` (or encoded image ``bytes``) to RGB and say what conversion that took
    (``""`` when it already was RGB).

    Order matters and is the same for reference and candidate: EXIF orientation first
    (converting first would drop the tag), then one explicit conversion per mode.

    The file is read once; when ``sha256`` is given (or ``path`` is a fixture image that carries
    one) those bytes must match it, so a fixture replaced after it was verified is never mixed in.

    Raises:
        FixtureError: missing file, not an image, truncated data, a decompression bomb, a mode with
            no faithful RGB conversion, or bytes that no longer match the fixture's checksum.
    """
    expected = sha256 or getattr(path, "sha256", "")  # before Path() makes a plain copy
    if isinstance(path, (bytes, bytearray)):
        data, path = bytes(path), Path(f"<{len(path)} bytes>")
    else:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise FixtureError(f"image not found: {path}") from e
        except OSError as e:
            raise FixtureError(f"cannot read image {path}: {e}") from e
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise FixtureChangedError(
            f"{path} changed after its fixture was verified (its sha256 no longer matches the manifest).\n"
            "Note: the fixture was regenerated or edited while this ran; run it again."
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a release gate refuses both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                oriented = ImageOps.exif_transpose(image) if exif_transpose else image
                return _to_rgb(oriented, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FixtureError(f"refusing {path}: decompression bomb ({e})") from e
    except UnidentifiedImageError as e:  # PIL's message names an in-memory buffer, not the file
        raise FixtureError(f"cannot decode image {path}: not an image format PIL recognises") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise FixtureError(f"cannot decode image {path}: {e}") from e
    except MemoryError as e:
        raise FixtureError(f"cannot decode image {path}: it needs more memory than is available") from e


def check_resize(size: tuple[int, int], shortest_edge: float, *, path: str | Path = "image") -> None:
    """Refuse an image whose resize to ``shortest_edge`` would exceed `MAX_RESIZED_PIXELS`.

    Raises:
        FixtureError: the resized image would be too large (an extreme aspect ratio).
    """
    width, height = size
    scale = shortest_edge / max(min(width, height), 1)
    resized = width * height * max(scale, 1.0) ** 2
    if resized > MAX_RESIZED_PIXELS:
        raise FixtureError(
            f"refusing {path}: {width}x{height} resized to a shortest edge of {shortest_edge:g} would be "
            f"{resized:.3g} pixels (at most {MAX_RESIZED_PIXELS}); its aspect ratio is too extreme for this model.\n"
            "Note: crop or pad the image to a sane aspect ratio before it reaches the model."
        )


def _to_rgb(image: Image.Image, path: Path) -> tuple[Image.Image, str]:
    mode = image.mode
    if mode == "RGB":
        return image.copy(), ""
    if mode in ("I", "F"):
        # convert("RGB") clips 32-bit values to 0..255: a 16-bit scan becomes uniformly white, floats black.
        low, high = image.getextrema()
        if mode == "I" and 0 <= low and high <= 65535:
            eight = image.point(lambda v: v / 256).convert("L")
            return eight.convert("RGB"), "I -> RGB (16-bit range scaled to 8-bit)"
        raise FixtureError(
            f"refusing {path}: mode {mode} ({'32-bit float' if mode == 'F' else '32-bit integer'}) with values "
            f"{low}..{high} has no defined mapping to 8-bit RGB.\n"
            "Note: convert it to an 8-bit or 16-bit image where it is produced, choosing the scaling on purpose."
        )
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
    name = Path(getattr(image, "filename", "") or "<image>")
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image, name)
    if type(image).__module__ == "numpy" and hasattr(image, "dtype"):
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
            raise FixtureError(f"cannot decode a numpy array of dtype {array.dtype} and shape {array.shape}: "
                               "expected uint8 (H, W) or (H, W, C) with C = 1, 3 or 4 (RGB/RGBA order). "
                               "Note: convert float arrays with (a * 255).round().astype(np.uint8).")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        decoded, note = _to_rgb(Image.fromarray(np.ascontiguousarray(array)), Path("<numpy array>"))
        return decoded, f"numpy {array.dtype} {tuple(array.shape)}" + (f": {note}" if note else "")
    raise FixtureError(f"cannot decode a {type(image).__name__}: expected a path, encoded bytes, a PIL image "
                       "or a numpy uint8 (H, W, C) array")


def load_image(path: str | Path, *, exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` to an RGB image (see `decode_image`)."""
    return decode_image(path, exif_transpose=exif_transpose)[0]
