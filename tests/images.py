"""Image bytes for tests, derived from real photographs (scikit-image) plus deliberately broken variants."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from storage.ingest.samples import load_photo


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    im = load_photo(name)
    return im.resize(size) if size else im


def jpeg(name: str = "chelsea", size: tuple[int, int] | None = None) -> bytes:
    return encode(photo(name, size))


def jpeg_with_orientation(orientation: int, name: str = "rocket") -> bytes:
    """A JPEG stored landscape whose EXIF says how to rotate it for display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(name, (120, 80)), exif=exif.tobytes())


def png_16bit_gray() -> bytes:
    arr = np.asarray(photo("chelsea", (64, 48)).convert("L"), dtype=np.uint16) * 257
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16"), im.mode
    return encode(im, "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: the shape of a decompression bomb, a few dozen bytes long."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def corrupt_header(data: bytes) -> bytes:
    """SOI kept, everything up to the scan replaced by garbage."""
    return data[:2] + bytes(range(256)) * 2 + data[514:]
