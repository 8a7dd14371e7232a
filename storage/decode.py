"""Safe image decoding, shared by every stage.

`probe_image` checks bytes cheaply at ingest (header, size after EXIF orientation, pixel limit, truncation);
`decode_image` returns a fully decoded RGB image for captioning and feature extraction. Both raise
`ImageDecodeError` with a one-line reason for empty, truncated, corrupt, oversized or non-image bytes.

Memory is bounded before any pixel is decoded: `max_pixels` caps width*height, and `max_decoded_bytes` caps
width*height*bytes per pixel of the stored mode (default `DEFAULT_MAX_DECODED_BYTES`, 384 MB: an 8-bit RGB image
at the default pixel limit, so RGBA, CMYK and 32-bit images get proportionally fewer pixels). 16- and 32-bit
images become 8-bit in strips, never through a float copy of the whole image.

libjpeg decodes a JPEG whose scan data ends early without an error (it paints the rest grey and warns, and Pillow
drops the warning); a full decode here refuses it as "premature end of data" (see `_jpeg_to_decode`).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageMode, ImageOps, UnidentifiedImageError

from storage.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 128_000_000  # 4x the largest SA-1B original (~3300x4950); real bombs are far larger
DEFAULT_MAX_DECODED_BYTES = 3 * DEFAULT_MAX_PIXELS  # 384 MB: an 8-bit RGB image at the pixel limit
_STRIP_PIXELS = 1 << 22  # 16/32-bit images are scaled to 8 bits in strips this size: temporaries stay ~30 MB
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
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


def _open(data: bytes, max_pixels: int, max_decoded_bytes: int) -> Image.Image:
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
    decoded = w * h * _bytes_per_pixel(im.mode)
    if decoded > max_decoded_bytes:
        raise ImageDecodeError(f"{w}x{h} {im.mode} decodes to {decoded} bytes, over the limit of {max_decoded_bytes}")
    return im


def _bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of a stored mode: 1 for L and P, 2 for I;16, 3 for RGB, 4 for RGBA, CMYK, I and F."""
    try:
        spec = ImageMode.getmode(mode)
    except KeyError:  # a mode Pillow does not describe: assume the widest common pixel
        return 4
    return len(spec.bands) * int(spec.typestr[-1])


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
        if str(e).startswith("image file is truncated"):  # Pillow: the decoder wanted bytes past the end
            raise ImageDecodeError(f"truncated {im.format or 'image'}: premature end of data") from None
        raise ImageDecodeError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# JPEG scan data that ends early
# ---------------------------------------------------------------------------------------------------------------------

_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive; arithmetic coding has no bit floor
_SEQUENTIAL_FRAMES = {0xC0, 0xC1}
_NOT_FRAMES = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the 0xC0-0xCF range with the frame markers
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # 0xFF00 (stuffing) and RSTn are part of scan data
_SCAN_PAD = bytes(32)  # more than libjpeg's read-ahead (8 bytes), and no marker


@dataclass(frozen=True)
class _Scans:
    """What the marker walk of a JPEG learns about its scans."""

    frame: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...
    blocks: int  # 8x8 blocks over all components, without MCU padding
    one_pass: bool  # a single scan holding every component
    scan_bytes: int  # entropy-coded bytes over all scans
    scan_end: int  # offset just past the last scan's data


def _frame_blocks(body: bytes) -> tuple[int, int] | None:
    """(components, 8x8 blocks over all components) of a SOF segment body; None when unusable."""
    if len(body) < 6 or len(body) < 6 + 3 * body[5]:
        return None
    height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    factors = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)]
    if not height or not width or not factors or min(min(f) for f in factors) == 0:
        return None  # height 0 means it is given later (DNL marker): rare, left to libjpeg
    hmax, vmax = max(h for h, _ in factors), max(v for _, v in factors)
    blocks = sum(_ceil_div(_ceil_div(width * h, hmax), 8) * _ceil_div(_ceil_div(height * v, vmax), 8)
                 for h, v in factors)
    return count, blocks


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_scans(data: bytes) -> _Scans | None:
    """Walk the markers from SOI to EOI (or the end of the data); None for a structure this does not follow."""
    pos, frame, scans, one_pass, scan_bytes, scan_end = 2, None, 0, False, 0, 0
    while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end < pos + 4 or end > len(data):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if frame is not None or (parsed := _frame_blocks(data[pos + 4:end])) is None:
                return None  # several frames (hierarchical JPEG) or an unusable one
            frame = (marker, *parsed)
        elif marker == 0xDA:
            if frame is None:
                return None
            scans += 1
            one_pass = scans == 1 and end > pos + 4 and data[pos + 4] == frame[1]  # components in the scan
            found = _NEXT_MARKER.search(data, end)
            scan_end = found.start() if found else len(data)
            scan_bytes += scan_end - end
            end = scan_end
        pos = end
    if frame is None or not scans:
        return None
    return _Scans(frame=frame[0], blocks=frame[2], one_pass=one_pass, scan_bytes=scan_bytes, scan_end=scan_end)


def _jpeg_to_decode(data: bytes) -> bytes:
    """The bytes to fully decode for a JPEG, refusing scan data that ends early.

    Two checks, because libjpeg itself only warns: (1) every Huffman-coded block takes at least one bit, so scan
    data under blocks/8 bytes is cut short (a huge frame over a few KB, progressive files included); (2) a
    single-scan file is decoded with its end marker replaced by zero padding. A complete scan then decodes its
    last block (the padding only feeds libjpeg's read-ahead) and Pillow finishes; a scan that ends early decodes
    the padding, still wants more input, and Pillow reports truncation instead of painting the rest grey.
    """
    scans = _jpeg_scans(data)
    if scans is None or scans.frame not in _HUFFMAN_FRAMES:
        return data
    if scans.scan_bytes * 8 < scans.blocks:
        raise ImageDecodeError(f"truncated JPEG: premature end of data ({scans.scan_bytes} bytes of scan data "
                               f"cannot code {scans.blocks} blocks)")
    if scans.frame in _SEQUENTIAL_FRAMES and scans.one_pass:
        return data[: scans.scan_end] + _SCAN_PAD
    return data


def _open_for_decode(data: bytes, im: Image.Image, max_pixels: int, max_decoded_bytes: int) -> Image.Image:
    """`im` ready for a full decode; a JPEG is checked for premature end of data, and reopened on padded bytes."""
    if im.format != "JPEG":
        return im
    body = _jpeg_to_decode(data)
    return im if body is data else _open(body, max_pixels, max_decoded_bytes)


def probe_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    verify: Verify = "header",
) -> ImageInfo:
    """Validate image bytes and return format, mode and oriented size.

    verify="header": parse the header and check that a JPEG/PNG ends with its end marker (catches truncation)
        at a cost independent of the pixel count. Corruption inside the entropy-coded data is found later, by
        `decode_image`, and recorded per sample by that stage.
    verify="full": also decode the pixels (JPEG at 1/8 scale through libjpeg's DCT scaling), catching corrupt
        scan data and JPEG scan data that ends before the last block, at roughly 10x the cost.
    """
    im = _open(data, max_pixels, max_decoded_bytes)
    fmt = im.format or "unknown"
    w, h = im.size
    end = _END_MARKERS.get(fmt)
    if end is not None and end not in data[-64:]:
        raise ImageDecodeError(f"truncated {fmt}: premature end of data (no end marker in the last bytes)")
    if verify == "full":
        im = _open_for_decode(data, im, max_pixels, max_decoded_bytes)
        if fmt == "JPEG":
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        _load(im, f"corrupt {fmt} data")
    if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return ImageInfo(format=fmt, mode=im.mode, width=w, height=h)


def _scale_strip(strip: np.ndarray, peak: int) -> np.ndarray:
    """round(x * 255 / peak), clipped to 0..255, as uint8: integer arithmetic for integer pixels."""
    if strip.dtype.kind == "f":
        return np.clip(np.nan_to_num(strip.astype(np.float64)) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    wide = np.clip(strip, 0, peak).astype(np.uint32)  # 65535 * 255 + 32767 still fits
    return ((wide * 255 + peak // 2) // peak).astype(np.uint8)


def _wide_to_l(im: Image.Image) -> Image.Image:
    """A 16/32-bit image as 8-bit L, scaled by 65535 (16-bit, or 32-bit values above 255) or else by 255.

    Works on strips of `_STRIP_PIXELS`, so the temporaries stay small: a float64 copy of a whole 128 MP image
    alone would take 1 GB, and captioning decodes several images at once.
    """
    w, h = im.size
    peak = 65535 if im.mode.startswith("I;16") or (im.getextrema()[1] or 0) > 255 else 255
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // w)
    for top in range(0, h, rows):
        out[top:top + rows] = _scale_strip(np.asarray(im.crop((0, top, w, min(h, top + rows)))), peak)
    return Image.fromarray(out)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit scaled (not clipped), alpha composited on white, CMYK converted."""
    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    min_side: int | None = None, side: str = "short",
) -> Image.Image:
    """Fully decode to an upright 8-bit RGB image. Raises ImageDecodeError with a one-line reason.

    With `min_side`, a JPEG may be decoded at a reduced scale (libjpeg DCT scaling, up to 8x faster) as long as its
    `side` ("short" or "long") stays at least `min_side` pixels: for consumers that resize down anyway.
    """
    im = _open_for_decode(data, _open(data, max_pixels, max_decoded_bytes), max_pixels, max_decoded_bytes)
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
