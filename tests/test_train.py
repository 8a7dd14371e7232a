"""Training stages on tiny models and real extracted features, on CPU: steps, checkpoints, exact resume, init."""

import json
from pathlib import Path

import pytest
import torch

from pixart.train import checkpoint
from pixart.train.config import TrainConfig
from pixart.train.prepare import prepare_run
from pixart.train.trainer import NonFiniteLossError, Trainer
from storage.configio import load_config
from storage.errors import ConfigError, PipelineError


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


def test_a_nan_loss_stops_the_step_and_keeps_the_checkpoint(features, tiny_t5_encoder):
    """The step is not applied: after the NaN, the weights (but the poisoned one), the EMA and AdamW's state are
    still the step-2 checkpoint's, bit for bit, and no gradient is left behind."""
    from safetensors.torch import load_file

    cfg = config(features, "tiny-stage2", "nan", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(cfg)
    list(Trainer(cfg).fit())
    cfg = config(features, "tiny-stage2", "nan", t5=tiny_t5_encoder)
    trainer = Trainer(cfg)
    trainer.resume()
    with torch.no_grad():
        trainer.model.proj_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3: loss is nan"):  # the step that failed, as logged
        next(trainer.fit())
    ckpt = Path(checkpoint.latest(features, "nan"))
    assert ckpt.name == "step-000000002" and trainer.step == 2
    saved = {part: load_file(str(ckpt / part / "diffusion_pytorch_model.safetensors")) for part in ("transformer",
                                                                                                      "ema")}
    for part, module in (("transformer", trainer.model), ("ema", trainer.ema)):
        state = module.state_dict()
        assert state.keys() == saved[part].keys()
        for k, v in state.items():
            if part == "transformer" and k == "proj_out.bias":
                assert torch.isnan(v).all()  # as poisoned: no update touched it
            else:
                assert torch.equal(v, saved[part][k]), (part, k)
    adam = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    ours = trainer.optimizer.state_dict()["state"]
    assert ours.keys() == adam.keys() and all(torch.equal(ours[i][k], adam[i][k]) for i in adam for k in adam[i])
    assert all(p.grad is None for p in trainer.model.parameters())


def test_stage1_dit_then_stage2_from_its_reparameterisation(features, tiny_t5_encoder):
    from safetensors.torch import load_file

    one = config(features, "tiny-stage1", "s1", "schedule.max_steps=2")
    prepare_run(one)
    trainer = Trainer(one)
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in trainer.fit()])))
    blocks = trainer.model.transformer_blocks  # the per-block embedder copies stayed equal (summed gradients)
    assert all(torch.equal(a, b) for blk in blocks[1:] for a, b in
               zip(blocks[0].norm1.emb.parameters(), blk.norm1.emb.parameters(), strict=True))
    ckpt = checkpoint.latest(features, "s1")
    two = config(features, "tiny-stage2", "s2-from-s1", "schedule.max_steps=2", f"init={ckpt}", t5=tiny_t5_encoder)
    prepare_run(two)
    pixart = Trainer(two)
    dit = load_file(f"{ckpt}/transformer/diffusion_pytorch_model.safetensors")
    own = pixart.model.state_dict()
    assert torch.equal(own["transformer_blocks.1.attn1.to_q.weight"], dit["transformer_blocks.1.attn1.to_q.weight"])
    assert torch.equal(own["pos_embed.proj.weight"], dit["pos_embed.proj.weight"])
    assert not own["transformer_blocks.0.attn2.to_out.0.weight"].any()  # cross-attention starts as a no-op
    assert len([m for m in pixart.fit()]) == 2


def test_stage3_multi_scale_starts_from_stage2_and_feeds_micro_conditions(features, tiny_t5_encoder):
    base = config(features, "tiny-stage2", "s2-for-s3", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(base)
    list(Trainer(base).fit())
    cfg = config(features, "tiny-stage3", "s3", f"init={checkpoint.latest(features, 's2-for-s3')}",
                 "init_any_step=true", t5=tiny_t5_encoder)  # ms1024 straight from stage 2, deliberately
    prepare_run(cfg)
    trainer = Trainer(cfg)
    assert trainer.model.config.use_additional_conditions and trainer.model.config.sample_size == 64
    batch = next(trainer.batches())
    assert batch["img_hw"].shape == (1, 2) and batch["aspect_ratio"].shape == (1,)
    metrics = list(trainer.fit())
    assert len(metrics) == 4 and all(m["loss"] == m["loss"] for m in metrics)


def test_an_incompatible_init_names_the_mismatch(features, tiny_t5_encoder, tmp_path):
    from pixart.models import ModelConfig, build_pixart

    build_pixart(ModelConfig(preset="pixart-tiny"), 256, caption_channels=16).save_pretrained(tmp_path / "other")
    cfg = config(features, "tiny-stage2", "bad-init", f"init={tmp_path / 'other'}", t5=tiny_t5_encoder)
    prepare_run(cfg)
    with pytest.raises(ValueError, match="caption_channels: expected 32, found 16"):
        Trainer(cfg)
    missing = config(features, "tiny-stage2", "bad-init", f"init={tmp_path / 'nowhere'}", t5=tiny_t5_encoder)
    with pytest.raises(Exception, match="does not exist"):
        Trainer(missing)


def test_resume_refuses_a_different_worker_count(features, tiny_t5_encoder):
    cfg = config(features, "tiny-stage2", "ws", "schedule.max_steps=2", t5=tiny_t5_encoder)
    prepare_run(cfg)
    list(Trainer(cfg).fit())
    state = json.loads(open(checkpoint.latest(features, "ws") + ".done").read())
    assert state["step"] == 2 and state["world_size"] == 1
    with pytest.raises(Exception, match="written by 1 workers"):
        Trainer(cfg, rank=0, world_size=2).resume()


def test_batches_cross_epochs_in_plan_order_while_read_ahead(features, tiny_t5_encoder):
    """The prefetching reader runs ahead of the steps; across epoch boundaries it must still follow the plan."""
    from pixart.data.loader import BucketedLoader

    cfg = config(features, "tiny-stage2", "epochs", "data.prefetch=2", t5=tiny_t5_encoder)
    prepare_run(cfg)
    trainer = Trainer(cfg)
    expected = []
    for epoch in range(3):  # one rank: each epoch's every batch, the ones carried leftovers complete included
        plain = BucketedLoader(trainer.loader.shards, cfg.data.batch_size, seed=cfg.data.seed)
        plain.set_epoch(epoch)
        batches = [b["keys"] for b in plain]
        assert len(batches) == trainer.epoch_steps(epoch)
        expected += batches
    got = []
    for batch in trainer.batches():
        got.append(batch["keys"])
        trainer.step += 1  # what train_step does; the reader must not depend on it
        if len(got) == len(expected):
            break
    assert got == expected


def test_train_flow_trains_and_publishes_samples_and_cost(prefect_server, features, tiny_t5_encoder, tiny_vae):
    from flows.train import train
    from tests.artifacts import run_artifacts

    overrides = [f"output_root={features}", "run=flow-s2", "data.caption_set=tiny", f"t5_model={tiny_t5_encoder}",
                 f"vae_model={tiny_vae}", "schedule.max_steps=2"]
    state = train(config="tiny-stage2", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["steps"] == 2 and summary["paper_v100_days"] == 672
    keys = ["train-flow-s2-samples", "train-flow-s2-cost", "train-flow-s2-progress"]
    assert set(run_artifacts(state, keys)) == set(keys)
    bad = train(config="tiny-stage2", overrides=[*overrides, "model.preset=pixart-xl-2"], return_state=True)
    assert bad.is_failed() and "caption_channels 4096" in bad.message  # refused before any model is built


def test_cli_train_resumes_and_reports(features, tiny_t5_encoder, tiny_vae):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["train", "tiny-stage2", f"output_root={features}", "run=cli-s2", "data.caption_set=tiny",
            f"t5_model={tiny_t5_encoder}", f"vae_model={tiny_vae}"]
    first = CliRunner().invoke(app, [*args, "schedule.max_steps=2"])
    assert first.exit_code == 0, first.output
    assert "step 2: loss" in first.output and "cli-s2: 2 steps" in first.output
    second = CliRunner().invoke(app, args)  # resumes at 2, runs to the preset's 4
    assert second.exit_code == 0, second.output
    assert "step 1:" not in second.output and "step 3: loss" in second.output and "cli-s2: 4 steps" in second.output
    lines = [json.loads(x) for x in open(f"{features}/runs/cli-s2/metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    missing = CliRunner().invoke(app, ["train", f"output_root={features}"])
    assert missing.exit_code == 2 and "a preset comes first" in missing.output


def test_caption_dropout_swaps_a_tenth_of_captions_for_the_null_caption(features, tiny_t5_encoder):
    from pixart.train.conditions import Conditions
    from pixart.train.trainer import step_generator

    cfg = config(features, "tiny-stage2", "dropout", t5=tiny_t5_encoder)
    prepare_run(cfg)
    cond = Conditions.load(cfg)
    assert cond.null_mask.sum() >= 1 and cond.width == 32  # T5("") is its EOS token
    rate = torch.cat([torch.rand(64, generator=step_generator(0, s, 0)) < cfg.caption_dropout
                      for s in range(200)]).float().mean()
    assert 0.08 < float(rate) < 0.12
    text, mask = torch.randn(3, 120, 32).half(), torch.ones(3, 120, dtype=torch.long)
    out_text, out_mask = cond.drop(text, mask, torch.tensor([False, True, False]))
    assert torch.equal(out_text[1], cond.null_text) and torch.equal(out_mask[1], cond.null_mask)
    assert torch.equal(out_text[0], text[0]) and torch.equal(out_mask[2], mask[2])


@pytest.mark.parametrize("preset", ["tiny-stage1", "tiny-stage2"])
def test_finishing_batches_in_the_step_gives_the_same_run(features, tiny_t5_encoder, preset):
    """data.finish=device (the loader hands over the posterior, noise seeds and the valid T5 rows; the step samples
    and pads): on the CPU the same losses as finishing in the loader, with dropout to the null caption (0.5 here)."""
    runs = []
    for where in ("loader", "device"):
        cfg = config(features, preset, f"finish-{where}-{preset}", "schedule.max_steps=3", f"data.finish={where}",
                     "caption_dropout=0.5",
                     t5=tiny_t5_encoder)
        prepare_run(cfg)
        trainer = Trainer(cfg)
        assert trainer.loader.sample_posterior == trainer.loader.pad_text == (where == "loader")
        runs.append(losses(trainer))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_a_sharded_dit_trains_like_the_plain_one(features, tmp_path):
    """FSDP2 on stage 1 (one gloo rank in this process): diffusers' DiT reuses block 0's embedder after the blocks
    and the trainer sums the per-block embedder gradients on sharded tensors; losses, gradient norms and the
    gathered checkpoint equal the plain run's."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from pixart.train.checkpoint import latest
    from pixart.train.sharding import FSDP, Replicated
    from pixart.train.weights import load_weights

    runs, plain = {}, None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for name, strategy in (("plain", Replicated()), ("sharded", FSDP())):
            cfg = config(features, "tiny-stage1", f"fsdp-{name}", "schedule.max_steps=3",
                         "schedule.checkpoint_every=3", "optim.ema_decay=0.9")
            trainer = Trainer(cfg, strategy=strategy)
            assert isinstance(trainer.model, FSDPModule) == isinstance(trainer.ema, FSDPModule) == (name == "sharded")
            plain = plain or copy.deepcopy(trainer.model)
            runs[name] = [x for m in trainer.fit() for x in (m["loss"], m["grad_norm"])]
    finally:
        dist.destroy_process_group()
    assert runs["sharded"] == pytest.approx(runs["plain"], rel=1e-6)
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    for part in ("transformer", "ema"):
        load_weights(a, Path(latest(features, "fsdp-plain")) / part)
        load_weights(b, Path(latest(features, "fsdp-sharded")) / part)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.allclose(x, y, atol=1e-7), (part, k)


def test_a_compiled_model_trains_like_the_eager_one(features, tiny_t5_encoder, monkeypatch):
    """model.compile=true: the step runs the torch.compile'd module, and trains like the eager one; checkpoints keep
    the plain module's parameter names. Compiled here with a counting aot_eager backend (TorchDynamo's capture and
    AOTAutograd's forward and backward graphs, no C++ toolchain, seconds on a CPU) in place of inductor's default."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": counter}))
    runs, frames = [], []
    try:
        for name, flag in (("eager", "false"), ("compiled", "true")):
            cfg = config(features, "tiny-stage2", name, "schedule.max_steps=2", f"model.compile={flag}",
                         t5=tiny_t5_encoder)
            prepare_run(cfg)
            trainer = Trainer(cfg)
            runs.append(losses(trainer))
            frames.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert frames[0] == 0 and frames[1] >= 1 and counter.op_count > 0  # only the compiled run went through dynamo
    assert type(trainer.forward_model).__name__ == "OptimizedModule"
    # the same float32 operations, some regrouped by AOTAutograd's traced backward: the step-1 losses (no update
    # yet) agree to rounding, and AdamW's first update (about lr x sign(grad)) moves step 2's by far less than 1e-5
    assert torch.allclose(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=1e-5, atol=0), runs
    assert not any(k.startswith("_orig_mod") for k in trainer.model.state_dict())


def test_an_epoch_that_runs_dry_is_an_error_not_a_hang(features):
    cfg = config(features, "tiny-stage1", "dry", "schedule.max_steps=50")
    prepare_run(cfg)
    trainer = Trainer(cfg)
    class OneMore(type(trainer.epoch_steps)):  # as if the shards lost samples after the count
        def __call__(self, epoch):
            return super().__call__(epoch) + 1

    trainer.epoch_steps.__class__ = OneMore
    with pytest.raises(PipelineError, match="fewer than the"):
        list(trainer.fit())


def test_stage1_runs_are_deterministic(features):
    """Label dropout is the step's seeded one: diffusers' own (global RNG, per block) is switched off."""
    runs = []
    for name in ("det-a", "det-b"):
        cfg = config(features, "tiny-stage1", name, "schedule.max_steps=3", "caption_dropout=0.5")
        prepare_run(cfg)
        trainer = Trainer(cfg)
        torch.manual_seed(len(runs))  # a different global RNG state must not matter
        runs.append(losses(trainer))
    assert runs[0] == runs[1]
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in trainer.model.transformer_blocks)


# -- which weights start the next stage (init, init_weights) ----------------------------------------------------------


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_init_from_a_run_directory_takes_its_latest_checkpoint_and_says_which_weights(features, tiny_t5_encoder,
                                                                                      weights):
    from safetensors.torch import load_file

    src = config(features, "tiny-stage2", f"init-src-{weights}", t5=tiny_t5_encoder)  # checkpoints at 2 and 4
    prepare_run(src)
    list(Trainer(src).fit())
    run_directory = Path(features) / "runs" / f"init-src-{weights}"
    sub = {"model": "transformer", "ema": "ema"}[weights]
    file = run_directory / "checkpoints" / "step-000000004" / sub / "diffusion_pytorch_model.safetensors"
    older = load_file(str(run_directory / "checkpoints" / "step-000000002" / sub / file.name))
    want, other = load_file(str(file)), load_file(str(file).replace(f"/{sub}/", "/ema/" if sub == "transformer"
                                                                      else "/transformer/"))
    assert any(not torch.equal(want[k], other[k]) for k in want)  # 4 steps at EMA decay 0.99: the two differ
    assert any(not torch.equal(want[k], older[k]) for k in want)

    cfg = config(features, "tiny-stage2", f"from-run-dir-{weights}", f"init={run_directory}",
                 f"init_weights={weights}", "schedule.max_steps=1", t5=tiny_t5_encoder)
    prepare_run(cfg)  # the driver's check takes the run directory too
    trainer = Trainer(cfg)
    got = trainer.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # the latest checkpoint's, the weights asked for
    said = []
    assert trainer.resume(log=said.append) is False
    assert len(said) == 1 and str(file) in said[0], said
    assert ("trained (model) weights" if weights == "model" else "EMA weights") in said[0]
    list(trainer.fit())
    record = json.loads(open(checkpoint.latest(features, f"from-run-dir-{weights}") + ".done").read())["init"]
    assert record == {"init": str(run_directory), "weights": weights, "path": str(file.parent), "files": [str(file)]}


def test_the_readmes_stage2_from_a_stage1_run_directory_works(features, tiny_t5_encoder, tiny_vae):
    """README: `pixart train stage2 init=/data/pixart/runs/stage1-imagenet-256 ...` (was: no transformer
    config): the run directory's latest committed checkpoint, its trained weights, re-parameterised."""
    from typer.testing import CliRunner

    from flows.cli import app

    common = [f"output_root={features}", f"vae_model={tiny_vae}"]
    first = CliRunner().invoke(app, ["train", "tiny-stage1", *common, "run=readme-s1",
                                     "schedule.max_steps=2"])
    assert first.exit_code == 0, first.output
    run_directory = Path(features) / "runs" / "readme-s1"
    second = CliRunner().invoke(app, ["train", "tiny-stage2", f"init={run_directory}",
                                      *common, "run=readme-s2", "data.caption_set=tiny",
                                      f"t5_model={tiny_t5_encoder}", "schedule.max_steps=1"])
    assert second.exit_code == 0, second.output
    file = run_directory / "checkpoints" / "step-000000002" / "transformer" / "diffusion_pytorch_model.safetensors"
    said = [line[line.index("init: "):] for line in second.output.splitlines() if "init: " in line]
    assert len(said) == 1 and "trained (model) weights" in said[0] and str(file) in said[0], second.output
    assert "readme-s2: 1 steps" in second.output
    empty = Path(features) / "runs" / "readme-empty" / "checkpoints"
    empty.mkdir(parents=True)
    third = CliRunner().invoke(app, ["train", "tiny-stage2", f"init={empty.parent}", *common,
                                     "run=readme-s2b", "data.caption_set=tiny", f"t5_model={tiny_t5_encoder}"])
    assert third.exit_code == 2 and "without a committed checkpoint" in third.output, third.output


def test_the_t0_decoder_cdf_is_a_config_key_passed_to_the_loss(features, tiny_t5_encoder):
    from storage.configio import dump_yaml

    default = config(features, "tiny-stage2", "cdf-tanh", t5=tiny_t5_encoder)
    assert default.loss.decoder_cdf == "tanh"  # the official formula
    exact = config(features, "tiny-stage2", "cdf-exact", "loss.decoder_cdf=exact", t5=tiny_t5_encoder)
    prepare_run(exact)
    assert Trainer(exact).diffusion.decoder_cdf == "exact"
    assert "decoder_cdf: exact" in (Path(features) / "runs" / "cdf-exact" / "config.yaml").read_text()
    assert "decoder_cdf: tanh" in dump_yaml(default)
    with pytest.raises(ConfigError, match="decoder_cdf"):
        config(features, "tiny-stage2", "cdf-bad", "loss.decoder_cdf=erf", t5=tiny_t5_encoder)
