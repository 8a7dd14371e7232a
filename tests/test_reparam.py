"""DiT -> PixArt re-parameterisation on tiny models: exact class-free equality at t_match for any caption, a real
difference elsewhere, copied tensors equal to their sources, zero cross-attention at init, and input errors."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import DiTTransformer2DModel

from pixart.models import PRESETS, ModelConfig, build_dit, dit_forward, pixart_forward, unify_dit_embedders
from pixart.train.reparam import dit_to_pixart

CAPTION = 32
BATCH = 3


@pytest.fixture(scope="module")
def dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return build_dit(ModelConfig(preset="dit-tiny"), resolution=64).eval()


def latents(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def caption(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 12, (1,), generator=g))
    mask = (torch.rand(BATCH, tokens, generator=g) > 0.4).long()
    mask[:, 0] = 1
    return torch.randn(BATCH, tokens, CAPTION, generator=g) * 3, mask


class _NoLabel(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.zeros(labels.shape[0], self.width)


@contextmanager
def label_dropped(dit: DiTTransformer2DModel):
    """The DiT with every block's label embedding contributing zero: e(t) = timestep embedding only."""
    saved = [b.norm1.emb.class_embedder for b in dit.transformer_blocks]
    try:
        for b in dit.transformer_blocks:
            b.norm1.emb.class_embedder = _NoLabel(dit.inner_dim)
        yield dit
    finally:
        for b, s in zip(dit.transformer_blocks, saved, strict=True):
            b.norm1.emb.class_embedder = s


@torch.no_grad()
def dit_class_free(dit: DiTTransformer2DModel, x: torch.Tensor, t: int, null_class: int | None) -> torch.Tensor:
    if null_class is None:
        with label_dropped(dit):
            return dit_forward(dit, x, t, torch.zeros(BATCH, dtype=torch.long))
    return dit_forward(dit, x, t, torch.full((BATCH,), null_class))


@pytest.mark.parametrize("global_init", ["mean", "block0"])
@pytest.mark.parametrize("null_class", [None, 1000])
def test_exact_at_t_match_for_any_caption(dit, null_class, global_init):
    pixart = dit_to_pixart(dit, CAPTION, t_match=500, null_class=null_class, global_init=global_init).eval()
    for seed in range(3):
        x = latents(seed)
        ref = dit_class_free(dit, x, 500, null_class)
        with torch.no_grad():
            out = pixart_forward(pixart, x, 500, *caption(seed))
        assert ref.abs().max() > 0.1  # a non-trivial function
        assert (out - ref).abs().max() < 1e-5
    assert (dit_class_free(dit, x, 500, 7) - ref).abs().max() > 1e-3  # the class matters in the DiT


@pytest.mark.parametrize("null_class", [None, 1000])
def test_t_match_is_specific(dit, null_class):
    pixart = dit_to_pixart(dit, CAPTION, t_match=300, null_class=null_class).eval()
    x, (text, mask) = latents(0), caption(0)
    with torch.no_grad():
        gap = {t: (pixart_forward(pixart, x, t, text, mask) - dit_class_free(dit, x, t, null_class)).abs().max()
               for t in (0, 300, 500, 999)}
    assert gap[300] < 1e-5
    assert all(gap[t] > 1e-3 for t in (0, 500, 999))


def test_copied_tensors_equal_their_sources(dit):
    pixart = dit_to_pixart(dit, CAPTION)
    p, d = pixart.state_dict(), dit.state_dict()
    pairs = {"pos_embed.proj.weight": "pos_embed.proj.weight", "pos_embed.proj.bias": "pos_embed.proj.bias",
             "proj_out.weight": "proj_out_2.weight", "proj_out.bias": "proj_out_2.bias"}
    for lin in ("linear_1", "linear_2"):
        for w in ("weight", "bias"):
            pairs[f"adaln_single.emb.timestep_embedder.{lin}.{w}"] = \
                f"transformer_blocks.0.norm1.emb.timestep_embedder.{lin}.{w}"
    for i in range(dit.config.num_layers):
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
            for w in ("weight", "bias"):
                pairs[f"transformer_blocks.{i}.{name}.{w}"] = f"transformer_blocks.{i}.{name}.{w}"
    for pk, dk in pairs.items():
        assert torch.equal(p[pk], d[dk]), pk
    assert len(pairs) == 4 + 4 + 12 * dit.config.num_layers
    assert torch.equal(pixart.pos_embed.pos_embed, dit.pos_embed.pos_embed)
    assert pixart.config.interpolation_scale == 1.0 and pixart.config.sample_size == dit.config.sample_size


def test_global_linear_and_new_parts_initialised_as_documented(dit):
    linears = [b.norm1.linear for b in dit.transformer_blocks]
    mean = dit_to_pixart(dit, CAPTION, global_init="mean").adaln_single.linear
    assert torch.allclose(mean.weight, torch.stack([lin.weight for lin in linears]).mean(0), atol=1e-7)
    assert torch.allclose(mean.bias, torch.stack([lin.bias for lin in linears]).mean(0), atol=1e-7)
    pixart = dit_to_pixart(dit, CAPTION, global_init="block0")
    assert torch.equal(pixart.adaln_single.linear.weight, linears[0].weight)
    for block in pixart.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn2.to_q.weight.abs().sum() > 0 and block.attn2.to_k.weight.shape == (24, 24)
    for lin in (pixart.caption_projection.linear_1, pixart.caption_projection.linear_2):
        assert not lin.bias.any() and 0.01 < lin.weight.std() < 0.03
    assert pixart.caption_projection.linear_1.in_features == CAPTION


def test_cross_attention_adds_zero_at_init(dit):
    pixart = dit_to_pixart(dit, CAPTION, null_class=1000).eval()
    x = latents(1)
    with torch.no_grad():
        for t in (0, 123, 500, 999):
            outs = [pixart_forward(pixart, x, t, *caption(seed)) for seed in range(3)]
            assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_affine_norms_are_carried():
    torch.manual_seed(1)
    arch = {**PRESETS["dit-tiny"], "norm_elementwise_affine": True}
    dit = DiTTransformer2DModel(**arch, sample_size=8).eval()
    unify_dit_embedders(dit)
    with torch.no_grad():
        for b in dit.transformer_blocks:
            b.norm3.weight.normal_(1.0, 0.2)
            b.norm3.bias.normal_(0.0, 0.2)
    pixart = dit_to_pixart(dit, CAPTION).eval()
    assert torch.equal(pixart.transformer_blocks[1].norm2.weight, dit.transformer_blocks[1].norm3.weight)
    x = latents(2)
    with torch.no_grad():
        assert (pixart_forward(pixart, x, 500, *caption(2)) - dit_class_free(dit, x, 500, None)).abs().max() < 1e-5


def test_eps_mismatch_warns_and_stays_close():
    torch.manual_seed(2)
    dit = DiTTransformer2DModel(**{**PRESETS["dit-tiny"], "norm_eps": 1e-5}, sample_size=8).eval()
    unify_dit_embedders(dit)
    with pytest.warns(UserWarning, match="eps"):
        pixart = dit_to_pixart(dit, CAPTION).eval()
    x = latents(3)
    with torch.no_grad():
        assert (pixart_forward(pixart, x, 500, *caption(3)) - dit_class_free(dit, x, 500, None)).abs().max() < 1e-3


def test_bad_inputs(dit):
    for bad in (0, -4):
        with pytest.raises(ValueError, match="caption_channels"):
            dit_to_pixart(dit, bad)
    with pytest.raises(ValueError, match="t_match"):
        dit_to_pixart(dit, CAPTION, t_match=1000)
    with pytest.raises(ValueError, match="null_class"):
        dit_to_pixart(dit, CAPTION, null_class=1001)
    with pytest.raises(ValueError, match="global_init"):
        dit_to_pixart(dit, CAPTION, global_init="zeros")
    no_sigma = DiTTransformer2DModel(**{**PRESETS["dit-tiny"], "out_channels": 4}, sample_size=8)
    unify_dit_embedders(no_sigma)
    with pytest.raises(ValueError, match="learned-sigma"):
        dit_to_pixart(no_sigma, CAPTION)
    untied = DiTTransformer2DModel(**PRESETS["dit-tiny"], sample_size=8)  # diffusers: independent embedders
    with pytest.raises(ValueError, match="block 1 norm1.emb"):
        dit_to_pixart(untied, CAPTION)
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        dit_to_pixart(torch.nn.Linear(2, 2), CAPTION)
