"""The `train` flow writes a loss line to the Prefect run's logs every schedule.log_every steps: locally as it trains,
and on Ray as the workers' metrics.jsonl is read back (each step once, none of an earlier run's)."""

from __future__ import annotations

import json
import logging
import re
import time
from types import SimpleNamespace

from flows._stage import Runtime
from flows.train_stage import TrainStage, step_line

LINE = re.compile(r"step (\d+)/(\d+): loss [\d.]+, grad_norm \S+, lr \S+, [\d.]+ samples/s")


def run_logs(flow_run_id) -> list[str]:
    """The messages the Prefect API holds for one flow run (its tasks' included), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs go to the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def test_the_train_flow_logs_the_loss_to_the_run_every_log_every_steps(prefect_server, features, tiny_t5_encoder,
                                                                       tiny_vae):
    from flows.train import train

    state = train(config="tiny-stage2", output_root=features, run="flow-logs", caption_set="tiny", max_steps=4,
                  overrides=[f"t5_model={tiny_t5_encoder}", f"vae_model={tiny_vae}", "schedule.log_every=2"],
                  return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["steps"] == 4  # max_steps, a typed parameter, reached the run
    deadline, steps = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        steps = [LINE.search(m).groups() for m in run_logs(state.state_details.flow_run_id) if LINE.search(m)]
        if len(steps) >= 2:
            break
        time.sleep(0.5)
    assert steps == [("2", "4"), ("4", "4")]  # every log_every (2) steps, out of max_steps


class Recorder(Runtime):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.lines.append(message)

    def progress(self, fraction: float, text: str) -> None:
        self.lines.append(f"progress {fraction:.2f}")


def metrics(step: int) -> dict:
    return {"step": step, "loss": 0.5 / step, "mse": 0.1, "vb": 0.0, "grad_norm": 1.5, "lr": 1e-4, "step_s": 0.5,
            "samples_per_s": 64.0, "gpu_hours": 0.0}


def test_a_ray_run_logs_each_step_once_as_metrics_jsonl_is_flushed(tmp_path):
    cfg = SimpleNamespace(output_root=str(tmp_path), run="ray-run", schedule=SimpleNamespace(max_steps=40))
    url = tmp_path / "runs" / "ray-run" / "metrics.jsonl"
    url.parent.mkdir(parents=True)

    def flush(*steps: int) -> None:  # what MetricsLog.flush writes on a Ray worker at a checkpoint
        url.write_text("".join(json.dumps(metrics(s)) + "\n" for s in steps))

    seen: list[int] = []
    stage, runtime = TrainStage(on_step=lambda m: seen.append(m["step"]), log_steps=True), Recorder()
    stage.runtime = runtime
    stage._read_back(cfg)  # before the first flush: nothing
    flush(10)  # a step of an earlier run of this name, before this one resumed
    stage.reported = 10
    flush(10, 20, 30)
    stage._read_back(cfg)
    stage._read_back(cfg)  # nothing new since
    flush(10, 20, 30, 40)
    stage._read_back(cfg)
    logged = [line for line in runtime.lines if line.startswith("step")]
    assert logged == [step_line(metrics(s), 40) for s in (20, 30, 40)] and seen == [20, 30, 40]
    assert logged[0] == "step 20/40: loss 0.0250, grad_norm 1.5, lr 0.0001, 64.0 samples/s"
    assert runtime.lines[-1] == "progress 1.00"
