"""The pipeline DAG on the demo data: run twice (the second run skips every step), and lineage decides what a
change re-runs: a new caption prompt, a new VAE, a changed source image."""

import os
import shutil
from pathlib import Path

import pytest

from flows.pipeline import demo_inputs, local_runner, plan, run_pipeline, state
from flows.pipeline_config import PipelineConfig
from storage.configio import load_config
from storage.errors import PipelineError

CAPTION = ["generation.max_new_tokens=40", "batch_size=4"]


def pipeline(root: Path, inputs: Path, *overrides: str) -> dict[str, str]:
    cfg = load_config(PipelineConfig, "demo", [f"output_root={root / 'pixart'}", f"demo_inputs={inputs}", *overrides],
                      kind="pipeline")
    cfg = demo_inputs(cfg)
    outcome = run_pipeline(cfg, local_runner(cfg), log=lambda message: None)
    assert outcome.ok, outcome.failed
    return {r["step"]: r["state"] for r in outcome.rows}


def snapshot(root: Path, *parts: str) -> dict[str, tuple[int, bytes]]:
    """Every file under root/pixart/<part>: (mtime_ns, bytes)."""
    out = {}
    for part in parts:
        for p in sorted((root / "pixart" / part).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo pipeline, run once: (its root, the shared sample shards and tiny models)."""
    inputs = tmp_path_factory.mktemp("demo-inputs")
    root = tmp_path_factory.mktemp("pipeline")
    first = pipeline(root, inputs)
    assert set(first.values()) == {"done"}, first
    return root, inputs


def copy_of(demo, tmp_path: Path) -> Path:
    """The demo's outputs copied (mtimes kept) to a root of their own: the same content, so the same lineage."""
    shutil.copytree(demo[0] / "pixart", tmp_path / "copy" / "pixart")
    return tmp_path / "copy"


def test_a_second_run_skips_every_step_and_status_says_done(demo):
    root, inputs = demo
    again = pipeline(root, inputs)
    assert set(again.values()) == {"skipped"}, again
    cfg = demo_inputs(load_config(PipelineConfig, "demo", [f"output_root={root / 'pixart'}",
                                                           f"demo_inputs={inputs}"], kind="pipeline"))
    done: set[str] = set()
    for step in plan(cfg):
        s = state(cfg, step, done)
        assert s.state == "done", (step.name, s)
        done.add(step.name)
    assert (root / "pixart" / "export" / "model_index.json").is_file()


def test_a_new_caption_prompt_reruns_captions_text_and_training_only(demo, tmp_path):
    root = copy_of(demo, tmp_path)
    assert set(pipeline(root, demo[1]).values()) == {"skipped"}  # a copied root is as current as its original
    kept = snapshot(root, "manifests", "features/sam/latents", "features/imagenet", "runs")
    prompt = ["caption=[" + ",".join(f'"{o}"' for o in [*CAPTION, "prompt=Describe this image briefly"]) + "]"]
    states = pipeline(root, demo[1], *prompt)
    assert states["ingest-sam"] == states["extract-sam-512"] == states["extract-imagenet-256"] == "skipped"
    assert states["train-stage1"] == "skipped"
    assert states["caption-sam"] == states["extract-sam-256"] == states["train-stage2"] == "done", states
    assert states["train-stage3-ms1024"] == states["export"] == "done"
    assert snapshot(root, "manifests", "features/sam/latents", "features/imagenet", "runs").items() >= kept.items()
    assert set(pipeline(root, demo[1], *prompt).values()) == {"skipped"}


def test_a_new_vae_reencodes_latents_and_retrains_but_keeps_captions_and_text(demo, tmp_path):
    root = copy_of(demo, tmp_path)
    kept = snapshot(root, "manifests", "captions", "features/sam/text")
    other = tmp_path / "other-vae"
    shutil.copytree(demo[1] / "models" / "tiny-vae", other)  # the same weights under another id
    states = pipeline(root, demo[1], f"models.vae={other}")
    assert states["caption-sam"] == states["ingest-imagenet"] == "skipped"
    assert states["extract-sam-256"] == states["extract-imagenet-256"] == states["train-stage1"] == "done", states
    assert snapshot(root, "manifests", "captions", "features/sam/text") == kept


def test_a_changed_source_reingests_its_shard_and_redoes_its_dependants_only(tmp_path):
    inputs, root = tmp_path / "inputs", tmp_path / "root"
    assert set(pipeline(root, inputs).values()) == {"done"}
    manifests = root / "pixart" / "manifests" / "imagenet"
    before = {p.name: p.read_bytes() for p in manifests.glob("*.parquet*")}
    sources = sorted(p for p in (inputs / "raw" / "imagenet").rglob("*") if p.is_file() and p.parent.name != "wds"
                     and p.suffix != ".txt")
    assert sources, list((inputs / "raw" / "imagenet").rglob("*"))
    changed = sources[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # replaced in place
    states = pipeline(root, inputs)
    assert states["ingest-imagenet"] == "done" and states["ingest-sam"] == "skipped", states
    assert states["caption-sam"] == states["extract-sam-256"] == states["extract-sam-1024"] == "skipped", states
    assert states["extract-imagenet-256"] == states["train-stage1"] == "done", sorted(states.items())
    assert states["train-stage2"] == "done"  # it starts from stage 1's weights, which changed
    after = {p.name: p.read_bytes() for p in manifests.glob("*.parquet*")}
    changed_files = sorted(n for n in after if after[n] != before.get(n))
    assert changed_files and len({n.split(".")[0] for n in changed_files}) == 1, changed_files  # one shard only


def test_the_pixart_pipeline_flow_runs_its_steps_as_subflows_and_publishes_a_summary(prefect_server, tmp_path):
    """Through Prefect: the selected steps run as subflows of the stage flows, the rest are not run, and the
    summary table is an artifact of the pipeline's run; a second run skips what the first made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline_flow import pixart_pipeline
    from tests.artifacts import run_artifacts

    args = dict(config="demo", output_root=str(tmp_path / "pixart"), only=["ingest-sam", "caption-sam"],
                overrides=[f"demo_inputs={tmp_path / 'inputs'}"])
    state = pixart_pipeline(**args, return_state=True)
    assert state.is_completed(), state.message
    rows = {r["step"]: r["state"] for r in state.result()}
    assert rows["ingest-sam"] == rows["caption-sam"] == "done" and rows["ingest-imagenet"] == "not run", rows
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert sorted(r.name for r in children) == ["caption-sam", "ingest-sam"]
    assert all(r.state.is_completed() for r in children)
    summary = run_artifacts(state, ["pixart-pipeline-summary"])["pixart-pipeline-summary"].data
    assert "| ingest-sam | done | 8 | 0 |" in summary
    again = pixart_pipeline(**args, return_state=True)
    assert {r["step"]: r["state"] for r in again.result()}["caption-sam"] == "skipped"


def test_a_quick_run_of_the_full_pipeline_without_sources_says_which_field_to_fill(prefect_server):
    from flows.pipeline_flow import pixart_pipeline

    state = pixart_pipeline(config="pixart-alpha", return_state=True)
    assert state.is_failed() and "datasets.sam.source: fill in" in state.message, state.message


def test_gpu_shard_calls_wait_for_the_strict_gpu_limit(prefect_server, tmp_path):
    """A stage whose shard calls hold a GPU runs them under the `pixart-gpu` global concurrency limit: without the
    limit the shard fails naming it (strict, not a silent no-op); with it, the shards run, one at a time."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows._prefect import GPU_LIMIT, run_as_flow
    from flows._stage import Shard, Stage

    class GpuStage(Stage):
        name = "gpu-test"
        workers = 2

        def load(self, config, overrides):
            from storage.config import StageConfig

            return StageConfig(output_root=str(tmp_path))

        def output_dir(self, cfg):
            return str(tmp_path)

        def shards(self, cfg, log):
            return [Shard("a", 1), Shard("b", 2)]

        def gpu_slots(self, cfg):
            return 1

        def run_shard(self, shard, cfg, progress):
            return {"shard": shard.name, "num_ok": 1, "num_error": 0}

    @flow(name="gpu-test")
    def gpu_flow():
        return run_as_flow(GpuStage(), "", [], False)

    missing = gpu_flow(return_state=True)
    assert missing.is_failed() and f"no global concurrency limit {GPU_LIMIT!r}" in missing.message, missing.message
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            ran = gpu_flow(return_state=True)
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    assert ran.is_completed(), ran.message


def test_setup_creates_the_gpu_limit_and_the_zombie_automation_once(prefect_server):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows._prefect import GPU_LIMIT
    from flows.setup import AUTOMATION, SetupConfig, setup_prefect

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}), pytest.raises(PipelineError, match=(
            "heartbeat_timeout_s=300 is less than two heartbeats")):  # Prefect's default beat: live runs crashed
        setup_prefect(SetupConfig(gpu_slots=4, heartbeat_timeout_s=300))
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
            first = setup_prefect(SetupConfig(gpu_slots=4, heartbeat_timeout_s=60))
            again = setup_prefect(SetupConfig(gpu_slots=2, heartbeat_timeout_s=60))  # idempotent: no copies
        assert "created" in first[0] and "set to 2 slots" in again[0] and "replaced" in again[1]
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit == 2
            assert len(client.read_automations_by_name(AUTOMATION)) == 1
        automation = Automation.read(name=AUTOMATION)
        trigger = automation.trigger
        assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
        assert trigger.within.total_seconds() == 60 and automation.actions[0].state == "CRASHED"
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
        Automation.read(name=AUTOMATION).delete()
