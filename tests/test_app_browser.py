"""`attnreg app` in a real browser: the sub-command serves the embedded model on a free localhost port
(6 steps) and headless Chromium (Playwright, the system's /usr/bin/chromium; ATTNREG_CHROMIUM overrides)
types, clicks and reads the page."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
WAIT_MS = 120_000


def chromium_path() -> str:
    path = os.environ.get("ATTNREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), f"no Chromium at {path}: apt-get install -y chromium (or set ATTNREG_CHROMIUM)"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "attnreg.cli", "app", "--port", str(port), "--steps", str(STEPS)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"attnreg app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.terminate()
            pytest.fail(f"attnreg app did not answer in 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, log_path
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True)
        yield b
        b.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(url)
    page.locator("#prompt textarea").wait_for(timeout=WAIT_MS)
    page.outside_requests = outside
    return page


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def type_prompt(page, prompt, targets=None):
    page.locator("#prompt textarea").fill(prompt)
    if targets is None:
        page.wait_for_function("() => document.querySelector('#targets textarea').value.length > 0", timeout=WAIT_MS)
    else:
        page.locator("#targets textarea").fill(targets)


def wait_done(page, prompt):
    status = page.locator("#status")
    page.wait_for_function(
        "(p) => { const s = document.querySelector('#status'); return s && s.innerText.includes('Done:') "
        "&& s.innerText.includes(p); }", arg=prompt, timeout=WAIT_MS)
    return status.inner_text()


def page_image(page, elem_id) -> Image.Image:
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(timeout=WAIT_MS)
    body = page.request.get(img.get_attribute("src")).body()
    return Image.open(io.BytesIO(body)).convert("RGB")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_generate_in_the_browser(server, browser, tmp_path):
    url, _ = server
    page = open_page(browser, url)
    prompt = "a red circle and a blue square"
    type_prompt(page, prompt)
    assert page.locator("#targets textarea").input_value() == "circle, square"  # suggested as typed
    page.wait_for_function("() => document.querySelector('#tokens').innerText.includes('square')", timeout=WAIT_MS)
    assert "circle → 3:circle" in page.locator("#targets-note").inner_text()
    set_number(page, "seed", 42)
    page.locator("#run").click()
    status = wait_done(page, prompt)
    assert f"{STEPS} steps" in status and "circle → 3" in status
    original, regulated = page_image(page, "original-0"), page_image(page, "regulated-0")
    assert original.size == regulated.size == (64, 64)
    assert np.abs(pixels(original) - pixels(regulated)).max() > 50  # the pair differs
    maps = page_image(page, "maps")
    assert maps.width > 400 and maps.height > 400
    for kind in ("original", "regulated"):
        text = page.locator(f"#verdict-{kind}-0").inner_text()
        assert ("RIGHT" in text or "WRONG" in text) and "detector found" in text
    numbers = page.locator("#numbers").inner_text()
    assert "peak @ step 0" in numbers and "regulated" in numbers
    assert page.locator("#diagnosis").inner_text().startswith("circle:")
    assert not page.locator("#original-1").is_visible()  # one image asked for: one pair shown
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert page.outside_requests == []  # nothing fetched from outside this machine (fonts, scripts, analytics)


def test_errors_are_shown_on_the_page(server, browser):
    url, _ = server
    page = open_page(browser, url)
    type_prompt(page, "a red circle and a blue square")
    page.locator("#targets textarea").fill("circle, dog")
    page.wait_for_function("() => document.querySelector('#targets-note').innerText.includes('Problem')",
                           timeout=WAIT_MS)
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Cannot run')", timeout=WAIT_MS)
    text = page.locator("#status").inner_text()
    assert "'dog' is not in the prompt" in text and "<|startoftext|>" in text and "7:square" in text
    assert "Traceback" not in page.content()
    # the app keeps serving: another mistake, then a good run
    page.locator("#targets textarea").fill("circle")
    set_number(page, "guidance", 1)
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Guidance must be > 1')",
                           timeout=WAIT_MS)
    page.locator("#prompt textarea").fill("")
    set_number(page, "guidance", 7.5)
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('prompt is empty')",
                           timeout=WAIT_MS)
    type_prompt(page, "a green triangle", targets="triangle")
    page.locator("#run").click()
    wait_done(page, "a green triangle")
    page.locator("#regulated-0 img").wait_for(state="visible", timeout=WAIT_MS)  # rendered just after the status


def test_two_tabs_at_once_get_their_own_images(server, browser):
    """Two sessions click within a moment of each other; the queue runs them one at a time and each page
    shows its own prompt's images, the very pixels the callbacks give in this process."""
    from attnreg.app.logic import Engine

    url, _ = server
    jobs = [("a red circle", 0), ("a blue square and a yellow triangle", 1)]
    pages = []
    for prompt, seed in jobs:
        page = open_page(browser, url)
        type_prompt(page, prompt)
        set_number(page, "seed", seed)
        pages.append(page)
    for page in pages:
        page.locator("#run").click()
    shown = []
    for page, (prompt, _) in zip(pages, jobs):
        wait_done(page, prompt)
        shown.append({kind: page_image(page, f"{kind}-0") for kind in ("original", "regulated")})
    engine = Engine.load(None)
    for got, (prompt, seed) in zip(shown, jobs):
        want = engine.generate(prompt, "", seed, STEPS, 7.5, "auto", 1).pairs[0]
        for kind in ("original", "regulated"):
            assert np.abs(pixels(got[kind]) - pixels(getattr(want, kind))).max() <= 2, (prompt, kind)
    assert np.abs(pixels(shown[0]["regulated"]) - pixels(shown[1]["regulated"])).max() > 50


def start_long_run(page):
    """The demo prompt at 200 steps x 4 images (1,600 UNet steps: over a minute on one core), running."""
    type_prompt(page, "a red circle and a blue square")
    set_number(page, "steps", 200)
    set_number(page, "n-images", 4)
    page.locator("#run").click()
    page.wait_for_function("() => /step \\d+ of 1600/.test(document.body.innerText)", timeout=WAIT_MS)


def short_run(page):
    """The same prompt again at the test's few steps and one image, run to the end."""
    set_number(page, "steps", STEPS)
    set_number(page, "n-images", 1)
    page.locator("#run").click()
    wait_done(page, "a red circle and a blue square")


def test_stop_leaves_the_app_usable(server, browser):
    url, _ = server
    page = open_page(browser, url)
    start_long_run(page)

    def step_now():
        import re

        return int(re.search(r"step (\d+) of 1600", page.locator("body").inner_text()).group(1))

    k1, t1 = step_now(), time.time()
    page.wait_for_timeout(2000)
    k2, t2 = step_now(), time.time()
    assert k2 > k1, "the progress bar does not move"
    remaining = (1600 - k2) / ((k2 - k1) / (t2 - t1))  # seconds the whole run would still take
    start = time.time()
    page.locator("#stop").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped')", timeout=WAIT_MS)
    # a short run right after: it waits for the stopped job to end, which is at its next step
    short_run(page)
    assert time.time() - start < remaining / 2, (time.time() - start, remaining)
    page.locator("#regulated-0 img").wait_for(state="visible", timeout=WAIT_MS)  # rendered just after the status


def test_stop_in_a_waiting_tab_takes_its_job_off_the_queue(server, browser):
    url, _ = server
    busy, waiting = open_page(browser, url), open_page(browser, url)
    type_prompt(waiting, "a green triangle")
    start_long_run(busy)
    waiting.locator("#run").click()
    waiting.wait_for_function("() => /queue/i.test(document.querySelector('#status').innerText)", timeout=WAIT_MS)
    waiting.locator("#stop").click()
    waiting.wait_for_function("() => document.querySelector('#status').innerText.includes('taken off')",
                              timeout=WAIT_MS)
    busy.locator("#stop").click()
    busy.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped')", timeout=WAIT_MS)
    # the busy tab runs again at once; the waiting tab's job never ran
    short_run(busy)
    assert "Done:" not in waiting.locator("#status").inner_text()
    assert not waiting.locator("#results").is_visible()
