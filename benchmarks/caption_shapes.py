"""Model shapes `benchmarks/bench_caption.py` builds offline (`--shape`): random weights from their configs, saved
with `save_pretrained` together with a processor, so the project's `Captioner` loads them through its real code
path. `tiny` is the test suite's random LLaVA; `llava-1.5-7b` follows ../shared/reference/gpu-notes.md (CLIP
ViT-L/14-336, Llama-2-7B, 576 image tokens, a 32k word-level tokenizer). `layers` cuts both towers for a CPU smoke
run: widths, vocabulary and prompt length stay, the figures are not the model's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioning.config import PAPER_PROMPT
from storage.hub import quiet_progress


@dataclass(frozen=True)
class Shape:
    """A model shape the benchmark can build offline: `build(out_dir, device, dtype, layers)` saves a model and its
    processor with save_pretrained and returns a one-line description."""

    name: str
    build: Callable[[Path, torch.device, torch.dtype, int | None], str]


def build_tiny(out_dir: Path, device: torch.device, dtype: torch.dtype, layers: int | None) -> str:
    """The project's tiny random LLaVA (always 2 layers, fp32 on disk; the Captioner casts it)."""
    from captioning.tiny import make_tiny_llava

    if layers is not None:
        raise SystemExit("--layers applies to the real shapes only; the tiny model has 2 layers")
    make_tiny_llava(out_dir)
    return "tiny random LLaVA (32 px, 16 image tokens, 2 layers)"


def _word_level_tokenizer(vocab_size: int, image_id: int, pad_id: int) -> Any:
    """A fast tokenizer over `vocab_size` words: <unk>, <s>, </s> at 0-2, `<image>` and `<pad>` at their ids, the
    chat template's and the prompt's words first (so the prompt tokenizes as words), then synthetic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {0: "<unk>", 1: "<s>", 2: "</s>", image_id: "<image>", pad_id: "<pad>"}
    words = iter(["USER:", "ASSISTANT:", *dict.fromkeys(PAPER_PROMPT.split())] + [f"w{i}" for i in range(vocab_size)])
    vocab = {specials[i] if i in specials else next(words): i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(list(specials.values()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])


def build_llava15_7b(out_dir: Path, device: torch.device, dtype: torch.dtype, layers: int | None) -> str:
    """LLaVA-1.5-7B at real shapes with random weights (recipe: GPU notes), built on `device` in `dtype`."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from captioning.tiny import LLAVA15_TEMPLATE

    vocab, image_id, pad_id = 32064, 32000, 32001
    text_layers, vision_layers = 32, 24
    if layers is not None:
        if layers < 1:
            raise SystemExit("--layers must be at least 1")
        text_layers, vision_layers = min(layers, text_layers), min(max(layers, 2), vision_layers)
    tok = _word_level_tokenizer(vocab, image_id, pad_id)
    # The PIL class by name where it exists (no torchvision here; it saves as CLIPImageProcessor either way)
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_proc = image_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=576)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in the target dtype, on the target device: seconds, not minutes
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    with quiet_progress():
        model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cut = f"; cut to --layers {layers}: not the model's numbers" if layers is not None else ""
    return (f"LLaVA-1.5-7B shapes, random weights ({params / 1e9:.2f}B parameters; CLIP ViT-L/14-336 "
            f"{vision_layers} layers, Llama {text_layers} layers{cut})")


SHAPES: dict[str, Shape] = {s.name: s for s in (Shape("tiny", build_tiny), Shape("llava-1.5-7b", build_llava15_7b))}
