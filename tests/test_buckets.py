"""The official 40 aspect-ratio buckets, nearest-bucket assignment, the cover-then-crop transform, histograms."""

import io

import pytest
from PIL import Image

from pixart.buckets import BucketError, apply_crop, assign, bucket_table, fixed_bucket
from pixart.features.bucket_report import bucket_histogram, histogram_png

# The official ASPECT_RATIO_1024 (PixArt-alpha diffusion/data/datasets/utils.py), typed from the reference notes.
OFFICIAL_1024 = {
    "0.25": (512, 2048), "0.26": (512, 1984), "0.27": (512, 1920), "0.28": (512, 1856), "0.32": (576, 1792),
    "0.33": (576, 1728), "0.35": (576, 1664), "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472),
    "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216),
    "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.07": (1024, 960), "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896),
    "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704),
    "2.09": (1472, 704), "2.4": (1536, 640), "2.5": (1600, 640), "2.89": (1664, 576), "3.0": (1728, 576),
    "3.11": (1792, 576), "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512), "4.0": (2048, 512),
}


@pytest.mark.parametrize("base, multiple", [(1024, 64), (512, 32), (256, 16)])
def test_tables_equal_the_official_ones(base, multiple):
    table = bucket_table(base)
    scale = 1024 // base
    assert table == {k: (h // scale, w // scale) for k, (h, w) in OFFICIAL_1024.items()}
    assert list(table) == list(OFFICIAL_1024)  # increasing ratio
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in table.values())


def test_nearest_bucket_as_the_official_sampler():
    assert assign(1500, 2250, 1024).key == "0.68"  # 0.667: |0.68 - 0.667| < |0.6 - 0.667|
    assert assign(1000, 1000, 512) == assign(7, 7, 512) and assign(7, 7, 512).height == 512
    tall = assign(2000, 1000, 256)
    assert (tall.key, tall.height, tall.width) == ("2.0", 352, 176)
    for key in OFFICIAL_1024:  # every key maps to itself
        h, w = OFFICIAL_1024[key]
        assert assign(h, w, 1024).key == key


def test_ratios_outside_the_range_follow_the_policy():
    assert assign(100, 1000, 1024, "clamp").key == "0.25" and assign(5000, 1000, 1024, "clamp").key == "4.0"
    with pytest.raises(BucketError, match="outside 0.25-4.0"):
        assign(100, 1000, 1024, "drop")
    assert assign(250, 1000, 1024, "drop").key == "0.25"  # the ends themselves are inside
    with pytest.raises(BucketError, match="invalid image size"):
        assign(0, 10, 512)


@pytest.mark.parametrize("h, w", [(1500, 2250), (2250, 1500), (333, 1999), (512, 512), (100, 90), (4000, 999)])
def test_crop_covers_the_bucket_keeping_the_aspect_ratio(h, w):
    bucket = assign(h, w, 512)
    crop = bucket.crop(h, w)
    rh, rw = crop.resized
    assert rh >= bucket.height and rw >= bucket.width and (rh == bucket.height or rw == bucket.width)
    assert abs(rh / rw - h / w) < 0.01 * h / w + 2 / min(rh, rw)  # not squashed
    left, top, right, bottom = crop.box
    assert (right - left, bottom - top) == (bucket.width, bucket.height)
    assert abs(left - (rw - right)) <= 1 and abs(top - (rh - bottom)) <= 1  # centred
    out = apply_crop(Image.new("RGB", (w, h), "red"), crop)
    assert out.size == (bucket.width, bucket.height)


def test_single_scale_is_resize_short_side_then_centre_crop():
    crop = fixed_bucket(256).crop(600, 900)
    assert crop.resized == (256, 384) and crop.box == (64, 0, 320, 256) and crop.resample == "bilinear"


# -- the official transforms, written here from torchvision's behaviour on PIL images ---------------------------------


def official_single_scale(img: Image.Image, n: int) -> Image.Image:
    """T.Resize(n) + T.CenterCrop(n) (PixArt's 256/512 datasets): short side to n, long side int(n * long / short),
    torchvision's default bilinear (PIL's, antialiased), no resize at the same size; offsets int(round(excess / 2))."""
    w, h = img.size
    nw, nh = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - n) / 2.0)), int(round((nw - n) / 2.0))
    return img.crop((left, top, left + n, top + n))


def official_multi_scale(img: Image.Image, bh: int, bw: int) -> Image.Image:
    """InternalDataMS: resize_size = (bh, int(w * bh / h)) when bh / h > bw / w, else (int(h * bw / w), bw); then
    T.Resize(resize_size, BICUBIC) + T.CenterCrop((bh, bw))."""
    w, h = img.size
    rh, rw = (bh, int(w * bh / h)) if bh / h > bw / w else (int(h * bw / w), bw)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC)
    top, left = int(round((rh - bh) / 2.0)), int(round((rw - bw) / 2.0))
    return img.crop((left, top, left + bw, top + bh))


# Real photos cut to sizes whose excess over the bucket is odd and even, at half-way offsets (round-half-even),
# squarer and wider than the bucket, and already at the target size.
SIZES = [(600, 900), (900, 600), (333, 500), (427, 640), (301, 451), (512, 512), (255, 257), (256, 259),
         (257, 256), (1001, 1500), (700, 2100), (513, 515)]


@pytest.fixture(scope="module")
def photos():
    from storage.ingest.samples import load_photo

    base = [load_photo(name) for name in ("astronaut", "coffee", "chelsea")]
    return {(h, w): base[i % 3].resize((w, h), Image.LANCZOS) for i, (h, w) in enumerate(SIZES)}


@pytest.mark.parametrize("n", [256, 512])
def test_single_scale_transform_is_the_official_one_in_pixels(photos, n):
    for (h, w), img in photos.items():
        crop = fixed_bucket(n).crop(h, w)
        want = official_single_scale(img, n)
        assert apply_crop(img, crop).tobytes() == want.tobytes(), (h, w, n, crop)


@pytest.mark.parametrize("base", [256, 512, 1024])
def test_multi_scale_transform_is_the_official_one_in_pixels(photos, base):
    for (h, w), img in photos.items():
        bucket = assign(h, w, base)
        want = official_multi_scale(img, bucket.height, bucket.width)
        got = apply_crop(img, bucket.crop(h, w))
        assert got.size == want.size == (bucket.width, bucket.height)
        assert got.tobytes() == want.tobytes(), (h, w, base, bucket)


def test_histogram_counts_every_image_once_and_draws_a_chart():
    sizes = [(1500, 2250), (2250, 1500), (1000, 1000), (1000, 1000), (100, 1000)]
    table, extra = bucket_histogram([h for h, _ in sizes], [w for _, w in sizes], 1024)
    counts = dict(zip(table["bucket"].to_pylist(), table["count"].to_pylist(), strict=True))
    assert table.num_rows == 40 and sum(counts.values()) == 5
    assert counts["1.0"] == 2 and counts["0.68"] == 1 and counts["1.46"] == 1 and counts["0.25"] == 1
    assert extra == {"outside_range": 1, "dropped": 0}
    dropped, extra = bucket_histogram([100], [1000], 1024, "drop")
    assert sum(dropped["count"].to_pylist()) == 0 and extra == {"outside_range": 1, "dropped": 1}
    png = Image.open(io.BytesIO(histogram_png(table, "test")))
    assert png.format == "PNG" and png.size == (960, 360)
