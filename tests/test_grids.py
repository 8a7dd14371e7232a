"""Sample grids are labelled with their prompts or classes, and images go to Prefect as small thumbnails."""

import base64
import io
import re

import numpy as np
from PIL import Image

from flows.train_stage import THUMBNAIL, thumbnail_markdown
from pixart.train.sampling import LABEL_HEIGHT, class_label, grid


def test_a_grid_writes_each_label_under_its_tile():
    tiles = [Image.new("RGB", (64, 48), (0, 0, 0)) for _ in range(4)]
    plain = grid(tiles, 2)
    labelled = grid(tiles, 2, ["a red fox", "a lighthouse at night, long exposure, very long caption", "x", "y"])
    assert plain.size == (128, 96) and labelled.size == (128, 2 * (48 + LABEL_HEIGHT))
    strip = np.asarray(labelled)[48:48 + LABEL_HEIGHT, :64]
    assert strip.max() > 200  # text drawn in the strip under the first tile
    assert np.asarray(labelled)[:48, :64].max() == 0  # and not over the image
    assert class_label(207) == "class 207" and class_label(1000) == "null class"


def test_a_large_grid_goes_out_as_a_thumbnail():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    md = thumbnail_markdown(buf.getvalue(), "samples", "/runs/r/samples/step-1.png")
    data = base64.b64decode(re.search(r"base64,([^)]+)\)", md).group(1))
    with Image.open(io.BytesIO(data)) as im:
        assert max(im.size) == THUMBNAIL and im.format == "JPEG"
    assert len(md) < len(buf.getvalue()) / 10 and md.endswith("`/runs/r/samples/step-1.png`")
