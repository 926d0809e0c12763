#!/usr/bin/env bash
# The project's test command (the README's; .ci/run calls exactly this), from the repository root:
#   bash scripts/test.sh [pytest args]            the locked set: exactly the versions in constraints-test.txt
#   bash scripts/test.sh --latest [pytest args]   the newest releases pyproject.toml's ranges allow (.venv-latest)
# First the system packages the tests drive (Debian's chromium + chromium-driver for the web page, qemu-user to
# run the int8 kernels as an x86 CPU without VNNI), then a venv with the dev extra, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
latest=0
if [ "${1:-}" = "--latest" ]; then latest=1; shift; fi
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then need+=(qemu-user); fi
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"; } \
        >/dev/null || echo "warning: could not install ${need[*]}; the tests that drive them will fail" >&2
fi
if [ $latest = 1 ]; then
    python3 -m venv .venv-latest && .venv-latest/bin/pip install -q --upgrade -e ".[dev]"
    .venv-latest/bin/pip freeze --exclude-editable > .venv-latest/resolved.txt
    exec .venv-latest/bin/python -m pytest -q "$@"
fi
python3 -m venv .venv && .venv/bin/pip install -q -c constraints-test.txt -e ".[dev]" && .venv/bin/python -m pytest -q "$@"
