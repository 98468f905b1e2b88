#!/usr/bin/env bash
# Set up .venv with the test tools (and chromium), lint, and run the test suite. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/system-deps.sh   # Debian's chromium for the report page test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
