#!/usr/bin/env bash
# Quick end-to-end preset on CPU, no internet, a few minutes: set up, rebuild a small hopper-medium dataset
# from the kept behaviour policy, pre-train IQL briefly, run a short O2SAC, print where the outputs are.
# Paper-scale runs use the scripts' defaults instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
export MINARI_DATASETS_PATH="${MINARI_DATASETS_PATH:-$PWD/runs/quickstart/minari}"
PY=.venv/bin/python
OUT=runs/quickstart
$PY make_dataset.py --env hopper-medium-v2 --policy benchmarks/behavior_policies/hopper/medium_policy.pt \
    --size 100000 --overwrite
$PY offline_pretrain.py --algo iql --env hopper-medium-v2 --total-steps 10000 --eval-every 5000 --run-dir $OUT
$PY o2o_sac.py --env hopper-medium-v2 --offline-algo iql --run-dir $OUT --run-name quickstart \
    --distill-steps 2000 --reevaluate-steps 2000 --align-steps 1000 --online-steps 1000 --learning-starts 200 --utd 5 \
    --eval-every 200 --eval-episodes 5
RUN=$OUT/o2o_sac/hopper-medium-v2/quickstart
echo
echo "curve:       $RUN/results.json  (tensorboard --logdir $OUT)"
echo "checkpoints: $(ls $RUN/*.pt | tr '\n' ' ')"
echo "offline:     $OUT/offline/iql/hopper-medium-v2/seed0/checkpoint.pt"
