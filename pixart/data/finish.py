"""Finishing a batch: sampling its latents from the stored posterior and padding its T5 rows to max_tokens with a
mask. The loader does both on its CPU thread by default; with sample_posterior=False / pad_text=False it hands over
the stored arrays instead and the training step calls these on the GPU (data.finish=auto there): the same batch,
less work and fewer bytes on the host."""

from __future__ import annotations

import torch

from storage.config import DEFAULT_MAX_TOKENS

SCALING_FACTOR = 0.18215  # SD VAE latent scale, as PixArt-alpha trains


def pad_text(rows: torch.Tensor, n_tokens: torch.Tensor,
             max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(text [B, max_tokens, d] zero-padded, mask [B, max_tokens] int64) on `rows`' device from the valid rows of
    B samples back to back ([sum of n_tokens, d]) and the per-sample counts (a CPU tensor: the scatter's indices are
    built on the host, so nothing waits on the device). Equal to the loader's own padding (pad_text=True)."""
    n = n_tokens.cpu()
    mask = torch.arange(max_tokens) < n[:, None]
    index = torch.arange(mask.numel())[mask.flatten()]  # the slots the rows land in, sample-major
    if index.numel() != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} text rows for n_tokens summing to {index.numel()}")
    text = rows.new_zeros((len(n), max_tokens, *rows.shape[1:]))
    text.view(len(n) * max_tokens, *rows.shape[1:]).index_copy_(0, index.to(rows.device), rows)
    return text, mask.to(device=rows.device, dtype=torch.int64)


def sample_posterior(posterior: torch.Tensor, noise_seed: torch.Tensor,
                     scaling_factor: float = SCALING_FACTOR) -> torch.Tensor:
    """Latents [B, C, h, w] fp32 from stored posteriors [B, 2C, h, w] (mean then std):
    (mean + std * eps) * scaling_factor, where sample i's eps comes from a generator on `posterior`'s device seeded
    with noise_seed[i]. The loader calls it on the CPU; with `sample_posterior=False` it hands over the posterior and
    the seeds instead, and training calls it on the GPU (same seeds; CUDA's generator draws other numbers than the
    CPU's, so a run keeps to one kind of device)."""
    mean, std = posterior.float().chunk(2, dim=1)
    eps = torch.empty_like(mean)
    gen = torch.Generator(device=posterior.device)
    for i, seed in enumerate(noise_seed.tolist()):
        eps[i].normal_(generator=gen.manual_seed(seed))
    return mean.add_(std.mul_(eps)).mul_(scaling_factor)
