"""Training stages on tiny models and real extracted features, on CPU: steps, checkpoints, exact resume, init."""

import json

import pytest
import torch

from pixart import checkpoint
from pixart.prepare import prepare_run
from pixart.train_config import TrainConfig
from pixart.trainer import NonFiniteLossError, Trainer
from storage.configio import load_config
from storage.errors import ConfigError


def config(root, preset, run, *overrides, t5=None, vae=None):
    extra = [f"output_root={root}", f"run={run}"]
    if "stage1" not in preset:
        extra += ["data.caption_set=tiny", f"t5_model={t5}"]
    if vae:
        extra.append(f"vae_model={vae}")
    return load_config(TrainConfig, preset, extra + list(overrides), kind="train")


def losses(trainer, steps=None):
    return [m["loss"] for m in trainer.fit()][:steps]


def test_stage2_steps_checkpoints_and_resumes_exactly(features, tiny_t5_encoder):
    cfg = config(features, "tiny-stage2", "resume-a", t5=tiny_t5_encoder)
    prepare_run(cfg)
    full = losses(Trainer(cfg))
    assert len(full) == 4 and all(torch.isfinite(torch.tensor(full)))
    assert [s for s, _ in checkpoint.list_checkpoints(features, "resume-a")] == [2, 4]  # keep 2

    cut = config(features, "tiny-stage2", "resume-b", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(cut)
    first = losses(Trainer(cut))
    again = config(features, "tiny-stage2", "resume-b", t5=tiny_t5_encoder)
    resumed = Trainer(again)
    assert resumed.resume() and resumed.step == 2
    rest = losses(resumed)
    assert first + rest == full  # bit-identical per-step losses


def test_a_preset_contradicting_the_features_is_refused(features, tiny_t5_encoder):
    bad = config(features, "tiny-stage2", "bad", "data.base_size=512", "data.multi_scale=true",
                 "model.multi_scale=true", "model.preset=pixart-xl-2", t5=tiny_t5_encoder)
    with pytest.raises(ConfigError, match="32 wide; model.preset pixart-xl-2 has caption_channels 4096"):
        prepare_run(bad)


def test_a_nan_loss_stops_the_step_and_keeps_the_checkpoint(features, tiny_t5_encoder, monkeypatch):
    cfg = config(features, "tiny-stage2", "nan", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(cfg)
    list(Trainer(cfg).fit())
    cfg = config(features, "tiny-stage2", "nan", t5=tiny_t5_encoder)
    trainer = Trainer(cfg)
    trainer.resume()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.proj_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 2: loss is nan"):
        next(trainer.fit())
    assert checkpoint.latest(features, "nan").endswith("step-000000002")
    assert trainer.step == 2 and before.keys() == trainer.model.state_dict().keys()
