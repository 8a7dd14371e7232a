"""PixArt-alpha aspect-ratio buckets: the official 40-entry tables, bucket assignment, and the one crop transform.

    bucket = assign(height, width, base_size=512)          # Bucket(key="0.57", height=384, width=672)
    crop = bucket.crop(height, width)                      # resize to cover the bucket, centre-crop: record the box
    image = apply_crop(pil_image, crop)                    # the same transform offline (extraction) and online

Tables. Keys are height/width rounded to 2 decimals, "0.25" to "4.0"; values are (height, width) in multiples of
64 / 32 / 16 for base sizes 1024 / 512 / 256. diffusers ships 33 of the 40 entries (`ASPECT_RATIO_*_BIN`, the
official `_TEST` tables used for inference); the 7 ratios used only in training (0.26, 0.27, 2.89, 3.11, 3.62,
3.75, 3.88) are added here from the official `ASPECT_RATIO_1024`, and their 512/256 sizes are its half and
quarter, exactly as in the official 512 and 256 tables.

Assignment is the official sampler's: the key minimising |key - h/w|. Ratios outside 0.25-4 follow `policy`:
"clamp" puts them in the end bucket (what the official sampler does for h/w < 0.25), "drop" refuses them with a
`BucketError`, which callers turn into an error row (the official loader drops h/w > 4).

The transform is the official one, geometrically and in pixels (PIL does the resampling, as torchvision does on a
PIL image):
- multi-scale (`assign`), as the official `InternalDataMS`: resize so that the bucket is covered, the long side
  truncated (`int(w * bucket_h / h)`), bicubic; then `T.CenterCrop(bucket)`;
- single-scale (`fixed_bucket`), as the official `T.Resize(n)` + `T.CenterCrop(n)`: the short side to n, the long
  side truncated, bilinear (torchvision's default: the official "# Image.BICUBIC" is only a comment);
- the centre crop's offsets are `int(round(excess / 2))`, Python's round-half-even, as torchvision's.
The official multi-scale *extractor* squashes images to the bucket instead, while its online path crops; this
project crops both offline and online (a deliberate difference: latents match what online training would see).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

from PIL import Image

BASE_SIZES = (256, 512, 1024)
MIN_RATIO, MAX_RATIO = 0.25, 4.0
Policy = Literal["clamp", "drop"]

# Official ASPECT_RATIO_1024 entries that diffusers' 33-entry bins leave out: (height, width).
_TRAINING_ONLY_1024 = {"0.26": (512, 1984), "0.27": (512, 1920), "2.89": (1664, 576), "3.11": (1792, 576),
                       "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512)}


class BucketError(ValueError):
    """An image that no bucket takes under the configured policy."""


@cache
def bucket_table(base_size: int) -> dict[str, tuple[int, int]]:
    """The 40 official buckets for `base_size`, {key: (height, width)} in increasing ratio."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    shipped = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
    if base_size not in shipped:
        raise BucketError(f"no bucket table for base size {base_size}; sizes: {', '.join(map(str, BASE_SIZES))}")
    scale = 1024 // base_size
    table = {k: (int(h), int(w)) for k, (h, w) in shipped[base_size].items()}
    table.update({k: (h // scale, w // scale) for k, (h, w) in _TRAINING_ONLY_1024.items()})
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


@dataclass(frozen=True)
class Crop:
    """Resize the (height, width) image to `resized` with `resample`, then cut `box` = (left, top, right, bottom)."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    resample: str = "bicubic"


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class Bucket:
    key: str  # "0.57": height/width of the bucket, as the official tables write it
    height: int
    width: int
    resample: str = "bicubic"  # the official multi-scale transform's; single-scale is bilinear (`fixed_bucket`)

    @property
    def ratio(self) -> float:
        """The aspect-ratio micro-condition of the multi-scale model: the bucket key as a float."""
        return float(self.key)

    def crop(self, height: int, width: int) -> Crop:
        """Cover the bucket keeping the aspect ratio (long side truncated), then centre-crop to it: the official
        geometry, see the module docstring. For a square bucket this is exactly `T.Resize(n)`'s size."""
        if self.height / height > self.width / width:
            rh, rw = self.height, int(width * self.height / height)
        else:
            rh, rw = int(height * self.width / width), self.width
        rh, rw = max(rh, self.height), max(rw, self.width)  # never below the bucket (torchvision would pad black)
        top, left = int(round((rh - self.height) / 2.0)), int(round((rw - self.width) / 2.0))
        return Crop(resized=(rh, rw), box=(left, top, left + self.width, top + self.height), resample=self.resample)


def assign(height: int, width: int, base_size: int, policy: Policy = "clamp") -> Bucket:
    """The bucket of an image of `height` x `width` (after EXIF orientation); see the module docstring."""
    if height <= 0 or width <= 0:
        raise BucketError(f"invalid image size {width}x{height}")
    ratio = height / width
    if policy == "drop" and not MIN_RATIO <= ratio <= MAX_RATIO:
        raise BucketError(f"aspect ratio h/w = {ratio:.3f} is outside {MIN_RATIO}-{MAX_RATIO} (bucket policy drop)")
    table = bucket_table(base_size)
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return Bucket(key, *table[key])


def fixed_bucket(base_size: int) -> Bucket:
    """The square bucket of single-scale stages (256 and 512 training): bilinear, as the official `T.Resize(n)`."""
    return Bucket("1.0", base_size, base_size, resample="bilinear")


def apply_crop(image: Image.Image, crop: Crop) -> Image.Image:
    """Resize then crop: the one bucket transform, used offline and online."""
    rh, rw = crop.resized
    if (image.height, image.width) != (rh, rw):
        image = image.resize((rw, rh), _RESAMPLE[crop.resample])
    return image.crop(crop.box)
