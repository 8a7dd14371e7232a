"""End to end through a real Prefect server: deploy from prefect.yaml, start a worker, run ingest/ingest-sam."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_deployment_run_ingest_sam(prefect_env, samples, tmp_path):
    env = prefect_env
    run([*PREFECT, "work-pool", "create", "local", "--type", "process"], env)
    deployed = run([*PREFECT, "--no-prompt", "deploy", "--all"], env)
    assert "ingest/ingest-sam" in deployed.stdout
    listed = run([*PREFECT, "deployment", "ls"], env).stdout
    assert all(name in listed for name in ("ingest-sam", "ingest-journeydb", "ingest-imagenet"))

    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "local"], env=env, cwd=tmp_path,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [*PREFECT, "deployment", "run", "ingest/ingest-sam", "--watch", "--watch-timeout", "240",
             "-p", f'overrides=["source={samples["sam_links"]}", "output_root={out}"]'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        stop(worker)
        worker_log.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
    assert "Completed" in proc.stdout
    assert len(committed_manifests(str(out), "sam")) == 2
    rows = read_dataset(str(out), "sam").to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
