"""Wall-clock of the whole O2SAC protocol (distillation when needed, re-evaluation, alignment, online fine-tuning with
evaluations), phases broken out, and peak GPU memory, per execution mode.

At --scale 1 this is the paper's protocol: 500k re-evaluation + 500k alignment gradient steps, then 100k env steps
at 10 updates each (2M gradient steps) with an evaluation of 10 episodes every 1000 env steps (100 evaluations;
a checkpoint whose actor is not tanh-Gaussian is first distilled for 5k steps). A smaller --scale shrinks every
step count (and the KL horizon, learning start and checkpoint interval with it); --evals sets how many evaluations
the online phase makes. Each mode runs in this process, from scratch (--no-resume), in its own run
folder; compilation and CUDA-graph capture are part of the phase times they happen in.

    # paper scale on the GPU (offline checkpoint from offline_pretrain.py)
    python benchmarks/bench_protocol.py --checkpoint runs/offline/cql/hopper-medium-v2/seed0/checkpoint.pt
    # a CPU check of the whole pipeline at 1/500 scale
    python benchmarks/bench_protocol.py --device cpu --scale 0.001 --evals 2 --modes eager compile --checkpoint <ckpt>
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"distill_steps": 5_000, "reevaluate_steps": 500_000, "align_steps": 500_000, "online_steps": 100_000, "constraint_horizon": 100_000,
         "learning_starts": 1_000, "checkpoint_every": 5_000, "log_every": 1_000}


@dataclass
class Args:
    checkpoint: str
    """offline checkpoint the protocol starts from (offline_pretrain.py output)"""
    env: str = "hopper-medium-v2"
    """dataset name, as for o2o_sac.py"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    modes: tuple[str, ...] | None = None
    """eager or '+'-joined compile/cudagraphs/bf16; default: eager and compile+cudagraphs on CUDA, eager and compile on CPU"""
    scale: float = 1.0
    """fraction of the paper's step counts (1.0 = the paper's protocol)"""
    evals: int = 100
    """evaluations during the online phase (the paper: 100, one every 1000 env steps)"""
    seed: int = 0
    """seed of every run"""
    run_dir: str = "runs/bench_protocol"
    """run folders go to <run_dir>/o2o_sac/<env>/<mode>_scale<scale>/"""
    out: str = str(ROOT / "benchmarks" / "results")
    """where protocol_o2o_sac_<device>.json goes"""
    extra: str = ""
    """more o2o_sac.py flags in one string, e.g. --extra='--threads 1 --no-download'"""


def load_sac():
    spec = importlib.util.spec_from_file_location("o2o_sac", ROOT / "o2o_sac.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["o2o_sac"] = mod
    spec.loader.exec_module(mod)
    return mod


def mode_flags(mode: str) -> list[str]:
    parts = [] if mode == "eager" else mode.split("+")
    bad = set(parts) - {"compile", "cudagraphs", "bf16"}
    if bad:
        raise SystemExit(f"error: unknown mode part(s) {sorted(bad)} in {mode!r}; use eager or compile/cudagraphs/bf16 joined by +")
    return [f"--{p}" for p in parts]


def main(a: Args) -> dict:
    sac = load_sac()
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    cuda = device.startswith("cuda")
    modes = a.modes or (("eager", "compile+cudagraphs") if cuda else ("eager", "compile"))
    steps = {k: max(1, int(round(v * a.scale))) for k, v in PAPER.items()}
    steps["eval_every"] = max(1, steps["online_steps"] // a.evals)
    rec = {"script": "o2o_sac.py", "env": a.env, "checkpoint": a.checkpoint, "scale": a.scale, "evals": a.evals, "steps": steps, "device": device,
           "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv), "modes": {}}
    for mode in modes:
        name = f"{mode.replace('+', '_')}_scale{a.scale:g}"
        argv = ["--env", a.env, "--checkpoint", a.checkpoint, "--device", device, "--seed", str(a.seed), "--run-dir", a.run_dir,
                "--run-name", name, "--no-resume", *mode_flags(mode), *shlex.split(a.extra)]
        for k, v in steps.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = sac.main(tyro.cli(sac.Args, args=argv))
        total = time.perf_counter() - t0
        rec["modes"][mode] = {
            "wall_clock_s": total, "phases_s": res["wall_clock_s"], "final_normalized_score": res["final_score"],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "argv": argv,
        }
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in res["wall_clock_s"].items())
        print(f"{mode}: {total / 60:.1f} min ({phases})")
    out = Path(a.out) / f"protocol_o2o_sac_{device.split(':')[0]}{'' if a.scale == 1 else f'_scale{a.scale:g}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    print(f"wrote {out}")
    return rec


if __name__ == "__main__":
    main(tyro.cli(Args))
