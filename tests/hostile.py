"""Helpers of the hostile-input tests (tests/test_hostile.py, tests/test_hostile_images.py): ingesting a source
and reading back its rows, GNU tars with raw member names, and running code in a fresh interpreter to read its peak
RSS."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.manifest import read_dataset
from tests import images

GOOD = images.jpeg("chelsea", (90, 60))
GB = 1 << 30
RSS_LIMIT = 1_000_000_000  # bytes
REPO = Path(__file__).resolve().parents[1]


def ingest_rows(cfg: IngestConfig) -> dict[str, dict]:
    ctx = prepare(cfg)
    results = [ingest_shard(s, cfg, ctx) for s in list_shards(cfg)]
    rows = read_dataset(cfg.output_root, cfg.dataset).to_pylist()
    assert sum(r.num_ok + r.num_error for r in results) == len(rows)
    return {r["key"]: r for r in rows}


def ok_keys(rows: dict[str, dict]) -> list[str]:
    return sorted(k for k, r in rows.items() if r["status"] == "ok")


def errors(rows: dict[str, dict]) -> dict[str, str]:
    return {k: r["error"] for k, r in rows.items() if r["status"] != "ok"}


def write_gnu_tar(path: Path, members: list) -> Path:
    """GNU headers store a member name as raw bytes: a surrogate-escaped str becomes the undecodable bytes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data))
    return path


def run_measured(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object. Adds its peak RSS in bytes as 'rss'."""
    # VmHWM is the peak of this process's own memory map. ru_maxrss is not: Linux carries the parent's peak across
    # fork+exec, so under a large pytest process (torch loaded) it reported 1 GB for a 0.5 GB child.
    tail = ("\n_hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"
            "\nprint(json.dumps({**out, 'rss': int(_hwm.split()[1]) * 1024}))")
    proc = subprocess.run([sys.executable, "-c", code + tail, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_INGEST = """
import json, sys
from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards, prepare
from storage.manifest import read_dataset
cfg = IngestConfig(**json.loads(sys.argv[1]))
ctx = prepare(cfg)
for shard in list_shards(cfg):
    ingest_shard(shard, cfg, ctx)
rows = read_dataset(cfg.output_root, cfg.dataset).to_pylist()
out = {"rows": {r["key"]: [r["status"], r["error"]] for r in rows},
       "report": {k: v for k, v in ctx.items() if k in ("num_records", "num_error", "errors")}}
"""


def ingest_measured(**cfg) -> dict:
    return run_measured(_INGEST, json.dumps(cfg))


def edit_index(monkeypatch, suffix: str, edit) -> None:
    """The loader sees the rows of the index whose URL ends with `suffix` as `edit(rows)` leaves them."""
    import pixart.data.index as data

    real = data.read_rows

    def edited(url, columns=None):
        rows = real(url, columns)
        if url.endswith(suffix):
            edit(rows)
        return rows

    monkeypatch.setattr(data, "read_rows", edited)
