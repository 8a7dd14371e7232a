"""Leases after a crash, and runs that end with shards not done (issue 15, defects 1, 18 and 20).

A lease whose owner died on this host is broken at once (the pid and its start time are in the lease, so a reused
pid does not count); a lease from another host expires on a short TTL. A kill -9 during captioning or extraction is
followed by an immediate re-run that ends complete. A run that ends with a shard busy in another run is not a
success: exit code 3 from `pixart`, a Failed state in Prefect, the shard named in both.

The kill -9 tests run the real command in a subprocess with one function wrapped to print a marker and sleep at a
known point (after the first part / the first tar sample), so the kill always lands mid-shard with the lease held.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.errors import ShardBusyError
from storage.lease import DEFAULT_TTL, LEASE_SUFFIX, Lease

REPO = str(Path(__file__).resolve().parents[1])
HOLD = """
import sys, time
from storage.lease import Lease
Lease(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def hold_elsewhere(url: str) -> subprocess.Popen:
    """Another live process on this host holding the lease of `url`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=60)
    if proc.stdout is not None:
        proc.stdout.close()


def lease_files(root) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob(f"*{LEASE_SUFFIX}"))


# ---------------------------------------------------------------------------------------------------------------------
# The lease itself
# ---------------------------------------------------------------------------------------------------------------------


def test_a_killed_owners_lease_is_broken_at_once(tmp_path):
    url = str(tmp_path / "out.parquet")
    holder = hold_elsewhere(url)
    try:
        with pytest.raises(ShardBusyError, match="being processed by another run"):
            Lease(url).acquire()  # alive: it keeps its lease
    finally:
        kill9(holder)
    lease = Lease(url)
    lease.acquire()  # dead on this host: no waiting for the TTL
    lease.release()
    assert lease_files(tmp_path) == []


def test_a_recycled_pid_does_not_keep_a_dead_lease(tmp_path):
    url = str(tmp_path / "out.parquet")
    held = Lease(url)
    held.acquire()
    held._stop.set()  # no renewals from here on: the record below stays as written
    held._thread.join()
    with pytest.raises(ShardBusyError):
        Lease(url).acquire()  # our own pid, our own start time: alive
    record = json.loads(Path(url + LEASE_SUFFIX).read_text())
    record["start"] = "1"  # the same pid, but a process that started at another time: the owner is gone
    Path(url + LEASE_SUFFIX).write_text(json.dumps(record))
    lease = Lease(url)
    lease.acquire()
    lease.release()


def test_a_lease_from_another_host_expires_on_a_short_ttl(tmp_path):
    assert DEFAULT_TTL <= 60  # renewed every ttl/3 by a live owner
    url = str(tmp_path / "out.parquet")
    record = {"owner": "elsewhere:1:abcd", "host": "elsewhere.invalid", "pid": 1, "start": "1",
              "expires": time.time() + 3600}
    Path(url + LEASE_SUFFIX).write_text(json.dumps(record))
    with pytest.raises(ShardBusyError, match="elsewhere"):
        Lease(url).acquire()  # another host's live-looking lease is honoured until it expires
    Path(url + LEASE_SUFFIX).write_text(json.dumps({**record, "expires": time.time() - 1}))
    lease = Lease(url)
    lease.acquire()
    lease.release()


def test_breaking_a_dead_lease_is_won_by_exactly_one_of_many(tmp_path):
    url = str(tmp_path / "out.parquet")
    kill9(hold_elsewhere(url))
    racers = [Lease(url) for _ in range(8)]
    start = threading.Barrier(len(racers))
    won = []

    def race(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
        except ShardBusyError:
            return
        won.append(lease)

    threads = [threading.Thread(target=race, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()
    assert lease_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 mid-shard, then an immediate re-run
# ---------------------------------------------------------------------------------------------------------------------

PAUSED_RUN = """
import sys, time
import {module} as m

real = m.{cls}.{method}
calls = []

def paused(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 1:
        print("PAUSED", flush=True)
        time.sleep(600)
    return out

m.{cls}.{method} = paused
sys.argv = ["pixart", *sys.argv[1:]]
from flows.cli import main
main()
"""


def run_until_paused_then_kill(args: list[str], module: str, cls: str, method: str) -> None:
    """Run `pixart <args>` with `module.cls.method` pausing after its first call; kill -9 it there."""
    code = PAUSED_RUN.format(module=module, cls=cls, method=method)
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=_env())
    lines = []
    try:
        for line in proc.stdout:  # ends at EOF if the run exits without pausing
            lines.append(line)
            if line.strip() == "PAUSED":
                break
    finally:
        kill9(proc)
    assert lines and lines[-1].strip() == "PAUSED", "".join(lines)


def pixart(*args: str):
    """`pixart <args>` in this process (a second interpreter would only add its start-up time)."""
    from flows.cli import app

    return CliRunner().invoke(app, list(args))


def test_kill_9_during_captioning_then_an_immediate_rerun_is_complete(ingested_sam, tiny_llava, tiny_t5):
    from storage.manifest import read_dataset
    from storage.parquet import read_rows

    args = ["caption", "sam", f"output_root={ingested_sam}", f"model={tiny_llava}", f"t5_tokenizer={tiny_t5}",
            "generation.max_new_tokens=6", "batch_size=1", "part_rows=1", "caption_set=k"]
    run_until_paused_then_kill(args, "storage.parts", "PartStore", "write")
    assert lease_files(ingested_sam), "the kill should leave the shard's lease behind"
    again = pixart(*args)  # at once: no waiting for the dead run's lease
    assert again.exit_code == 0, again.output
    assert "exactly-once verified" in again.output
    keys = sorted(r["key"] for r in read_dataset(ingested_sam, "sam").to_pylist())
    set_dir = Path(ingested_sam) / "captions" / "sam" / "k"
    rows = [r for p in sorted(set_dir.glob("*.parquet")) for r in read_rows(str(p))]
    assert sorted(r["key"] for r in rows) == keys and all(r["status"] == "ok" for r in rows)
    assert lease_files(ingested_sam) == []


@pytest.fixture
def captioned_copy(captioned, tmp_path):
    """The session's captioned root (manifests + caption set "tiny"), copied so that features start empty."""
    root = tmp_path / "root"
    for part in ("manifests", "captions"):
        shutil.copytree(Path(captioned) / part, root / part)
    return str(root)


def test_kill_9_during_extraction_then_an_immediate_rerun_is_complete(captioned_copy, tiny_t5_encoder, tiny_vae):
    """Killed after the first committed part (one sample): the re-run resumes the shard from it, so the sample
    committed before the kill is not encoded again, and every key still ends with exactly one row."""
    import json

    from storage.manifest import read_dataset
    from storage.parquet import read_rows

    args = ["extract", "sam-256", f"output_root={captioned_copy}", "caption_set=tiny", f"t5_model={tiny_t5_encoder}",
            f"vae_model={tiny_vae}", "part_rows=1"]
    run_until_paused_then_kill(args, "storage.parts", "PartStore", "write")
    assert lease_files(captioned_copy), "the kill should leave the shard's lease behind"
    again = pixart(*args)  # at once: no waiting for the dead run's lease
    assert again.exit_code == 0, again.output
    first = Path(captioned_copy) / "features" / "sam" / "text" / "tiny" / "sa_000000.parquet"
    marker = json.loads(Path(str(first) + ".done").read_text())
    assert marker["resumed_rows"] == 1 and marker["num_ok"] == 4, marker  # 1 resumed, 3 encoded by the re-run
    keys = sorted(r["key"] for r in read_dataset(captioned_copy, "sam").to_pylist())
    features = Path(captioned_copy) / "features" / "sam"
    for kind in ("text/tiny", "latents/256"):
        rows = [r for p in sorted((features / kind).glob("sa_*.parquet")) for r in read_rows(str(p))]
        assert sorted(r["key"] for r in rows) == keys and all(r["status"] == "ok" for r in rows), kind
    assert lease_files(captioned_copy) == []


# ---------------------------------------------------------------------------------------------------------------------
# A shard busy in a live run: not a success
# ---------------------------------------------------------------------------------------------------------------------


def test_a_shard_busy_in_a_live_run_ends_the_command_incomplete(samples, tmp_path, monkeypatch):
    import flows._stage
    from flows.cli import app
    from storage.layout import manifest_url

    monkeypatch.setattr(flows._stage, "RETRY_DELAYS", ())
    root = str(tmp_path / "root")
    holder = Lease(manifest_url(root, "sam", "sa_000000"))
    holder.acquire()
    try:
        result = CliRunner().invoke(app, ["ingest", "sam", f"source={samples['sam']}", f"output_root={root}",
                                          "worker_type=thread"])
    finally:
        holder.release()
    assert result.exit_code == 3, result.output
    assert "sa_000000" in result.output and "incomplete" in result.output


def test_a_shard_busy_in_a_live_run_fails_the_prefect_flow(prefect_server, samples, tmp_path, monkeypatch):
    import flows._prefect
    import flows.ingest as ingest_flow_mod
    from storage.layout import manifest_url

    monkeypatch.setattr(flows._prefect, "shard_task", flows._prefect.shard_task.with_options(retries=0))
    holder = Lease(manifest_url(str(tmp_path), "sam", "sa_000001"))
    holder.acquire()
    try:
        state = ingest_flow_mod.ingest(config="sam", overrides=[f"source={samples['sam']}", f"output_root={tmp_path}",
                                                                "worker_type=thread"], return_state=True)
    finally:
        holder.release()
    assert state.is_failed() and "sa_000001" in state.message, state.message


def test_run_stage_outcome_with_a_busy_shard_is_not_ok(samples, tmp_path):
    from flows._stage import LocalRuntime, run_stage
    from flows.ingest_stage import IngestStage
    from storage.layout import manifest_url

    root = str(tmp_path / "root")
    holder = Lease(manifest_url(root, "sam", "sa_000000"))
    holder.acquire()
    try:
        outcome = run_stage(IngestStage(), "sam", [f"source={samples['sam']}", f"output_root={root}",
                                                   "worker_type=thread"], False, LocalRuntime(retry_delays=()))
    finally:
        holder.release()
    assert not outcome.ok and list(outcome.busy) == ["sa_000000"]
    assert "sa_000000" in outcome.extra["message"]


# ---------------------------------------------------------------------------------------------------------------------
# Counts on a re-run (defect 18) and log lines beside the progress bar (defect 20)
# ---------------------------------------------------------------------------------------------------------------------


def test_a_rerun_with_everything_committed_counts_the_committed_shards(samples, tmp_path):
    from flows.cli import app

    args = ["ingest", "sam", f"source={samples['sam']}", f"output_root={tmp_path}", "worker_type=thread"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "sam: 2 shards, 0 already committed, 2 to run" in first.output, first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "sam: 2 shards, 2 already committed, 0 to run" in again.output, again.output


def test_log_lines_do_not_print_over_the_progress_bar(monkeypatch):
    from tqdm import tqdm

    from flows._stage import LocalRuntime

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # the terminal: the bar and the log lines share it
    runtime = LocalRuntime()
    bar = tqdm(total=3, file=sys.stderr, disable=False, desc="caption sam")
    bar.update(1)
    runtime.log("sa_000000: 4 ok, 0 errors")
    bar.close()
    text = buf.getvalue()
    before = text[: text.index("sa_000000: 4 ok")]
    assert before.rstrip(" 0123456789:INFO").endswith(("\r", "\n")), repr(text)  # the bar's line was cleared first


def test_a_shard_the_executor_never_reports_is_a_failure(tmp_path):
    from pydantic import BaseModel

    from flows._stage import LocalRuntime, Shard, Stage, run_stage

    class Cfg(BaseModel):
        dataset: str = "d"
        output_root: str = str(tmp_path)

    class Silent(Stage):  # an executor (Ray Data, say) that ends without a word about one shard
        name = "silent"

        def load(self, config, overrides):
            return Cfg()

        def output_dir(self, cfg):
            return str(tmp_path / "out")

        def shards(self, cfg, log):
            return [Shard("a", 1), Shard("b", 2)]

        def run_all(self, cfg, shards, runtime, on_done):
            on_done(shards[0], {"shard": "a", "num_ok": 1, "num_error": 0}, None)

    outcome = run_stage(Silent(), "", [], False, LocalRuntime(retry_delays=()))
    assert not outcome.ok and list(outcome.failed) == ["b"] and "without a result" in outcome.failed["b"]


def test_busy_shards_on_the_ray_executor_end_the_run_incomplete(captioned, tiny_t5_encoder, tiny_vae, monkeypatch):
    import contextlib

    import flows._ray_stage
    from flows._stage import LocalRuntime, run_stage
    from flows.extract_stage import ExtractStage
    from pixart.features.config import ExtractConfig
    from pixart.features.extract import latent_files_of
    from storage.configio import load_config

    monkeypatch.setattr(flows._ray_stage, "ray_session", lambda address: contextlib.nullcontext())  # no work left
    args = ["output_root=" + captioned, f"vae_model={tiny_vae}", "what=latents", "base_size=512", "executor=ray",
            "ray.num_gpus_per_replica=0", "force=true"]
    cfg = load_config(ExtractConfig, "sam-256", args, kind="extract")
    holders = [Lease(latent_files_of(cfg, s).index) for s in ("sa_000000", "sa_000001")]
    for h in holders:
        h.acquire()
    try:
        outcome = run_stage(ExtractStage(), "sam-256", args, False, LocalRuntime(retry_delays=()))
    finally:
        for h in holders:
            h.release()
    assert not outcome.ok and sorted(outcome.busy) == ["latents-sa_000000", "latents-sa_000001"], outcome
    assert "latents-sa_000000" in outcome.extra["message"]
