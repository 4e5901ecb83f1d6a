#!/usr/bin/env bash
# LVM in miniature, offline: render a toy world, train a VQGAN and an LVM on it from scratch, then
# pose visual prompts whose rules it has never seen and score the answers. Each stage is the
# project's own CLI; a stage whose output is complete is skipped, so running it again continues
# where it stopped.
#
#   bash examples/toy/run.sh OUT            # the full run (about 30 minutes on 2 CPU cores, 2026-12-05: README)
#   bash examples/toy/run.sh OUT --smoke    # tiny sizes, to check the stages fit together
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ $# -eq 2 ] && [ "$2" != --smoke ]; }; then
  echo "usage: bash examples/toy/run.sh OUT [--smoke]" >&2
  exit 2
fi
mkdir -p "$1" 2>/dev/null && [ -w "$1" ] || { echo "error: $1: cannot write there" >&2; exit 1; }
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
TOY=examples/toy
TASKS="shift recolour segment colorize"
# sentences per pair, per task: segment, whose rule is read at each object's first cell, gets the most;
# colorize, fixed and learnt first, the fewest
declare -A EPOCHS=([shift]=2 [recolour]=3 [segment]=4 [colorize]=1)

if [ "${2:-}" = --smoke ]; then
  CLIPS=2 PAIRS=6 PER_RULE=3 VQ_STEPS=4 VQ_AE=0 LVM_STEPS=2 PER_TASK=1 BATCH=1
else
  CLIPS=200 PAIRS=900 PER_RULE=3 VQ_STEPS=25 VQ_AE=0 LVM_STEPS=5400 PER_TASK=30 BATCH=2
fi
# glibc's huge pages for malloc: XLA's per-step temporaries then come without 4 KB page faults (the
# toy step about 12% faster, the same weights: docs/NOTES.md); glibc reads it at process start
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
started=$SECONDS
stage() { echo; echo "== [$(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s] $*"; }

stage "1/7 render the toy world: $CLIPS clips of 12 frames, $PAIRS pairs for each of: $TASKS ($PER_RULE per rule)"
[ -f "$OUT/data/done" ] || { python $TOY/world.py render --out "$OUT/data" --seed 0 --clips $CLIPS --frames 12 \
  --pairs $PAIRS --pairs_per_rule $PER_RULE;
  touch "$OUT/data/done"; }

stage "2/7 train the VQGAN ($VQ_STEPS steps)"
[ -f "$OUT/vqgan/config.json" ] || python $TOY/train_vqgan.py --data "$OUT/data" --out "$OUT/vqgan" \
  --steps $VQ_STEPS --ae_steps $VQ_AE --codes 256

# a sentence is as long as a prompt with its answer: 2 example pairs and a query pair (or 6 frames); the
# model only learns the positions it trains on, so a longer prompt would put the answer beyond them
SHOTS=2
stage "3/7 tokenize: sentences of 6 images (1536 tokens): 6 frames of a clip, or $((SHOTS + 1)) pairs of one rule"
mkdir -p "$OUT/tokens"
[ -f "$OUT/tokens/clips.jsonl" ] || python tokenize_data.py sequence --input "$OUT/data/clips" \
  --output "$OUT/tokens/clips.jsonl" --vqgan "$OUT/vqgan" --frames 6
for task in $TASKS; do
  [ -f "$OUT/tokens/$task.jsonl" ] || python tokenize_data.py pairs --input "$OUT/data/$task/x" \
    --targets "$OUT/data/$task/y" --output "$OUT/tokens/$task.jsonl" --vqgan "$OUT/vqgan" --shots $((SHOTS + 1)) \
    --epochs ${EPOCHS[$task]}
done
PARTS=("$OUT/tokens/clips.jsonl")
for task in $TASKS; do PARTS+=("$OUT/tokens/$task.jsonl"); done
[ -f "$OUT/tokens/dataset.jsonl" ] || python tokenize_data.py mix --output "$OUT/tokens/dataset.jsonl" --input "${PARTS[@]}"

SEQ=1536  # one sentence per row, aligned: every line holds exactly 6 images
# the loss on the answers alone (each x is a random scene no rule predicts): the answers' look-ups
# into the examples form sooner than with every token alike (docs/NOTES.md, 2026-12-05)
PROMPT_WEIGHT=0
stage "4/7 train the LVM ($LVM_STEPS steps of $BATCH x $SEQ tokens)"
[ -d "$OUT/lvm/step_$(printf %08d $LVM_STEPS)" ] || python train.py --size toy --data "$OUT/tokens/dataset.jsonl" \
  --out "$OUT/lvm" --steps $LVM_STEPS --batch_size $BATCH --accum 1 --seq_len $SEQ --lr 1e-3 --end_lr 1e-4 \
  --warmup $((LVM_STEPS / 10)) --decay_steps $LVM_STEPS --dtype bfloat16 --prompt_weight $PROMPT_WEIGHT --log_every 10 \
  --save_every $(( LVM_STEPS >= 12 ? LVM_STEPS / 12 : 1 )) --keep 12 --mesh 1,1,1

RULES=(held_out seen)
stage "5/7 prompts (seed 2, never used for training): $PER_TASK per task, with held-out and with seen rules"
for rules in "${RULES[@]}"; do
  [ -f "$OUT/prompts_$rules/jobs.jsonl" ] || python $TOY/world.py prompts --out "$OUT/prompts_$rules" --seed 2 \
    --per_task $PER_TASK --rules $rules --shots $SHOTS
done

stage "6/7 visual prompting, greedy"
for rules in "${RULES[@]}"; do
  last=$(tail -n 1 "$OUT/prompts_$rules/jobs.jsonl" | python -c "import json, sys; print(json.load(sys.stdin)['output'])")
  [ -f "$OUT/prompts_$rules/$last" ] || python sample.py --batch "$OUT/prompts_$rules/jobs.jsonl" --ckpt "$OUT/lvm" \
    --vqgan "$OUT/vqgan" --temperature 0
done

stage "7/7 score: the model's answers against the truth and trivial baselines"
for rules in "${RULES[@]}"; do
  python $TOY/world.py score "$OUT/prompts_$rules"
done
echo "done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
