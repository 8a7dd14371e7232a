"""Image preparation for the captioner, on CPU: decode at reduced scale, pad to square, shrink.

LLaVA-1.5 was trained on images padded to square with the processor's mean colour, while the transformers
processor centre-crops; padding keeps the edges of wide SA-1B and JourneyDB images in view.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from storage.config import DecodeConfig
from storage.decode import decode_image
from storage.errors import ImageDecodeError
from storage.readers import iter_manifest_images


def target_side(image_processor: Any) -> int:
    """The square side the vision tower sees (336 for LLaVA-1.5)."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge", "longest_edge"):  # dict (v4) or SizeDict (v5)
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value:
                return int(value)
    return 336


@dataclass(frozen=True)
class ImagePrep:
    side: int
    pad_color: tuple[int, int, int]
    pad_to_square: bool
    max_pixels: int
    max_decoded_bytes: int

    @classmethod
    def from_processor(cls, processor: Any, pad_to_square: bool, decode: DecodeConfig) -> ImagePrep:
        ip = processor.image_processor
        mean = getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5]
        return cls(target_side(ip), tuple(int(round(255 * m)) for m in mean[:3]), pad_to_square, decode.max_pixels,
                   decode.max_decoded_bytes)

    def decode(self, data: bytes) -> Image.Image:
        """Decode (JPEG at reduced scale when that still leaves 2x the target side); raises ImageDecodeError."""
        return decode_image(data, max_pixels=self.max_pixels, max_decoded_bytes=self.max_decoded_bytes,
                            min_side=2 * self.side,
                            side="long" if self.pad_to_square else "short")

    def shrink(self, image: Image.Image) -> Image.Image:
        """Pad to square (if configured) and shrink so the short side is at most twice the target side."""
        if self.pad_to_square and image.width != image.height:
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), self.pad_color)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        short = min(image.size)
        if short > 2 * self.side:
            scale = 2 * self.side / short
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
        return image

    def fixed(self, image: Image.Image) -> np.ndarray:
        """side x side x 3 uint8, as the processor would crop it (for fixed-shape transport, e.g. Ray blocks)."""
        image = self.shrink(image)
        scale = self.side / min(image.size)
        w, h = max(self.side, round(image.width * scale)), max(self.side, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - self.side) // 2, (h - self.side) // 2
        return np.asarray(image.crop((left, top, left + self.side, top + self.side)), dtype=np.uint8)


def iter_prepared(rows: list[dict[str, Any]], prep: ImagePrep) -> Iterator[dict[str, Any]]:
    """{"key", "image" (side x side x 3 uint8), "error" ("" when fine)} for every manifest row, read from sources."""
    blank = np.zeros((prep.side, prep.side, 3), dtype=np.uint8)
    for row, data, error in iter_manifest_images(rows):
        image = blank
        if error is None:
            try:
                image, error = prep.fixed(prep.decode(data)), ""
            except ImageDecodeError as e:
                error = f"image not decodable: {e}"
        yield {"key": row["key"], "image": image, "error": error}


def prepared_rows(item: dict[str, Any], prep: ImagePrep) -> Iterator[dict[str, Any]]:
    """`iter_prepared` over one shard's manifest rows given as JSON (item["rows"]): a Ray Data CPU task's work."""
    yield from iter_prepared(json.loads(item["rows"]), prep)
