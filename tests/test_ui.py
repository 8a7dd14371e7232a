"""The Prefect UI in headless Chromium: a finished `pixart-pipeline` run on a real loopback Prefect server (UI on),
its sub-runs (the selected steps as subflows) and its artifacts (the summary table) are shown.

Chromium and chromedriver are Debian's `chromium` and `chromium-driver`, installed by `tests/browser.py` when
missing. The pages are the UI's own routes: /runs/flow-run/<id> (tabs Subflow Runs, Artifacts) and
/artifacts/artifact/<id>."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.browser import ensure_chromium, headless_chromium
from tests.prefect_cli import ROOT

WAIT_S = 60
STEPS = ["ingest-sam", "caption-sam"]  # the cheapest steps: two sub-runs, each with artifacts of its own

PIPELINE = """
import json, sys
from flows.pipeline_flow import pixart_pipeline
state = pixart_pipeline(**json.loads(sys.argv[1]), return_state=True)
print("pipeline ended", state.name, state.message)
sys.exit(0 if state.is_completed() else 1)
"""


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Chromium and chromedriver, installed (apt-get) before any server starts; a test error, not a skip, if not."""
    try:
        return ensure_chromium()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


def finished_pipeline(api_url: str):
    """The `pixart-pipeline` flow run on the server (the only one), its sub-runs by name, its summary artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pixart-pipeline"])))
        assert len(runs) == 1, [r.name for r in runs]
        run = runs[0]
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pixart-pipeline-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert run.state is not None and run.state.is_completed(), run.state
    assert sorted(c.name for c in children) == sorted(STEPS), [c.name for c in children]
    assert len(artifacts) == 1, artifacts
    return run, {c.name: c for c in children}, artifacts[0]


class Page:
    """Explicit waits on one browser; a wait that times out fails with the page's text and a screenshot."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots, self.failures = driver, shots, 0

    def body(self) -> str:
        from selenium.webdriver.common.by import By

        try:
            return self.driver.find_element(By.TAG_NAME, "body").text
        except Exception as e:  # only for the failure message
            return f"<no body: {e}>"

    def wait(self, what: str, condition: Callable, timeout: float = WAIT_S):
        """condition(driver) -> a truthy value, retried (stale or missing elements included) until `timeout`."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25,
                                 ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                                 ).until(condition)
        except TimeoutException:
            self.fail(f"the UI did not show {what} within {timeout:.0f}s")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.fail(what)

    def fail(self, what: str):
        self.failures += 1
        shot = self.shots / f"ui-failure-{self.failures}.png"
        self.driver.save_screenshot(str(shot))
        pytest.fail(f"{what}, at {self.driver.current_url} (screenshot {shot}); page text:\n{self.body()[-6000:]}")

    def open_tab(self, tab_id: str, label: str):
        """Click the run page's tab (li.p-tab#<id>) and return its panel (#<id>-content) once it is shown."""
        from selenium.webdriver.common.by import By

        tab = self.wait(f"the {label!r} tab", lambda d: d.find_element(By.CSS_SELECTOR, f"li.p-tab#{tab_id}"))
        tab.click()
        return self.wait(f"the {label!r} tab's content",
                         lambda d: d.find_element(By.ID, f"{tab_id}-content")
                         if "p-tab__active" in d.find_element(By.CSS_SELECTOR, f"li.p-tab#{tab_id}")
                         .get_attribute("class") else None)


@pytest.mark.slow
def test_the_ui_shows_a_finished_pipeline_run_its_sub_runs_and_artifacts(chromium, prefect_env, tmp_path):
    from selenium.webdriver.common.by import By

    env, api_url = prefect_env, prefect_env["PREFECT_API_URL"]
    base = api_url.removesuffix("/api")
    params = dict(config="demo", output_root=str(tmp_path / "pixart"), only=STEPS,
                  overrides=[f"demo_inputs={tmp_path / 'inputs'}"])
    ran = subprocess.run([sys.executable, "-c", PIPELINE, json.dumps(params)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, f"the pipeline run failed:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    run, children, summary = finished_pipeline(api_url)

    with headless_chromium(tmp_path / "chromium") as driver:
        page = Page(driver, tmp_path)

        # the run's page: its name and its Completed state in the heading, its flow's name
        driver.get(f"{base}/runs/flow-run/{run.id}")
        heading = "header.page-heading-flow-run"
        page.wait(f"the run {run.name!r} Completed in the heading",
                  lambda d: run.name in d.find_element(By.CSS_SELECTOR, heading).text
                  and d.find_element(By.CSS_SELECTOR, f"{heading} .state-badge").text.strip() == "Completed"
                  and "pixart-pipeline" in d.find_element(By.CSS_SELECTOR, heading).text)

        # its sub-runs: the selected steps, each a run of its stage's flow, each Completed, linking to its page
        panel = page.open_tab("subflow-runs", "Subflow Runs")

        def listed(d) -> dict[str, tuple[str, str]] | None:
            rows = {}
            for item in panel.find_elements(By.CSS_SELECTOR, ".state-list-item"):
                link = item.find_element(By.CSS_SELECTOR, "a.flow-run-bread-crumbs__flow-run-link")
                rows[link.text.strip()] = (item.find_element(By.CSS_SELECTOR, ".state-badge").text.strip(),
                                           link.get_attribute("href"))
            return rows if set(rows) == set(STEPS) else None

        rows = page.wait(f"the sub-runs {STEPS}", listed)
        for name, child in children.items():
            page.check(rows[name] == ("Completed", f"{base}/runs/flow-run/{child.id}"),
                       f"sub-run {name} should be Completed and link to {child.id}: {rows}")
        page.check("ingest" in panel.text and "caption" in panel.text, "the stage flows' names in the sub-runs")

        # its artifacts: the summary card links to the artifact, whose page renders the summary table
        panel = page.open_tab("artifacts", "Artifacts")
        card = page.wait("the pixart-pipeline-summary artifact card", lambda d: panel.find_element(
            By.CSS_SELECTOR, f"a[href='/artifacts/artifact/{summary.id}']"))
        page.check(card.find_element(By.CSS_SELECTOR, ".artifact-card__title").text == "pixart-pipeline-summary",
                   f"the card of artifact {summary.id} should be titled pixart-pipeline-summary")
        card.click()

        def summary_row(step: str) -> Callable:
            """{column: cell} of `step`'s row in the summary table (the rendered table with a `state` column)."""
            def row(d) -> dict[str, str] | None:
                table = d.find_element(By.XPATH, "//table[.//th[normalize-space()='state']]")
                columns = [th.text.strip() for th in table.find_elements(By.TAG_NAME, "th")]
                found = table.find_elements(By.XPATH, f".//tr[td[1][normalize-space()='{step}']]")
                return dict(zip(columns, [td.text.strip() for td in found[0].find_elements(By.TAG_NAME, "td")],
                                strict=False)) if len(found) == 1 else None
            return row

        page.wait(f"the artifact page of {summary.id}",
                  lambda d: d.current_url.endswith(f"/artifacts/artifact/{summary.id}"))
        for step, expected in (("ingest-sam", {"state": "done", "samples": "8", "errors": "0"}),
                               ("caption-sam", {"state": "done", "samples": "8", "errors": "0"}),
                               ("ingest-imagenet", {"state": "not run"})):
            row = page.wait(f"the summary's {step} row", summary_row(step))
            page.check({k: row.get(k) for k in expected} == expected,
                       f"the summary's {step} row {row} should hold {expected}")
        page.wait(f"the run the artifact belongs to, {run.name!r}", lambda d: run.name in page.body())

        # a sub-run's page lists the stage's own artifacts: the shards table, the progress and the summary
        driver.get(rows["ingest-sam"][1])
        page.wait(f"the ingest-sam run's heading, naming its parent run {run.name!r}",
                  lambda d: {"ingest-sam", "Completed", "Parent Run", run.name} <= set(
                      d.find_element(By.CSS_SELECTOR, heading).text.splitlines()))
        panel = page.open_tab("artifacts", "Artifacts")
        keys = ["ingest-sam-shards", "ingest-sam-progress", "ingest-sam-summary"]
        page.wait(f"the artifacts {keys}", lambda d: set(keys) <= {
            t.text.strip() for t in panel.find_elements(By.CSS_SELECTOR, ".artifact-card__title")})
