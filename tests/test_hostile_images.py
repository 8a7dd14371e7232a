"""Hostile images: decoded in bounded memory (16-bit PNG), wide modes scaled exactly to 8 bits, the decoded-size
limit checked before decoding, and JPEG scan data that ends early refused at full verify, at decode and as an error
row at ingest, while real JPEGs of every common kind still pass.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from storage.decode import decode_image, probe_image
from storage.errors import ImageDecodeError
from storage.ingest.config import IngestConfig
from storage.ingest.samples import jpeg_bytes, photo_variants
from tests import images
from tests.archives import sa1b_pair
from tests.hostile import GOOD, RSS_LIMIT, errors, ingest_rows, ok_keys, run_measured, write_gnu_tar

# ---------------------------------------------------------------------------------------------------------------------
# Decoded images in bounded memory, and the decoded-size limit
# ---------------------------------------------------------------------------------------------------------------------


_DECODE = """
import json, sys
from storage.decode import decode_image
im = decode_image(open(sys.argv[1], "rb").read())
out = {"mode": im.mode, "size": list(im.size), "corners": [list(im.getpixel(p)) for p in ((0, 0), (im.width - 1, 0))]}
"""


def test_16bit_png_decodes_in_bounded_memory(tmp_path):
    w, h = 9000, 7000  # 63 MP, under max_pixels: 126 MB as stored, 504 MB as float64
    row = np.linspace(0, 65535, w).astype(np.uint16)
    path = tmp_path / "deep.png"
    im = Image.frombuffer("I;16", (w, h), np.broadcast_to(row, (h, w)).copy().tobytes(), "raw", "I;16", 0, 1)
    im.save(path, compress_level=1)
    del im
    out = run_measured(_DECODE, str(path))
    assert out["mode"] == "RGB" and out["size"] == [w, h]
    assert out["corners"] == [[0, 0, 0], [255, 255, 255]]
    assert out["rss"] < RSS_LIMIT, f"peak RSS {out['rss'] / 1e9:.2f} GB"


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16", [0, 128, 257, 32896, 65150, 65407, 65535], [0, 0, 1, 128, 254, 255, 255]),
    ("I", [-5, 0, 100, 255], [0, 0, 100, 255]),  # fits 8 bits: kept as is
    ("I", [0, 257, 65535, 70000], [0, 1, 255, 255]),  # wider: scaled as 16-bit, clipped above
    ("F", [-1.0, 0.4, 0.6, 254.6, 255.0], [0, 0, 1, 255, 255]),
    ("F", [0.0, 254.6, 300.0, 65535.0], [0, 1, 1, 255]),  # past 255: scaled as 16-bit
])
def test_wide_modes_scale_to_8bit_exactly(mode, values, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    im = Image.fromarray(np.array([values], dtype=dtype))
    assert im.mode == mode
    got = decode_image(images.encode(im, "TIFF"))
    assert np.asarray(got)[0, :, 0].tolist() == expected


def png_header_only(width: int, height: int, color_type: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("verify", ["header", "full"])
def test_decoded_size_limit_is_checked_before_decoding(verify):
    rgba = png_header_only(10_000, 10_000, 6)  # 100 MP is under max_pixels, 400 MB decoded is over the default
    with pytest.raises(ImageDecodeError, match="10000x10000 RGBA decodes to 400000000 bytes, over the limit of"):
        probe_image(rgba, verify=verify)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(rgba)
    rgb = images.jpeg(size=(100, 50))  # 3 bytes per pixel
    assert probe_image(rgb, verify=verify, max_decoded_bytes=15_000).width == 100
    with pytest.raises(ImageDecodeError, match="decodes to 15000 bytes, over the limit of 14999"):
        probe_image(rgb, verify=verify, max_decoded_bytes=14_999)
    with pytest.raises(ImageDecodeError, match="over the limit of 14999"):
        decode_image(rgb, max_decoded_bytes=14_999)


# ---------------------------------------------------------------------------------------------------------------------
# JPEG scan data that ends early
# ---------------------------------------------------------------------------------------------------------------------


def jpeg_claiming(width: int, height: int, keep: int, tail: bytes, progressive: bool = False) -> bytes:
    """A real JPEG whose frame header claims width x height, cut `keep` bytes into its scan data, plus `tail`."""
    data = images.encode(images.photo("chelsea"), "JPEG", progressive=progressive)
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data = data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]
    return data[: data.find(b"\xff\xda") + keep] + tail


def half_with_end_marker() -> bytes:
    data = images.jpeg("coffee")
    return data[: len(data) // 2] + b"\xff\xd9"


@pytest.mark.parametrize("make", [
    lambda: jpeg_claiming(11_000, 11_000, 3000, b"\xff\xd9"),
    lambda: jpeg_claiming(11_000, 11_000, 3000, b""),
    lambda: jpeg_claiming(11_000, 11_000, 3000, b"\xff\xd9" + b"trailer" * 3),
    lambda: jpeg_claiming(11_000, 11_000, 3000, b"\xff\xd9", progressive=True),
    half_with_end_marker,
], ids=["end-marker", "no-end-marker", "end-marker-trailer", "progressive", "half-scan-end-marker"])
def test_jpeg_with_premature_end_of_data_fails_full_verify_and_decode(make):
    data = make()
    with pytest.raises(ImageDecodeError, match="premature end of data") as err:
        probe_image(data, verify="full")
    assert "\n" not in str(err.value)
    with pytest.raises(ImageDecodeError, match="premature end of data"):
        decode_image(data)
    with pytest.raises(ImageDecodeError, match="premature end of data"):
        decode_image(data, min_side=64)


def _jpeg(im: Image.Image, **kw) -> bytes:
    return images.encode(im, "JPEG", **kw)


@pytest.mark.parametrize("make", [
    lambda: images.jpeg(),
    lambda: images.jpeg("coffee"),
    lambda: images.jpeg("rocket", (97, 53)),
    lambda: images.jpeg_with_orientation(6),
    lambda: _jpeg(images.photo("astronaut"), progressive=True),
    lambda: _jpeg(images.photo("coffee", (333, 211)), progressive=True, optimize=True, quality=30),
    lambda: _jpeg(images.photo("chelsea"), optimize=True),
    lambda: _jpeg(images.photo("chelsea"), subsampling=0, quality=100),
    lambda: _jpeg(images.photo("chelsea"), subsampling=1),
    lambda: _jpeg(images.photo("chelsea"), restart_marker_blocks=5),
    lambda: _jpeg(images.photo("rocket").convert("L")),
    lambda: _jpeg(images.photo("rocket").convert("CMYK")),
    lambda: _jpeg(Image.new("RGB", (1, 1), (128, 128, 128))),
    lambda: _jpeg(Image.new("RGB", (4000, 3000), (128, 128, 128))),  # flat grey for real: a tiny scan is fine
    lambda: _jpeg(Image.new("L", (17, 9), 0), quality=5),
    lambda: jpeg_bytes(photo_variants(1, 320)[0]),
    lambda: images.jpeg() + b"trailing bytes after the end marker",
], ids=["chelsea", "coffee", "odd-size", "exif-rotated", "progressive", "progressive-optimized", "optimized",
        "444", "422", "restart-markers", "gray", "cmyk", "1x1", "flat-grey-12mp", "tiny-gray", "samples",
        "trailer"])
def test_real_jpegs_still_pass_full_verify_and_decode(make):
    data = make()
    info = probe_image(data, verify="full")
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (info.width, info.height)
    assert decode_image(data, min_side=8).mode == "RGB"


def test_premature_end_is_an_error_row_at_full_verify(tmp_path):
    cut = jpeg_claiming(11_000, 11_000, 3000, b"\xff\xd9")
    (tmp_path / "src").mkdir()
    write_gnu_tar(tmp_path / "src" / "sa_000000.tar", [
        *sa1b_pair(1, GOOD, 90, 60), *sa1b_pair(2, cut, 11_000, 11_000), *sa1b_pair(3, GOOD, 90, 60)])
    rows = ingest_rows(IngestConfig(dataset="sam", source=str(tmp_path / "src"), output_root=str(tmp_path / "o"),
                                    decode={"verify": "full"}))
    assert ok_keys(rows) == ["sa_1", "sa_3"]
    assert "premature end of data" in errors(rows)["sa_2"]
