"""Safe decoding: orientation, every mode to RGB, pixel limit, and clear errors for bad bytes."""

import numpy as np
import pytest
from PIL import Image

from storage.decode import decode_image, probe_image
from storage.errors import ImageDecodeError
from tests import images


@pytest.mark.parametrize("orientation,expected", [(1, (120, 80)), (3, (120, 80)), (6, (80, 120)), (8, (80, 120))])
def test_exif_orientation_is_honoured(orientation, expected):
    data = images.jpeg_with_orientation(orientation)
    info = probe_image(data)
    assert (info.width, info.height) == expected
    im = decode_image(data)
    assert im.size == expected and im.mode == "RGB"


def test_rotation_moves_pixels_not_just_size():
    upright = np.asarray(decode_image(images.jpeg_with_orientation(1)), dtype=np.int16)
    rotated = np.asarray(decode_image(images.jpeg_with_orientation(6)), dtype=np.int16)
    # orientation 6 = rotate 90 degrees clockwise for display
    assert np.abs(np.rot90(upright, k=-1) - rotated).mean() < 3


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_8bit_rgb(mode):
    base = images.photo("coffee", (60, 40))
    if mode == "I;16":
        data = images.png_16bit_gray()
    elif mode == "CMYK":
        data = images.encode(base.convert("CMYK"), "JPEG")
    else:
        data = images.encode(base.convert(mode), "PNG")
    im = decode_image(data)
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.dtype == np.uint8
    assert 40 < arr.mean() < 230, "content survived the conversion (not clipped to black or white)"


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(images.encode(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_16bit_is_scaled_not_clipped():
    arr = np.asarray(decode_image(images.png_16bit_gray()))
    assert arr.max() < 255 and arr.std() > 10


@pytest.mark.parametrize("verify", ["header", "full"])
@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: b"", "empty"),
        (lambda: b"hello, this is not an image", "not an image"),
        (lambda: images.truncated(images.jpeg()), "truncated"),
        (lambda: images.corrupt_header(images.jpeg()), "corrupt|not an image|truncated"),
        (lambda: images.png_header_only(100_000, 100_000), "exceeds the limit|decompression bomb"),
    ],
    ids=["empty", "non-image", "truncated", "corrupt", "bomb"],
)
def test_bad_bytes_raise_one_line_errors(make, reason, verify):
    data = make()
    with pytest.raises(ImageDecodeError, match=reason) as err:
        probe_image(data, verify=verify)
    assert "\n" not in str(err.value)
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_pixel_limit_is_configurable():
    data = images.jpeg(size=(100, 50))
    assert probe_image(data, max_pixels=5000).width == 100
    with pytest.raises(ImageDecodeError, match="5000 pixels exceeds the limit of 4999"):
        probe_image(data, max_pixels=4999)
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(data, max_pixels=4999)


def test_full_verify_decodes_pixels_and_keeps_true_size():
    info = probe_image(images.jpeg(size=(400, 300)), verify="full")
    assert (info.format, info.width, info.height) == ("JPEG", 400, 300)
