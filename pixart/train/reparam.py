"""DiT -> PixArt re-parameterisation (paper §2.3): start text-to-image training from a class-conditional DiT.

    pixart = dit_to_pixart(dit, caption_channels=4096)     # t_match 500, class dropped, global linear = mean

At t = t_match the converted model computes the DiT's class-free function (up to float rounding) for any caption:
every block's modulation (6 x dim) and the final layer's (shift, scale) equal the DiT's, and cross-attention adds
zero because its output projection is zero. Away from t_match they differ, since one global adaLN linear replaces
the DiT's per-block ones.

Choices the paper leaves open (reference §4):
- "Without the class": `null_class=None` drops the label embedding, e(t) = t_emb(t); an int (1000, DiT's CFG
  null class) uses e(t) = t_emb(t) + label_emb(null_class), the DiT's unconditional branch.
- The global `adaln_single.linear`: `global_init="mean"` averages the blocks' adaLN linears (the table then holds
  each block's deviation from the average); `"block0"` copies block 0's.
- The final layer: DiT's `proj_out_1` (shift, scale from SiLU(e)) has no counterpart; PixArt's 2 x dim table is
  set so that table + t_emb(t_match) equals the DiT's (shift, scale) at t_match.

diffusers quirk, left alone: its DiT embeds timesteps with `downscale_freq_shift=1`, its PixArt (like both original
codes) with 0, so the copied timestep MLP sees slightly different sinusoids. The tables absorb this at t_match.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

NUM_TIMESTEPS = 1000  # IDDPM steps of both stages
PIXART_EPS = 1e-6


def _check(dit: DiTTransformer2DModel, caption_channels: int, t_match: int, null_class: int | None,
           global_init: str) -> None:
    from diffusers import DiTTransformer2DModel

    if not isinstance(dit, DiTTransformer2DModel):
        raise ValueError(f"expected a DiTTransformer2DModel, got {type(dit).__name__}")
    if not isinstance(caption_channels, int) or caption_channels <= 0:
        raise ValueError(f"caption_channels must be a positive int (T5 width), got {caption_channels!r}")
    if not 0 <= t_match < NUM_TIMESTEPS:
        raise ValueError(f"t_match must be in [0, {NUM_TIMESTEPS}), got {t_match}")
    if global_init not in ("mean", "block0"):
        raise ValueError(f"global_init must be 'mean' or 'block0', got {global_init!r}")
    if dit.out_channels != 2 * dit.config.in_channels:
        raise ValueError(f"the DiT predicts {dit.out_channels} channels for {dit.config.in_channels} in: PixArt needs "
                         f"a learned-sigma DiT ({2 * dit.config.in_channels} out: eps + variance range)")
    rows = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    if null_class is not None and not 0 <= null_class < rows:
        raise ValueError(f"null_class {null_class} is outside the DiT's label table (0..{rows - 1})")
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(dit.transformer_blocks[1:], start=1):
        for name, value in block.norm1.emb.state_dict().items():
            if not torch.equal(value, first[name]):
                raise ValueError(f"the DiT's conditioning embedders differ (block {i} norm1.emb.{name} != block 0's);"
                                 " PixArt has one timestep embedder, so they must be equal copies")


def _build_like(dit: DiTTransformer2DModel, caption_channels: int) -> PixArtTransformer2DModel:
    from diffusers import PixArtTransformer2DModel

    c = dit.config
    width = c.num_attention_heads * c.attention_head_dim
    if c.norm_eps != PIXART_EPS:
        warnings.warn(f"the DiT's MLP LayerNorm eps is {c.norm_eps} (diffusers' DiT default is 1e-5), PixArt's is "
                      f"{PIXART_EPS}: the converted model matches the DiT only approximately", stacklevel=3)
    weight = dit.proj_out_2.weight
    with torch.device(weight.device):
        pixart = PixArtTransformer2DModel(
            num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
            in_channels=c.in_channels, out_channels=dit.out_channels, num_layers=c.num_layers, dropout=c.dropout,
            cross_attention_dim=width, attention_bias=c.attention_bias, sample_size=c.sample_size,
            patch_size=c.patch_size, activation_fn=c.activation_fn, num_embeds_ada_norm=1000,
            upcast_attention=c.upcast_attention, norm_type="ada_norm_single",
            norm_elementwise_affine=c.norm_elementwise_affine, norm_eps=PIXART_EPS,
            interpolation_scale=float(dit.pos_embed.interpolation_scale), use_additional_conditions=False,
            caption_channels=caption_channels)
    if pixart.dtype != weight.dtype:  # diffusers warns on any .to(dtype), even a no-op
        pixart.to(weight.dtype)
    if not torch.equal(pixart.pos_embed.pos_embed, dit.pos_embed.pos_embed.to(pixart.pos_embed.pos_embed)):
        raise ValueError("the PixArt positional embedding differs from the DiT's; cannot convert exactly")
    return pixart


def _copy(dst: torch.nn.Module, src: torch.nn.Module, what: str) -> None:
    """Copy every tensor of `src` into the same-named tensor of `dst`; shapes and names must match."""
    d, s = dst.state_dict(), src.state_dict()
    if d.keys() != s.keys() or any(d[k].shape != s[k].shape for k in s):
        raise ValueError(f"{what}: the PixArt and DiT modules differ in names or shapes")
    dst.load_state_dict(s)


def _init_new(pixart: PixArtTransformer2DModel) -> None:
    """PixArt's init for the parts DiT lacks: cross-attention xavier with a zero output projection, so it adds
    exactly 0 at first; caption projection Normal(0, 0.02) weights and zero biases."""
    for block in pixart.transformer_blocks:
        for lin in (block.attn2.to_q, block.attn2.to_k, block.attn2.to_v):
            torch.nn.init.xavier_uniform_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    for lin in (pixart.caption_projection.linear_1, pixart.caption_projection.linear_2):
        torch.nn.init.normal_(lin.weight, std=0.02)
        torch.nn.init.zeros_(lin.bias)


def _linear64(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return F.linear(F.silu(x.double()), lin.weight.double(), lin.bias.double())


def _set_modulation(dit: DiTTransformer2DModel, pixart: PixArtTransformer2DModel, t_match: int,
                    null_class: int | None, global_init: str) -> None:
    """adaLN-single tables so that, at t_match, table + global modulation = the DiT block's class-free modulation
    (computed in float64, then cast)."""
    emb = dit.transformer_blocks[0].norm1.emb
    dtype, t = dit.proj_out_2.weight.dtype, torch.tensor([t_match], device=dit.proj_out_2.weight.device)
    e = emb.timestep_embedder(emb.time_proj(t).to(dtype))  # e(t) without the class
    if null_class is not None:
        e = e + emb.class_embedder.embedding_table.weight[null_class][None]
    linears = [block.norm1.linear for block in dit.transformer_blocks]
    g = pixart.adaln_single.linear
    if global_init == "mean":
        g.weight.copy_(torch.stack([lin.weight for lin in linears]).double().mean(0))
        g.bias.copy_(torch.stack([lin.bias for lin in linears]).double().mean(0))
    else:
        _copy(g, linears[0], "adaln_single.linear")
    _, t_emb = pixart.adaln_single(t, None, batch_size=1, hidden_dtype=dtype)  # PixArt's own sinusoid
    t0 = _linear64(t_emb, g)
    width = t_emb.shape[-1]
    for block, lin in zip(pixart.transformer_blocks, linears, strict=True):
        block.scale_shift_table.copy_((_linear64(e, lin) - t0).reshape(6, width))  # DiT's chunk order
    shift, scale = _linear64(e, dit.proj_out_1).chunk(2, dim=1)  # diffusers: row 0 shift, row 1 scale
    pixart.scale_shift_table.copy_(torch.cat([shift, scale]) - t_emb.double())


def dit_to_pixart(dit: DiTTransformer2DModel, caption_channels: int, t_match: int = 500, null_class: int | None = None,
                  global_init: str = "mean") -> PixArtTransformer2DModel:
    """A PixArt with the DiT's shapes and weights that equals the DiT's class-free output at t = t_match.

    Copied: patch embedding, timestep embedder (block 0's; all blocks' must agree), self-attention, MLP, MLP norm
    (when affine) and the output projection. New: cross-attention (zero output), caption projection, and the
    adaLN-single linear and tables (see the module docstring). The result is in the DiT's mode, dtype and device.
    """
    _check(dit, caption_channels, t_match, null_class, global_init)
    pixart = _build_like(dit, caption_channels)
    with torch.no_grad():
        _copy(pixart.pos_embed.proj, dit.pos_embed.proj, "patch embedding")
        _copy(pixart.adaln_single.emb.timestep_embedder, dit.transformer_blocks[0].norm1.emb.timestep_embedder,
              "timestep embedder")
        for i, (p, d) in enumerate(zip(pixart.transformer_blocks, dit.transformer_blocks, strict=True)):
            _copy(p.attn1, d.attn1, f"block {i} self-attention")
            _copy(p.ff, d.ff, f"block {i} MLP")
            _copy(p.norm2, d.norm3, f"block {i} MLP norm")  # no tensors unless the norms are affine
            if p.norm1.weight is not None:  # DiT's first norm (inside adaLN-Zero) has no affine: identity
                torch.nn.init.ones_(p.norm1.weight)
                torch.nn.init.zeros_(p.norm1.bias)
        _copy(pixart.proj_out, dit.proj_out_2, "output projection")
        _init_new(pixart)
        _set_modulation(dit, pixart, t_match, null_class, global_init)
    return pixart.train(dit.training)
