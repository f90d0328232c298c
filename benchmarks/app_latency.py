"""Time from clicking Generate to seeing both images in `attnreg app`, on the embedded model (CPU).

Starts `attnreg app --steps STEPS` on a free localhost port, drives it with headless Chromium
(Playwright on Debian's chromium), and for each seed clicks Generate and waits until the page shows
the original and the regulated image. The baseline, measured in the same run: the same work done
directly in Python (`attnreg.explain.explain`, which the page calls for the first pair: a plain and a
regulated run with recorders, and the figures). Prints the medians and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/app_latency.py --steps 25 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "a red circle and a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(steps: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "attnreg.cli", "app", "--port", str(port), "--steps", str(steps)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"attnreg app exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit("attnreg app did not answer in 300 s")


def click_to_images(url: str, seeds: list[int], chromium: str) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("#prompt textarea").fill(PROMPT)
        page.wait_for_function("() => document.querySelector('#targets textarea').value.length > 0", timeout=120_000)
        for seed in seeds:
            box = page.locator("#seed input[type=number]").first
            box.fill(str(seed))
            box.press("Tab")
            start = time.perf_counter()
            page.locator("#run").click()
            page.wait_for_function(
                "(s) => { const t = document.querySelector('#status'); return t && t.innerText.includes('Done:') "
                "&& t.innerText.includes('seed ' + s + ',') && document.querySelector('#original-0 img') "
                "&& document.querySelector('#regulated-0 img'); }", arg=str(seed), timeout=600_000)
            times.append(time.perf_counter() - start)
        browser.close()
    return times


def direct(seeds: list[int], steps: int) -> list[float]:
    import torch

    from attnreg.explain import explain
    from attnreg.toy import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline()
    times = []
    for seed in seeds:
        start = time.perf_counter()
        explain(pipe, PROMPT, seed=seed, num_inference_steps=steps, guidance_scale=7.5)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chromium", default=os.environ.get("ATTNREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    a = ap.parse_args()
    seeds = list(range(1, a.repeats + 1))
    log = Path(tempfile.mkdtemp()) / "app.log"
    proc, url = start_server(a.steps, log)
    try:
        clicked = click_to_images(url, [0] + seeds, a.chromium)[1:]  # seed 0 warms the server up
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    plain = direct([0] + seeds, a.steps)[1:]
    page, base = statistics.median(clicked), statistics.median(plain)
    print(f"embedded model, CPU, 1 thread, {a.steps} steps, {a.repeats} seeds (medians)")
    print("| what | seconds | ratio |\n|---|---|---|")
    print(f"| explain() in Python: plain + regulated run, recorders, figures | {base:.2f} | 1.00x |")
    print(f"| attnreg app: click Generate -> both images on the page | {page:.2f} | {page / base:.2f}x |")


if __name__ == "__main__":
    main()
