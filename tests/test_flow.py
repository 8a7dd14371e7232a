"""The `ingest` flow run through Prefect (a temporary server per session), and the `pixart` CLI."""

import subprocess
import sys

import pytest
import yaml

import flows._prefect
from flows.ingest import ingest
from storage.manifest import committed_manifests, read_dataset
from tests.artifacts import run_artifacts


def test_flow_ingests_all_three_datasets(prefect_server, samples, tmp_path):
    out = str(tmp_path)
    runs = {"sam": [f"source={samples['sam']}"],
            "journeydb": [f"source={samples['journeydb']}", f"annotations={samples['journeydb_annotations']}"],
            "imagenet": [f"source={samples['imagenet']}", f"synset_mapping={samples['synset_mapping']}"]}
    states = {}
    for preset, overrides in runs.items():
        state = states[preset] = ingest(config=preset, overrides=[*overrides, f"output_root={out}"],
                                        return_state=True)
        assert state.is_completed(), state.message
        outcome = state.result()
        assert outcome["num_ok"] == 8 and outcome["num_error"] == 0 and outcome["failed"] == []
        assert len(committed_manifests(out, preset)) == outcome["shards"]
        resolved = yaml.safe_load((tmp_path / "manifests" / preset / "config.resolved.yaml").read_text())
        assert resolved["dataset"] == preset and resolved["output_root"] == out
    arts = run_artifacts(states["sam"], ["ingest-sam-summary", "ingest-sam-shards"])
    assert "samples: 8 ok, 0 error rows" in arts["ingest-sam-summary"].data
    assert "sa_000001" in str(arts["ingest-sam-shards"].data)


def test_flow_rerun_skips_and_force_redoes(prefect_server, samples, tmp_path):
    args = dict(config="sam", overrides=[f"source={samples['sam']}", f"output_root={tmp_path}"])
    first = ingest(**args, return_state=True).result()
    assert (first["to_run"], first["committed"]) == (2, 0)
    again = ingest(**args, return_state=True).result()  # current shards are not even listed to run
    assert (again["to_run"], again["committed"], again["all_shards"]) == (0, 2, 2)
    forced = ingest(**args, force=True, return_state=True).result()
    assert (forced["to_run"], forced["committed"]) == (2, 0)


def test_typed_parameters_reach_the_run_and_free_text_overrides_win(prefect_server, samples, tmp_path):
    state = ingest(config="sam", source=samples["sam"], output_root=str(tmp_path), max_shards=2,
                   shards=["sa_000001"], workers=3, overrides=["workers=1"], return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert (outcome["to_run"], outcome["num_ok"]) == (1, 4)  # only the shard named
    assert [u.rsplit("/", 1)[-1] for u in committed_manifests(str(tmp_path), "sam")] == ["sa_000001.parquet"]
    resolved = yaml.safe_load((tmp_path / "manifests" / "sam" / "config.resolved.yaml").read_text())
    assert (resolved["source"], resolved["output_root"], resolved["max_shards"], resolved["workers"]) == (
        samples["sam"], str(tmp_path), 2, 1)


def test_one_failing_shard_does_not_stop_the_others(prefect_server, samples, tmp_path, monkeypatch):
    from storage.ingest.sources.sa1b import SA1B

    real = SA1B.iter_samples

    def flaky(self, shard, cfg, ctx):
        if shard.name == "sa_000000":
            raise OSError("connection reset by peer")
        return real(self, shard, cfg, ctx)

    monkeypatch.setattr(SA1B, "iter_samples", flaky)
    monkeypatch.setattr(flows._prefect, "shard_task",
                        flows._prefect.shard_task.with_options(retries=1, retry_delay_seconds=0))
    state = ingest(config="sam", overrides=[f"source={samples['sam']}", f"output_root={tmp_path}",
                                            "worker_type=thread"],  # the patch lives in this process
                   return_state=True)
    assert state.is_failed() and "1 of 2 shards failed: sa_000000" in state.message
    assert [r["shard"] for r in read_dataset(str(tmp_path), "sam").to_pylist()] == ["sa_000001"] * 4


def test_bad_config_fails_the_run_with_one_message(prefect_server, tmp_path):
    state = ingest(config="sam", overrides=["source=/definitely/missing", f"output_root={tmp_path}"],
                   return_state=True)
    assert state.is_failed() and state.message == "/definitely/missing: does not exist"


@pytest.mark.slow
def test_cli_help_and_ingest(samples, tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "flows", "--help"], capture_output=True, text=True).stdout
    assert "ingest" in help_text and "demo" in help_text
    proc = subprocess.run([sys.executable, "-m", "flows", "ingest", "imagenet", f"source={samples['imagenet_wds']}",
                           f"synset_mapping={samples['synset_mapping']}", f"output_root={tmp_path}"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "imagenet: 1 shards, 0 already committed, 1 to run, 8 samples ok, 0 error rows" in proc.stdout


def test_prefect_retries_a_shard_after_the_same_delays_as_the_local_and_ray_runners():
    """One retry rule for every runner: a shard's task under Prefect waits what LocalRuntime and the Ray runtime
    wait (the Prefect task once had its own 10/60 s)."""
    import flows._prefect
    from flows._stage import RETRY_DELAYS, LocalRuntime

    task = flows._prefect.shard_task
    assert task.retries == len(RETRY_DELAYS) == 2
    assert list(task.retry_delay_seconds) == list(RETRY_DELAYS) == list(LocalRuntime().retry_delays)
