"""What a researcher sees in a real browser: JupyterLab (started here on a loopback port with a token, ended by its
pid) runs the playground notebook, a person changes the task and method and clicks Generate, and the three answers
with their verdicts render; the run's report.html shows every image. Headless Chromium is Debian's package, driven by
Playwright (no browser download), installed by `make test-deps`; without it the tests skip, or fail when CI is set."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import _cache_with_models, copy_run, require

SCREENSHOT_DIR = Path(__file__).resolve().parent.parent / "outputs" / "test-screenshots"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium (`make test-deps` installs it)."""
    path = shutil.which("chromium")
    require(path is not None, "no chromium on PATH (`make test-deps` installs it as root): browser tests skipped")
    return path


@pytest.fixture
def browser_page(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tiny_run, session_models, tmp_path):
    """JupyterLab on 127.0.0.1 with a token, serving a copy of notebook 07 parameterised for the tiny run
    → (base URL, token). Stopped by its own pid."""
    import papermill

    from saif_utils.paths import NOTEBOOK_DIR
    from saif_utils.pipeline import jupyter_env
    from saif_utils.progress import TEXT_PROGRESS

    # the playground writes into its run folder and its cache: copies of the shared run's, which other tests read
    cache = _cache_with_models(tmp_path / "cache", session_models)
    output_dir = copy_run(tiny_run[0], tmp_path / "run", ("01_sae_loading", "02_feature_discovery", "05_steering_sweeps"))
    root = tmp_path / "lab"
    root.mkdir()
    papermill.execute_notebook(str(NOTEBOOK_DIR / "07_playground.ipynb"), str(root / "07_playground.ipynb"),
                               parameters={"profile": "tiny", "output_dir": str(output_dir), "max_new_tokens": 8},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    port, token = _free_port(), "saif-browser-test-token"
    env = os.environ | jupyter_env(tmp_path / "jupyter") | {"SAIF_CACHE_DIR": str(cache)}
    env.pop(TEXT_PROGRESS)  # as a person's JupyterLab: progress bars are widgets, not the batch runner's text
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--allow-root"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "lab.log").read_text()[-3000:]
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()  # by pid; the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_jupyterlab_runs_the_playground_and_generate_renders_three_judged_answers(jupyter_lab, browser_page, tiny_run):
    base, token = jupyter_lab
    page = browser_page
    page.set_default_timeout(240_000)
    page.goto(f"{base}/lab/tree/07_playground.ipynb?token={token}")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    generate = page.get_by_role("button", name="Generate")
    generate.wait_for()
    dropdowns = page.locator(".widget-dropdown")
    task_select = dropdowns.filter(has_text="task").locator("select")
    method_select = dropdowns.filter(has_text="method").locator("select")
    other_task = next(o for o in task_select.locator("option").all_inner_texts() if o != task_select.input_value())
    task_select.select_option(label=other_task)
    method_select.select_option(label="diff_in_means")
    generate.click()
    answers = page.locator(".widget-output table").first
    answers.wait_for()
    header = [h.strip() for h in answers.locator("thead th").all_inner_texts()]
    rows = [r.locator("th, td").all_inner_texts() for r in answers.locator("tbody tr").all()]
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "jupyterlab_playground.png"), full_page=True)
    assert {"answer", "response", "strict", "loose", "degenerate"} <= set(header), header
    labels = [row[1] for row in rows]
    assert len(rows) == 3 and labels[0] == "no instruction" and labels[1].startswith("prompted: "), labels
    assert labels[2].startswith("diff_in_means (L"), labels
    verdicts = [row[header.index(name)] for row in rows for name in ("strict", "loose", "degenerate")]
    assert set(verdicts) <= {"True", "False"}, verdicts
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert "Traceback" not in " ".join(errors.all_inner_texts())


def test_report_html_shows_every_image(tiny_run, browser_page):
    report = tiny_run[0] / "report.html"
    page = browser_page
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    assert len(images) >= 5, images
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "report.png"))
