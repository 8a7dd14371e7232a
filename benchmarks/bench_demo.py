"""The demo's wall time: `pixart pipeline demo` (what `make demo` runs) on a fresh output root, then again on the same
root (every step skipped), each in its own interpreter, as a user runs it; the sample shards and tiny models are built
first and timed apart. Prints the wall times, the second run as a fraction of the first, and the slowest steps of the
first run from its summary table. The aim: the first run within 10 minutes on 2 cores.

    python benchmarks/bench_demo.py                 # in a temporary directory, removed after
    python benchmarks/bench_demo.py --keep /tmp/d   # keep the outputs there
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pixart(*args: str) -> tuple[float, str]:
    """Wall seconds and stdout of `pixart <args>` in a fresh interpreter; raises with its output when it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pixart {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return wall, proc.stdout


def slowest(summary: str, n: int = 5) -> list[tuple[str, float]]:
    """The `n` steps with the most seconds in a summary table (`| step | state | ... | seconds | bytes |`)."""
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[header.index("seconds")]:
            rows.append((cells[0], float(cells[header.index("seconds")])))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="write the outputs here and keep them (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-demo-"))
    inputs, out = f"demo_inputs={work / 'inputs'}", f"output_root={work / 'out'}"
    try:
        built, _ = pixart("status", "demo", inputs, out)  # builds the sample shards and tiny models, runs nothing
        first, summary = pixart("pipeline", "demo", inputs, out)
        second, again = pixart("pipeline", "demo", inputs, out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    skipped = re.search(r"(\d+) of (\d+) steps skipped", again)
    if not (skipped and skipped[1] == skipped[2]):
        raise SystemExit(f"the second run did not skip every step:\n{again[-2000:]}")
    print(f"demo on {os.cpu_count()} cores: inputs built in {built:.1f} s (with `pixart status`); first run "
          f"{first:.1f} s; second run {second:.1f} s ({second / first:.2f}x the first, every step skipped)")
    print("slowest steps of the first run: " + ", ".join(f"{name} {s:.1f} s" for name, s in slowest(summary)))


if __name__ == "__main__":
    main()
