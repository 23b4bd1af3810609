#!/usr/bin/env bash
# Quick end-to-end preset on CPU, no internet, a few minutes: set up, rebuild a small hopper-medium dataset
# from the kept behaviour policy, pre-train IQL briefly, run a short O2SAC, print where the outputs are.
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
$PY offline_pretrain.py --algo iql --env hopper-medium-v2 --total-steps 5000 --eval-every 5000 --run-dir $OUT --overwrite
# re-evaluation runs until Q has converged (at most 20k steps); alignment trains the actor, as in the paper
$PY o2o_sac.py --env hopper-medium-v2 --offline-algo iql --run-dir $OUT --run-name quickstart \
    --distill-steps 2000 --reevaluate-steps 20000 --align-steps 1000 --online-steps 1000 --learning-starts 10 --utd 5 \
    --eval-every 200 --eval-episodes 5 --overwrite
RUN=$OUT/o2o_sac/hopper-medium-v2/quickstart
echo
$PY - "$RUN/results.json" <<'EOF'
import json, sys
curve = json.load(open(sys.argv[1]))["curve"]
online = [c for c in curve if c["phase"] == "online"]
start = [c for c in curve if c["phase"] not in ("online", "align")][-1]
print(f"normalised score: offline {curve[0]['normalized_score']:.1f} -> start of online ({start['phase']}) "
      f"{start['normalized_score']:.1f} -> lowest online {min(c['normalized_score'] for c in online):.1f} "
      f"-> final {online[-1]['normalized_score']:.1f}")
EOF
echo "curve:       $RUN/results.json  (tensorboard --logdir $OUT)"
echo "checkpoints: $(ls $RUN/*.pt | tr '\n' ' ')"
echo "offline:     $OUT/offline/iql/hopper-medium-v2/seed0/checkpoint.pt"
