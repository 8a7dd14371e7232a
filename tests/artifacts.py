"""Prefect artifacts of one flow run. Artifact keys repeat across the session's runs (every SAM ingest publishes
`ingest-sam-shards`), so a test reads those of the run it started, never whichever run of another test wrote last."""

from __future__ import annotations

from typing import Any


def run_artifacts(state: Any, keys: list[str]) -> dict[str, Any]:
    """{key: artifact} for `keys` published by the flow run whose final `state` this is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None, "a flow run's state carries its id"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys),
                                                                     flow_run_id=ArtifactFilterFlowRunId(
                                                                         any_=[flow_run_id])))
    return {a.key: a for a in found}
