#!/usr/bin/env bash
# The README's no-drop check at --budget-scale 0.02: each job one o2o run with the scripts' defaults scaled by 0.02
# (O2SAC: 5k distillation steps, re-evaluation until converged, at most 10k, 10k alignment steps with the actor held at
# pi0, 2k env steps at UTD 10; O2TD3: the same phases, an IQL actor's mean network copied, 2k env steps at UTD 1), 5
# evaluation episodes every 200 env steps, 50 for the headline evaluations (offline, distilled, aligned, the first
# tenth of online learning, the last).
# O2PPO jobs run at --budget-scale 0.4 instead (5k distillation steps, 20k re-evaluation steps, 100k env steps = 48
# PPO updates of 2048 transitions, an evaluation every 4k env steps; PPO_SCALE=F sets another scale, re-evaluation
# stays at 20k steps): at 0.02 its online phase is two updates. One torch thread per run, P runs at a time (default
# 2), in the order given; each run's results.json is copied to OUT/<job>.json for benchmarks/no_drop_table.py.
#
#   bash benchmarks/no_drop_grid.sh IQL_CKPT TD3BC_CKPT OUT [ENV [JOB ...]]
#
# JOB = <script>_<mode>_<checkpoint>_s<seed>: script sac | td3 | ppo, mode o2sac | o2td3 | o2ppo | naive, checkpoint
# iql | td3bc (pass - for a checkpoint no job uses). ENV defaults to hopper-medium-v2, the jobs to the hopper grid.
set -uo pipefail
IQL=$1; TD3BC=$2; OUT=$(realpath -m "$3"); ENV=${4:-hopper-medium-v2}
shift $(( $# < 4 ? $# : 4 ))
cd "$(dirname "$0")/.."
[ "$IQL" != "-" ] && IQL=$(realpath "$IQL")
[ "$TD3BC" != "-" ] && TD3BC=$(realpath "$TD3BC")
JOBS=("$@")
if [ ${#JOBS[@]} -eq 0 ]; then
  for s in 0 1 2; do JOBS+=("sac_o2sac_iql_s$s"); done
  for s in 0 1 2; do JOBS+=("sac_o2sac_td3bc_s$s" "td3_o2td3_td3bc_s$s" "ppo_o2ppo_iql_s$s"); done
  for s in 0 1 2; do JOBS+=("sac_naive_iql_s$s" "td3_naive_td3bc_s$s" "ppo_naive_iql_s$s"); done
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PY=${PY:-.venv/bin/python} OUT ENV IQL TD3BC PPO_SCALE=${PPO_SCALE:-0.4}
printf '%s\n' "${JOBS[@]}" | xargs -P "${P:-2}" -I{} bash -c '
  name={}; IFS=_ read -r script mode ck seed <<< "$name"; seed=${seed#s}
  ckpt=$([ "$ck" = iql ] && echo "$IQL" || echo "$TD3BC")
  flags=$([ "$mode" = naive ] && echo "--no-reevaluate --no-constraint $([ "$script" != ppo ] && echo --no-align)")
  scale=$([ "$script" = ppo ] && echo "$PPO_SCALE --reevaluate-steps $(awk "BEGIN { print int(20000 / $PPO_SCALE + 0.5) }")" || echo 0.02)
  t0=$SECONDS
  $PY o2o_$script.py --env "$ENV" --seed "$seed" --checkpoint "$ckpt" --budget-scale $scale --eval-every 10000 --eval-episodes 5 \
      --threads 1 --device cpu --run-dir "$OUT/runs" --run-name "$name" $flags > "$OUT/$name.log" 2>&1; rc=$?
  res=$(ls "$OUT"/runs/o2o_*/*/"$name"/results.json 2>/dev/null | head -1)
  [ -n "$res" ] && cp "$res" "$OUT/$name.json"
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/runs.txt"'
