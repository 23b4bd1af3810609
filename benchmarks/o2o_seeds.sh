#!/usr/bin/env bash
# The no-drop check of the README on local hopper-medium, several seeds (the o2o seed; the offline checkpoints are
# fixed): O2SAC (defaults: actor frozen during alignment) from an IQL and a TD3+BC checkpoint, O2TD3 from the TD3+BC
# one; on the first seed also naive fine-tuning and O2SAC with the paper's alignment schedule (--align-actor train).
# One torch thread per run, two runs at a time, in this order. Reduced budgets:
#   O2SAC: 5k distillation steps, re-evaluation until Q has converged (at most 20k steps), 2k alignment steps,
#          2k env steps online at UTD 5 (updates from env step 20), evaluations every 200 env steps;
#   O2TD3: re-evaluation until converged (at most 20k), 3k alignment steps, 6k env steps at UTD 1, threshold horizon
#          6k, updates from env step 60, evaluations every 500 env steps;
#   5 evaluation episodes, plus five evaluations in the first tenth of the online phase (--early-evals 5).
#
#   bash benchmarks/o2o_seeds.sh IQL_CKPT TD3BC_CKPT OUT_DIR ["SEEDS"]
#   python benchmarks/no_drop_table.py OUT_DIR --plot curves.png
set -uo pipefail
IQL=$(realpath "$1"); TD3BC=$(realpath "$2"); OUT=$(realpath -m "$3"); SEEDS=(${4:-0 1 2})
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PY OUT
COMMON="--env hopper-medium-v2 --threads 1 --device cpu --eval-episodes 5 --reevaluate-steps 20000"
SAC="o2o_sac.py $COMMON --align-steps 2000 --online-steps 2000 --utd 5 --learning-starts 20 --eval-every 200"
TD3="o2o_td3.py $COMMON --align-steps 3000 --online-steps 6000 --constraint-horizon 6000 --learning-starts 60 --eval-every 500"
NAIVE="--no-reevaluate --no-align --no-constraint"
jobs=()
for s in "${SEEDS[@]}"; do
  jobs+=("sac_o2sac_iql_s$s|$SAC --seed $s --checkpoint $IQL" "sac_o2sac_td3bc_s$s|$SAC --seed $s --checkpoint $TD3BC")
  if [ "$s" = "${SEEDS[0]}" ]; then  # the baselines and the paper's alignment schedule on the first seed
    jobs+=("sac_naive_iql_s$s|$SAC --seed $s --checkpoint $IQL $NAIVE" "sac_naive_td3bc_s$s|$SAC --seed $s --checkpoint $TD3BC $NAIVE"
           "sac_o2sactrain_iql_s$s|$SAC --seed $s --checkpoint $IQL --align-actor train"
           "sac_o2sactrain_td3bc_s$s|$SAC --seed $s --checkpoint $TD3BC --align-actor train")
  fi
  jobs+=("td3_o2td3_td3bc_s$s|$TD3 --seed $s --checkpoint $TD3BC")
done
jobs+=("td3_naive_td3bc_s${SEEDS[0]}|$TD3 --seed ${SEEDS[0]} --checkpoint $TD3BC $NAIVE")
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c '
  job="{}"; name=${job%%|*}; cmd=${job#*|}; t0=$SECONDS
  $PY $cmd --run-dir "$OUT/runs" --run-name "$name" > "$OUT/$name.log" 2>&1; rc=$?
  res=$(ls "$OUT"/runs/o2o_*/*/"$name"/results.json 2>/dev/null | head -1)
  [ -n "$res" ] && cp "$res" "$OUT/$name.json"
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/runs.txt"'
