"""The demo's wall time: `python -m flows.demo` (what `make demo` runs: the `pixart-pipeline` Prefect flow on
Prefect's ephemeral API, training on Ray Train) on a fresh output root, then again on the same root (every step
skipped), each in its own interpreter, as a user runs it, with no PREFECT_API_URL, PREFECT_HOME or RAY_ADDRESS (a
fresh Prefect database under the output root, a local Ray); the sample shards and tiny models are built first and
timed apart. `--local` times `pixart pipeline demo` instead (every step in one process, no Prefect, no Ray). Prints
which it measured, the wall times, the second run as a fraction of the first, and the slowest steps of the first run
from its summary table. The aim: the first run within 10 minutes on 2 cores.

    python benchmarks/bench_demo.py                 # in a temporary directory, removed after
    python benchmarks/bench_demo.py --keep /tmp/d   # keep the outputs there
    python benchmarks/bench_demo.py --local         # `pixart pipeline demo`
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


ENV = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")}


def python_m(module: str, *args: str) -> tuple[float, str]:
    """Wall seconds and stdout of `python -m <module> <args>` in a fresh interpreter; raises with its output when it
    fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"python -m {module} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
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
    ap.add_argument("--local", action="store_true", help="time `pixart pipeline demo` (no Prefect, no Ray)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-demo-"))
    inputs, out = f"demo_inputs={work / 'inputs'}", f"output_root={work / 'out'}"
    command = ("flows", "pipeline", "demo") if args.local else ("flows.demo",)
    measured = ("`pixart pipeline demo` (in one process, no Prefect, no Ray)" if args.local else
                "`python -m flows.demo` (make demo: the pixart-pipeline Prefect flow on its ephemeral API, training "
                "on Ray Train)")
    try:
        built, _ = python_m("flows", "status", "demo", inputs, out)  # builds the sample shards and tiny models
        first, summary = python_m(*command, inputs, out)
        second, again = python_m(*command, inputs, out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    skipped = re.search(r"(\d+) of (\d+) steps skipped", again)
    if not (skipped and skipped[1] == skipped[2]):
        raise SystemExit(f"the second run did not skip every step:\n{again[-2000:]}")
    print(f"measured: {measured}")
    print(f"demo on {os.cpu_count()} cores: inputs built in {built:.1f} s (with `pixart status`); first run "
          f"{first:.1f} s; second run {second:.1f} s ({second / first:.2f}x the first, every step skipped)")
    print("slowest steps of the first run: " + ", ".join(f"{name} {s:.1f} s" for name, s in slowest(summary)))


if __name__ == "__main__":
    main()
