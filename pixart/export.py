"""A training checkpoint as a diffusers pipeline directory, so the result of a run loads with diffusers alone.

    export("out/runs/stage2/checkpoints/step-000004000", "exports/stage2")   # EMA weights, T5 and VAE by name
    pipe = PixArtAlphaPipeline.from_pretrained("exports/stage2", text_encoder=t5, tokenizer=tok, vae=vae)
    export(ckpt, "exports/stage2-full", bundle=True)                         # T5 + VAE copied in: loads alone

    transformer/         the EMA weights (or transformer/ without an EMA or with use_ema=False), safetensors
    scheduler/           DPM-Solver++ 2M on the training schedule (pixart/train/sampling.py: make_scheduler)
    model_index.json     PixArtAlphaPipeline (stage 1: DiTPipeline); unbundled components are [null, null], what
                         diffusers itself writes for an absent component, so they must be passed to from_pretrained
    pixart_export.json   T5 and VAE names, stage and stage-3 step, training step, source checkpoint, config hash
    README.md            the same for people, with the positional-embedding interpolation scale

Only committed checkpoints (with their .done marker) are exported. The directory is built under a temporary
sibling, its transformer (and bundled VAE) loaded back in full there (readable safetensors, exactly the tensors
its config describes, finite: `pixart.train.weights.check_model_dir`), and only then renamed into place, so a reader
sees no export or a whole one that loads; an existing export of something else is replaced only with force
(`--force`; a directory that is not an export never). The trainer takes an export as `init` when its weights are
the run's `init_weights` (pixart_export.json's `weights`: ema, or transformer for the trained weights).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pixart.train import checkpoint
from pixart.train.sampling import make_scheduler
from pixart.train.weights import check_model_dir
from storage.commit import TMP_MARK, read_done, sweep_stale
from storage.errors import PipelineError
from storage.urls import absolute_url, exists, filesystem

EXPORT_INFO = "pixart_export.json"
_WEIGHT_GLOBS = ("config.json", "*.safetensors", "*.safetensors.index.json")


class ExportError(PipelineError):
    """A checkpoint that cannot be exported, or an export that would replace another one; the message says which."""


def export(checkpoint_url_or_dir: str, out_dir: str, *, use_ema: bool = True, bundle: bool = False,
           force: bool = False) -> str:
    """Write the pipeline directory of a committed checkpoint to `out_dir` (local) and return its path. Exporting
    the same checkpoint the same way again is a no-op."""
    url = checkpoint_url_or_dir.rstrip("/")
    state = _committed(url)
    if "://" in out_dir and not out_dir.startswith("file://"):
        raise ExportError(f"out_dir {out_dir!r}: an export is a local directory (from_pretrained reads one)")
    out = Path(out_dir.removeprefix("file://")).expanduser().absolute()
    local, cleanup = checkpoint.local_copy(url)
    try:
        ckpt = Path(local)
        cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
        weights = "ema" if use_ema and (ckpt / "ema" / "config.json").is_file() else "transformer"
        arch = json.loads((ckpt / weights / "config.json").read_text())
        info = _info(url, state, cfg, weights, arch, bundle)
        if out.is_dir() and any(out.iterdir()):
            found = _read_info(out)
            if found == info and not force:
                return str(out)
            if found is None and not (out / "model_index.json").is_file():
                raise ExportError(f"{out} exists and is not an export: choose another out_dir")
            if not force:
                what = (f"{found['source']} (step {found['step']}, {found['weights']} weights, bundle "
                        f"{found['bundle']})" if found else "another pipeline")
                raise ExportError(f"{out} already holds an export of {what}; replace it with --force")
        elif out.exists() and not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        _publish(out, info, lambda d: _build(d, ckpt, weights, info, arch, bundle))
    finally:
        cleanup()
    return str(out)


def _committed(url: str) -> dict[str, Any]:
    state = read_done(url)
    if state is None:
        if not exists(url):
            raise ExportError(f"checkpoint {url} does not exist")
        raise ExportError(f"{url} is not a committed checkpoint: no {url}.done marker (still being written, or its "
                          "save crashed); export a committed runs/<run>/checkpoints/step-NNNNNNNNN")
    for part in ("config.yaml", "transformer/config.json"):
        if not exists(f"{url}/{part}"):
            raise ExportError(f"checkpoint {url} has no {part}")
    return state


def _info(url: str, state: dict[str, Any], cfg: dict[str, Any], weights: str, arch: dict[str, Any],
          bundle: bool) -> dict[str, Any]:
    """Everything the export is a function of; equal records mean an identical export."""
    stage = int(cfg["stage"])
    return {"format": 1, "pipeline": "DiTPipeline" if stage == 1 else "PixArtAlphaPipeline",
            "source": absolute_url(url), "step": int(state["step"]), "stage": stage,
            "stage_step": cfg.get("stage_step"), "run": cfg.get("run"),
            "config_hash": state.get("config_hash"), "weights": weights, "bundle": bundle,
            "t5_model": cfg.get("t5_model") if stage > 1 else None, "vae_model": cfg.get("vae_model"),
            "resolution": int(arch["sample_size"]) * 8, "sample_size": int(arch["sample_size"]),
            "interpolation_scale": arch.get("interpolation_scale") if stage > 1 else 1.0,
            "multi_scale": bool(arch.get("use_additional_conditions")), "transformer": arch.get("_class_name")}


def _read_info(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return None


def _publish(out: Path, info: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build under `<out>.tmp-*`, then rename into place; an existing export is moved aside only once the new one
    is complete, and put back if the rename fails."""
    fs, path = filesystem(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(fs, path)
    tmp = out.with_name(f"{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    old = None
    try:
        tmp.mkdir()
        build(tmp)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError as e:
            if old is not None:
                os.rename(old, out)
                old = None
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if _read_info(out) == info:
                return  # another process published the same export meanwhile
            raise ExportError(f"{out}: another export was published while this one was built") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _copy_model(src: Path, dst: Path, what: str) -> None:
    """Config and safetensors only: an export never carries pickled weights."""
    files = [f for pattern in _WEIGHT_GLOBS for f in sorted(src.glob(pattern))]
    if not any(f.name.endswith(".safetensors") for f in files):
        raise ExportError(f"{what} {src} has no .safetensors weights (pickled checkpoints are not exported)")
    dst.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)


def _model_dir(name: str, what: str) -> Path:
    """A local directory, or a hub id already in the Hugging Face cache (nothing is downloaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - an invalid id and a cache miss both mean "not available locally"
        raise ExportError(f"bundle needs the {what} {name!r} on this machine: not a directory and not in the "
                          f"Hugging Face cache ({type(e).__name__})") from None


def _check(copy: Path, source: Path, what: str) -> None:
    """Load what was copied, before it is published; the message names the source's files, not the temporary's."""
    try:
        check_model_dir(copy, what)
    except PipelineError as e:
        raise ExportError(f"not exported: {str(e).replace(str(copy), str(source))}") from None


def _build(d: Path, ckpt: Path, weights: str, info: dict[str, Any], arch: dict[str, Any], bundle: bool) -> None:
    _copy_model(ckpt / weights, d / "transformer", f"checkpoint {weights}/")
    _check(d / "transformer", ckpt / weights, f"checkpoint {weights}/")
    make_scheduler().save_pretrained(d / "scheduler")
    import diffusers

    absent = [None, None]
    index: dict[str, Any] = {"_class_name": info["pipeline"], "_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                             "transformer": ["diffusers", arch["_class_name"]], "vae": absent}
    if info["stage"] > 1:
        index.update(text_encoder=absent, tokenizer=absent)
    if bundle:
        vae = _model_dir(info["vae_model"], "VAE")
        _copy_model(vae, d / "vae", "VAE")
        _check(d / "vae", vae, f"VAE {info['vae_model']}")
        index["vae"] = ["diffusers", "AutoencoderKL"]
        if info["stage"] > 1:
            from transformers import AutoTokenizer

            t5 = _model_dir(info["t5_model"], "T5")
            _copy_model(t5, d / "text_encoder", "T5")
            tokenizer = AutoTokenizer.from_pretrained(str(t5))
            tokenizer.save_pretrained(str(d / "tokenizer"))
            index.update(text_encoder=["transformers", "T5EncoderModel"],
                         tokenizer=["transformers", type(tokenizer).__name__])
    (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (d / EXPORT_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    (d / "README.md").write_text(_readme(info))


def _readme(i: dict[str, Any]) -> str:
    text = i["stage"] > 1
    passed = "" if i["bundle"] else (", text_encoder=T5EncoderModel.from_pretrained(T5), tokenizer=AutoTokenizer."
                                     "from_pretrained(T5), vae=AutoencoderKL.from_pretrained(VAE)" if text else
                                     ", vae=AutoencoderKL.from_pretrained(VAE)")
    lines = [f"# {i['run']} at step {i['step']} ({i['pipeline']})", "",
             f"Exported from `{i['source']}` ({i['weights']} weights, config hash {i['config_hash']}).", "",
             "| component | what |", "|---|---|",
             f"| transformer | {i['transformer']}, {i['weights']} weights, {i['resolution']} px (latent "
             f"{i['sample_size']}), interpolation_scale {i['interpolation_scale']}"
             f"{', multi-scale micro-conditions' if i['multi_scale'] else ''} |",
             "| scheduler | DPMSolverMultistepScheduler: DPM-Solver++ 2M, 1000 linear betas 1e-4..0.02, epsilon |",
             f"| vae | {i['vae_model']}{' (bundled)' if i['bundle'] else ' (not included: pass it)'} |"]
    if text:
        lines.append(f"| text_encoder, tokenizer | {i['t5_model']}"
                     f"{' (bundled)' if i['bundle'] else ' (not included: pass them)'} |")
    lines += ["", "```python", f"from diffusers import {i['pipeline']}",
              f"pipe = {i['pipeline']}.from_pretrained(EXPORT_DIR{passed})", "```", "",
              "PixArt-alpha's sampling defaults: 20 steps, guidance 4.5, negative prompt \"\" (the training null "
              "caption)." if text else "Stage 1: class-conditional, null class 1000; 20 steps, guidance 4.5.", ""]
    return "\n".join(lines)
