#!/usr/bin/env bash
# fp32 vs --bf16 learning curves with the same seeds, at reduced scale, on the local hopper-medium dataset
# (python make_dataset.py --env hopper-medium-v2 --levels medium). One torch thread per run, runs one after another.
#   bash benchmarks/bf16_curve.sh td3_bc   # offline TD3+BC, 30k gradient steps, 10-episode evaluation every 5k
#   bash benchmarks/bf16_curve.sh o2sac    # O2SAC from runs/offline/iql/hopper-medium-v2/seed0/checkpoint.pt:
#                                          # 5k re-evaluation, 2k alignment, 3k online env steps at UTD 2
# Writes benchmarks/results/bf16_curve_<part>_hopper_medium.json; SEEDS="0 1" by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bash benchmarks/bf16_curve.sh td3_bc|o2sac}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1"}
OUT=runs/bf16_curve
for seed in $SEEDS; do
  for mode in fp32 bf16; do
    extra=""; [ "$mode" = bf16 ] && extra="--bf16"
    if [ "$PART" = td3_bc ]; then
      OMP_NUM_THREADS=1 $PY offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --total-steps 30000 --eval-every 5000 \
        --seed "$seed" --device cpu --no-download --run-dir "$OUT/$mode" --overwrite $extra
    else
      OMP_NUM_THREADS=1 $PY o2o_sac.py --env hopper-medium-v2 --checkpoint runs/offline/iql/hopper-medium-v2/seed0/checkpoint.pt \
        --seed "$seed" --device cpu --threads 1 --no-download --run-dir "$OUT/$mode" --run-name "o2sac_seed$seed" --no-resume \
        --reevaluate-steps 5000 --align-steps 2000 --online-steps 3000 --utd 2 --eval-every 500 --constraint-horizon 3000 \
        --learning-starts 200 --checkpoint-every 1000 --log-every 500 $extra
    fi
  done
done
$PY - "$PART" "$OUT" "$SEEDS" <<'PY'
import json, sys, pathlib
part, out, seeds = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3].split()
rec = {"command": f"bash benchmarks/bf16_curve.sh {part}", "dataset": "local/hopper/medium-v0", "device": "cpu", "curves": {}}
for mode in ("fp32", "bf16"):
    for seed in seeds:
        if part == "td3_bc":
            r = json.loads((out / mode / "offline/td3_bc/hopper-medium-v2" / f"seed{seed}" / "results.json").read_text())
            curve = {"steps": [h[0] for h in r["eval_history"]], "normalized_score": [round(h[2], 1) for h in r["eval_history"]]}
        else:
            r = json.loads((out / mode / "o2o_sac/hopper-medium-v2" / f"o2sac_seed{seed}" / "results.json").read_text())
            curve = {"steps": [p["step"] for p in r["curve"]], "phase": [p["phase"] for p in r["curve"]],
                     "normalized_score": [round(p["normalized_score"], 1) for p in r["curve"]], "phase_wall_clock_s": r["wall_clock_s"]}
        rec["curves"][f"{mode}_seed{seed}"] = curve
p = pathlib.Path(f"benchmarks/results/bf16_curve_{part}_hopper_medium.json")
p.write_text(json.dumps(rec, indent=2))
for k, v in rec["curves"].items():
    print(k, v["normalized_score"])
print("wrote", p)
PY
