#!/usr/bin/env bash
# The project's test command (the README's; .ci/run calls exactly this), from the repository root:
# the system packages the browser test needs (Debian's chromium + chromedriver), a venv with the dev extra, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null || echo "warning: could not install chromium + chromium-driver; the browser test needs them" >&2
fi
python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/python -m pytest -q "$@"
