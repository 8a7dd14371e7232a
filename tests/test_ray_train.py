"""Ray Train: two CPU workers (DDP over gloo) train a tiny stage 2; a worker failure mid-run is restarted by
FailureConfig and resumes from the last checkpoint, giving the same per-step losses as an uninterrupted run."""

import json

import pytest

from pixart.prepare import prepare_run
from storage.layout import run_dir
from tests.test_train import config

pytestmark = pytest.mark.slow


def losses(root, run):
    with open(f"{run_dir(root, run)}/metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_two_workers_resume_after_a_failure_with_identical_losses(features, tiny_t5_encoder, tiny_vae, tmp_path):
    import ray

    from flows._ray_train import encode_conditions, run_ray
    from pixart.conditions import conditions_url
    from storage.errors import ConfigError
    from storage.urls import exists

    overrides = ("executor=ray", "ray.num_workers=2", "ray.max_failures=1", "data.batch_size=1",
                 "schedule.max_steps=4", "schedule.checkpoint_every=2", "ray.object_store_memory=200000000")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        plain = config(features, "tiny-stage2", "ray-plain", *overrides, t5=tiny_t5_encoder, vae=tiny_vae)
        found = prepare_run(plain, encode=False)  # as the flow does for executor=ray: no T5 on the driver
        assert not exists(conditions_url(plain))
        run_ray(plain, text_width=found["text_width"])  # encoded in a Ray task first
        assert exists(conditions_url(plain))
        with pytest.raises(ConfigError, match="wide but the features are 4096 wide"):
            encode_conditions(config(features, "tiny-stage2", "ray-width", *overrides, t5=tiny_t5_encoder), 4096)
        failing = config(features, "tiny-stage2", "ray-failing", *overrides, t5=tiny_t5_encoder, vae=tiny_vae)
        prepare_run(failing)
        marker = tmp_path / "failed-once"
        run_ray(failing, fail_once_at=(3, str(marker)))
    finally:
        ray.shutdown()
    assert marker.exists()  # the failure did happen, after step 3 was logged and before its checkpoint
    expected = losses(features, "ray-plain")
    assert [s for s, _ in expected] == [1, 2, 3, 4]
    assert losses(features, "ray-failing") == expected  # resumed from step 2: same steps, same losses
    summary = json.load(open(f"{run_dir(features, 'ray-failing')}/summary.json"))
    assert summary["steps"] == 4
