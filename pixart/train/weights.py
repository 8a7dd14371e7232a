"""Moving weights into a model being trained: resume from our own checkpoints, or initialise a stage from the
previous one (a run directory, meaning its latest committed checkpoint; a checkpoint; an export; a diffusers
transformer; or a DiT to re-parameterise).

Which weights: `init_weights=model` (the default) starts from a checkpoint's trained weights (`transformer/`), as
the official `load_from` does; `ema` from its EMA (`ema/`). An export holds one of the two (`pixart_export.json`),
which must be the one asked for. `resolve_init` says which and where (`InitSource.note`, and the files), for the
run's log and trainer.json, and what stage (and stage-3 step) its run recorded; `init_source` holds stage 3 to its
chain (stage 2 -> hq256 -> hq512 -> ms1024) unless `init_any_step`.

Only safetensors are read. Every mismatch is an error that names it: architecture, config keys, tensor shapes,
missing or unexpected tensors; a file that is not readable safetensors (torn, a header too large, offsets out of
range) is a `WeightsError` naming the file. The one allowed difference is PixArt -> PixArt-MS (stage 3 at 1024
from 512): the micro-condition embedders are new and keep their init, as the official loader's strict=False allowed.

`check_init` reads only configs and safetensors headers (no weights), so the driver can refuse a bad init before
anything of a run is written; `check_model_dir` loads a model directory in full (what an export must pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from pixart.models import ModelMismatchError, load_transformer
from pixart.train.checkpoint import TRAINER_STATE, run_checkpoints
from pixart.train.reparam import dit_to_pixart
from storage.errors import ConfigError, PipelineError, one_line
from storage.hub import ModelLoadError
from storage.layout import CHECKPOINTS

if TYPE_CHECKING:
    from pixart.train.config import TrainConfig

MICRO_CONDITIONS = ("adaln_single.emb.resolution_embedder.", "adaln_single.emb.aspect_ratio_embedder.")
ARCH_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "out_channels")


class WeightsError(ModelLoadError):
    """A weights file that cannot be read (torn, corrupt, not safetensors); the message names it."""


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{file}: not a readable safetensors file ({one_line(e)})") from None


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header alone (the header is checked against the file's size)."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{file}: not a readable safetensors file ({one_line(e)})") from None


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors weights in {directory} (pickled checkpoints are never loaded)")
    return files


def load_weights(model: torch.nn.Module, directory: Path, strict: bool = True) -> None:
    """Load a diffusers model directory's safetensors (one file or shards) into `model`."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        state.update(read_safetensors(f))
    transfer(model, state, str(directory), allow_missing=() if strict else MICRO_CONDITIONS)


def check_model_dir(directory: Path, what: str) -> None:
    """Load a diffusers model directory as `from_pretrained` would: its config builds the model (on the meta
    device: no memory), and its safetensors must be readable, hold exactly that model's tensors in their shapes,
    and be finite. Raises a WeightsError or ModelMismatchError naming the file or the tensors."""
    import diffusers

    config_file = Path(directory) / "config.json"
    try:
        config = json.loads(config_file.read_text())
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - a bad json, an unknown class, a config the class refuses
        raise WeightsError(f"{what}: {config_file} does not describe a diffusers model ({one_line(e)})") from None
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        tensors = read_safetensors(f)
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise WeightsError(f"{f}: non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        state.update(tensors)
    shapes = [f"{k}: {tuple(v.shape)} in {directory}, {tuple(own[k].shape)} in its config" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    parts = [f"shape mismatch: {'; '.join(shapes[:5])}"] if shapes else []
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if parts:
        raise ModelMismatchError(f"{what}: weights of {directory} do not fit its config: {' | '.join(parts)}")


def transfer(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
             allow_missing: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} here" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = [f"shape mismatch: {'; '.join(shapes[:5])}"] if shapes else []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise ModelMismatchError(f"weights of {source} do not fit this model: {' | '.join(parts)}")
    model.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class InitSource:
    """Where cfg.init's weights are read from: `path` (a directory, or a hub id) and `subfolder` as
    `load_transformer` takes them, the transformer class its config names, which weights they are (`model`, `ema`,
    or None where nothing records it: a diffusers transformer or pipeline) and a sentence for the run's log."""

    path: str
    subfolder: str | None
    cls: str
    weights: str | None
    note: str
    trained: tuple[int, str | None] | None = None  # the (stage, stage_step) its run recorded; None: not recorded

    def files(self) -> list[str]:
        directory = Path(self.path) / (self.subfolder or "")
        return [str(f) for f in sorted(directory.glob("*.safetensors"))] if directory.is_dir() else []

    def record(self, init: str) -> dict[str, object]:
        """What trainer.json keeps of it."""
        return {"init": init, "weights": self.weights, "path": str(Path(self.path) / (self.subfolder or "")),
                "files": self.files()}


def resolve_init(init: str, kind: str, weights: str = "model") -> InitSource:
    """The transformer cfg.init points at. A run directory (`runs/<run>`) means its latest committed checkpoint; of
    a checkpoint, `weights` picks transformer/ (model) or ema/; an export holds one of the two (pixart_export.json),
    which must be `weights`."""
    path = Path(init).expanduser()
    if not path.exists():
        if init.startswith(("/", ".", "~")) or init.count("/") != 1:
            raise PipelineError(f"init {init!r} does not exist (a checkpoint, run, export or transformer directory, "
                                "or a hub id)")
        return InitSource(init, "transformer", "", None, f"init: the transformer of hub pipeline {init!r} (released "
                          "weights: which of model or EMA they are is not recorded, init_weights does not apply)")
    origin, trained = "", None
    if not (path / TRAINER_STATE).exists() and (path / CHECKPOINTS).is_dir():
        found = run_checkpoints(str(path))
        if not found:
            raise PipelineError(f"init {init!r}: run directory without a committed checkpoint yet "
                                f"({path / 'checkpoints'} holds no step-NNNNNNNNN.done)")
        origin = f", the latest committed checkpoint of run directory {path}"
        path = Path(found[-1][1])
    if kind == "checkpoint" or (path / TRAINER_STATE).exists():  # init_kind pixart/dit: the model it holds
        sub = "transformer" if weights == "model" else "ema"
        if weights == "ema" and not (path / "ema").is_dir():
            raise PipelineError(f"init {init!r}: checkpoint {path} has no ema/ (its run kept no EMA): set "
                                "init_weights=model")
        note = (f"init: {'the trained (model)' if weights == 'model' else 'the EMA'} weights of checkpoint {path}"
                f"{origin} ({sub}/; init_weights={weights})")
        trained = _checkpoint_stage(path)
        path, held = path / sub, weights
    elif (path / "model_index.json").exists():
        info = _export_info(path)
        if info is None:
            held = None
            note = (f"init: the transformer of diffusers pipeline {path} (which of model or EMA weights it holds is "
                    "not recorded; init_weights does not apply)")
        else:
            held = "ema" if info.get("weights") == "ema" else "model"
            if held != weights:
                source = info.get("source", "?")
                raise PipelineError(
                    f"init {init!r}: this export holds the {'EMA' if held == 'ema' else 'trained (model)'} weights "
                    f"of {source} (pixart_export.json), and init_weights={weights}. Start from that checkpoint or "
                    f"its run directory (init_weights picks its {weights} weights), or from an export made "
                    f"with weights={weights}, or set init_weights={held}")
            note = (f"init: the {'EMA' if held == 'ema' else 'trained (model)'} weights of export {path} (step "
                    f"{info.get('step')} of {info.get('source')}; init_weights={weights})")
            trained = _recorded_stage(info)
        path = path / "transformer"
    else:
        held = None
        note = (f"init: transformer directory {path} (which of model or EMA weights it holds is not recorded; "
                "init_weights does not apply)")
    config = path / "config.json"
    if not config.is_file():
        raise PipelineError(f"init {init!r}: no transformer config at {config}")
    try:
        cls = json.loads(config.read_text()).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise PipelineError(f"init {init!r}: {config} is not a readable config ({one_line(e)})") from None
    return InitSource(str(path), None, cls, held, note, trained)


def _recorded_stage(record: dict) -> tuple[int, str | None] | None:
    """(stage, stage_step) from a trainer.json, a config or an export's info; None when the stage (or, at stage
    3, its step) is not recorded."""
    stage = record.get("stage")
    if type(stage) is not int:
        return None
    step = record.get("stage_step")
    if stage == 3 and not isinstance(step, str):
        return None
    return stage, step if stage == 3 else None


def _checkpoint_stage(path: Path) -> tuple[int, str | None] | None:
    """The (stage, stage_step) a checkpoint of this project records: its trainer.json, else its config.yaml
    (checkpoints written before trainer.json held stage_step)."""
    import yaml

    for name, parse in ((TRAINER_STATE, json.loads), ("config.yaml", yaml.safe_load)):
        try:
            record = parse((path / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(record, dict) and (found := _recorded_stage(record)) is not None:
            return found
    return None


def _step_name(trained: tuple[int, str | None]) -> str:
    stage, step = trained
    return f"stage 3 {step}" if step else f"stage {stage}"


def init_source(cfg: TrainConfig) -> InitSource:
    """`resolve_init` for cfg, with stage 3's chain checked: a step starts from the previous one (`STAGE3_INIT`:
    stage 2 -> hq256 -> hq512 -> ms1024) when its init records its stage, else the init is refused naming the
    expected and the found step, unless cfg.init_any_step. An init that records no stage is taken, and its note
    (the run's log) says that nothing could be checked."""
    from pixart.train.config import STAGE3_INIT

    src = resolve_init(cfg.init, cfg.init_kind, cfg.init_weights)
    if cfg.stage != 3:
        return src
    want, found = STAGE3_INIT[cfg.stage_step], src.trained
    if found is None:
        return replace(src, note=f"{src.note}; it records no stage, so whether it is {_step_name(want)} (what "
                       f"stage_step={cfg.stage_step} starts from) is not checked")
    if found == want:
        return src
    if not cfg.init_any_step:
        raise ConfigError(f"init {cfg.init!r} is {_step_name(found)}, but stage_step={cfg.stage_step} starts from "
                          f"{_step_name(want)} (stage 3 runs stage 2 -> hq256 -> hq512 -> ms1024, each from the one "
                          f"before): set init to a {_step_name(want)} run, or init_any_step=true to start from "
                          f"{_step_name(found)} deliberately")
    return replace(src, note=f"{src.note}; {_step_name(found)}, not {_step_name(want)}: taken as "
                   "init_any_step=true says")


def _export_info(path: Path) -> dict | None:
    try:
        info = json.loads((path / "pixart_export.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_init(cfg: TrainConfig) -> None:
    """What can be checked of cfg.init without reading weights: it exists (a run directory has a committed
    checkpoint), holds a transformer config and the weights init_weights asks for, (stage 3) is the previous step
    of the chain (`init_source`; a stage-3 step without an init is refused unless init_any_step), and (local) its
    safetensors headers are readable. `load_init` checks the rest while loading."""
    if not cfg.init:
        if cfg.stage == 3 and not cfg.init_any_step:
            from pixart.train.config import STAGE3_INIT

            want = _step_name(STAGE3_INIT[cfg.stage_step])
            raise ConfigError(f"stage_step={cfg.stage_step} has no init: a stage-3 step starts from the previous "
                              f"one's weights ({want}): set init to that run's directory (runs/<run>), or "
                              "init_any_step=true to start from random weights deliberately")
        return
    src = init_source(cfg)
    directory = Path(src.path) / (src.subfolder or "")
    if directory.is_dir():
        for f in _weight_files(directory):
            safetensors_shapes(f)


def load_init(model: torch.nn.Module, cfg: TrainConfig, caption_channels: int | None) -> InitSource:
    """Initialise `model` (built from cfg.model) from cfg.init; stage 2 from a DiT goes through the re-param.
    Returns where the weights came from (its `note` is what the run's log says)."""
    try:
        return _load_init(model, cfg, caption_channels)
    except (SafetensorError, OSError) as e:  # from_pretrained on a torn file: name the init
        raise WeightsError(f"init {cfg.init!r}: its weights cannot be read ({one_line(e)})") from None


def _load_init(model: torch.nn.Module, cfg: TrainConfig, caption_channels: int | None) -> InitSource:
    source = init_source(cfg)
    src, subfolder, cls = source.path, source.subfolder, source.cls
    is_dit = cls == "DiTTransformer2DModel" or cfg.init_kind == "dit"
    arch = {k: model.config[k] for k in ARCH_KEYS}
    if cfg.stage == 1 or is_dit:
        dit = load_transformer(src, "dit", expect={**arch, "sample_size": model.config.sample_size}
                               if cfg.stage == 1 else {k: v for k, v in arch.items() if k != "out_channels"},
                               subfolder=subfolder)
        if cfg.stage == 1:
            transfer(model, dit.state_dict(), src)
            return source
        converted = dit_to_pixart(dit, caption_channels=caption_channels, t_match=cfg.reparam_t)
        if converted.config.sample_size != model.config.sample_size:
            raise ModelMismatchError(f"{src}: a DiT at latent size {converted.config.sample_size} cannot start a "
                                     f"stage at {cfg.resolution} px (latent size {model.config.sample_size})")
        transfer(model, converted.state_dict(), f"{src} (re-parameterised at t={cfg.reparam_t})")
        return source
    loaded = load_transformer(src, "pixart", expect={**arch, "caption_channels": caption_channels},
                              subfolder=subfolder)
    allow = MICRO_CONDITIONS if cfg.model.multi_scale and not loaded.config.use_additional_conditions else ()
    transfer(model, loaded.state_dict(), src, allow_missing=allow)
    return source
