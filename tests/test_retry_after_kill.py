"""A worker killed with -9 in the middle of a caption shard, then the UI's Retry (`prefect flow-run retry`), on a real
Prefect server on a loopback port: the dead run does not stay Running (the heartbeat automation of `pixart setup
cluster` sets it Crashed), the retried run resumes the shard from its committed part, every key ends captioned
exactly once, and the run is green only then."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from captioning.audit import audit_caption_set
from storage.manifest import read_dataset
from storage.parquet import read_rows
from tests.prefect_cli import PREFECT, run, stop

# Put into the first worker's environment through PYTHONPATH: the flow-run process it starts pauses right after its
# first committed caption part (writing its pid), so the test can kill it mid-shard.
PAUSE_HOOK = """\
import os
import time

if os.environ.get("PIXART_PAUSE_FILE"):
    import storage.parts as parts

    _write, _calls = parts.PartStore.write, []

    def _paused(self, *args, **kwargs):
        out = _write(self, *args, **kwargs)
        _calls.append(1)
        if len(_calls) == 1:
            with open(os.environ["PIXART_PAUSE_FILE"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
        return out

    parts.PartStore.write = _paused
"""

HEARTBEAT_S = 30  # Prefect's minimum heartbeat interval
TIMEOUT_S = 2 * HEARTBEAT_S  # the automation's window: the smallest `pixart setup cluster` accepts


def flow_run(env: dict, run_id: str) -> dict:
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=10) as r:
        return json.loads(r.read())


def wait_state(env: dict, run_id: str, types: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = flow_run(env, run_id)
        if (got.get("state") or {}).get("type") in types:
            return got
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not in {types} after {timeout}s: {got.get('state')}")


def start_worker(env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*PREFECT, "worker", "start", "--pool", "local"], env=env, cwd=cwd,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_kill_9_of_the_worker_mid_caption_shard_then_retry_captions_every_key_once(prefect_env, ingested_sam,
                                                                                   tiny_llava, tiny_t5, tmp_path):
    env = {**prefect_env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    run([*PREFECT, "work-pool", "create", "local", "--type", "process"], env)
    run([*PREFECT, "--no-prompt", "deploy", "--name", "caption-sam"], env)
    setup = run([sys.executable, "-m", "flows", "setup", "cluster", "gpu_slots=1",
                 f"heartbeat_timeout_s={TIMEOUT_S}"], env)
    assert "pixart-zombie-runs" in setup.stdout, setup.stdout

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    paused = tmp_path / "paused.pid"
    overrides = [f"output_root={ingested_sam}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
                 "generation.max_new_tokens=6", "batch_size=1", "part_rows=1", "caption_set=retried"]
    started = run([*PREFECT, "deployment", "run", "caption/caption-sam", "-p",
                   f"overrides={json.dumps(overrides)}"], env)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)

    first = start_worker({**env, "PYTHONPATH": str(hook), "PIXART_PAUSE_FILE": str(paused)}, tmp_path,
                         tmp_path / "worker1.log")
    try:
        deadline = time.monotonic() + 240
        while not (paused.exists() and paused.read_text()) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "worker1.log").read_text()[-3000:]
            time.sleep(0.5)
        assert paused.exists(), (tmp_path / "worker1.log").read_text()[-3000:]
        os.kill(int(paused.read_text()), signal.SIGKILL)  # the flow-run process (its own session)
        os.killpg(first.pid, signal.SIGKILL)  # and the worker
        first.wait()
    finally:
        stop(first)

    # mid-shard: one part committed, nothing finished, the run still Running until the heartbeats stop counting
    assert not audit_caption_set(ingested_sam, "sam", "retried")["ok"]
    assert flow_run(env, run_id)["state"]["type"] == "RUNNING"
    crashed = wait_state(env, run_id, {"CRASHED", "FAILED", "COMPLETED"}, TIMEOUT_S + 120)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    assert "heartbeat" in crashed["state"]["message"], crashed["state"]

    run([*PREFECT, "flow-run", "retry", run_id], env)  # what the UI's Retry does: the same run, rescheduled
    second = start_worker(env, tmp_path, tmp_path / "worker2.log")
    try:
        done = wait_state(env, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 240)
    finally:
        stop(second)
    assert done["state"]["type"] == "COMPLETED", (done["state"], (tmp_path / "worker2.log").read_text()[-3000:])
    assert done["run_count"] >= 2, done  # the same flow run, run again

    audit = audit_caption_set(ingested_sam, "sam", "retried")
    assert audit["ok"], audit
    keys = sorted(r["key"] for r in read_dataset(ingested_sam, "sam").to_pylist())
    rows = [r for p in sorted((Path(ingested_sam) / "captions" / "sam" / "retried").glob("*.parquet"))
            for r in read_rows(str(p))]
    assert sorted(r["key"] for r in rows) == keys and all(r["status"] == "ok" for r in rows)
    markers = [json.loads(p.read_text()) for p in (Path(ingested_sam) / "captions" / "sam" / "retried").glob("*.done")]
    assert sum(m.get("resumed_rows", 0) for m in markers) >= 1, markers  # the part committed before the kill
    assert not list(Path(ingested_sam).rglob("*.lease")), "the dead run's lease was left behind"
