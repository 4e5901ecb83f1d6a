#!/usr/bin/env bash
# When does in-context learning appear? Scores every checkpoint of a run.sh run on the same
# held-out-rule prompts (seed 2, as run.sh): one table per checkpoint, then each in-context task's
# changed-cell accuracy per step.
#
#   bash examples/toy/curve.sh OUT [PER_TASK]     # OUT: a finished run.sh folder; PER_TASK: 10
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: bash examples/toy/curve.sh OUT [PER_TASK]" >&2
  exit 2
fi
OUT=$(cd "$1" && pwd)
PER_TASK=${2:-10}
cd "$(dirname "$0")/../.."
for ckpt in "$OUT"/lvm/step_*; do
  step=$(basename "$ckpt")
  prompts="$OUT/curve/$step"
  [ -f "$prompts/jobs.jsonl" ] || python examples/toy/world.py prompts --out "$prompts" --seed 2 --per_task "$PER_TASK" \
    --rules held_out > /dev/null
  last=$(tail -n 1 "$prompts/jobs.jsonl" | python -c "import json, sys; print(json.load(sys.stdin)['output'])")
  [ -f "$prompts/$last" ] || python sample.py --batch "$prompts/jobs.jsonl" --ckpt "$ckpt" --vqgan "$OUT/vqgan" \
    --temperature 0 > /dev/null 2>&1
  echo "== $step"
  python examples/toy/world.py score "$prompts" | tee "$prompts/table.txt" | head -n -1
done
echo
echo "changed cells right, held-out rules (with swapped examples in brackets):"
for table in "$OUT"/curve/step_*/table.txt; do
  step=$(basename "$(dirname "$table")")
  echo "$step $(awk 'NR > 1 && $3 ~ /^[0-9]+$/ && $2 != "fixed" {printf "%s %s [%s]  ", $1, $9, $10}' "$table")"
done
