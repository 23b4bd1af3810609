#!/usr/bin/env bash
# The no-drop check of the README on local hopper-medium: O2SAC against naive SAC fine-tuning from an IQL and a
# TD3+BC checkpoint, seeds 0 1 2 (the o2o seed; the offline checkpoints are fixed), one torch thread per run, two runs
# at a time. Reduced budget: 5k distillation steps, re-evaluation until converged (at most 20k steps), 2k alignment
# steps, 2k env steps online at UTD 5 (updates from env step 20), 5 evaluation episodes every 200 env steps plus five
# in the first tenth.
#
#   bash benchmarks/o2o_seeds.sh IQL_CKPT TD3BC_CKPT OUT_DIR [SEEDS]
#   python benchmarks/o2o_table.py OUT_DIR --seeds
set -uo pipefail
IQL=$(realpath "$1"); TD3BC=$(realpath "$2"); OUT=$(realpath -m "$3"); SEEDS=${4:-0 1 2}
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PY OUT
COMMON="--env hopper-medium-v2 --threads 1 --device cpu --reevaluate-steps 20000 --align-steps 2000 --online-steps 2000 --utd 5 --learning-starts 20 --eval-every 200 --eval-episodes 5"
jobs=()
for s in $SEEDS; do
  for src in iql:$IQL td3bc:$TD3BC; do
    name=${src%%:*}; ck=${src#*:}
    jobs+=("sac_o2sac_${name}_s$s|o2o_sac.py $COMMON --seed $s --checkpoint $ck")
    jobs+=("sac_naive_${name}_s$s|o2o_sac.py $COMMON --seed $s --checkpoint $ck --no-reevaluate --no-align --no-constraint")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c '
  job="{}"; name=${job%%|*}; cmd=${job#*|}; t0=$SECONDS
  $PY $cmd --run-dir "$OUT/runs" --run-name "$name" > "$OUT/$name.log" 2>&1; rc=$?
  res=$(ls "$OUT"/runs/o2o_sac/*/"$name"/results.json 2>/dev/null | head -1)
  [ -n "$res" ] && cp "$res" "$OUT/$name.json"
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/runs.txt"'
