"""What a person hands the app, checked before it reaches the model: an uploaded file becomes an RGB PIL image or
an :class:`AppInputError` whose message the page shows (the app keeps running)."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

__all__ = ["MAX_PIXELS", "AppInputError", "read_image", "to_rgb"]

# Larger files are refused before they are decoded: a 100 MP image costs 300 MB and seconds to decode, for an
# input the model sees at a few hundred pixels a side.
MAX_PIXELS = 40_000_000


class AppInputError(ValueError):
    """An input the app cannot use; the message says why and what to do, in one sentence."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB: grey, palette and CMYK images converted, transparent ones laid on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def read_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image file at ``path`` as an RGB PIL image, turned upright by its EXIF orientation.

    Raises :class:`AppInputError` for a file PIL cannot decode (not an image, truncated) and for an image of more
    than ``max_pixels`` pixels, which is refused from its header, before decoding."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _too_large(name, width, height, max_pixels)
                return to_rgb(ImageOps.exif_transpose(im))  # the full decode: truncated files fail here
    except Image.DecompressionBombError as exc:  # PIL refuses it before the header is read back
        raise AppInputError(f"{name} is too large to read ({exc}); downscale it to at most "
                            f"{max_pixels / 1e6:.0f} MP first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, AppInputError):
            raise
        raise AppInputError(f"{name} is not an image the app can read ({type(exc).__name__}: {exc}); upload a "
                            "JPEG, PNG, WebP, BMP, GIF or TIFF file") from None


def _too_large(name: str, width: int, height: int, max_pixels: int) -> AppInputError:
    return AppInputError(f"{name} is {width} × {height} px ({width * height / 1e6:.0f} MP); the app reads images "
                         f"of up to {max_pixels / 1e6:.0f} MP: downscale it first")
