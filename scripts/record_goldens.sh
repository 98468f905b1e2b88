#!/usr/bin/env bash
# Regenerate tests/goldens/ from the reference code: every scripts/check_reference*.py with
# --record, on the checkouts under REFS (docs/testing.md, "Reference goldens", says how to
# get them). Needs the `reference` extra (einops, scikit-image).
#
#   bash scripts/record_goldens.sh /tmp/refs   # REFS/Kandinsky-3, KandiSuperRes, kandinsky3-diffusers
set -euo pipefail

REFS=${1:?usage: scripts/record_goldens.sh REFS (holding Kandinsky-3, KandiSuperRes, kandinsky3-diffusers)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/tests/goldens

for repo in Kandinsky-3 KandiSuperRes kandinsky3-diffusers; do
  [ -d "$REFS/$repo/.git" ] || { echo "no checkout of ai-forever/$repo at $REFS/$repo" >&2; exit 2; }
done
# One thread: the figures the scripts print are for one CPU thread, as the tests run.
export OMP_NUM_THREADS=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
rm -f "$OUT"/*.npz "$OUT"/*.json
mkdir -p "$OUT"
"$PY" scripts/check_reference.py "$REFS/Kandinsky-3" --record "$OUT"
"$PY" scripts/check_reference_sr.py "$REFS/KandiSuperRes" --record "$OUT"
"$PY" scripts/check_reference_sr_flash.py "$REFS/KandiSuperRes" sr refine --record "$OUT"
"$PY" scripts/check_reference_controlnet.py "$REFS/kandinsky3-diffusers" --record "$OUT"
"$PY" scripts/check_reference_ip_adapter.py "$REFS/kandinsky3-diffusers" --record "$OUT"
du -ch "$OUT"/* | tail -1
