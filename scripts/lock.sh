#!/usr/bin/env bash
# Re-resolve the locked test set: a fresh venv takes the newest releases pyproject.toml's dev extra allows, and
# constraints-test.txt records every version it got (scripts/test.sh installs exactly these). Run it when a
# dependency is added or moved, then run the tests on the new set before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[dev]"
{
    echo "# The locked test set (pip constraints): scripts/test.sh installs exactly these versions."
    echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) ($("$venv/bin/python" -c 'import platform; print(platform.python_implementation(), platform.python_version(), platform.machine())'))."
    echo "# Platform-specific packages (the CUDA libraries torch brings on x86_64 Linux) only apply where pip needs them."
    "$venv/bin/pip" freeze --exclude-editable
} > constraints-test.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints-test.txt ($(grep -vc '^#' constraints-test.txt) packages)"
