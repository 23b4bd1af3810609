"""Gradient steps per second of each offline method's update (offline_pretrain.py), on CPU and on CUDA when present.

The update runs on a synthetic hopper-sized batch stream (obs 11, act 3, batch 256) held on the device, exactly
the learner code that offline_pretrain.py runs; evaluation and logging are excluded.

    python benchmarks/bench_offline.py                      # all methods, every available device
    python benchmarks/bench_offline.py --algos iql --steps 500 --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def measure(op, algo: str, device: torch.device, steps: int, warmup: int, obs_dim: int = 11, act_dim: int = 3, n: int = 100_000) -> float:
    args = op.Args(algo=algo, total_steps=10**6)
    torch.manual_seed(0)
    learner = op.LEARNERS[algo](args, obs_dim, act_dim, device)
    rb = op.ReplayBuffer(obs_dim, act_dim, n, device)
    rb.add(torch.randn(n, obs_dim), torch.rand(n, act_dim) * 2 - 1, torch.randn(n), torch.randn(n, obs_dim), (torch.rand(n) < 0.01).float())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        learner.update(rb.sample(args.batch_size), i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        learner.update(rb.sample(args.batch_size), warmup + i)
    sync()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["cql", "iql", "td3_bc", "bc"])
    p.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--steps", type=int, default=300, help="timed updates per method (CQL uses a tenth)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    op = load("offline_pretrain")
    for dev in a.device:
        device = torch.device(dev)
        res = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "batch_size": 256, "steps_per_s": {}}
        for algo in a.algos:
            steps = max(10, a.steps // 10) if algo == "cql" and dev == "cpu" else a.steps
            res["steps_per_s"][algo] = round(measure(op, algo, device, steps, a.warmup), 1)
            print(f"{dev:5s} {algo:7s} {res['steps_per_s'][algo]:9.1f} grad steps/s")
        out = Path(a.out) / f"bench_offline_{dev}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
