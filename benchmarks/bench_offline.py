"""Gradient steps per second of each offline method's update (offline_pretrain.py), per execution mode, on CPU and
on CUDA when present.

The update runs on a synthetic hopper-sized batch stream (obs 11, act 3, batch 256) held on the device, exactly
the learner code that offline_pretrain.py runs (batch sampling included; evaluation and logging excluded).
A mode is eager or a '+'-joined set of compile / cudagraphs / bf16 (the script's --compile/--cudagraphs/--bf16);
CUDA-graph modes are skipped on CPU. Compilation and capture happen in the warm-up and are timed separately.

    python benchmarks/bench_offline.py                      # all methods, default modes, every available device
    python benchmarks/bench_offline.py --algos iql --steps 500 --device cpu --modes eager compile bf16
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


MODES_CPU = ["eager", "compile", "bf16", "compile+bf16"]
MODES_CUDA = ["eager", "compile", "cudagraphs", "compile+cudagraphs", "compile+cudagraphs+bf16"]


def accel_for(op, mode: str, device: torch.device):
    flags = set() if mode == "eager" else set(mode.split("+"))
    unknown = flags - {"compile", "cudagraphs", "bf16"}
    if unknown:
        raise SystemExit(f"error: unknown mode part(s) {sorted(unknown)} in {mode!r}; use eager or compile/cudagraphs/bf16 joined by +")
    return op.Accel(device, "compile" in flags, "cudagraphs" in flags, "bf16" in flags)


def measure(op, algo: str, device: torch.device, steps: int, warmup: int, mode: str = "eager", obs_dim: int = 11, act_dim: int = 3,
            n: int = 100_000) -> tuple[float, float]:
    """(grad steps/s, seconds of warm-up including compilation and capture)."""
    args = op.Args(algo=algo, total_steps=10**6)
    torch.manual_seed(0)
    torch._dynamo.reset()
    learner = op.LEARNERS[algo](args, obs_dim, act_dim, device, accel_for(op, mode, device))
    rb = op.ReplayBuffer(obs_dim, act_dim, n, device)
    rb.add(torch.randn(n, obs_dim), torch.rand(n, act_dim) * 2 - 1, torch.randn(n), torch.randn(n, obs_dim), (torch.rand(n) < 0.01).float())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_warm = time.perf_counter()
    for i in range(warmup):
        learner.update(rb.sample(args.batch_size), i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        learner.update(rb.sample(args.batch_size), warmup + i)
    sync()
    return steps / (time.perf_counter() - t0), t0 - t_warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["cql", "iql", "td3_bc", "bc"])
    p.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--steps", type=int, default=300, help="timed updates per method (CQL uses a tenth)")
    p.add_argument("--warmup", type=int, default=20, help="untimed updates first (compilation, CUDA-graph capture)")
    p.add_argument("--modes", nargs="+", default=None, help=f"default: {' '.join(MODES_CPU)} on CPU; {' '.join(MODES_CUDA)} on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    op = load("offline_pretrain")
    for dev in a.device:
        device = torch.device(dev)
        modes = a.modes or (MODES_CUDA if device.type == "cuda" else MODES_CPU)
        res = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "batch_size": 256, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": " ".join(sys.argv), "steps_per_s": {}, "warmup_s": {}}
        for mode in modes:
            if "cudagraphs" in mode and device.type != "cuda":
                print(f"skipping {mode} on {dev}: CUDA graphs need CUDA")
                continue
            res["steps_per_s"][mode], res["warmup_s"][mode] = {}, {}
            for algo in a.algos:
                steps = max(10, a.steps // 10) if algo == "cql" and dev == "cpu" else a.steps
                sps, warm = measure(op, algo, device, steps, a.warmup, mode)
                res["steps_per_s"][mode][algo], res["warmup_s"][mode][algo] = round(sps, 1), round(warm, 1)
                print(f"{dev:5s} {mode:24s} {algo:7s} {sps:9.1f} grad steps/s (warm-up {warm:.1f} s)")
        out = Path(a.out) / f"bench_offline_{dev}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
