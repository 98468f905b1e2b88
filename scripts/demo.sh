#!/usr/bin/env bash
# Set up .venv and run the demo job (configs/demo.yaml): local Ray, a tiny random-weight
# Kandinsky 3 built on the spot, the prompt table in data/, output in out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/k3batch run configs/demo.yaml "$@"
