"""Batch size from free memory (`captioning.sizing`) at the real LLaVA-1.5-7B shapes, built from configs only."""

from __future__ import annotations

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig

from captioning.sizing import (
    DYNAMIC_CACHE_GROWTH,
    STATIC_CACHE_GROWTH,
    BatchSizeError,
    activation_bytes_per_row,
    auto_batch_size,
    bytes_per_row,
    free_device_bytes,
    kv_bytes_per_token,
    kv_shape,
)
from storage.errors import PipelineError

GiB = 2**30
MiB = 2**20
PROMPT, NEW = 589, 300  # LLaVA-1.5: 576 image tokens + 13 text tokens; the paper's 300 new tokens
WEIGHTS_7B = 14_120_000_000  # 7.06B parameters in bf16


@pytest.fixture(scope="module")
def llava7b() -> LlavaConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B (the numbers of llava-hf/llava-1.5-7b-hf)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)


def llava7b_dict() -> dict:
    return {"model_type": "llava", "text_config": {"num_hidden_layers": 32, "num_attention_heads": 32,
                                                   "num_key_value_heads": 32, "hidden_size": 4096,
                                                   "intermediate_size": 11008}}


def test_kv_bytes_per_token_is_half_a_mib_for_llava_1_5_7b_in_bf16(llava7b):
    assert kv_shape(llava7b) == (32, 32, 128)
    assert kv_bytes_per_token(llava7b, 2) == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # the issue's "about 0.5 MB"
    assert kv_bytes_per_token(llava7b, 4) == 2 * kv_bytes_per_token(llava7b, 2)
    assert kv_bytes_per_token(llava7b.text_config, 2) == 512 * 1024  # a bare text config works too
    assert kv_bytes_per_token(llava7b_dict(), 2) == 512 * 1024  # and a config.json dict


def test_grouped_query_attention_and_explicit_head_dim():
    gqa = MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_shape(gqa) == (32, 8, 128)
    assert kv_bytes_per_token(gqa, 2) == 128 * 1024
    explicit = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 96,
                "hidden_size": 256}
    assert kv_bytes_per_token(explicit, 2) == 2 * 2 * 2 * 96 * 2


def test_a_row_at_full_length_holds_its_cache_twice_with_the_dynamic_cache(llava7b):
    kv = 512 * 1024 * (PROMPT + NEW)  # 889 tokens: 444.5 MiB of cache per image
    act = activation_bytes_per_row(llava7b, PROMPT, 2)
    assert 0 < act < kv / 4
    assert bytes_per_row(llava7b, PROMPT, NEW, 2, STATIC_CACHE_GROWTH) == kv + act
    assert bytes_per_row(llava7b, PROMPT, NEW, 2) == 2 * kv + act
    assert DYNAMIC_CACHE_GROWTH == 2.0


def test_h100_sizes_for_llava_1_5_7b(llava7b):
    """80 GiB free, weights not yet loaded: the dynamic cache stays well below batch 128, which ran out of memory
    on an H100 at these shapes; a cache allocated once at its final size fits almost twice as many rows."""
    dynamic = auto_batch_size(llava7b, PROMPT, NEW, 80 * GiB, 2, weights_bytes=WEIGHTS_7B)
    static = auto_batch_size(llava7b, PROMPT, NEW, 80 * GiB, 2, weights_bytes=WEIGHTS_7B,
                             cache_growth=STATIC_CACHE_GROWTH)
    assert dynamic == 62 and static == 115
    budget = int(80 * GiB * 0.9) - WEIGHTS_7B
    for batch, growth in ((dynamic, DYNAMIC_CACHE_GROWTH), (static, STATIC_CACHE_GROWTH)):
        row = bytes_per_row(llava7b, PROMPT, NEW, 2, growth)
        assert batch * row <= budget < (batch + 1) * row  # the largest that fits
    # the model already on the device: its weights are no longer free, so free_bytes shrinks and weights_bytes is 0
    assert auto_batch_size(llava7b, PROMPT, NEW, 80 * GiB - WEIGHTS_7B, 2) >= dynamic - 1
    assert auto_batch_size(llava7b, PROMPT, NEW, 80 * GiB, 2, weights_bytes=WEIGHTS_7B, multiple_of=8) == 56


@pytest.mark.parametrize("knob", ["free_bytes", "max_new_tokens", "prompt_tokens", "weights_bytes", "headroom",
                                  "dtype_bytes", "cache_growth"])
def test_monotonic_in_every_argument(llava7b, knob):
    base = {"prompt_tokens": PROMPT, "max_new_tokens": NEW, "free_bytes": 139 * GiB, "dtype_bytes": 2,
            "weights_bytes": WEIGHTS_7B, "headroom": 0.1, "cache_growth": 1.5}
    steps = {"free_bytes": [40 * GiB, 80 * GiB, 139 * GiB, 400 * GiB], "max_new_tokens": [50, 150, 300, 1000],
             "prompt_tokens": [100, 589, 2000], "weights_bytes": [0, WEIGHTS_7B, 3 * WEIGHTS_7B],
             "headroom": [0.0, 0.1, 0.3], "dtype_bytes": [1, 2, 4], "cache_growth": [1.0, 1.5, 2.0]}[knob]
    sizes = [auto_batch_size(llava7b, **{**base, knob: v}, cap=10_000) for v in steps]
    more_is_more = knob == "free_bytes"
    assert sizes == sorted(sizes, reverse=not more_is_more), sizes
    assert sizes[0] != sizes[-1]


def test_cap_bounds_the_batch(llava7b):
    assert auto_batch_size(llava7b, 8, 8, 10_000 * GiB, 2) == 256
    assert auto_batch_size(llava7b, 8, 8, 10_000 * GiB, 2, cap=32) == 32
    assert auto_batch_size(llava7b, PROMPT, NEW, 80 * GiB, 2, weights_bytes=WEIGHTS_7B, multiple_of=128) == 62


def test_exactly_one_row(llava7b):
    row = bytes_per_row(llava7b, PROMPT, NEW, 2)
    assert auto_batch_size(llava7b, PROMPT, NEW, row, 2, headroom=0.0) == 1
    with pytest.raises(BatchSizeError):
        auto_batch_size(llava7b, PROMPT, NEW, row - 1, 2, headroom=0.0)


@pytest.mark.parametrize("free, weights", [(8 * GiB, WEIGHTS_7B), (14 * GiB, WEIGHTS_7B), (0, 0)])
def test_nothing_fits_is_a_clear_error(llava7b, free, weights):
    with pytest.raises(BatchSizeError, match=r"not even one row fits: .* GiB free.*589 \+ 300 tokens needs") as e:
        auto_batch_size(llava7b, PROMPT, NEW, free, 2, weights_bytes=weights)
    assert isinstance(e.value, PipelineError)  # shown to the user as-is, permanent (no retry)


@pytest.mark.parametrize("kwargs, match", [
    ({"headroom": 1.0}, "headroom"), ({"headroom": -0.1}, "headroom"), ({"cap": 0}, "cap"),
    ({"multiple_of": 0}, "multiple_of"), ({"cache_growth": 0.5}, "cache_growth"), ({"dtype_bytes": 0}, "dtype_bytes"),
    ({"prompt_tokens": 0}, "prompt_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"free_bytes": -1}, "free_bytes"),
])
def test_bad_arguments_are_refused(llava7b, kwargs, match):
    args = {"prompt_tokens": PROMPT, "max_new_tokens": NEW, "free_bytes": 80 * GiB, "dtype_bytes": 2, **kwargs}
    with pytest.raises(BatchSizeError, match=match):
        auto_batch_size(llava7b, **args)


def test_a_dict_without_the_sizes_is_refused_by_name():
    # llava-hf's config.json leaves Llama's defaults out of text_config; only a transformers config fills them in
    with pytest.raises(BatchSizeError, match="num_hidden_layers"):
        kv_bytes_per_token({"text_config": {"model_type": "llama", "vocab_size": 32064}}, 2)
    with pytest.raises(BatchSizeError, match="not a multiple"):
        kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 3, "hidden_size": 64}, 2)


def test_no_free_bytes_on_cpu():
    assert free_device_bytes("cpu") is None


def test_batch_size_auto_is_resolved_on_the_device(tiny_llava, tiny_t5, monkeypatch):
    """auto: 16 rows on CPU; on a GPU the rows whose cache fits (refill takes 4x as many images per call as a
    queue); refused for executor=ray, whose batches are fixed on the driver."""
    import captioning.captioner as captioner_module
    from captioning.captioner import Captioner
    from captioning.config import CaptionConfig
    from storage.configio import load_config
    from storage.errors import ConfigError

    base = dict(dataset="sam", model=tiny_llava, t5_tokenizer=tiny_t5, batch_size="auto",
                generation={"max_new_tokens": 12})
    assert Captioner(CaptionConfig(**base)).batch_size == 16  # CPU
    monkeypatch.setattr(captioner_module, "free_device_bytes", lambda device: 2 * 2**20)  # a 2 MiB "GPU"
    plain = Captioner(CaptionConfig(**base))
    refill = Captioner(CaptionConfig(**base, engine="refill"))
    assert 1 <= plain.batch_size < 256
    assert refill.engine.slots >= plain.batch_size  # a static cache (growth 1.0) fits more rows than a dynamic one
    assert refill.batch_size == 4 * refill.engine.slots
    with pytest.raises(ConfigError, match="executor=ray fixes them"):
        load_config(CaptionConfig, None, ["dataset=sam", "batch_size=auto", "executor=ray"])
