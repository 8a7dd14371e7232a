"""One-time Prefect setup of a cluster (`pixart setup cluster gpu_slots=8`), idempotent:

- the global concurrency limit `pixart-gpu` with `gpu_slots` slots, which GPU shard calls take with strict=True
  (`flows/_prefect.py`), so a cluster without it fails loudly instead of oversubscribing its GPUs;
- the automation `pixart-zombie-runs`: a flow run whose process stopped sending `prefect.flow-run.heartbeat` events
  (workers send one every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds) for `heartbeat_timeout_s` is set Crashed, so
  a killed worker's run does not stay Running and can be retried. The timeout must cover two heartbeats of this
  machine's Prefect settings (Prefect's default is one every 180 s; docker/compose.yaml sets 30 s), else live runs
  would be set Crashed: setup refuses a shorter one.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from storage.configio import StrictModel
from storage.errors import PipelineError

AUTOMATION = "pixart-zombie-runs"


class SetupConfig(StrictModel):
    """Prefect objects the pipeline expects on a cluster. Presets live in `configs/setup/`."""

    gpu_slots: int = Field(gt=0, description="GPUs the cluster's Prefect workers share (slots of pixart-gpu).")
    heartbeat_timeout_s: int = Field(90, gt=0, description="A run with no heartbeat for this long is set Crashed.")


def setup_prefect(cfg: SetupConfig) -> list[str]:
    """Create or update the limit and the automation; returns what was done, one line each."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from flows._prefect import GPU_LIMIT

    beat = get_current_settings().flows.heartbeat_frequency
    if beat is not None and cfg.heartbeat_timeout_s < 2 * beat:
        raise PipelineError(f"heartbeat_timeout_s={cfg.heartbeat_timeout_s} is less than two heartbeats "
                            f"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY={beat} s): live runs would be set Crashed. Set "
                            f"heartbeat_timeout_s>={2 * beat}, or a shorter heartbeat on the workers (30 s at least)")
    done = []
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=cfg.gpu_slots))
            done.append(f"global concurrency limit {GPU_LIMIT}: set to {cfg.gpu_slots} slots")
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=cfg.gpu_slots))
            done.append(f"global concurrency limit {GPU_LIMIT}: created with {cfg.gpu_slots} slots")
    trigger = EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"}, after={"prefect.flow-run.heartbeat"},
                           expect={"prefect.flow-run.*"}, for_each={"prefect.resource.id"}, posture=Posture.Proactive,
                           threshold=1, within=timedelta(seconds=cfg.heartbeat_timeout_s))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {cfg.heartbeat_timeout_s} s: the run's process died")
    try:
        old = Automation.read(name=AUTOMATION)
    except ValueError:
        old = None
    if old is not None:
        old.delete()
    Automation(name=AUTOMATION, trigger=trigger, actions=[action],
               description="Marks a flow run Crashed when its process stops sending heartbeats.").create()
    done.append(f"automation {AUTOMATION}: {'replaced' if old else 'created'} (Crashed after "
                f"{cfg.heartbeat_timeout_s} s without a heartbeat)")
    return done
