"""Gradient steps per second of each phase of the offline-to-online scripts, per execution mode, timed on random tensors.

Each script has a measuring function in MEASURES: it imports the script by file path (the scripts are standalone,
not a package), builds the networks and optimisers the script builds, and times the script's own per-phase update
function, wrapped exactly as the script wraps it (`accel.update(partial(update_fn, state..., constants...))`), on
random batches of the right shapes (data sampling and env steps excluded). A mode is eager or a '+'-joined set of
compile / cudagraphs / bf16 (the scripts' --compile/--cudagraphs/--bf16); CUDA-graph modes are skipped on CPU.
Compilation and capture happen in the untimed warm-up, whose length is recorded. Results go to
benchmarks/results/bench_o2o_<script>_<device>.json.

Usage:
    python benchmarks/bench_o2o.py --script sac --seconds 30            # CPU, and CUDA too when present
    python benchmarks/bench_o2o.py --script sac --devices cpu --threads 1 --modes eager compile bf16
    python benchmarks/bench_o2o.py --script td3      # or ppo
A new script gets a measure_<name>(mod, device, args, seconds, accel) -> {phase: stats} registered in MEASURES.
"""

from __future__ import annotations

import functools
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
    modes: tuple[str, ...] | None = None
    """eager or '+'-joined compile/cudagraphs/bf16; default: eager compile bf16 compile+bf16 on CPU,
    eager compile cudagraphs compile+cudagraphs compile+cudagraphs+bf16 on CUDA"""
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


MODES_CPU = ("eager", "compile", "bf16", "compile+bf16")
MODES_CUDA = ("eager", "compile", "cudagraphs", "compile+cudagraphs", "compile+cudagraphs+bf16")


def mode_flags(mode: str) -> dict[str, bool]:
    parts = set() if mode == "eager" else set(mode.split("+"))
    bad = parts - {"compile", "cudagraphs", "bf16"}
    if bad:
        raise SystemExit(f"error: unknown mode part(s) {sorted(bad)} in {mode!r}; use eager or compile/cudagraphs/bf16 joined by +")
    return {k: k in parts for k in ("compile", "cudagraphs", "bf16")}


def time_steps(step: Callable[[int], object], seconds: float, device: torch.device, warmup: int = 10) -> dict[str, float]:
    """Run step(i) repeatedly for about `seconds` after a warm-up (where compilation and graph capture happen, for
    every flag combination the phase uses); steps/s counted between two device syncs."""
    t_warm = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm = time.perf_counter() - t_warm
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):  # check the clock (and sync) only every 10 steps
            step(n)
            n += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"steps": n, "seconds": elapsed, "steps_per_s": n / elapsed, "ms_per_step": 1000.0 * elapsed / n, "warmup_s": warm}


def random_batches(obs_dim: int, act_dim: int, batch_size: int, device: torch.device, k: int = 8) -> list[dict[str, torch.Tensor]]:
    def one() -> dict[str, torch.Tensor]:
        return {"obs": torch.randn(batch_size, obs_dim, device=device), "actions": torch.rand(batch_size, act_dim, device=device) * 2 - 1,
                "rewards": torch.randn(batch_size, device=device), "next_obs": torch.randn(batch_size, obs_dim, device=device),
                "terminals": (torch.rand(batch_size, device=device) < 0.01).float()}
    return [one() for _ in range(k)]


def measure_sac(mod: ModuleType, device: torch.device, a: Args, seconds: float, accel) -> dict[str, dict[str, float]]:
    """o2o_sac.py: reevaluate_update, align_update, online_update (constrained, lambda stepped on 1 update in utd=10;
    and unconstrained = naive / PORL), with the script's own networks and learning rates."""
    sa = mod.Args()
    batches = random_batches(a.obs_dim, a.act_dim, a.batch_size, device)
    actor = mod.TanhGaussianActor(a.obs_dim, a.act_dim, mod.ACTOR_HIDDEN).to(device)
    pi0 = mod.frozen(actor)
    qf = mod.make_critic(a.obs_dim, a.act_dim).to(device)
    qf_target = mod.frozen(qf)
    qf_opt = accel.adam(qf.parameters(), sa.critic_lr)
    actor_opt = accel.adam(actor.parameters(), sa.actor_lr)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)
    log_lam = torch.zeros(1, device=device, requires_grad=True)
    opts = {"actor": actor_opt, "qf": qf_opt, "alpha": accel.adam([log_alpha], sa.alpha_lr), "lambda": accel.adam([log_lam], sa.lambda_lr)}
    pi_ref = mod.frozen(actor)
    eps_t = accel.scalar(0.5)
    const = dict(target_entropy=-float(a.act_dim), gamma=sa.gamma, tau=sa.tau, kl_floor=sa.kl_floor)
    reeval = accel.update(functools.partial(mod.reevaluate_update, pi0, qf, qf_target, qf_opt, alpha0=0.2, gamma=sa.gamma, tau=sa.tau))
    align = accel.update(functools.partial(mod.align_update, pi0, actor, qf, qf_target, qf_opt, actor_opt, alpha0=0.2))
    constrained = accel.update(functools.partial(mod.online_update, actor, pi_ref, qf, qf_target, log_alpha, log_lam, opts, **const))
    unconstrained = accel.update(functools.partial(mod.online_update, actor, None, qf, qf_target, log_alpha, log_lam, opts, **const))
    per = seconds / 4
    b = lambda i: batches[i % len(batches)]  # noqa: E731
    warm = 4 * sa.utd  # every flag combination passes its warm-up calls and capture
    return {
        "reevaluate": time_steps(lambda i: reeval(b(i)), per, device),
        "align": time_steps(lambda i: align(b(i)), per, device),
        "online_constrained": time_steps(lambda i: constrained(b(i), eps_t, i % sa.utd == 0, True), per, device, warm),
        "online_unconstrained": time_steps(lambda i: unconstrained(b(i), eps_t, False, True), per, device),
    }


def measure_td3(mod: ModuleType, device: torch.device, a: Args, seconds: float, accel) -> dict[str, dict[str, float]]:
    """o2o_td3.py: reevaluate_update, align_update, online_update (constrained / naive; actor and Lagrange step on every
    policy_freq-th update), opt_pretrain_update (one meta step), opt_finetune_update."""
    ta = mod.Args()
    batches = random_batches(a.obs_dim, a.act_dim, a.batch_size, device)
    actor = lambda: mod.DeterministicActor(a.obs_dim, a.act_dim, mod.ACTOR_HIDDEN).to(device)  # noqa: E731
    pi0, pi, pi_target, pi_ref = actor().requires_grad_(False), actor(), actor(), actor()
    qf, qf_target, qf_on, qf_on_target = (mod.new_critic(a.obs_dim, a.act_dim).to(device) for _ in range(4))
    qf_opt = accel.adam(qf.parameters(), ta.critic_lr)
    qf_on_opt = accel.adam(qf_on.parameters(), ta.critic_lr)
    actor_opt = accel.adam(pi.parameters(), ta.actor_lr)
    log_lam = torch.nn.Parameter(torch.zeros(1, device=device))
    lam_opt = accel.adam([log_lam], ta.lambda_lr)
    const = mod.td3_constants(ta)
    reeval = accel.update(functools.partial(mod.reevaluate_update, pi0, qf, qf_target, qf_opt, **const))
    align = accel.update(functools.partial(mod.align_update, pi0, pi, qf, qf_target, qf_opt, actor_opt, policy_noise=ta.policy_noise,
                                           noise_clip=ta.noise_clip, beta=ta.align_beta, max_distance=ta.align_max_distance))
    online = (pi, pi_target, pi_ref, qf, qf_target, qf_opt, actor_opt, log_lam, lam_opt)
    constrained = accel.update(functools.partial(mod.online_update, *online, constraint=True, lagrange_tau=ta.lagrange_tau, **const))
    naive = accel.update(functools.partial(mod.online_update, *online, constraint=False, lagrange_tau=ta.lagrange_tau, **const))
    pretrain = accel.update(functools.partial(mod.opt_pretrain_update, pi, qf_on, qf_on_target, qf_on_opt, inner_lr=ta.opt_inner_lr, **const))
    finetune = accel.update(functools.partial(mod.opt_finetune_update, pi, pi_target, qf, qf_target, qf_on, qf_on_target, qf_opt, qf_on_opt,
                                              actor_opt, **const))
    threshold, kappa = accel.scalar(0.01), accel.scalar(0.5)
    b = lambda i: batches[i % len(batches)]  # noqa: E731
    x = lambda i: (b(i)["obs"], b(i)["actions"], b(i)["rewards"], b(i)["next_obs"], b(i)["terminals"])  # noqa: E731
    turn = lambda i: i % ta.policy_freq == 0  # noqa: E731
    warm = 4 * ta.policy_freq
    per = seconds / 6
    return {
        "reevaluate": time_steps(lambda i: reeval(*x(i)), per, device),
        "align": time_steps(lambda i: align(b(i)["obs"]), per, device),
        "online_constrained": time_steps(lambda i: constrained(*x(i), threshold, turn(i)), per, device, warm),
        "online_naive": time_steps(lambda i: naive(*x(i), threshold, turn(i)), per, device, warm),
        "opt_pretrain": time_steps(lambda i: pretrain(b(i), b(i + 1)), per, device),
        "opt_finetune": time_steps(lambda i: finetune(*x(i), kappa, turn(i)), per, device, warm),
    }


def measure_ppo(mod: ModuleType, device: torch.device, a: Args, seconds: float, accel) -> dict[str, dict[str, float]]:
    """o2o_ppo.py: reevaluate_update (V on Monte-Carlo returns, batch 512), online_update (one PPO minibatch of 128) and
    rollout_advantages over a rollout of 2048 with and without the reference advantage (the constraint acts there, once
    per rollout); one PPO iteration of the paper is one rollout_advantages and 10 epochs x 16 minibatches."""
    pa = mod.Args()
    actor = mod.GaussianActor(a.obs_dim, a.act_dim, (256, 256)).to(device)
    vf = mod.build_value(a.obs_dim).to(device)
    aopt = accel.adam(actor.parameters(), 3e-5, eps=pa.adam_eps)
    vopt = accel.adam(vf.parameters(), 2e-4, eps=pa.adam_eps)
    ropt = accel.adam(vf.parameters(), 1e-4)
    mb, n = 128, 2048
    obs, act = torch.randn(8, mb, a.obs_dim, device=device), torch.rand(8, mb, a.act_dim, device=device) * 2 - 1
    logp, adv, ret = torch.randn(8, mb, device=device) - 3, torch.randn(8, mb, device=device), torch.randn(8, mb, device=device)
    obs512, ret512 = torch.randn(8, 512, a.obs_dim, device=device), torch.randn(8, 512, device=device)
    r_adv, r_act = torch.randn(n, 1, device=device), torch.rand(n, a.act_dim, device=device) * 2 - 1
    r_mean, r_std = torch.zeros(n, a.act_dim, device=device), torch.full((n, a.act_dim), 0.3, device=device)
    reeval = accel.update(functools.partial(mod.reevaluate_update, vf, ropt))
    online = accel.update(functools.partial(mod.online_update, actor, vf, aopt, vopt, clip_coef=pa.clip_coef, ent_coef=pa.ent_coef,
                                            max_grad_norm=pa.max_grad_norm, log_std_max=None))
    per = seconds / 4
    return {
        "reevaluate": time_steps(lambda i: reeval(obs512[i % 8], ret512[i % 8]), per, device),
        "online_minibatch": time_steps(lambda i: online(obs[i % 8], act[i % 8], logp[i % 8], adv[i % 8], ret[i % 8]), per, device),
        "rollout_advantages_constrained": time_steps(lambda i: mod.rollout_advantages(r_adv, r_act, r_mean, r_std, 0.9), per, device),
        "rollout_advantages_unconstrained": time_steps(lambda i: mod.rollout_advantages(r_adv, r_act, None, None, 0.9), per, device),
    }


MEASURES: dict[str, Callable[..., dict[str, dict[str, float]]]] = {
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
        modes = a.modes or (MODES_CUDA if device.type == "cuda" else MODES_CPU)
        by_mode = {}
        for mode in modes:
            flags = mode_flags(mode)
            if flags["cudagraphs"] and device.type != "cuda":
                print(f"skipping {mode} on {name}: CUDA graphs need CUDA")
                continue
            torch.manual_seed(0)
            torch._dynamo.reset()
            by_mode[mode] = MEASURES[a.script](mod, device, a, a.seconds, mod.Accel(device, **flags))
            for ph, s in by_mode[mode].items():
                print(f"o2o_{a.script}.py {name} {mode:24s} {ph:22s} {s['steps_per_s']:8.1f} grad steps/s ({s['ms_per_step']:.2f} ms, warm-up {s['warmup_s']:.1f} s)")
        rec = {"script": f"o2o_{a.script}.py", "device": name, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": a.batch_size, "obs_dim": a.obs_dim, "act_dim": a.act_dim,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv), "modes": by_mode}
        path = Path(a.out_dir) / f"bench_o2o_{a.script}_{name.split(':')[0]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
        print(f"wrote {path}")
        out.append(rec)
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
