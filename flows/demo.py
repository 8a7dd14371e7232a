"""`make demo`: the Prefect flow `pixart-pipeline` (flows/pipeline_flow.py) on the `pipeline/demo` preset, run in
this process: sample SA-1B, JourneyDB and ImageNet shards built from real photos, tiny models built offline, every
step a subflow of its stage's flow, the training steps Ray Train jobs on a local Ray (`train_executor=ray`; one
worker, which fits 2 cores). A second run skips every step, and so does a run after `pixart pipeline demo`: where
training ran is not lineage.

    python -m flows.demo                                      # demo-output/, as `make demo`
    python -m flows.demo output_root=/tmp/d/pixart demo_inputs=/tmp/d

Arguments are `key=value` overrides of the pipeline config, as for `pixart pipeline demo`.

Prefect: the server at PREFECT_API_URL when it is set; otherwise Prefect's ephemeral API (a temporary server it
starts and stops itself; ephemeral mode is turned on for this run). Prefect's home (its SQLite database, results,
profiles) is `<output_root>/.prefect` unless PREFECT_HOME is set, so the demo writes nothing outside its roots.

Prints, as `pixart pipeline demo` does: one line per step on stderr while it runs (Prefect's own lines about runs,
tasks and the server are left out; warnings are kept), then on stdout the summary table and the estimate next to
what each step's outputs measure (the flow's `pixart-pipeline-summary` artifact), and the flow run's name and final
state. Exit 0 when the flow run ends Completed; 1 otherwise, with its message in one `error:` line; 2 when the
config cannot be read.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

PRESET = "pipeline/demo"
FLOW = "pixart-pipeline"
SUMMARY = "pixart-pipeline-summary"


def prefect_home(output_root: str) -> Path | None:
    """Where Prefect keeps its database for the demo: `<output_root>/.prefect` for a local root (None: remote)."""
    from storage.urls import filesystem, protocol_of

    fs, path = filesystem(output_root)
    return Path(path).resolve() / ".prefect" if protocol_of(fs) in ("file", "local") else None


def prefect_environment(output_root: str, environ: dict[str, str] | None = None) -> str:
    """Set Prefect's environment for the run (before Prefect is imported: it reads its settings then); returns
    where the run is recorded, in words."""
    env = os.environ if environ is None else environ
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors
    if not env.get("PREFECT_HOME") and (home := prefect_home(output_root)) is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    if env.get("PREFECT_API_URL"):
        return f"Prefect server {env['PREFECT_API_URL']}"
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # migrations on a busy 2-core machine
    where = env.get("PREFECT_HOME", "~/.prefect")
    return f"Prefect's ephemeral API, database {where}/prefect.db"


class _StepLines(logging.Filter):
    """On the console: the pipeline run's own lines (one per step) and any warning; not the lines of the subflows,
    tasks, engine or temporary server."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "flow_name", None) == FLOW


def _quiet_console() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_StepLines())


def recorded(flow_run_id) -> tuple[str, str | None]:
    """The flow run's name and its summary artifact (the table, then estimated vs measured), as Prefect recorded
    them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id).name
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[SUMMARY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return name, found[0].data if found else None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    from flows.pipeline_config import PipelineConfig
    from storage.configio import load_config
    from storage.errors import PipelineError

    try:
        cfg = load_config(PipelineConfig, PRESET, args, kind="pipeline")
    except PipelineError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    where = prefect_environment(cfg.output_root)
    print(f"{FLOW} on {PRESET}: training on Ray Train (local Ray unless RAY_ADDRESS); runs recorded in {where}",
          file=sys.stderr, flush=True)

    from flows.pipeline_flow import pixart_pipeline  # Prefect reads its settings and sets up its logging here

    _quiet_console()

    state = pixart_pipeline(config=PRESET, train_executor="ray", overrides=args, return_state=True)
    run_id = state.state_details.flow_run_id
    name, summary = recorded(run_id) if run_id is not None else ("", None)
    if summary:
        print(summary)
    message = " ".join((state.message or "").split())
    print(f"\nPrefect flow run {name!r} of {FLOW} ({run_id}): {state.name}{f': {message}' if message else ''}",
          flush=True)
    if not state.is_completed():
        print(f"error: {FLOW} ended {state.name}: {message or 'no message'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
