"""Behaviour check for refactors: tiny fixed-seed eager CPU runs of the pipeline give the same curves before and after.

Builds the test fixture's tiny dataset (make_dataset.py, local/hopper/medium-v0, a few hundred SAC steps) in its own
Minari store, tiny offline checkpoints (offline_pretrain.py: CQL, IQL, TD3+BC), then runs each o2o script in its
default mode (and a few other modes whose flags did not change) with tiny flags, seed 0, one torch thread, each as a
subprocess `python SCRIPT ...`. Collected per run: the `results.json` curve (o2o: [phase, step, normalized_score,
return]; offline: the evaluation history) and a few summary numbers.

    python benchmarks/same_curve.py --save before.json      # before the change
    python benchmarks/same_curve.py --check before.json     # after: exit 1 and the differing runs when any differs
    python benchmarks/same_curve.py --only o2o_sac_cql ...  # a subset of the runs

Everything is written under a temporary folder (or --work DIR, kept). Exact equality is required: the runs are eager,
on CPU, single-threaded and seeded, so any difference is a change of behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATASET = ["--env", "hopper-medium-v2", "--levels", "medium", "medium-replay", "--train-steps", "1500", "--learning-starts", "500",
           "--snapshot-every", "500", "--snapshot-episodes", "2", "--medium-fraction", "0.0", "--size", "3000", "--num-envs", "4",
           "--device", "cpu"]
OFFLINE = ["--env", "hopper-medium-v2", "--total-steps", "60", "--eval-every", "30", "--log-every", "10", "--eval-episodes", "2",
           "--batch-size", "64", "--cql-n-actions", "2", "--device", "cpu", "--threads", "1"]
COMMON = ["--env", "hopper-medium-v2", "--device", "cpu", "--threads", "1", "--seed", "0"]
TINY = {  # the test files' tiny flags (none of them renamed by the flag-vocabulary change)
    "o2o_sac": ["--reevaluate-steps", "50", "--align-steps", "50", "--online-steps", "300", "--learning-starts", "100", "--utd", "1",
                "--eval-every", "100", "--eval-episodes", "2", "--batch-size", "64", "--log-every", "50", "--distill-steps", "50",
                "--checkpoint-every", "50", "--pre-sample-steps", "150"],
    "o2o_td3": ["--batch-size", "32", "--distill-steps", "20", "--reevaluate-steps", "20", "--align-steps", "20", "--online-steps", "40",
                "--learning-starts", "10", "--eval-every", "20", "--eval-episodes", "1", "--log-every", "10", "--checkpoint-every", "20",
                "--opt-collect-steps", "20", "--opt-pretrain-steps", "10", "--opt-utd", "2", "--kappa-begin", "20", "--kappa-finish", "40"],
    "o2o_ppo": ["--rollout-size", "64", "--minibatch-size", "32", "--update-epochs", "2", "--online-steps", "256", "--reevaluate-steps", "50",
                "--distill-steps", "50", "--eval-every", "128", "--eval-episodes", "2", "--log-every", "64", "--checkpoint-every", "128"],
}
NAIVE = ["--no-reevaluate", "--no-align", "--no-constraint"]
# name -> (script, offline algo, extra flags); the first of each script is its default mode from its default offline algo
RUNS = {
    "o2o_sac_cql": ("o2o_sac", "cql", []),
    "o2o_sac_iql": ("o2o_sac", "iql", []),  # distillation into the tanh-Gaussian
    "o2o_sac_cql_naive": ("o2o_sac", "cql", NAIVE),
    "o2o_sac_iql_porl": ("o2o_sac", "iql", ["--critic-init", "scratch"]),
    "o2o_sac_cql_interval": ("o2o_sac", "cql", ["--reference", "interval", "--reference-interval", "2"]),
    "o2o_td3_td3_bc": ("o2o_td3", "td3_bc", []),
    "o2o_td3_iql": ("o2o_td3", "iql", []),  # distillation into the deterministic actor
    "o2o_td3_td3_bc_no_reevaluate": ("o2o_td3", "td3_bc", ["--no-reevaluate"]),
    "o2o_td3_td3_bc_opt": ("o2o_td3", "td3_bc", ["--opt"]),
    "o2o_ppo_iql": ("o2o_ppo", "iql", []),
    "o2o_ppo_iql_naive": ("o2o_ppo", "iql", ["--no-reevaluate", "--no-constraint"]),
}
SUMMARY = ("offline_score", "distilled_score", "aligned_score", "online_start_score", "min_first_tenth", "final_score", "best_score")


def sh(cmd: list[str], env: dict, log: Path) -> None:
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"  {' '.join(cmd[1:3])} ... rc {rc}, {time.time() - t0:.0f} s", flush=True)
    if rc != 0:
        sys.exit(f"failed (rc {rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def collect(work: Path, only: list[str] | None) -> dict:
    py = sys.executable
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = {k: v for k, v in RUNS.items() if not only or k in only}
    out: dict = {}
    print("dataset", flush=True)
    if not (work / "minari" / "local" / "hopper" / "medium-v0").exists():
        sh([py, "make_dataset.py", *DATASET, "--out-dir", str(work / "make_dataset")], env, logs / "make_dataset.log")
    for algo in sorted({a for _, a, _ in runs.values()}):
        run_dir = work / "offline_runs"
        sh([py, "offline_pretrain.py", "--algo", algo, *OFFLINE, "--run-dir", str(run_dir), "--overwrite"], env, logs / f"offline_{algo}.log")
        res = json.loads((run_dir / "offline" / algo / "hopper-medium-v2" / "seed0" / "results.json").read_text())
        out[f"offline_{algo}"] = {"curve": res["eval_history"], "eval_normalized_score": res["eval_normalized_score"]}
    for name, (script, algo, extra) in runs.items():
        ckpt = work / "offline_runs" / "offline" / algo / "hopper-medium-v2" / "seed0" / "checkpoint.pt"
        run_dir = work / "o2o_runs"
        sh([py, f"{script}.py", *COMMON, *TINY[script], "--checkpoint", str(ckpt), "--run-dir", str(run_dir), "--run-name", name,
            "--overwrite", *extra], env, logs / f"{name}.log")
        res = json.loads((run_dir / script / "hopper-medium-v2" / name / "results.json").read_text())
        out[name] = {"curve": res["curve"], **{k: res.get(k) for k in SUMMARY}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE", help="write the runs' curves to FILE")
    g.add_argument("--check", metavar="FILE", help="compare the runs' curves with FILE; exit 1 when any differs")
    p.add_argument("--work", metavar="DIR", help="working folder (kept); default: a temporary one")
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), help="only these o2o runs (and the offline runs they need)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="same_curve_") as tmp:
        work = Path(a.work).resolve() if a.work else Path(tmp)
        got = collect(work, a.only)
    for name, r in got.items():
        print(f"{name:32s} " + " ".join(f"{c['normalized_score']:.3f}" if isinstance(c, dict) else f"{c[2]:.3f}" for c in r["curve"]))
    if a.save:
        Path(a.save).write_text(json.dumps(got, indent=1) + "\n")
        print(f"saved {len(got)} runs to {a.save}")
        return
    want = json.loads(Path(a.check).read_text())
    bad = [k for k in got if k not in want or json.loads(json.dumps(got[k])) != want[k]]
    for k in bad:
        print(f"DIFFERS: {k}\n  saved: {json.dumps(want.get(k))[:2000]}\n  now:   {json.dumps(got[k])[:2000]}")
    print(f"{len(got) - len(bad)} of {len(got)} runs give the saved curves" + (f"; {len(bad)} differ: {', '.join(bad)}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
