#!/usr/bin/env bash
# fp32 vs --bf16 learning curves, same seeds, reduced scale: TD3+BC on hopper-medium, 30k gradient steps, evaluation
# (10 episodes) every 5k. Needs the local dataset (python make_dataset.py --env hopper-medium-v2 --levels medium).
# Writes benchmarks/results/bf16_curve_td3_bc_hopper_medium.json.
#   bash benchmarks/bf16_curve.sh            # seeds 0 1, one torch thread each, one after another
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1"}
OUT=runs/bf16_curve
for seed in $SEEDS; do
  for mode in fp32 bf16; do
    extra=""; [ "$mode" = bf16 ] && extra="--bf16"
    OMP_NUM_THREADS=1 $PY offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --total-steps 30000 --eval-every 5000 \
      --seed "$seed" --device cpu --no-download --run-dir "$OUT/$mode" $extra
  done
done
$PY - "$OUT" "$SEEDS" <<'PY'
import json, sys, pathlib
out, seeds = pathlib.Path(sys.argv[1]), sys.argv[2].split()
rec = {"command": "bash benchmarks/bf16_curve.sh", "method": "td3_bc", "dataset": "local/hopper/medium-v0", "total_steps": 30000,
       "eval_every": 5000, "eval_episodes": 10, "device": "cpu", "curves": {}}
for mode in ("fp32", "bf16"):
    for seed in seeds:
        r = json.loads((out / mode / "offline/td3_bc/hopper-medium-v2" / f"seed{seed}" / "results.json").read_text())
        rec["curves"][f"{mode}_seed{seed}"] = {"steps": [h[0] for h in r["eval_history"]], "normalized_score": [round(h[2], 1) for h in r["eval_history"]],
                                               "wall_clock_s": round(r["wall_clock_s"], 1)}
p = pathlib.Path("benchmarks/results/bf16_curve_td3_bc_hopper_medium.json")
p.write_text(json.dumps(rec, indent=2))
for k, v in rec["curves"].items():
    print(k, v["normalized_score"])
print("wrote", p)
PY
