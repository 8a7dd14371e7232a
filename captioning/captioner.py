"""`Captioner`: a LLaVA-family model loaded once, turning batches of RGB images into captions.

    cap = Captioner(CaptionConfig(dataset="sam", model="llava-hf/llava-1.5-7b-hf"))
    inputs = cap.encode([cap.prep.shrink(im) for im in images])     # CPU: pad, shrink, tokenize
    captions = cap.generate(inputs)                                  # accelerator: generate()

The model goes through `AutoModelForImageTextToText` + `AutoProcessor` and the processor's chat template, so any
LLaVA-family checkpoint (1.5, NeXT, OneVision) works with the same code. `__call__(batch) -> batch` serves Ray Data
actor pools without importing Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioning.config import CaptionConfig
from captioning.images import ImagePrep


@dataclass
class Caption:
    """One generated caption. `text` is raw (see captioning.text.clean_caption)."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (hit max_new_tokens)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Captioner:
    """Loads the processor and model once; CPU-side `prepare_image`/`encode`, device-side `generate`."""

    def __init__(self, cfg: CaptionConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        attn = "sdpa" if self.device.type == "cuda" else None
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=self.dtype, attn_implementation=attn)
        self.model.to(self.device).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cfg.prompt}]}]
        self.prompt_text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        self.prep = ImagePrep.from_processor(self.processor, cfg.pad_to_square, cfg.decode.max_pixels)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))

    # -- CPU side (see captioning.images.ImagePrep for decoding and padding) -------------------------------------

    def encode(self, images: list[Image.Image]) -> Any:
        """Processor inputs for a batch (pixel values + left-padded prompt tokens), on CPU."""
        return self.processor(images=images, text=[self.prompt_text] * len(images), padding=True,
                              return_tensors="pt")

    # -- device side ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, inputs: Any) -> list[Caption]:
        """Run generate() on an encoded batch; deterministic for a fixed seed."""
        torch.manual_seed(self.cfg.generation.seed)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, **self.cfg.generation.generate_kwargs(), pad_token_id=self.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        captions = []
        for row in new.tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row[:stop] if stop is not None else [t for t in row if t != self.pad_id]
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
            captions.append(Caption(text=text, n_tokens=len(tokens), finish_reason="stop" if stop is not None
                                    else "length"))
        return captions

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data form: batch["image"] holds prepared HxWx3 uint8 arrays and batch["error"] a reason or "" per
        row; rows with an error pass through uncaptioned. Adds caption, n_tokens, finish_reason, seconds."""
        n = len(batch["image"])
        good = [i for i in range(n) if not batch["error"][i]]
        images = [Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8)) for i in good]
        start = time.perf_counter()
        captions = self.generate(self.encode(images)) if images else []
        per_image = (time.perf_counter() - start) / max(1, len(images))
        out = {k: v for k, v in batch.items() if k != "image"}
        out["caption"] = np.full(n, "", dtype=object)
        out["n_tokens"] = np.zeros(n, dtype=np.int64)
        out["finish_reason"] = np.full(n, "", dtype=object)
        out["seconds"] = np.zeros(n, dtype=np.float64)
        for i, cap in zip(good, captions, strict=True):
            out["caption"][i], out["n_tokens"][i], out["finish_reason"][i] = cap.text, cap.n_tokens, cap.finish_reason
            out["seconds"][i] = per_image
        return out
