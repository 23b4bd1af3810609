#!/usr/bin/env bash
# Quick end-to-end preset on CPU, no internet, a few minutes: set up, rebuild a small hopper-medium dataset from the
# kept behaviour policy, pre-train TD3+BC briefly, run a short O2TD3 (re-evaluation until Q has converged, alignment,
# constrained online fine-tuning), print the scores and where the outputs are.
# Paper-scale runs use the scripts' defaults instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
export MINARI_DATASETS_PATH="${MINARI_DATASETS_PATH:-$PWD/runs/quickstart/minari}"
export OMP_NUM_THREADS=1  # one torch thread per job (the scripts also take --threads): on a small machine more threads slow each other down
PY=.venv/bin/python
OUT=runs/quickstart
$PY make_dataset.py --env hopper-medium-v2 --policy benchmarks/behavior_policies/hopper/medium_policy.pt \
    --size 100000 --overwrite
$PY offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --total-steps 10000 --eval-every 10000 --run-dir $OUT --overwrite
# re-evaluation until Q has converged (at most 8k steps), 3k alignment steps, 6k online env steps (threshold horizon
# 6k, updates from env step 60), an evaluation every 500 env steps and five more in the first tenth; 5 episodes
# per evaluation, 20 for the ones the printed scores rest on (offline, aligned, the first tenth, the last)
$PY o2o_td3.py --env hopper-medium-v2 --offline-algo td3_bc --run-dir $OUT --run-name quickstart \
    --reevaluate-steps 8000 --align-steps 3000 --online-steps 6000 --constraint-horizon 6000 --learning-starts 60 \
    --eval-every 500 --eval-episodes 5 --headline-eval-episodes 20 --overwrite
RUN=$OUT/o2o_td3/hopper-medium-v2/quickstart
echo
$PY - "$RUN/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
online = [c["normalized_score"] for c in r["curve"] if c["phase"] == "online"]
print(f"normalised score: offline {r['offline_score']:.1f} -> start of online {r['online_start_score']:.1f} "
      f"-> lowest in the first tenth {r['min_first_tenth']:.1f} -> lowest online {min(online):.1f} -> final {r['final_score']:.1f}")
EOF
echo "curve:       $RUN/results.json  (tensorboard --logdir $OUT)"
echo "checkpoints: $(ls $RUN/*.pt | tr '\n' ' ')"
echo "offline:     $OUT/offline/td3_bc/hopper-medium-v2/seed0/checkpoint.pt"
