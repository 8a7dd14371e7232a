"""Sample grids during training, through diffusers' own pipelines, so what the grids show is what an export gives.

    images = sample_text(transformer, vae, text, mask, null_text, null_mask, steps=20, cfg_scale=4.5, seed=0)
    images = sample_classes(dit, vae, [207, 360], steps=20, cfg_scale=4.5, seed=0)   # stage 1, null class 1000
    url = save_samples(trainer, step)   # runs/<run>/samples/step-000000123.png, one tile per prompt / class

The sampler is PixArt-α's default (pixart.md §3): DPM-Solver++ 2M on the training schedule, 20 steps, cfg 4.5, with
T5("") (the training null caption) as the negative prompt. Everything random comes from a CPU generator seeded by
`seed` and no global RNG is touched, so a grid is a function of the weights and the seed, on any device, and
sampling in the middle of a run leaves the run's own determinism alone.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import torch

from pixart.models import pixart_forward
from storage.commit import write_atomic
from storage.hub import from_pretrained
from storage.layout import run_dir
from storage.urls import join

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from PIL import Image


def make_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (order 2, multistep) over the training schedule: 1000 linear betas 1e-4..0.02, ε-prediction.

    `variance_type` stays None on purpose: diffusers 0.42's "learned_range" branch keeps `model_output[:, :3]`
    (RGB-pixel models), which breaks on 4-channel latents whether it gets 8 channels or 4. Both pipelines already
    drop the variance half themselves (out_channels // 2 == in_channels), and DPM-Solver only needs ε anyway.
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                       prediction_type="epsilon", timestep_spacing="linspace")


def _device_of(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The model's device; a `device` that names another one is an error (the model is not moved behind the
    caller's back: it is the trainer's)."""
    found = next(model.parameters()).device
    if device is not None and torch.device(device).type != found.type:
        raise ValueError(f"the model is on {found}, not on {device}: move it first")
    return found


def _side(transformer: torch.nn.Module, resolution: int | None) -> int:
    side = resolution or transformer.config.sample_size * 8
    if side % 8:
        raise ValueError(f"resolution {side} must be a multiple of 8 (the VAE's factor)")
    return side


@torch.no_grad()
def sample_text(transformer: PixArtTransformer2DModel, vae: AutoencoderKL, cond_text: torch.Tensor,
                cond_mask: torch.Tensor, null_text: torch.Tensor, null_mask: torch.Tensor, steps: int = 20,
                cfg_scale: float = 4.5, resolution: int | None = None, seed: int = 0,
                device: torch.device | str | None = None) -> list[Image.Image]:
    """One image per prompt from T5 features [P, L, C] and masks [P, L]; the null caption [L, C] is the negative.

    diffusers' PixArtAlphaPipeline runs it (no tokenizer or text encoder needed with embeddings), except for a
    multi-scale model whose latent side is not 128: the pipeline only passes micro-conditions at 1024 px, so those
    go through `_own_loop`, the same steps with the size and aspect ratio given."""
    from diffusers import PixArtAlphaPipeline

    dev, side = _device_of(transformer, device), _side(transformer, resolution)
    dtype, n = transformer.dtype, cond_text.shape[0]
    text, mask = cond_text.to(dev, dtype), cond_mask.to(dev)
    null = null_text.to(dev, dtype)[None].expand(n, -1, -1)
    nmask = null_mask.to(dev)[None].expand(n, -1)
    generator = torch.Generator().manual_seed(seed)
    if transformer.use_additional_conditions and transformer.config.sample_size != 128:
        return _own_loop(transformer, vae, text, mask, null, nmask, steps, cfg_scale, side, generator, dev)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(negative_prompt=None, prompt_embeds=text, prompt_attention_mask=mask, negative_prompt_embeds=null,
                negative_prompt_attention_mask=nmask, num_inference_steps=steps, guidance_scale=cfg_scale,
                height=side, width=side, generator=generator, use_resolution_binning=False).images


def _own_loop(transformer: PixArtTransformer2DModel, vae: AutoencoderKL, text: torch.Tensor, mask: torch.Tensor,
              null: torch.Tensor, nmask: torch.Tensor, steps: int, cfg_scale: float, side: int,
              generator: torch.Generator, dev: torch.device) -> list[Image.Image]:
    """The pipeline's loop (same noise, same CFG on all channels, ε = first in_channels) with micro-conditions."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = make_scheduler()
    scheduler.set_timesteps(steps, device=dev)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels, n, guided = transformer.config.in_channels, text.shape[0], cfg_scale > 1
    latents = randn_tensor((n, channels, side // factor, side // factor), generator=generator, device=dev,
                           dtype=text.dtype) * scheduler.init_noise_sigma
    if guided:
        text, mask = torch.cat([null, text]), torch.cat([nmask, mask])
    rows = text.shape[0]
    img_hw = torch.tensor([[side, side]], dtype=text.dtype, device=dev).repeat(rows, 1)
    aspect = torch.ones(rows, 1, dtype=text.dtype, device=dev)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        out = pixart_forward(transformer, x, t, text, mask, img_hw=img_hw, aspect_ratio=aspect)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        latents = scheduler.step(out[:, :channels], t, latents).prev_sample
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return VaeImageProcessor(vae_scale_factor=factor).postprocess(image, output_type="pil")


@torch.no_grad()
def sample_classes(dit: DiTTransformer2DModel, vae: AutoencoderKL, class_ids: list[int], steps: int = 20,
                   cfg_scale: float = 4.5, resolution: int | None = None, seed: int = 0,
                   device: torch.device | str | None = None) -> list[Image.Image]:
    """Stage 1: one image per ImageNet class through diffusers' DiTPipeline (its CFG null class is 1000, ours)."""
    from diffusers import DiTPipeline

    side = _side(dit, resolution)
    if side != dit.config.sample_size * 8:
        raise ValueError(f"a DiT samples at its own size ({dit.config.sample_size * 8} px), not {side}")
    _device_of(dit, device)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=list(class_ids), guidance_scale=cfg_scale, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed)).images


LABEL_HEIGHT = 14  # pixels of the caption strip under each tile


def grid(images: list[Image.Image], cols: int, labels: list[str] | None = None) -> Image.Image:
    """Tiles left to right, top to bottom, on black; every tile takes the first image's size. `labels` (a prompt
    or a class per image) are written under their tiles, cut to the tile's width."""
    from PIL import Image, ImageDraw

    if not images or cols <= 0:
        raise ValueError(f"a grid needs images and cols > 0 (got {len(images)} images, cols {cols})")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    w, h = images[0].size
    cell = h + (LABEL_HEIGHT if labels else 0)
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * w, rows * cell))
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * cell
        out.paste(im.convert("RGB").resize((w, h)) if im.size != (w, h) else im.convert("RGB"), (x, y))
        if labels:
            text = labels[i]
            while text and draw.textlength(text) > w - 4:
                text = text[:-2] + "…" if len(text) > 1 else ""
            draw.text((x + 2, y + h + 1), text, fill=(230, 230, 230))
    return out


def class_label(class_id: int) -> str:
    return "null class" if class_id == 1000 else f"class {class_id}"


def samples_url(root: str, run: str, step: int) -> str:
    return join(run_dir(root, run), "samples", f"step-{int(step):09d}.png")


def _sample_vae(trainer: Any) -> AutoencoderKL:
    """Loaded once per trainer: a grid every few thousand steps must not re-read the VAE each time."""
    vae = getattr(trainer, "_sample_vae", None)
    if vae is None:
        from diffusers import AutoencoderKL

        vae = from_pretrained(AutoencoderKL.from_pretrained, trainer.cfg.vae_model, "sample VAE", "vae_model",
                              low_cpu_mem_usage=False)
        trainer._sample_vae = vae = vae.to(trainer.device).eval().requires_grad_(False)
    return vae


def save_samples(trainer: Any, step: int | None = None) -> str | None:
    """Rank 0 writes the grid of the run's fixed prompts (stage 1: classes) with the EMA weights when there are
    some; returns its URL. Every rank calls it (FSDP gathers the weights first). Seeded by data.seed, so grids of
    different steps share their noise and compare."""
    model = trainer.sampling_model()  # every rank calls it: under FSDP the shards are gathered
    if trainer.rank != 0:
        return None
    cfg, sched = trainer.cfg, trainer.cfg.schedule
    step = trainer.step if step is None else step
    was_training = model.training
    model.eval()
    try:
        vae = _sample_vae(trainer)
        common = {"steps": sched.sample_steps, "cfg_scale": sched.cfg_scale, "resolution": cfg.resolution,
                  "seed": cfg.data.seed, "device": trainer.device}
        if cfg.stage == 1:
            images = sample_classes(model, vae, list(sched.sample_classes), **common)
        else:
            c = trainer.conditions
            images = sample_text(model, vae, c.prompt_text, c.prompt_mask, c.null_text, c.null_mask, **common)
    finally:
        model.train(was_training)
    buf = io.BytesIO()
    labels = ([class_label(c) for c in sched.sample_classes] if cfg.stage == 1 else list(sched.sample_prompts))
    grid(images, math.ceil(math.sqrt(len(images))), labels if len(labels) == len(images) else None).save(
        buf, format="PNG")
    url = samples_url(cfg.output_root, cfg.run, step)
    write_atomic(url, buf.getvalue())
    return url


def sample_checkpoint(url: str, prompts: list[str] | None = None, classes: list[int] | None = None, *,
                      steps: int = 20, cfg_scale: float = 4.5, seed: int = 0, device: str = "auto",
                      use_ema: bool = True) -> Image.Image:
    """A grid from a committed checkpoint, with the T5 and VAE its config names (`pixart sample`). Text stages
    encode `prompts` and the null caption T5("") here; stage 1 samples `classes`."""
    from pathlib import Path

    import yaml
    from diffusers import AutoencoderKL

    from pixart.features.encoders import TextEncoder, resolve_device
    from pixart.models import load_transformer
    from pixart.train import checkpoint
    from pixart.train.conditions import pad_features

    checkpoint.trainer_state(url)  # a committed checkpoint, or a clear error
    local, cleanup = checkpoint.local_copy(url)
    try:
        cfg = yaml.safe_load((Path(local) / "config.yaml").read_text())
        weights = "ema" if use_ema and (Path(local) / "ema" / "config.json").is_file() else "transformer"
        dev = resolve_device(device)
        model = load_transformer(local, "dit" if cfg["stage"] == 1 else "pixart", subfolder=weights).to(dev).eval()
    finally:
        cleanup()
    vae = from_pretrained(AutoencoderKL.from_pretrained, cfg["vae_model"], "VAE", "vae_model",
                          low_cpu_mem_usage=False).to(dev).eval()
    common = {"steps": steps, "cfg_scale": cfg_scale, "resolution": cfg["data"]["base_size"], "seed": seed,
              "device": dev}
    with torch.no_grad():
        if cfg["stage"] == 1:
            classes = list(classes or [207, 360, 387, 974])
            images = sample_classes(model, vae, classes, **common)
            return grid(images, math.ceil(math.sqrt(len(images))), [class_label(c) for c in classes])
        else:
            if not prompts:
                raise ValueError("give at least one prompt")
            from pixart.features.clean import clean_caption

            encoder = TextEncoder(cfg["t5_model"], max_tokens=cfg["data"]["max_tokens"], device=device)
            feats = encoder.encode(["", *(clean_caption(p) for p in prompts)])  # as the features and diffusers
            text, mask = pad_features(feats, cfg["data"]["max_tokens"])
            images = sample_text(model, vae, text[1:], mask[1:], text[0], mask[0], **common)
    return grid(images, math.ceil(math.sqrt(len(images))), list(prompts))
