"""Decoding: the one image loader shared by the reference and the candidate."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from parity.errors import FixtureError

__all__ = ["load_image"]


def load_image(path: str | Path, *, exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` to an RGB image: EXIF orientation first, then ``convert("RGB")``.

    The order matters: transposing after conversion would drop the EXIF tag, and
    converting palette/alpha/16-bit modes differently on the two sides is a silent drift.

    Raises:
        FixtureError: the file is missing or is not a decodable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return (ImageOps.exif_transpose(image) if exif_transpose else image).convert("RGB")
    except FileNotFoundError as e:
        raise FixtureError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FixtureError(f"cannot decode image {path}: {e}") from e
