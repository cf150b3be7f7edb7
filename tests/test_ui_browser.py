"""The UIs a person opens after a run, in a real headless Chromium (Debian's chromium and
chromedriver, driven by Selenium), fully offline: the Prefect UI shows the flow run with its task
runs and artifacts; the MLflow UI shows the run's metrics and the merged-vs-adapter comparison.
Screenshots go to $QLORA_TEST_ARTIFACTS (default: the test's temporary directory)."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import small_recipe, write_recipe
from test_deploy import _cli, _mlflow_run_of, prefect_api, running_servers

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver "
                                                                          "are not installed (.ci/run installs them)")]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                 "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    Path(os.environ.get("QLORA_TEST_ARTIFACTS", "."), "last-page.txt").write_text(body)
    raise AssertionError(f"{[t for t in texts if t not in body]} never shown; page says: {body[:1500]}")


def _tab(driver, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        tabs = driver.find_elements("xpath", f"//*[normalize-space(.)='{name}']")
        if tabs:
            tabs[-1].click()
            return
        assert time.monotonic() < deadline, f"no '{name}' tab"
        time.sleep(0.5)


def test_prefect_and_mlflow_uis_show_the_run(project, browser):
    shots = Path(os.environ.get("QLORA_TEST_ARTIFACTS", project / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with running_servers(project) as urls:
        recipe = small_recipe(merge={"enabled": True, "compare": True},
                                     tracking={"experiment_name": "ui", "tracking_uri": urls["mlflow"]})
        write_recipe(project / "r.yaml", recipe)
        done = _cli(project, "run", "r.yaml", env={"PREFECT_API_URL": urls["prefect"],
                                                   "QLORA_MLFLOW_UI_URL": urls["mlflow"]}, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        from prefect.client.orchestration import get_client

        with prefect_api(urls["prefect"]), get_client(sync_client=True) as client:
            flow_run = client.read_flow_runs()[0]
        run = _mlflow_run_of(urls["mlflow"], flow_run.id)

        prefect_ui = urls["prefect"].removesuffix("/api")
        browser.get(f"{prefect_ui}/runs/flow-run/{flow_run.id}")
        _wait_for_text(browser, [flow_run.name, "Completed"])
        browser.save_screenshot(str(shots / "prefect-flow-run.png"))
        _tab(browser, "Task Runs")
        _wait_for_text(browser, ["train-", "evaluate-", "merge-"])
        browser.save_screenshot(str(shots / "prefect-task-runs.png"))
        _tab(browser, "Artifacts")
        _wait_for_text(browser, ["reviews-test-eval", "reviews-test-mlflow-run"])  # metrics table, link to MLflow
        browser.save_screenshot(str(shots / "prefect-artifacts.png"))

        # An unchanged re-run: its lineage artifact lists every stage as cached, each linking to the
        # flow run above, which built it.
        done = _cli(project, "run", "r.yaml", env={"PREFECT_API_URL": urls["prefect"],
                                                   "QLORA_MLFLOW_UI_URL": urls["mlflow"]}, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        with prefect_api(urls["prefect"]), get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            lineage = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reviews-test-lineage"])))
        latest = max(lineage, key=lambda a: a.created)
        assert latest.flow_run_id != flow_run.id and f"/runs/flow-run/{flow_run.id}" in latest.data
        browser.get(f"{prefect_ui}/artifacts/artifact/{latest.id}")
        _wait_for_text(browser, ["built by", "cached", f"flow run {str(flow_run.id)[:8]}"])
        from selenium.webdriver.common.by import By

        links = browser.find_elements(By.CSS_SELECTOR, f"a[href*='{flow_run.id}']")
        assert links, "the lineage artifact renders no link to the flow run that built the stages"
        browser.save_screenshot(str(shots / "prefect-lineage.png"))

        experiment = run.info.experiment_id
        # The experiment as our links open it: on its runs (MLflow's machine-learning view), not on
        # the GenAI traces overview a fresh browser would show.
        from qlora.tasks.lineage import mlflow_page

        browser.get(mlflow_page(urls["mlflow"], f"experiments/{experiment}"))
        _wait_for_text(browser, ["Run Name", run.info.run_name])
        assert "/runs" in browser.current_url and "workflowType=machine_learning" in browser.current_url
        browser.save_screenshot(str(shots / "mlflow-experiment.png"))
        browser.get(f"{urls['mlflow']}/#/experiments/{experiment}/runs/{run.info.run_id}")
        # The comparison: one nested run per variant, listed on the run's page.
        _wait_for_text(browser, ["adapter", "merged-dequant", "merged-original", "merged-4bit", "Finished"],
                       timeout=90)
        browser.save_screenshot(str(shots / "mlflow-run.png"))
        # Its metrics, on the run's overview (scrolled into view: the list renders lazily).
        browser.execute_script("document.querySelectorAll('*').forEach(e => { if (e.scrollHeight > e.clientHeight) "
                               "e.scrollTop = e.scrollHeight; })")
        _wait_for_text(browser, ["test_accuracy", "merged_test_accuracy"], timeout=90)
        browser.save_screenshot(str(shots / "mlflow-metrics.png"))
    assert all((shots / f).stat().st_size > 10_000 for f in ("prefect-flow-run.png", "mlflow-run.png"))
    print(f"screenshots: {shots}", file=sys.stderr)
