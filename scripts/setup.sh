#!/usr/bin/env bash
# Set up attnreg from nothing: a venv in .venv with the pinned packages and attnreg itself (editable).
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly pinned: an unpinned torch (or a range a newer release satisfies) pulls a
# multi-GB CUDA build; 2.13.0 is the CPU wheel. On a GPU machine install the CUDA torch you need first.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
# The web app's browser tests drive the system's Chromium (Playwright cannot download its own here).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: could not install chromium; the browser tests need it"
fi
