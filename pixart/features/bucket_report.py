"""Bucket histograms: how a dataset's images spread over the 40 aspect-ratio buckets of one base size.

    table = bucket_histogram(heights, widths, base_size=1024)     # pyarrow table, one row per bucket (all 40)
    png = histogram_png(table, title="sam @ 1024")                 # bytes of a bar chart

Computed from the manifests' width/height (after EXIF orientation), so it costs one column read per shard.
The flows save both beside the features and publish the table as a Prefect artifact.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
from PIL import Image, ImageDraw

from pixart.buckets import MAX_RATIO, MIN_RATIO, BucketError, Policy, assign, bucket_table

HISTOGRAM_SCHEMA = pa.schema([("bucket", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
                              ("count", pa.int64()), ("share", pa.float64())])


def bucket_histogram(heights: Iterable[int], widths: Iterable[int], base_size: int,
                     policy: Policy = "clamp") -> tuple[pa.Table, dict[str, int]]:
    """(one row per bucket, {"outside_range": n, "dropped": n}) for the given image sizes."""
    table = bucket_table(base_size)
    counts = dict.fromkeys(table, 0)
    extra = {"outside_range": 0, "dropped": 0}
    for h, w in zip(heights, widths, strict=True):
        if not MIN_RATIO <= h / w <= MAX_RATIO:
            extra["outside_range"] += 1
        try:
            counts[assign(h, w, base_size, policy).key] += 1
        except BucketError:
            extra["dropped"] += 1
    total = max(1, sum(counts.values()))
    rows = [{"bucket": k, "height": hw[0], "width": hw[1], "count": counts[k], "share": counts[k] / total}
            for k, hw in table.items()]
    return pa.Table.from_pylist(rows, schema=HISTOGRAM_SCHEMA), extra


def histogram_png(table: pa.Table, title: str, width: int = 960, height: int = 360) -> bytes:
    """A bar chart of the counts per bucket (keys on the x axis, in ratio order), as PNG bytes."""
    keys, counts = table["bucket"].to_pylist(), table["count"].to_pylist()
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    left, bottom, top = 40, height - 60, 30
    draw.text((left, 8), f"{title}: {sum(counts)} images over {len(keys)} buckets (h/w)", fill="black")
    peak = max(1, max(counts))
    step = (width - left - 10) / len(keys)
    for i, (key, n) in enumerate(zip(keys, counts, strict=True)):
        x0 = left + i * step
        bar = (bottom - top) * n / peak
        draw.rectangle((x0 + 2, bottom - bar, x0 + step - 2, bottom), fill=(70, 110, 180))
        if n:
            draw.text((x0 + 2, bottom - bar - 12), str(n), fill="black")
        draw.text((x0 + 2, bottom + 4 + 12 * (i % 3)), key, fill="black")
    draw.line((left, bottom, width - 10, bottom), fill="black")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
