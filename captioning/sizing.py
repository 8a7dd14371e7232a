"""Batch size from free accelerator memory: the largest batch whose KV cache and activations fit beside the weights.

    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained("llava-hf/llava-1.5-7b-hf")
    kv_bytes_per_token(cfg, dtype_bytes=2)               # 524288: 2 (K, V) x 32 layers x 32 heads x 128 dims x 2 B
    auto_batch_size(cfg, prompt_tokens=589, max_new_tokens=300, free_bytes=80 * 2**30, dtype_bytes=2,
                    weights_bytes=14_100_000_000)        # 62 on an 80 GiB card with the dynamic cache

Memory for a batch of B rows, each `prompt_tokens + max_new_tokens` long:

    weights + B x (cache_growth x kv_bytes_per_token x (prompt + max_new) + activation_bytes_per_row)
        <= free_bytes x (1 - headroom)

`cache_growth` is 2.0 by default, for transformers' `DynamicCache`: it grows every layer's K and V by `torch.cat`
at each step, so old and new copies exist together for a moment and the caching allocator cannot reuse the freed,
slightly too small blocks for the next, larger ones. On an H100 at LLaVA-1.5-7B shapes (589 + 300 tokens) batch 128
ran out of memory although one copy of its cache (56 GiB) plus the weights (13 GiB) fits in 80 GiB
(see the GPU notes). Use 1.0 for a cache that is allocated once at its final size (static or paged). The estimate is
deliberately conservative: running out of memory mid-shard costs far more than a somewhat smaller batch. (Batch 96
did fit there, which a growth of about 1.2 would allow: measure before lowering it.)

Torch-free at import: `free_device_bytes` imports torch only when called. Configs may be transformers config
objects (a LLaVA-family `LlavaConfig`, or a bare text config) or the equivalent dicts of a `config.json`; a dict
must spell out every size it needs, since transformers' defaults are not applied to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from storage.errors import PipelineError

DYNAMIC_CACHE_GROWTH = 2.0  # old + new copy of the cache during torch.cat growth (DynamicCache)
STATIC_CACHE_GROWTH = 1.0  # allocated once at its final size (StaticCache, paged attention)
GiB = 2**30


class BatchSizeError(PipelineError):
    """Not even one row fits in the free memory, or the config lacks a size the estimate needs."""


def _get(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def text_config(config: Any) -> Any:
    """The language model's config of a LLaVA-family (or any multimodal) config; a text config as it is."""
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    for key in ("text_config", "language_config", "llm_config"):
        sub = _get(config, key)
        if sub is not None:
            return sub
    return config


def _require(config: Any, *names: str) -> int:
    """The first of `names` that `config` sets, as a positive int; BatchSizeError naming them when none is set."""
    for name in names:
        value = _get(config, name)
        if value is not None:
            if int(value) <= 0:
                raise BatchSizeError(f"text config has {name}={value!r}; it must be positive")
            return int(value)
    raise BatchSizeError(f"text config sets none of {', '.join(names)}: cannot size the KV cache "
                         f"(pass a transformers config, which fills in the model type's defaults)")


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the language model of `config`."""
    text = text_config(config)
    layers = _require(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _require(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _get(text, "num_key_value_heads")
    kv_heads = heads if kv_heads is None else _require(text, "num_key_value_heads")
    head_dim = _get(text, "head_dim")
    if head_dim is None:
        hidden = _require(text, "hidden_size", "n_embd", "d_model")
        if hidden % heads:
            raise BatchSizeError(f"text config hidden size {hidden} is not a multiple of its {heads} heads")
        head_dim = hidden // heads
    return layers, kv_heads, int(head_dim)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of KV cache one token of one row holds: 2 (K and V) x layers x KV heads x head dim x dtype bytes.

    LLaVA-1.5-7B (Llama-2-7B: 32 layers, 32 heads of 128) in bf16: 524288 bytes, 0.5 MiB per token per image."""
    if dtype_bytes <= 0:
        raise BatchSizeError(f"dtype_bytes must be positive, not {dtype_bytes}")
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def activation_bytes_per_row(config: Any, prompt_tokens: int, dtype_bytes: int) -> int:
    """Peak transient activations of one row, reached at prefill (the whole prompt in one forward pass).

    An upper estimate for one decoder layer at a time: the residual stream, normed input and attention output
    (4 x hidden per token), the MLP's gate, up and product (3 x intermediate per token), and the attention scores
    (heads x prompt^2) as the math SDPA kernel materialises them; flash and memory-efficient kernels need less.
    Logits are computed for the last position only and are negligible."""
    text = text_config(config)
    hidden = _require(text, "hidden_size", "n_embd", "d_model")
    heads = _require(text, "num_attention_heads", "n_head", "num_heads")
    intermediate = _get(text, "intermediate_size") or 4 * hidden
    per_token = 4 * hidden + 3 * int(intermediate)
    return (prompt_tokens * per_token + heads * prompt_tokens * prompt_tokens) * dtype_bytes


def bytes_per_row(config: Any, prompt_tokens: int, max_new_tokens: int, dtype_bytes: int,
                  cache_growth: float = DYNAMIC_CACHE_GROWTH) -> int:
    """Memory one row of a batch needs at its peak: its KV cache at full length (times `cache_growth`) plus its
    prefill activations."""
    if prompt_tokens <= 0 or max_new_tokens <= 0:
        raise BatchSizeError(f"prompt_tokens ({prompt_tokens}) and max_new_tokens ({max_new_tokens}) must be "
                             f"positive")
    if cache_growth < 1.0:
        raise BatchSizeError(f"cache_growth must be at least 1.0, not {cache_growth}")
    kv = kv_bytes_per_token(config, dtype_bytes) * (prompt_tokens + max_new_tokens)
    return int(cache_growth * kv) + activation_bytes_per_row(config, prompt_tokens, dtype_bytes)


def auto_batch_size(model_config: Any, prompt_tokens: int, max_new_tokens: int, free_bytes: int, dtype_bytes: int,
                    weights_bytes: int = 0, headroom: float = 0.1, cap: int = 256,
                    cache_growth: float = DYNAMIC_CACHE_GROWTH, multiple_of: int = 1) -> int:
    """The largest batch (at most `cap`, rounded down to a multiple of `multiple_of` when at least that many fit)
    whose KV cache and activations fit in `free_bytes` after `weights_bytes` and a `headroom` share of `free_bytes`.

    `free_bytes` is what the device has free now (`free_device_bytes`): pass `weights_bytes=0` when the model is
    already loaded, its size when it is not. `prompt_tokens` counts the image tokens (589 for LLaVA-1.5: 576 image
    tokens and the text). Raises BatchSizeError, naming the numbers, when not even one row fits."""
    if not 0.0 <= headroom < 1.0:
        raise BatchSizeError(f"headroom must be in [0, 1), not {headroom}")
    if cap < 1 or multiple_of < 1:
        raise BatchSizeError(f"cap ({cap}) and multiple_of ({multiple_of}) must be at least 1")
    if weights_bytes < 0 or free_bytes < 0:
        raise BatchSizeError(f"free_bytes ({free_bytes}) and weights_bytes ({weights_bytes}) cannot be negative")
    row = bytes_per_row(model_config, prompt_tokens, max_new_tokens, dtype_bytes, cache_growth)
    budget = int(free_bytes * (1.0 - headroom)) - weights_bytes
    fits = budget // row if budget > 0 else 0
    if fits < 1:
        raise BatchSizeError(
            f"not even one row fits: {free_bytes / GiB:.2f} GiB free, less {headroom:.0%} headroom and "
            f"{weights_bytes / GiB:.2f} GiB of weights, leaves {budget / GiB:.2f} GiB; one row of "
            f"{prompt_tokens} + {max_new_tokens} tokens needs {row / GiB:.3f} GiB (KV cache x{cache_growth:g} and "
            f"activations). Use a smaller dtype, fewer max_new_tokens, or a larger device")
    batch = min(cap, fits)
    return batch - batch % multiple_of if batch >= multiple_of else batch


def free_device_bytes(device: Any = None) -> int | None:
    """Free memory of a CUDA device in bytes (`torch.cuda.mem_get_info`), None for a CPU device or without CUDA.
    Memory that torch's caching allocator holds but does not use counts as free."""
    import torch

    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + reserved_unused)
