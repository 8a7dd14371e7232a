"""End to end through a real Prefect server on a loopback port: deploy from prefect.yaml, start a worker, run
ingest/ingest-sam, caption/caption-sam and pixart-pipeline/pixart-pipeline-demo from the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from captioning.audit import audit_caption_set
from storage.manifest import committed_manifests, read_dataset

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def prefect_env(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PWD": str(ROOT)}  # prefect.yaml's pull step records {{ $PWD }} as the working directory
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(env["PREFECT_API_URL"], server)
        yield env
    finally:
        stop(server)
        log.close()


def run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


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
