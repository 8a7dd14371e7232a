"""Pixel error of the reduced-scale JPEG decode (`ExtractConfig.jpeg_draft`) against the full decode, after the
official crop: what the opt-in speed setting costs in fidelity. Real photos (scikit-image) at SA-1B's 1500 px short
side by default, as JPEG q90.

    python3 benchmarks/jpeg_draft_error.py [--short-side 1500]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixart.buckets import apply_crop, assign, fixed_bucket  # noqa: E402
from storage.decode import decode_image  # noqa: E402
from storage.ingest.samples import jpeg_bytes, load_photo  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry")
SETTINGS = (("256", 256, False), ("512", 512, False), ("512 multi-scale", 512, True), ("1024 multi-scale", 1024, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short-side", type=int, default=1500)
    args = ap.parse_args()
    print("| setting | photos | mean abs diff (levels) | worst photo's mean | max abs diff |")
    print("|---|---|---|---|---|")
    for label, base, ms in SETTINGS:
        means, maxes = [], []
        for name in PHOTOS:
            im = load_photo(name)
            scale = args.short_side / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)))
            data = jpeg_bytes(im)
            h, w = im.height, im.width
            bucket = assign(h, w, base) if ms else fixed_bucket(base)
            crop = bucket.crop(h, w)
            need = math.ceil(min(h, w) * crop.resized[0] / h)
            full = np.asarray(apply_crop(decode_image(data), crop), dtype=np.int16)
            draft = np.asarray(apply_crop(decode_image(data, min_side=need), crop), dtype=np.int16)
            diff = np.abs(full - draft)
            means.append(float(diff.mean()))
            maxes.append(int(diff.max()))
        print(f"| {label} | {len(PHOTOS)} | {np.mean(means):.2f} | {max(means):.2f} | {max(maxes)} |")


if __name__ == "__main__":
    main()
