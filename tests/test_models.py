"""Model presets over diffusers: real-shape parameter counts (meta device), tiny builds and forwards, micro-conditions,
gradient checkpointing, save/load round trips and the errors of `load_transformer`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pixart.models import (
    PRESETS,
    ModelConfig,
    ModelMismatchError,
    build_dit,
    build_pixart,
    count_params,
    dit_forward,
    load_transformer,
    pe_interpolation,
    pixart_forward,
)
from storage.errors import PipelineError
from storage.hub import ModelLoadError

TINY = ModelConfig(preset="pixart-tiny")


def inputs(batch: int = 2, side: int = 8, tokens: int = 5, channels: int = 32, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    text = torch.randn(batch, tokens, channels, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 3:] = 0
    return x, text, mask


def test_real_shape_parameter_counts():
    with torch.device("meta"):
        pixart = build_pixart(ModelConfig(preset="pixart-xl-2"), resolution=256)
        pixart_ms = build_pixart(ModelConfig(preset="pixart-xl-2", multi_scale=True), resolution=1024)
        dit = build_dit(ModelConfig(preset="dit-xl-2"), resolution=256)
    assert count_params(pixart) == 610_856_096  # 610.86M, the paper's 611M
    assert count_params(pixart_ms) - count_params(pixart) == 2 * 246_528  # size + aspect-ratio embedders
    # diffusers' DiT holds one timestep+label embedder per block (27 extra copies); without them it is DiT-XL/2's
    # 675.13M minus the original's frozen 256x1152 positional-embedding parameter.
    per_copy = (256 * 1152 + 1152) + (1152 * 1152 + 1152) + 1001 * 1152
    assert count_params(dit) - 27 * per_copy == 675_129_632 - 256 * 1152
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1001  # + null 1000


def test_config_and_presets_validated():
    with pytest.raises(ValidationError, match="unknown model preset"):
        ModelConfig(preset="pixart-xxl")
    with pytest.raises(ValidationError):
        ModelConfig(preset="pixart-tiny", lr=1.0)
    with pytest.raises(ValueError, match="is a dit model"):
        build_pixart(ModelConfig(preset="dit-tiny"), 64)
    with pytest.raises(ValueError, match="is a pixart model"):
        build_dit(TINY, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_pixart(TINY, 100)
    with pytest.raises(ValueError, match="caption_channels"):
        build_pixart(TINY, 64, caption_channels=0)
    assert {"pixart-xl-2", "dit-xl-2", "pixart-tiny", "dit-tiny"} <= PRESETS.keys()


def test_interpolation_scale():
    assert [pe_interpolation(r) for r in (256, 512, 1024, 2048)] == [1.0, 1.0, 2.0, 4.0]
    assert build_pixart(TINY, 64).config.interpolation_scale == 1.0
    half = ModelConfig(preset="pixart-tiny", interpolation_scale=0.5)  # the released diffusers 256 value
    assert build_pixart(half, 64).config.interpolation_scale == 0.5
    assert build_pixart(TINY, 64).use_additional_conditions is False  # explicit, whatever the sample size


def test_tiny_forward_shapes():
    torch.manual_seed(0)
    x, text, mask = inputs()
    pixart = build_pixart(TINY, 64, caption_channels=32).eval()
    dit = build_dit(ModelConfig(preset="dit-tiny"), 64).eval()
    assert pixart.config.sample_size == 8 and dit.config.sample_size == 8
    with torch.no_grad():
        assert pixart_forward(pixart, x, torch.tensor([10, 900]), text, mask).shape == (2, 8, 8, 8)
        assert pixart_forward(pixart, x, 500, text, None).shape == (2, 8, 8, 8)
        assert dit_forward(dit, x, 500, torch.tensor([3, 1000])).shape == (2, 8, 8, 8)
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    assert all(torch.equal(v, dit.transformer_blocks[1].norm1.emb.state_dict()[k]) for k, v in first.items())


def test_multi_scale_micro_conditions_change_the_output():
    torch.manual_seed(0)
    x, text, mask = inputs()
    model = build_pixart(ModelConfig(preset="pixart-tiny", multi_scale=True), 64).eval()
    hw, ar = torch.tensor([[64.0, 64.0]] * 2), torch.tensor([[1.0]] * 2)
    with torch.no_grad():
        base = pixart_forward(model, x, 500, text, mask, hw, ar)
        other_hw = pixart_forward(model, x, 500, text, mask, torch.tensor([[48.0, 96.0]] * 2), ar)
        other_ar = pixart_forward(model, x, 500, text, mask, hw, torch.tensor([[0.5]] * 2))
    assert base.shape == (2, 8, 8, 8)
    assert (base - other_hw).abs().max() > 1e-4 and (base - other_ar).abs().max() > 1e-4
    with pytest.raises(ValueError, match="img_hw"):
        pixart_forward(model, x, 500, text, mask)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_gradient_checkpointing_recomputes_the_blocks_with_the_same_gradients(kind):
    """gradient_checkpointing=True: the blocks keep only their inputs for the backward and recompute the rest
    (counted: the tensors autograd saves during the forward), and the gradients are the plain model's. The recompute
    repeats the same float32 operations on the same inputs; only the order in which autograd sums contributions to a
    tensor that feeds several blocks (the timestep embedding) may change, by an ulp or so per sum: hence a tolerance
    of 1e-5 of each gradient's largest entry."""
    build, preset = (build_pixart, "pixart-tiny") if kind == "pixart" else (build_dit, "dit-tiny")
    torch.manual_seed(0)
    plain = build(ModelConfig(preset=preset), 64).train()
    ckpt = build(ModelConfig(preset=preset, gradient_checkpointing=True), 64).train()
    assert plain.gradient_checkpointing is False and ckpt.gradient_checkpointing is True
    with torch.no_grad():  # every weight nonzero: the zero-initialised projections would hide the blocks' gradients
        for p in plain.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    ckpt.load_state_dict(plain.state_dict())
    x, text, mask = inputs()

    def forward_backward(model: torch.nn.Module) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if kind == "pixart":
                out = pixart_forward(model, x, torch.tensor([10, 900]), text, mask)
            else:
                for block in model.transformer_blocks:  # no label dropout (global RNG): the same labels in both
                    block.norm1.emb.class_embedder.dropout_prob = 0.0
                out = dit_forward(model, x, torch.tensor([10, 900]), torch.tensor([3, 1000]))
        out.square().mean().backward()
        return sum(saved)

    plain_saved, ckpt_saved = forward_backward(plain), forward_backward(ckpt)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    grads = 0
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            grads += 1
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-5 * float(a.grad.abs().max()), msg=name)
    assert grads > len(list(plain.parameters())) // 2


@pytest.fixture
def saved(tmp_path) -> dict[str, Path]:
    torch.manual_seed(0)
    pixart = build_pixart(TINY, 64).eval()
    dit = build_dit(ModelConfig(preset="dit-tiny"), 64).eval()
    pixart.save_pretrained(tmp_path / "pixart")
    dit.save_pretrained(tmp_path / "dit")
    return {"pixart": tmp_path / "pixart", "dit": tmp_path / "dit", "pixart_model": pixart, "dit_model": dit}


def test_save_load_round_trip(saved):
    assert (saved["pixart"] / "diffusion_pytorch_model.safetensors").is_file()
    x, text, mask = inputs()
    loaded = load_transformer(str(saved["pixart"]), "pixart", expect={"caption_channels": 32, "sample_size": 8,
                                                                      "in_channels": 4, "interpolation_scale": 1.0})
    dit = load_transformer(str(saved["dit"]), "dit", expect={"num_embeds_ada_norm": 1000})
    labels = torch.tensor([1, 1000])
    with torch.no_grad():
        assert torch.equal(pixart_forward(loaded, x, 500, text, mask),
                           pixart_forward(saved["pixart_model"], x, 500, text, mask))
        assert torch.equal(dit_forward(dit, x, 500, labels), dit_forward(saved["dit_model"], x, 500, labels))


def test_mismatch_names_each_key_with_both_values(saved):
    with pytest.raises(ModelMismatchError) as e:
        load_transformer(str(saved["pixart"]), "pixart",
                         expect={"caption_channels": 4096, "sample_size": 32, "in_channels": 4, "nonsense": 1})
    message = str(e.value)
    assert "caption_channels: expected 4096, found 32" in message
    assert "sample_size: expected 32, found 8" in message
    assert "nonsense: expected 1, found '<absent>'" in message
    assert "in_channels" not in message
    assert isinstance(e.value, ValueError) and isinstance(e.value, PipelineError)


@pytest.mark.parametrize("kind, other", [("pixart", "dit"), ("dit", "pixart")])
def test_wrong_architecture_names_both_classes(saved, kind, other):
    with pytest.raises(ModelMismatchError) as e:
        load_transformer(str(saved[other]), kind)
    assert "PixArtTransformer2DModel" in str(e.value) and "DiTTransformer2DModel" in str(e.value)


def test_missing_path_and_pickle_only_checkpoints(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_transformer(str(missing), "pixart")
    with pytest.raises(ValueError, match="kind"):
        load_transformer(str(missing), "unet")
    build_pixart(TINY, 64).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="never unpickled"):
        load_transformer(str(tmp_path / "pickled"), "pixart")


@pytest.mark.parametrize("multi_scale", [False, True])
def test_init_like_pixart_as_the_official_initialize(multi_scale):
    """PixArt.initialize_weights, and PixArtMS.initialize for the size and aspect-ratio embedders (Normal(0, 0.02),
    not xavier: xavier's std here is 0.06-0.08). Bounds are > 15 standard errors of the sample std wide."""
    from pixart.models import ModelConfig, build_pixart, init_like_pixart

    torch.manual_seed(0)
    model = build_pixart(ModelConfig(preset="pixart-small", multi_scale=multi_scale), resolution=256,
                         caption_channels=64)
    init_like_pixart(model)
    model.requires_grad_(False)  # read the weights as plain numbers below
    emb = model.adaln_single.emb
    normal = [emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2, model.adaln_single.linear,
              model.caption_projection.linear_1, model.caption_projection.linear_2]
    if multi_scale:
        normal += [emb.resolution_embedder.linear_1, emb.resolution_embedder.linear_2,
                   emb.aspect_ratio_embedder.linear_1, emb.aspect_ratio_embedder.linear_2]
    else:
        assert not hasattr(emb, "resolution_embedder")
    for lin in normal:
        assert 0.017 < float(lin.weight.std()) < 0.023 and not lin.bias.any(), lin
    q = model.transformer_blocks[0].attn1.to_q
    bound = (6 / (q.in_features + q.out_features)) ** 0.5  # xavier-uniform's bound
    assert float(q.weight.abs().max()) <= bound and float(q.weight.std()) > 0.5 * bound / 3**0.5
    assert not model.transformer_blocks[0].attn2.to_out[0].weight.any() and not model.proj_out.weight.any()
