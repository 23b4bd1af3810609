#!/usr/bin/env bash
# The reduced hopper-medium comparison of the README: O2SAC, O2TD3, O2PPO, OPT against naive fine-tuning, seed 0,
# one torch thread per run, two runs at a time. Needs the local hopper-medium dataset and two offline checkpoints.
#
#   bash benchmarks/o2o_reduced.sh IQL_CKPT TD3BC_CKPT OUT_DIR
#   python benchmarks/o2o_table.py OUT_DIR          # the README table
#
# The README's runs used the 20k-step checkpoint of a 100k-step IQL run and the 50k-step checkpoint of a 100k-step
# TD3+BC run (offline_pretrain.py --total-steps 100000 --eval-every 10000, copied at those evaluations).
set -uo pipefail
IQL=$(realpath "$1"); TD3BC=$(realpath "$2"); OUT=$(realpath -m "$3")
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
RD="$OUT/runs"

run() {  # name script args...
    local name=$1 script=$2; shift 2
    local t0=$SECONDS
    $PY "$script" --run-dir "$RD" --run-name "$name" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local res; res=$(ls "$RD"/"${script%.py}"/*/"$name"/results.json 2>/dev/null | head -1)
    [ -n "$res" ] && cp "$res" "$OUT/$name.json"
    echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/runs.txt"
}

SAC="--env hopper-medium-v2 --seed 0 --threads 1 --device cpu --checkpoint $IQL --distill-steps 2000 --online-steps 1200 --utd 5 --learning-starts 100 --eval-every 120 --eval-episodes 5"
TD3="--env hopper-medium-v2 --seed 0 --threads 1 --device cpu --checkpoint $TD3BC --online-steps 6000 --eval-every 500 --eval-episodes 5"
PPO="--env hopper-medium-v2 --seed 0 --threads 1 --device cpu --checkpoint $IQL --online-steps 40960 --constraint-horizon 40960 --eval-every 4096 --eval-episodes 10"
TD3_EPS=${TD3_EPS:---constraint-horizon 6000}
OPT_EXTRA=${OPT_EXTRA:-}

( run sac_o2sac o2o_sac.py $SAC --reevaluate-steps 3000 --align-steps 2000
  run sac_naive o2o_sac.py $SAC --no-reevaluate --no-align --no-constraint
  run td3_opt o2o_td3.py $TD3 --opt --opt-collect-steps 1000 --opt-pretrain-steps 1000 --opt-utd 2 --kappa-begin 1000 --kappa-finish 3500 $OPT_EXTRA ) &
( run ppo_o2ppo o2o_ppo.py $PPO --reevaluate-steps 20000
  run td3_o2td3 o2o_td3.py $TD3 --reevaluate-steps 5000 --align-steps 3000 $TD3_EPS
  run td3_naive o2o_td3.py $TD3 --no-reevaluate --no-align --no-constraint
  run ppo_naive o2o_ppo.py $PPO --no-reevaluate --no-constraint ) &
wait
