"""Ray Train: two CPU workers (DDP over gloo) train a tiny stage 2; a worker failure mid-run is restarted by
FailureConfig and resumes from the last checkpoint, giving the same per-step losses as an uninterrupted run. The same
under FSDP (ray.strategy=fsdp), whose gathered checkpoints are plain diffusers models."""

import functools
import json
from pathlib import Path

import pytest

from pixart.train.prepare import prepare_run
from storage.layout import run_dir
from tests.test_train import config

pytestmark = pytest.mark.slow


def losses(root, run):
    with open(f"{run_dir(root, run)}/metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _fail_once_after(config, step, marker):
    """`flows._ray_train._loop` with a fault injected from the test, in each Ray worker: rank 0 raises once, right
    after reporting `step` (before that step's checkpoint); the marker file makes the restarted workers carry on."""
    import ray.train

    from flows import _ray_train

    real = ray.train.report

    def report(metrics, *args, **kwargs):
        real(metrics, *args, **kwargs)
        if metrics["step"] == step and ray.train.get_context().get_world_rank() == 0 and not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError(f"injected failure after step {step}")

    ray.train.report = report  # this worker process's own module: _loop reads it when it starts
    try:
        _ray_train._loop(config)
    finally:
        ray.train.report = real


def test_two_workers_resume_after_a_failure_with_identical_losses(features, tiny_t5_encoder, tiny_vae, tmp_path,
                                                                  monkeypatch):
    import ray

    from flows import _ray_train
    from flows._ray_train import encode_conditions, run_ray
    from pixart.train.conditions import conditions_url
    from storage.errors import ConfigError
    from storage.urls import exists

    overrides = ("executor=ray", "ray.num_workers=2", "ray.max_failures=1", "data.batch_size=1",
                 "schedule.max_steps=4", "schedule.checkpoint_every=2", "ray.object_store_memory=200000000")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        monkeypatch.chdir(Path(features).parent)  # a relative output_root: the Ray workers run in another directory
        plain = config(Path(features).name, "tiny-stage2", "ray-plain", *overrides, t5=tiny_t5_encoder, vae=tiny_vae)
        found = prepare_run(plain, encode=False)  # as the flow does for executor=ray: no T5 on the driver
        assert not exists(conditions_url(plain))
        run_ray(plain, text_width=found["text_width"])  # encoded in a Ray task first
        assert exists(conditions_url(plain))
        with pytest.raises(ConfigError, match="wide but the features are 4096 wide"):
            encode_conditions(config(features, "tiny-stage2", "ray-width", *overrides, t5=tiny_t5_encoder), 4096)
        failing = config(features, "tiny-stage2", "ray-failing", *overrides, t5=tiny_t5_encoder, vae=tiny_vae)
        prepare_run(failing)
        marker = tmp_path / "failed-once"
        with monkeypatch.context() as m:  # the workers run the loop with the fault (pickled by reference)
            m.setattr(_ray_train, "_loop", functools.partial(_fail_once_after, step=3, marker=str(marker)))
            run_ray(failing)
        sharded = config(features, "tiny-stage2", "ray-fsdp", *overrides, "ray.strategy=fsdp",
                         t5=tiny_t5_encoder, vae=tiny_vae)
        prepare_run(sharded)
        fsdp_marker = tmp_path / "fsdp-failed-once"
        with monkeypatch.context() as m:
            m.setattr(_ray_train, "_loop", functools.partial(_fail_once_after, step=3, marker=str(fsdp_marker)))
            run_ray(sharded)
    finally:
        ray.shutdown()
    assert marker.exists()  # the failure did happen, after step 3 was logged and before its checkpoint
    expected = losses(features, "ray-plain")
    assert [s for s, _ in expected] == [1, 2, 3, 4]
    assert losses(features, "ray-failing") == expected  # resumed from step 2: same steps, same losses
    summary = json.load(open(f"{run_dir(features, 'ray-failing')}/summary.json"))
    assert summary["steps"] == 4

    # FSDP: sharded weights, gathered checkpoints, resumed after the same failure; the losses of DDP up to the
    # order of the gradient sums (reduce-scatter instead of all-reduce)
    assert fsdp_marker.exists()
    got = losses(features, "ray-fsdp")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert_checkpoint_is_plain(features, "ray-fsdp", sharded)


def assert_checkpoint_is_plain(root, run, cfg):
    """A checkpoint written under FSDP holds full diffusers models (they load without any sharding) and a full
    optimizer state; a DDP or local run refuses to resume from it, naming the strategy."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from pixart.train.checkpoint import latest
    from pixart.train.trainer import Trainer
    from storage.errors import PipelineError

    ckpt = latest(root, run)
    model = PixArtTransformer2DModel.from_pretrained(f"{ckpt}/transformer")
    reference = PixArtTransformer2DModel.from_pretrained(f"{run_dir(root, 'ray-plain')}/checkpoints/"
                                                         f"{ckpt.rsplit('/', 1)[-1]}/transformer")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    state = torch.load(f"{ckpt}/optimizer.pt", weights_only=True)
    assert set(state["state"]) == {n for n, p in model.named_parameters()}  # by name, each full size
    assert all(s["exp_avg"].shape == dict(model.named_parameters())[n].shape for n, s in state["state"].items())
    local = cfg.model_copy(update={"executor": "local"})
    with pytest.raises(PipelineError, match="written under fsdp, this run uses ddp"):
        Trainer(local).resume()
