"""`make demo` (`python -m flows.demo`): the `pixart-pipeline` Prefect flow on the demo preset, run as a user runs it,
in a fresh interpreter with no Prefect server configured: Prefect's ephemeral API with its database under the
output root, the training steps as Ray Train jobs on a local Ray; then again, every step skipped."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["ingest-sam", "ingest-journeydb", "ingest-imagenet", "caption-sam", "caption-journeydb", "extract-sam-256",
         "extract-sam-512", "extract-sam-1024", "extract-imagenet-256", "train-stage1", "train-stage2",
         "train-stage3-hq256", "train-stage3-hq512", "train-stage3-ms1024", "export"]
TRAIN = ["stage1", "stage2", "stage3-hq256", "stage3-hq512", "stage3-ms1024"]


def demo(tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m flows.demo` on a root under tmp_path, as `make demo` runs it: no Prefect server, home or Ray set,
    the roots relative to the working directory as the preset's are (Ray workers run elsewhere)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "RAY_ADDRESS")}
    relative = os.path.relpath(tmp_path, ROOT)
    return subprocess.run([sys.executable, "-m", "flows.demo", f"output_root={relative}/pixart",
                           f"demo_inputs={relative}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)


def table(stdout: str) -> dict[str, dict[str, str]]:
    """The summary table's rows by step: {step: {column: cell}}."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "step":  # the estimated-vs-measured table that follows
            break
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two runs of the demo: the first trains five Ray Train jobs on 2 cores
def test_make_demo_runs_the_prefect_flow_with_training_on_ray_then_skips_every_step(tmp_path):
    first = demo(tmp_path)
    assert first.returncode == 0, f"{first.stdout[-3000:]}\n{first.stderr[-5000:]}"
    rows = table(first.stdout)
    assert list(rows) == STEPS, rows
    assert all(rows[s]["state"] == "done" for s in STEPS), rows
    assert all(int(rows[s]["samples"]) > 0 for s in STEPS if s != "export"), rows
    assert "Estimated vs measured" in first.stdout
    assert re.search(r"Prefect flow run '[\w-]+' of pixart-pipeline \([0-9a-f-]+\): Completed", first.stdout)

    # training ran on Ray Train: each run's config records executor ray, and Ray Train kept its storage there
    runs = sorted((tmp_path / "pixart" / "runs").glob("stage*-*"))
    assert sorted(r.name.rsplit("-", 1)[0] for r in runs if r.is_dir()) == sorted(TRAIN), runs
    for run in runs:
        assert re.search(r"^executor: ray$", (run / "config.yaml").read_text(), re.M), run
        assert (run / "ray").is_dir(), run

    # Prefect recorded the run and its steps as subflows, in its database under the output root
    db = tmp_path / "pixart" / ".prefect" / "prefect.db"
    assert db.is_file(), sorted(p.name for p in (tmp_path / "pixart").iterdir())
    with sqlite3.connect(db) as con:
        recorded = con.execute("SELECT r.name, f.name, r.state_type FROM flow_run r JOIN flow f ON r.flow_id = f.id"
                               ).fetchall()
    assert {(name, state) for name, flow, state in recorded if flow != "pixart-pipeline"} == {
        (s, "COMPLETED") for s in STEPS if s != "export"}, recorded
    assert [state for _, flow, state in recorded if flow == "pixart-pipeline"] == ["COMPLETED"], recorded

    again = demo(tmp_path)
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-5000:]}"
    assert {s: r["state"] for s, r in table(again.stdout).items()} == dict.fromkeys(STEPS, "skipped")
    assert f"{len(STEPS)} of {len(STEPS)} steps skipped: nothing they depend on changed." in again.stdout
