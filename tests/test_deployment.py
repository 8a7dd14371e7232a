"""End to end through a real Prefect server on a loopback port: deploy from prefect.yaml, start a worker, run
ingest/ingest-sam, caption/caption-sam and pixart-pipeline/pixart-pipeline-demo from the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from captioning.audit import audit_caption_set
from storage.manifest import committed_manifests, read_dataset
from tests.prefect_cli import PREFECT, run, stop


def deployment_run(name: str, overrides: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", "240",
                           "-p", f"overrides={json.dumps(overrides)}"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_deployment_runs_ingest_then_caption(prefect_env, samples, tiny_llava, tiny_t5, tmp_path):
    env = prefect_env
    run([*PREFECT, "work-pool", "create", "local", "--type", "process"], env)
    deployed = run([*PREFECT, "--no-prompt", "deploy", "--all"], env)
    assert "ingest/ingest-sam" in deployed.stdout and "caption/caption-sam" in deployed.stdout
    assert "pixart-pipeline/pixart-pipeline-demo" in deployed.stdout
    listed = run([*PREFECT, "deployment", "ls"], env).stdout
    assert all(name in listed for name in ("ingest-sam", "ingest-journeydb", "ingest-imagenet", "caption-sam",
                                           "caption-journeydb"))

    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "local"], env=env, cwd=tmp_path,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        ingested = deployment_run("ingest/ingest-sam", [f"source={samples['sam_links']}", f"output_root={out}"],
                                  env, tmp_path)
        captioned = deployment_run("caption/caption-sam", [f"output_root={out}", f"model={tiny_llava}",
                                                           f"t5_tokenizer={tiny_t5}", "generation.max_new_tokens=8",
                                                           "caption_set=deployed"], env, tmp_path)
        inputs = f"demo_inputs={tmp_path / 'inputs'}"
        piped = subprocess.run([*PREFECT, "deployment", "run", "pixart-pipeline/pixart-pipeline-demo", "--watch",
                                "--watch-timeout", "240", "-p", f"output_root={tmp_path / 'pipe'}",
                                "-p", "only=" + json.dumps(["ingest-sam", "caption-sam"]),
                                "-p", "overrides=" + json.dumps([inputs])],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        stop(worker)
        worker_log.close()
    worker_tail = (tmp_path / "worker.log").read_text()[-3000:]
    assert ingested.returncode == 0, ingested.stdout[-3000:] + worker_tail
    assert "Completed" in ingested.stdout
    assert len(committed_manifests(str(out), "sam")) == 2
    rows = read_dataset(str(out), "sam").to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert captioned.returncode == 0, captioned.stdout[-3000:] + worker_tail
    assert audit_caption_set(str(out), "sam", "deployed")["ok"]
    # the pipeline's deployment, run from the CLI: its selected steps as subflows, the rest not run
    assert piped.returncode == 0 and "Completed" in piped.stdout, piped.stdout[-3000:] + worker_tail
    assert len(committed_manifests(str(tmp_path / "pipe"), "sam")) == 2
    assert not committed_manifests(str(tmp_path / "pipe"), "imagenet")
