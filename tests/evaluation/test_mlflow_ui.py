"""The MLflow UI in a real headless browser (Debian chromium + Selenium) browsing runs xrayfusion trained.

`XRAYFUSION_SCREENSHOT=docs/mlflow_ui.png` saves the screenshot the docs show (from these real runs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import SMALL_SYNTHETIC, free_port

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=2000,900",  # wide enough for the metric column beside the assistant panel
)
# two epochs so the curves have points; the rest as every tiny training test
TINY = [*SMALL_SYNTHETIC, "model=ensemble", "model.branches=[small_cnn,darknet]", "trainer.max_epochs=2"]
TINY += ["metrics.bootstrap=0", "gradcam.n_images=0"]


def wait_for(url: str, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver (apt-get install chromium chromium-driver)",
)
def test_mlflow_ui_shows_runs_and_fused_auroc(train_task, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for fusion in ("stacking", "average"):  # two real, tiny trainings into the store the UI reads
        train_task([*TINY, f"fusion={fusion}"])
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("xrayfusion").experiment_id
    runs = {r.info.run_name: r.data.metrics["test/fused/auroc"] for r in client.search_runs([exp])}
    assert set(runs) == {"stacking:small_cnn+darknet", "average:small_cnn+darknet"}

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    driver = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health")
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        # the experiment's "Training runs" page, best fused AUROC first
        driver.get(f"{base}/#/experiments/{exp}/runs?orderByKey=metrics.%60test%2Ffused%2Fauroc%60&orderByAsc=false")
        wait = WebDriverWait(driver, 120)
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        wait.until(lambda d: all(name in body(d) for name in runs))
        # show the metric column as a user does: Columns -> test/fused/auroc
        driver.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
        item = wait.until(lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='test/fused/auroc']"))
        item[-1].click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        shown = lambda v, text: any(f in text for f in (str(v), f"{v:.4f}", f"{v:.3f}", f"{v:.4g}"))  # noqa: E731
        wait.until(lambda d: all(shown(v, body(d)) for v in runs.values()))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "test/fused/auroc" in text
        shot = tmp_path / "mlflow_ui.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("XRAYFUSION_SCREENSHOT"):
            shutil.copy(shot, os.environ["XRAYFUSION_SCREENSHOT"])
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server and any worker it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
