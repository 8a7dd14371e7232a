"""`Captioner`: a LLaVA-family model loaded once, turning batches of RGB images into captions.

    cap = Captioner(CaptionConfig(dataset="sam", model="llava-hf/llava-1.5-7b-hf"))
    inputs = cap.encode([cap.prep.shrink(im) for im in images])     # CPU: pad, shrink, tokenize
    captions = cap.generate(inputs)                                  # accelerator: generate()

`engine=refill` decodes greedily with `captioning.engine.RefillEngine` instead of generate() (the default and the
reference): the same captions, but a row that finished hands its slot to the next image of the batch.

The model goes through `AutoModelForImageTextToText` + `AutoProcessor` and the processor's chat template, so any
LLaVA-family checkpoint (1.5, NeXT, OneVision) works with the same code. `__call__(batch) -> batch` serves Ray Data
actor pools without importing Ray.

Loading fails with one `ModelLoadError` line that names the model or tokenizer and what is wrong (no such directory,
no tokenizer files, not an image-text-to-text model, not cached while the hub is unreachable). A hub id is looked up
in the Hugging Face cache first, so an offline run with a cached model never touches the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioning.config import CaptionConfig
from captioning.engine import RefillEngine, check_generation_config
from captioning.images import ImagePrep
from captioning.sizing import auto_batch_size, free_device_bytes
from storage.devices import resolve_device, resolve_dtype  # noqa: F401 - importable from here too
from storage.hub import ModelLoadError, from_pretrained, quiet_progress, require_files

LLAVA = "LLaVA model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_processor(model: str) -> Any:
    """The checked processor (tokenizer + image processor) of an image-text-to-text model; ModelLoadError when the
    model is of another kind or its tokenizer or image processor files are missing."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    require_files(model, LLAVA, ("config.json",), "model config")
    config = from_pretrained(AutoConfig.from_pretrained, model, LLAVA, "model")
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelLoadError(f"{LLAVA} {model!r} is a {config.model_type!r} model, not an image-text-to-text "
                             f"(LLaVA-family) model")
    require_files(model, LLAVA, TOKENIZER_FILES, "tokenizer/processor files")
    require_files(model, LLAVA, IMAGE_PROCESSOR_FILES, "image processor files")
    processor = from_pretrained(AutoProcessor.from_pretrained, model, LLAVA, "model")
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{LLAVA} {model!r} has no image+text processor (it loads a "
                             f"{processor.__class__.__name__})")
    return processor


@dataclass
class Caption:
    """One generated caption. `text` is raw (see captioning.text.clean_caption)."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (hit max_new_tokens)


class _ForceEos:
    """generate()'s side of `stop_lengths`, a logits processor (duck-typed: transformers is imported lazily here):
    row i must emit end-of-sequence once it has `lengths[i]` new tokens, as the refill engine forces it."""

    def __init__(self, prompt_length: int, lengths: list[int], eos: int) -> None:
        self.prompt_length, self.eos = prompt_length, eos
        self.lengths = torch.tensor(lengths)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        due = self.lengths.to(scores.device) <= input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.eos] = 0.0
        return torch.where(due[:, None], forced, scores)  # a new tensor: generate() keeps `scores` as raw logits


class Captioner:
    """Loads the processor and model once (ModelLoadError when either cannot be); CPU side: `prep` (an ImagePrep:
    decode, pad, shrink) and `encode`; device side: `generate` (or `caption_stream`, captions as rows finish)."""

    def __init__(self, cfg: CaptionConfig) -> None:
        from transformers import AutoModelForImageTextToText

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        with quiet_progress():
            self.processor = load_processor(cfg.model)
            attn = "sdpa" if self.device.type == "cuda" else None
            self.model = from_pretrained(AutoModelForImageTextToText.from_pretrained, cfg.model, LLAVA, "model",
                                         dtype=self.dtype, attn_implementation=attn)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        self.model.to(self.device).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cfg.prompt}]}]
        self.prompt_text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        self.prep = ImagePrep.from_processor(self.processor, cfg.pad_to_square, cfg.decode)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id]
        self.eos_ids = set(eos_list)
        self.forced_eos = eos_list[0]  # what stop_lengths forces, in both engines
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))
        self.batch_size, rows = self._batch_sizes()
        self.engine: RefillEngine | None = None
        if cfg.engine == "refill":
            try:
                check_generation_config(self.model.generation_config)
            except ValueError as e:
                raise ModelLoadError(f"{LLAVA} {cfg.model!r}: {e}") from None
            self.engine = RefillEngine(self.model, rows, cfg.generation.max_new_tokens, self.eos_ids, self.forced_eos)

    def _batch_sizes(self) -> tuple[int, int]:
        """(images per generate() call, rows decoded together). batch_size=auto: the rows whose KV cache fits in the
        device's free memory (16 on CPU); the refill engine then takes 4x as many images per call as a queue."""
        cfg = self.cfg
        if cfg.batch_size != "auto":
            return cfg.batch_size, cfg.refill_rows or cfg.batch_size
        free = free_device_bytes(self.device)
        if free is None:
            rows = cfg.refill_rows or 16
        else:
            # the prompt's length with its image tokens (the processor expands them whatever the image's size)
            prompt_tokens = int(self.encode([Image.new("RGB", (336, 336))])["input_ids"].shape[1])
            rows = cfg.refill_rows or auto_batch_size(
                self.model.config, prompt_tokens, cfg.generation.max_new_tokens, free, self.dtype.itemsize,
                cache_growth=1.0 if cfg.engine == "refill" else 2.0)
        return (4 * rows if cfg.engine == "refill" else rows), rows

    # -- CPU side (see captioning.images.ImagePrep for decoding and padding) -------------------------------------

    def encode(self, images: list[Image.Image]) -> Any:
        """Processor inputs for a batch (pixel values + left-padded prompt tokens), on CPU."""
        return self.processor(images=images, text=[self.prompt_text] * len(images), padding=True,
                              return_tensors="pt")

    # -- device side ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, inputs: Any, stop_lengths: list[int] | None = None) -> list[Caption]:
        """Captions of an encoded batch, in its order; deterministic for a fixed seed. engine=generate: one
        generate() call; engine=refill: the batch is a queue for `refill_rows` slots (same greedy captions).
        `stop_lengths[i]` forces end-of-sequence after that many new tokens of row i (benchmarks: random weights
        never stop on their own)."""
        return [cap for _, cap in sorted(self.caption_stream(inputs, stop_lengths), key=lambda ic: ic[0])]

    @torch.inference_mode()
    def caption_stream(self, inputs: Any, stop_lengths: list[int] | None = None) -> Iterator[tuple[int, Caption]]:
        """(row, caption) pairs of an encoded batch as rows finish: in finishing order with engine=refill, in row
        order (all at the end) with engine=generate."""
        torch.manual_seed(self.cfg.generation.seed)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if stop_lengths is not None and len(stop_lengths) != inputs["input_ids"].shape[0]:
            raise ValueError(f"{len(stop_lengths)} stop_lengths for {inputs['input_ids'].shape[0]} images")
        if self.engine is not None:
            for i, tokens in self.engine.run(inputs, stop_lengths):
                yield i, self._caption(tokens)
            return
        from transformers import LogitsProcessorList

        kwargs = self.cfg.generation.generate_kwargs()
        if stop_lengths is not None:
            prompt = inputs["input_ids"].shape[1]
            kwargs["logits_processor"] = LogitsProcessorList([_ForceEos(prompt, stop_lengths, self.forced_eos)])
        out = self.model.generate(**inputs, **kwargs, pad_token_id=self.pad_id)
        for i, row in enumerate(out[:, inputs["input_ids"].shape[1]:].cpu().tolist()):
            yield i, self._caption(row)

    def _caption(self, row: list[int]) -> Caption:
        """A row of new tokens -> Caption: up to the first end-of-sequence ("stop"), else without padding ("length").
        One function for both engines, so their captions can only differ by the tokens."""
        stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        tokens = row[:stop] if stop is not None else [t for t in row if t != self.pad_id]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Caption(text=text, n_tokens=len(tokens), finish_reason="stop" if stop is not None else "length")

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
