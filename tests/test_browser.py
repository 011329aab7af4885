"""End to end in a real browser: JupyterLab, the launch form notebook, Launch, live logs and plot.

Runs JupyterLab on 127.0.0.1 with a token and drives Debian's Chromium with Playwright.
The screenshot is kept in ``test-artifacts/launch_form.png``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO

from dsnb import Cluster, JobState

playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("jupyterlab")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

pytestmark = pytest.mark.deepspeed
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path: Path):
    # Serve a copy: JupyterLab saves the notebooks it runs, and the committed ones stay clean.
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / "02_launch_form.ipynb", root / "notebooks")
    (root / "examples").symlink_to(REPO / "examples")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("JupyterLab did not start:\n" + (tmp_path / "jupyter.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield base, token
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_launch_form_in_jupyterlab(jupyter_lab) -> None:
    base, token = jupyter_lab
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        try:
            page.goto(f"{base}/lab/tree/notebooks/02_launch_form.ipynb?token={token}")
            cells = page.locator(".jp-Notebook .jp-Cell")
            cells.first.wait_for(timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            launch = page.locator("button.dsnb-launch")
            # Keys pressed while the kernel is still connecting can be lost: run the cells until the form shows.
            for _ in range(6):
                cells.nth(1).click()  # the cell that builds the spec; the next one shows the form
                page.keyboard.press("Shift+Enter")
                page.keyboard.press("Shift+Enter")
                try:
                    launch.wait_for(timeout=30_000)
                    break
                except playwright_api.TimeoutError:
                    continue
            assert launch.is_visible(), "the launch form did not appear"
            page.wait_for_function("() => !document.querySelector('button.dsnb-launch').disabled", timeout=60_000)
            # Will it fit: typing a model size into the form shows DeepSpeed's estimate and its verdict.
            page.locator(".dsnb-fit-model input").fill("7e9")
            page.locator(".dsnb-fit-model input").press("Enter")
            page.wait_for_function(
                "() => (document.querySelector('.dsnb-fit-verdict') || {}).textContent === 'does not fit'", timeout=60_000)
            assert "7,000.0 M parameters" in page.locator(".dsnb-fit").inner_text()
            launch.click()
            # Rank-prefixed log lines and a plotted metric appear in the job panel below the form.
            page.wait_for_function(
                """() => [...document.querySelectorAll('textarea, pre, .jp-OutputArea-output')]
                        .some(e => (e.value || e.textContent || '').includes('[rank 1]'))""",
                timeout=300_000,
            )
            page.wait_for_selector(".dsnb-plot img[src], img.dsnb-plot[src]", timeout=300_000)
            # Each rank's CPU and memory, sampled by the job's supervisor, get their own row of plots.
            page.wait_for_selector(".dsnb-usage-plot img[src], img.dsnb-usage-plot[src]", timeout=300_000)
            page.wait_for_function("() => document.body.innerText.includes('SUCCEEDED')", timeout=600_000)
            page.screenshot(path=str(ARTIFACTS / "launch_form.png"), full_page=True)
        finally:
            browser.close()
    jobs = Cluster().jobs()
    assert len(jobs) == 1 and jobs[0].state == JobState.SUCCEEDED
