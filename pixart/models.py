"""Model presets over diffusers' transformers: no hand-written network, so checkpoints stay diffusers-loadable.

    cfg = ModelConfig(preset="pixart-xl-2", gradient_checkpointing=True)
    model = build_pixart(cfg, resolution=256)                        # PixArtTransformer2DModel, 610.86M params
    out = pixart_forward(model, x_t, t, text, mask)                  # [B, 8, h, w]: eps and the variance range
    dit = build_dit(ModelConfig(preset="dit-xl-2"), resolution=256)  # stage 1, class-conditional ImageNet

Config keys the presets set, and why (diffusers' own defaults differ in places):
- `norm_type`: "ada_norm_single" = PixArt's adaLN-single (one global `adaln_single.linear`, a 6 x dim
  `scale_shift_table` per block); "ada_norm_zero" = DiT's per-block adaLN-Zero. The builders use it to tell the
  two kinds apart.
- `norm_elementwise_affine=False`, `norm_eps=1e-6`: the block LayerNorms of both papers. diffusers' DiT defaults
  to eps 1e-5; the original DiT and PixArt use 1e-6, and equal eps keeps the DiT -> PixArt re-param exact.
- `attention_bias=True` (qkv_bias), `activation_fn="gelu-approximate"` (tanh GELU in the MLP).
- `num_embeds_ada_norm=1000`: for DiT, the ImageNet classes; diffusers adds one row (1001) as the CFG null class
  1000 because its label dropout is 0.1. PixArt does not use the value, but diffusers requires it to be set.
- `cross_attention_dim` = hidden size (the caption projection maps T5 features to it), `caption_channels` = the
  T5 width (4096 for T5-XXL), `in_channels=4` (SD-VAE latents), `out_channels=8` (eps + learned variance range).
- Set by the builders, not the presets: `sample_size` = resolution // 8; `interpolation_scale`, always explicit so
  config.json records it (diffusers' fallback is max(sample_size // 64, 1)); `use_additional_conditions`, always
  explicit (diffusers turns micro-conditions on by itself whenever sample_size == 128).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from pixart.model_config import PRESETS, ModelConfig
from storage.hub import ModelLoadError

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

_KINDS = {"ada_norm_single": "pixart", "ada_norm_zero": "dit"}
_CLASSES = {"pixart": "PixArtTransformer2DModel", "dit": "DiTTransformer2DModel"}


class ModelMismatchError(ModelLoadError, ValueError):
    """A checkpoint whose config or architecture is not the one asked for; the message names every difference."""


def pe_interpolation(resolution: int) -> float:
    """Positional-embedding interpolation scale: max(resolution / 512, 1), i.e. 256 -> 1, 512 -> 1, 1024 -> 2.

    These are the α configs' `lewei_scale`. 256 -> 1.0 keeps the DiT's position grid, so the stage-1 re-param is
    exact. The released diffusers 256 checkpoints (and Σ) use 0.5 instead: to fine-tune one of them, set
    `ModelConfig(interpolation_scale=0.5)` (or the `expect` of `load_transformer`) so the grid matches its weights.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return max(resolution / 512, 1.0)


def _arch(preset: str, kind: str) -> dict[str, Any]:
    arch = dict(PRESETS[preset])
    found = _KINDS[arch["norm_type"]]
    if found != kind:
        raise ValueError(f"preset {preset!r} is a {found} model, not a {kind} model")
    return arch


def _latent_side(resolution: int, patch_size: int) -> int:
    if resolution <= 0 or resolution % (8 * patch_size):
        raise ValueError(f"resolution {resolution} must be a positive multiple of {8 * patch_size} (VAE /8, patch "
                         f"{patch_size})")
    return resolution // 8


def build_pixart(cfg: ModelConfig, resolution: int, caption_channels: int | None = None) -> PixArtTransformer2DModel:
    """A PixArt transformer at `resolution` (latent side resolution // 8), weights as diffusers initialises them."""
    from diffusers import PixArtTransformer2DModel

    arch = _arch(cfg.preset, "pixart")
    if caption_channels is not None:
        if caption_channels <= 0:
            raise ValueError(f"caption_channels must be positive, got {caption_channels}")
        arch["caption_channels"] = caption_channels
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    if cfg.multi_scale and width % 3:
        raise ValueError(f"multi_scale needs a hidden size divisible by 3 (size + aspect embedders), got {width}")
    scale = cfg.interpolation_scale if cfg.interpolation_scale is not None else pe_interpolation(resolution)
    model = PixArtTransformer2DModel(**arch, sample_size=_latent_side(resolution, arch["patch_size"]),
                                     interpolation_scale=scale, use_additional_conditions=cfg.multi_scale)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def build_dit(cfg: ModelConfig, resolution: int) -> DiTTransformer2DModel:
    """A class-conditional DiT (stage 1). Every block's conditioning embedder starts as a copy of block 0's.

    diffusers' DiT gives each block its own timestep + label embedder (the original DiT shares one); released
    checkpoints hold 28 equal copies, so a fresh model is made to look the same. They are separate parameters, so
    training can drift them apart, which `dit_to_pixart` refuses.
    """
    from diffusers import DiTTransformer2DModel

    arch = _arch(cfg.preset, "dit")
    if cfg.multi_scale:
        raise ValueError("DiT has no micro-condition embedders: multi_scale is for PixArt only")
    if cfg.interpolation_scale not in (None, 1.0):
        raise ValueError("diffusers' DiT has a fixed positional grid (interpolation_scale 1)")
    model = DiTTransformer2DModel(**arch, sample_size=_latent_side(resolution, arch["patch_size"]))
    unify_dit_embedders(model)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def unify_dit_embedders(dit: DiTTransformer2DModel) -> None:
    """Copy block 0's timestep + label embedder into every other block (in place), as released DiTs have them."""
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    with torch.no_grad():
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)


def _read_config(path_or_id: str, cls: type, subfolder: str | None) -> dict[str, Any]:
    local = Path(path_or_id).expanduser()
    if local.exists() or os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or path_or_id.count("/") != 1:
        config_file = local / (subfolder or "") / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"cannot load {cls.__name__} {path_or_id!r}: no such model directory "
                                 f"({config_file} not found)")
        try:
            return json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load {cls.__name__} {path_or_id!r}: bad {config_file}: {_first_line(e)}") \
                from None
    try:  # a hub id
        return dict(cls.load_config(path_or_id, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {cls.__name__} {path_or_id!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def load_transformer(path_or_id: str, kind: Literal["pixart", "dit"], expect: dict[str, Any] | None = None, *,
                     subfolder: str | None = None) -> PixArtTransformer2DModel | DiTTransformer2DModel:
    """Load a saved transformer (a local dir or hub id) from safetensors only (`use_safetensors=True`: a
    checkpoint with only pickled .bin weights is refused, never unpickled). The config is checked before any
    weight is read: the architecture must be `kind` (legacy `Transformer2DModel` configs count by their norm_type),
    and every `expect` key must equal the config's value (defaults included), else `ModelMismatchError`."""
    import diffusers

    if kind not in _CLASSES:
        raise ValueError(f"kind must be 'pixart' or 'dit', got {kind!r}")
    cls = getattr(diffusers, _CLASSES[kind])
    config = _read_config(path_or_id, cls, subfolder)
    found = config.get("_class_name", "?")
    if found == "Transformer2DModel" and _KINDS.get(config.get("norm_type", "")) == kind:
        found = cls.__name__
    if found != cls.__name__:
        raise ModelMismatchError(f"{path_or_id!r} holds a {found}, not the {cls.__name__} a {kind} model needs")
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    effective = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    wrong = [f"{k}: expected {v!r}, found {effective.get(k, '<absent>')!r}" for k, v in (expect or {}).items()
             if k not in effective or effective[k] != v]
    if wrong:
        raise ModelMismatchError(f"{path_or_id!r} does not match the expected config: {'; '.join(wrong)}")
    weights = Path(path_or_id).expanduser() / (subfolder or "")
    files = sorted(weights.glob("*.safetensors")) if weights.is_dir() else []
    if weights.is_dir() and not files:
        raise ModelLoadError(f"cannot load {cls.__name__} {path_or_id!r}: no .safetensors weights in {weights} "
                             "(pickled .bin checkpoints are never unpickled; re-save with safetensors)")
    for f in files:  # a torn, truncated or foreign file (a git-lfs pointer) is named before diffusers reads it
        _check_safetensors(f, cls.__name__)
    where = ", ".join(map(str, files)) or repr(path_or_id)
    try:
        model, info = cls.from_pretrained(path_or_id, subfolder=subfolder, use_safetensors=True,
                                          low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # RuntimeError: a tensor of another shape
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
        why = " ".join(lines[:2]) if isinstance(e, RuntimeError) else lines[0]  # the 2nd line names the tensor
        raise ModelLoadError(f"cannot load {cls.__name__} from {where}: {why[:500]}") from None
    if info.get("missing_keys"):  # diffusers would leave them at their random init, with a warning
        missing = sorted(info["missing_keys"])
        raise ModelMismatchError(f"cannot load {cls.__name__} from {where}: tensors missing: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model


def _check_safetensors(file: Path, what: str) -> None:
    """The header of a safetensors file parses and fits the file's size, else a ModelLoadError naming the file."""
    try:
        with safe_open(str(file), "pt") as f:
            list(f.keys())  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {what}: {file} is not a readable safetensors file "
                             f"({_first_line(e)})") from None


def _timesteps(t: torch.Tensor | int | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def pixart_forward(model: PixArtTransformer2DModel, x_t: torch.Tensor, t: torch.Tensor | int, text: torch.Tensor,
                   mask: torch.Tensor | None, img_hw: torch.Tensor | None = None,
                   aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """[B, out, h, w] for latents [B, in, h, w], timesteps [B] (or one int), T5 features [B, L, C] and their mask
    [B, L] (1 = keep). `img_hw` [B, 2] and `aspect_ratio` [B, 1] are required by a multi-scale model, ignored
    otherwise."""
    if getattr(model, "module", model).use_additional_conditions and (img_hw is None or aspect_ratio is None):
        raise ValueError("a multi-scale PixArt needs img_hw [B, 2] and aspect_ratio [B, 1]")
    return model(x_t, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=_timesteps(t, x_t),
                 added_cond_kwargs={"resolution": img_hw, "aspect_ratio": aspect_ratio}, return_dict=False)[0]


def dit_forward(model: DiTTransformer2DModel, x_t: torch.Tensor, t: torch.Tensor | int,
                class_labels: torch.Tensor) -> torch.Tensor:
    """[B, out, h, w] for a class-conditional DiT; label 1000 (num classes) is the CFG null class."""
    return model(x_t, timestep=_timesteps(t, x_t), class_labels=class_labels, return_dict=False)[0]


def count_params(model: torch.nn.Module) -> int:
    """Parameters (each counted once), trainable or not; works on meta-device models."""
    return sum(p.numel() for p in model.parameters())


def init_like_pixart(model: PixArtTransformer2DModel) -> None:
    """PixArt-alpha's initialisation of a model trained from scratch (pixart.md §1.6): xavier-uniform linears with
    zero bias; Normal(0, 0.02) for the timestep MLP, the adaLN-single linear, the caption projection and (multi-scale)
    the resolution and aspect-ratio MLPs, as PixArtMS.initialize; zero
    cross-attention output projections and final linear, so a fresh model ignores captions and predicts zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        proj = model.pos_embed.proj
        torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        emb = model.adaln_single.emb
        normal = [emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2, model.adaln_single.linear,
                  model.caption_projection.linear_1, model.caption_projection.linear_2]
        if model.config.use_additional_conditions:  # PixArtMS.initialize: the size and aspect-ratio MLPs too
            for mlp in (emb.resolution_embedder, emb.aspect_ratio_embedder):
                normal += [mlp.linear_1, mlp.linear_2]
        for lin in normal:
            torch.nn.init.normal_(lin.weight, std=0.02)
        for block in model.transformer_blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
