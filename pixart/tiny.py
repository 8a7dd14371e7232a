"""Tiny random encoders for tests and the offline demo, saved with `save_pretrained` and loaded back through the
same `from_pretrained(dir)` path as real hub ids. Their features are noise: they exercise the pipeline."""

from __future__ import annotations

from pathlib import Path


def make_tiny_t5_encoder(out_dir: str | Path, tokenizer_dir: str | Path) -> str:
    """A 2-layer gated-gelu T5 encoder (d_model 32, T5-v1.1's family) saved beside a copy of a T5-style tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def make_tiny_vae(out_dir: str | Path) -> str:
    """An AutoencoderKL with the SD VAE's structure (4 blocks: /8, 4 latent channels, scaling 0.18215), 67k params."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  norm_num_groups=8, sample_size=64, scaling_factor=0.18215).save_pretrained(out_dir)
    return str(out_dir)
