"""Gradient steps per second of each phase of the offline-to-online scripts, timed on random tensors.

Each script has a measuring function in MEASURES: it imports the script by file path (the scripts are standalone,
not a package), builds the networks and optimisers the script builds, and times the script's own per-phase update
function on random batches of the right shapes (data sampling and env steps excluded). Results go to
benchmarks/results/bench_o2o_<script>_<device>.json.

Usage:
    python benchmarks/bench_o2o.py --script sac --seconds 30            # CPU, and CUDA too when present
    python benchmarks/bench_o2o.py --script sac --devices cpu --threads 1
    python benchmarks/bench_o2o.py --script td3      # or ppo
A new script gets a measure_<name>(mod, device, args, seconds) -> {phase: stats} registered in MEASURES.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    script: str = "sac"
    """which o2o_<script>.py to measure (a key of MEASURES)"""
    seconds: float = 30.0
    """total timing budget per device, split evenly over the phases"""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """devices to measure; cuda is skipped when not available"""
    batch_size: int = 256
    """batch size of every update"""
    obs_dim: int = 11
    """observation size of the random batches (hopper: 11)"""
    act_dim: int = 3
    """action size of the random batches (hopper: 3)"""
    threads: int | None = None
    """torch CPU threads (default: torch's)"""
    out_dir: str = str(RESULTS)
    """where the JSON files go"""


def load_script(name: str) -> ModuleType:
    """Import o2o_<name>.py by file path."""
    path = ROOT / f"o2o_{name}.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"o2o_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], object], seconds: float, device: torch.device, warmup: int = 10) -> dict[str, float]:
    """Run step(i) repeatedly for about `seconds` after a warm-up; steps/s counted between two device syncs."""
    for i in range(warmup):
        step(i)
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):  # check the clock (and sync) only every 10 steps
            step(n)
            n += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"steps": n, "seconds": elapsed, "steps_per_s": n / elapsed, "ms_per_step": 1000.0 * elapsed / n}


def random_batches(obs_dim: int, act_dim: int, batch_size: int, device: torch.device, k: int = 8) -> list[dict[str, torch.Tensor]]:
    def one() -> dict[str, torch.Tensor]:
        return {"obs": torch.randn(batch_size, obs_dim, device=device), "actions": torch.rand(batch_size, act_dim, device=device) * 2 - 1,
                "rewards": torch.randn(batch_size, device=device), "next_obs": torch.randn(batch_size, obs_dim, device=device),
                "terminals": (torch.rand(batch_size, device=device) < 0.01).float()}
    return [one() for _ in range(k)]


def measure_sac(mod: ModuleType, device: torch.device, a: Args, seconds: float) -> dict[str, dict[str, float]]:
    """o2o_sac.py: reevaluate_update, align_update, online_update (constrained, lambda stepped on 1 update in utd=10;
    and unconstrained = naive / PORL), with the script's own networks and learning rates."""
    sa = mod.Args()
    batches = random_batches(a.obs_dim, a.act_dim, a.batch_size, device)
    actor = mod.TanhGaussianActor(a.obs_dim, a.act_dim, mod.ACTOR_HIDDEN).to(device)
    pi0 = mod.frozen(actor)
    qf = mod.make_critic(a.obs_dim, a.act_dim).to(device)
    qf_target = mod.frozen(qf)
    qf_opt = torch.optim.Adam(qf.parameters(), lr=sa.critic_lr)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=sa.actor_lr)
    log_alpha = torch.tensor(0.0, device=device, requires_grad=True)
    log_lam = torch.tensor(0.0, device=device, requires_grad=True)
    opts = {"actor": actor_opt, "qf": qf_opt, "alpha": torch.optim.Adam([log_alpha], lr=sa.alpha_lr),
            "lambda": torch.optim.Adam([log_lam], lr=sa.lambda_lr)}
    pi_ref = mod.frozen(actor)
    per = seconds / 4
    b = lambda i: batches[i % len(batches)]  # noqa: E731
    return {
        "reevaluate": time_steps(lambda i: mod.reevaluate_update(pi0, qf, qf_target, qf_opt, b(i), 0.2, sa.gamma, sa.tau), per, device),
        "align": time_steps(lambda i: mod.align_update(pi0, actor, qf, qf_target, qf_opt, actor_opt, b(i), 0.2), per, device),
        "online_constrained": time_steps(lambda i: mod.online_update(actor, pi_ref, qf, qf_target, log_alpha, log_lam, opts, b(i), 0.5,
                                                                     -float(a.act_dim), sa.gamma, sa.tau, sa.kl_floor, i % sa.utd == 0, True), per, device),
        "online_unconstrained": time_steps(lambda i: mod.online_update(actor, None, qf, qf_target, log_alpha, log_lam, opts, b(i), 0.5,
                                                                       -float(a.act_dim), sa.gamma, sa.tau, sa.kl_floor, False, True), per, device),
    }


def measure_td3(mod: ModuleType, device: torch.device, a: Args, seconds: float) -> dict[str, dict[str, float]]:
    """o2o_td3.py: reevaluate_update, align_update, o2td3_update (constrained / naive; actor and Lagrange step on every
    policy_freq-th update), opt_pretrain_update (one meta step), opt_finetune_update."""
    ta = mod.Args()
    batches = random_batches(a.obs_dim, a.act_dim, a.batch_size, device)
    ag = mod.Agent()
    ag.actor0 = mod.DeterministicActor(a.obs_dim, a.act_dim, mod.ACTOR_HIDDEN).to(device).requires_grad_(False)
    for n in ("actor", "actor_target", "actor_ref"):
        setattr(ag, n, mod.DeterministicActor(a.obs_dim, a.act_dim, mod.ACTOR_HIDDEN).to(device))
    for n in ("qf", "qf_target", "qf_on", "qf_on_target"):
        setattr(ag, n, mod.new_critic(a.obs_dim, a.act_dim).to(device))
    ag.qf_opt = torch.optim.Adam(ag.qf.parameters(), lr=ta.critic_lr)
    ag.qf_on_opt = torch.optim.Adam(ag.qf_on.parameters(), lr=ta.critic_lr)
    ag.actor_opt = torch.optim.Adam(ag.actor.parameters(), lr=ta.actor_lr)
    ag.log_lam = torch.nn.Parameter(torch.zeros((), device=device))
    ag.lam_opt = torch.optim.Adam([ag.log_lam], lr=ta.lambda_lr)
    b = lambda i: batches[i % len(batches)]  # noqa: E731
    x = lambda i: (b(i)["obs"], b(i)["actions"], b(i)["rewards"], b(i)["next_obs"], b(i)["terminals"])  # noqa: E731
    turn = lambda i: i % ta.policy_freq == 0  # noqa: E731
    per = seconds / 6
    return {
        "reevaluate": time_steps(lambda i: mod.reevaluate_update(ag, *x(i), ta), per, device),
        "align": time_steps(lambda i: mod.align_update(ag, b(i)["obs"], ta), per, device),
        "online_constrained": time_steps(lambda i: mod.o2td3_update(ag, *x(i), 0.01, turn(i), True, ta), per, device),
        "online_naive": time_steps(lambda i: mod.o2td3_update(ag, *x(i), 0.01, turn(i), False, ta), per, device),
        "opt_pretrain": time_steps(lambda i: mod.opt_pretrain_update(ag, b(i), b(i + 1), ta), per, device),
        "opt_finetune": time_steps(lambda i: mod.opt_finetune_update(ag, *x(i), 0.5, turn(i), ta), per, device),
    }


def measure_ppo(mod: ModuleType, device: torch.device, a: Args, seconds: float) -> dict[str, dict[str, float]]:
    """o2o_ppo.py: reeval_update (V on Monte-Carlo returns, batch 512) and ppo_update (one minibatch of 128, with and
    without the reference-advantage constraint); one PPO iteration of the paper is 10 epochs x 16 minibatches."""
    pa = mod.Args()
    actor = mod.GaussianActor(a.obs_dim, a.act_dim, (256, 256)).to(device)
    ref = mod.GaussianActor(a.obs_dim, a.act_dim, (256, 256)).to(device).requires_grad_(False)
    vf = mod.build_value(a.obs_dim).to(device)
    aopt = torch.optim.Adam(actor.parameters(), lr=3e-5, eps=1e-5)
    vopt = torch.optim.Adam(vf.parameters(), lr=2e-4, eps=1e-5)
    ropt = torch.optim.Adam(vf.parameters(), lr=1e-4)
    mb = 128
    obs, act = torch.randn(8, mb, a.obs_dim, device=device), torch.rand(8, mb, a.act_dim, device=device) * 2 - 1
    logp, adv, ret = torch.randn(8, mb, device=device) - 3, torch.randn(8, mb, 1, device=device), torch.randn(8, mb, device=device)
    obs512, ret512 = torch.randn(8, 512, a.obs_dim, device=device), torch.randn(8, 512, device=device)
    w = torch.tensor(0.9, device=device)
    per = seconds / 3
    return {
        "reevaluate": time_steps(lambda i: mod.reeval_update(vf, ropt, obs512[i % 8], ret512[i % 8]), per, device),
        "online_constrained": time_steps(lambda i: mod.ppo_update(actor, vf, ref, aopt, vopt, obs[i % 8], act[i % 8], logp[i % 8], adv[i % 8], ret[i % 8], w,
                                                                  0.2, 0.01, 0.5, True), per, device),
        "online_unconstrained": time_steps(lambda i: mod.ppo_update(actor, vf, ref, aopt, vopt, obs[i % 8], act[i % 8], logp[i % 8], adv[i % 8], ret[i % 8], w,
                                                                    0.2, 0.01, 0.5, False), per, device),
    }


MEASURES: dict[str, Callable[[ModuleType, torch.device, Args, float], dict[str, dict[str, float]]]] = {
    "sac": measure_sac,
    "td3": measure_td3,
    "ppo": measure_ppo,
}


def main(a: Args) -> list[dict]:
    if a.script not in MEASURES:
        raise SystemExit(f"error: no benchmark for --script {a.script}; known: {', '.join(MEASURES)}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    mod = load_script(a.script)
    out = []
    for name in a.devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"skipping {name}: CUDA not available")
            continue
        device = torch.device(name)
        torch.manual_seed(0)
        phases = MEASURES[a.script](mod, device, a, a.seconds)
        rec = {"script": f"o2o_{a.script}.py", "device": name, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": a.batch_size, "obs_dim": a.obs_dim, "act_dim": a.act_dim,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "phases": phases}
        path = Path(a.out_dir) / f"bench_o2o_{a.script}_{name.split(':')[0]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
        for ph, s in phases.items():
            print(f"{rec['script']} {name} {ph:22s} {s['steps_per_s']:8.1f} grad steps/s ({s['ms_per_step']:.2f} ms)")
        print(f"wrote {path}")
        out.append(rec)
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
