"""Safe image decoding, shared by every stage.

`probe_image` checks bytes cheaply at ingest (header, size after EXIF orientation, pixel limit, truncation);
`decode_image` returns a fully decoded RGB image for captioning and feature extraction. Both raise
`ImageDecodeError` with a one-line reason for empty, truncated, corrupt, oversized or non-image bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from storage.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 128_000_000  # 4x the largest SA-1B original (~3300x4950); real bombs are far larger
EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # these rotate by 90 degrees: width and height swap
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}

Verify = Literal["header", "full"]


@dataclass(frozen=True)
class ImageInfo:
    """What a probe learns without a full decode. width/height are after EXIF orientation."""

    format: str
    mode: str
    width: int
    height: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # above 2x Image.MAX_IMAGE_PIXELS, whatever max_pixels says
        raise ImageDecodeError(f"decompression bomb refused by Pillow: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image (first bytes {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt image header: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1


def _load(im: Image.Image, what: str) -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{what}: {e}") from None


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, verify: Verify = "header") -> ImageInfo:
    """Validate image bytes and return format, mode and oriented size.

    verify="header": parse the header and check that a JPEG/PNG ends with its end marker (catches truncation)
        at a cost independent of the pixel count. Corruption inside the entropy-coded data is found later, by
        `decode_image`, and recorded per sample by that stage.
    verify="full": also decode the pixels (JPEG at 1/8 scale through libjpeg's DCT scaling), catching corrupt
        scan data too, at roughly 10x the cost.
    """
    im = _open(data, max_pixels)
    fmt = im.format or "unknown"
    w, h = im.size
    end = _END_MARKERS.get(fmt)
    if end is not None and end not in data[-64:]:
        raise ImageDecodeError(f"truncated {fmt}: no end marker in the last bytes")
    if verify == "full":
        if fmt == "JPEG":
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        _load(im, f"corrupt {fmt} data")
    if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return ImageInfo(format=fmt, mode=im.mode, width=w, height=h)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit scaled (not clipped), alpha composited on white, CMYK converted."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None, side: str = "short"
) -> Image.Image:
    """Fully decode to an upright 8-bit RGB image. Raises ImageDecodeError with a one-line reason.

    With `min_side`, a JPEG may be decoded at a reduced scale (libjpeg DCT scaling, up to 8x faster) as long as its
    `side` ("short" or "long") stays at least `min_side` pixels: for consumers that resize down anyway.
    """
    im = _open(data, max_pixels)
    fmt = im.format or "image"
    if min_side and fmt == "JPEG":
        w, h = im.size
        scale = min_side / (min(w, h) if side == "short" else max(w, h))
        if scale < 1:
            im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    _load(im, f"truncated or corrupt {fmt}")
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - an unreadable orientation tag leaves the image as stored
        pass
    try:
        return _to_rgb(im)
    except (OSError, ValueError) as e:
        raise ImageDecodeError(f"cannot convert {fmt} mode {im.mode} to RGB: {e}") from None
