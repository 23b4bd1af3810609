"""O2TD3: offline-to-online TD3 with optimistic critic reconstruction and constrained fine-tuning (OCR-CFT).

Paper: "Optimistic Critic Reconstruction and Constrained Fine-Tuning for General Offline-to-Online RL"
(Luo et al., NeurIPS 2024, arXiv 2412.18855); OPT mode: "Online Pre-Training for Offline-to-Online RL"
(arXiv 2507.08387). The README lists where this differs from the official code.

Phases (O2TD3): load the offline actor (deterministic actors and IQL's Gaussian mean network are copied, other
stochastic ones distilled) ->
evaluate -> re-evaluation (FQE with TD3 targets, until Q has converged) -> alignment -> constrained online fine-tuning.
OPT (`--opt`): keep the offline critic, collect with the frozen actor, meta-pre-train a new critic, then
fine-tune both with a kappa-weighted actor objective.

Usage:
    python o2o_td3.py --env hopper-medium-v2                      # O2TD3 from runs/offline/td3_bc/...
    python o2o_td3.py --env hopper-medium-v2 --opt                # OPT
    python o2o_td3.py --env hopper-medium-v2 --no-reevaluate --no-align --no-constraint   # naive fine-tuning
    python o2o_td3.py --env hopper-medium-v2 --compile --cudagraphs   # same math, compiled updates replayed as CUDA graphs
    python o2o_td3.py --env hopper-medium-v2 --budget-scale 0.05  # the paper's protocol compressed 20x, every schedule with it
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Sequence

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.envs.registration import EnvSpec
from torch import Tensor
from torch.func import functional_call
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    # --- experiment ---
    env: str = "hopper-medium-v2"
    """D4RL-style dataset name (resolved to a Minari dataset); its level picks the defaults of FAMILY_DEFAULTS"""
    dataset_id: str | None = None
    """any Minari dataset id; overrides the name resolution of --env"""
    family: str | None = None
    """dataset family `<env>-<level>` (e.g. hopper-medium-expert, antmaze-umaze) whose per-family values apply; default:
    the one --env names (a --dataset-id run whose --env names no D4RL dataset must pass it)"""
    no_download: bool = False
    """never try to download a hosted dataset"""
    seed: int = 0
    """random seed (also picks the offline checkpoint seed<k>)"""
    offline_algo: Literal["td3_bc", "cql", "iql", "bc"] = "td3_bc"
    """offline method whose checkpoint is loaded from runs/offline/<algo>/<env>/seed<k>/checkpoint.pt"""
    checkpoint: str | None = None
    """explicit offline checkpoint path; overrides the convention"""
    run_dir: str = "runs"
    """root of all outputs; this script writes to <run_dir>/o2o_td3/<env>/<run_name>/"""
    run_name: str | None = None
    """output folder name; default <mode>__<offline_algo>__seed<k>"""
    no_resume: bool = False
    """recompute every phase even when the run folder holds phase checkpoints of the same args, and start the online
    phase afresh instead of resuming an unfinished run's online.pt (a finished run of other settings still needs
    --overwrite)"""
    overwrite: bool = False
    """start afresh in a run folder that holds a run of other settings: its checkpoints, results and tensorboard logs
    are deleted first"""
    stop_after: int | None = None
    """stop the online phase after this many env steps, as if killed (the last online.pt stays for a resume)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    budget_scale: float = 1.0
    """multiplies every step count given or defaulted (distill, re-evaluation, alignment and online steps, learning
    starts, the eval / align-eval / checkpoint / log intervals, --stop-after, OPT's
    collect and pre-train steps and its kappa schedule --kappa-begin / --kappa-finish), rounded to an integer >= 1
    (0 stays 0; --checkpoint-every keeps its ratio to --eval-every), and divides the Lagrange multiplier's learning
    rate by it, so that log lambda can move as far over a compressed online phase as over the paper's: F < 1 gives a
    miniature of the paper's protocol rather than a truncation of it; the threshold horizon only with
    --scale-constraint-horizon. 1 = the paper's protocol; the effective values go to results.json"""

    # --- data ---
    buffer_mode: Literal["half", "all", "part", "none"] = "half"
    """offline data online: half of each batch from it, inside the online buffer, only top trajectories, or none"""
    part_trajectories: int = 50
    """--buffer-mode part: number of highest-return offline trajectories put in the online buffer"""
    batch_size: int = 256
    """batch size of every phase"""
    normalize_states: bool | None = None
    """feed the networks states normalised with the offline actor's statistics (the checkpoint's); off: raw states,
    which needs an offline actor trained on raw states. Default: from FAMILY_DEFAULTS (on for MuJoCo and AntMaze)"""
    reward: str | None = None
    """`SCALE,SHIFT`: critics learned here (re-evaluation, alignment, fine-tuning; OPT's Q_on) learn on r * SCALE + SHIFT.
    Default: from FAMILY_DEFAULTS (1,0 on MuJoCo; 1,-1 on AntMaze, the official r - 1)"""

    # --- distillation of a stochastic offline actor (docs/algorithms.md, section 4) ---
    distill_steps: int = 20_000
    """gradient steps regressing a deterministic actor on the offline actor's mean action (20k: from the local
    hopper-medium IQL actor, 5k steps left action MSE 0.003 and distilled scores 45.3 / 35.4 / 45.2 against 50.6 /
    49.4 / 50.3 (seeds 0-2), 20k left 0.0015-0.0017 and 47.1 / 65.6 / 45.5; README, "No drop at the switch")"""
    distill_lr: float = 1e-3
    """learning rate of the distillation"""
    copy_mean_net: bool = True
    """an offline Gaussian actor whose mean action is max_action * tanh(mlp(s)) with the online actor's layers (IQL's,
    256x256) gives the online actor that network exactly instead of being distilled: the same deterministic actions,
    so the same score. Distilled (20k steps), the local hopper-medium IQL actor scored 47.1 / 65.6 / 45.5 against 50.6 /
    49.4 / 50.3 (seeds 0-2; README, "No drop at the switch"). Off: distilled like every other stochastic actor"""

    # --- TD3 ---
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """Polyak rate of target networks"""
    actor_lr: float = 1e-4
    """actor learning rate (alignment and fine-tuning)"""
    critic_lr: float = 3e-4
    """critic learning rate (every phase)"""
    policy_noise: float = 0.2
    """target policy smoothing noise (and the alignment perturbation)"""
    noise_clip: float = 0.5
    """clip of the smoothing noise"""
    policy_freq: int = 2
    """actor, Lagrange and target updates every this many critic updates (online)"""

    # --- re-evaluation (paper: Policy Re-evaluation, O2TD3; docs/algorithms.md, section 4.1) ---
    no_reevaluate: bool = False
    """skip re-evaluation (ablation): the online critic is then the checkpoint's or a random one (--critic-init)"""
    reevaluate_steps: int = 500_000
    """FQE gradient steps on the offline data; with --reevaluate-tol > 0 the cap of a run that stops once Q has converged"""
    reevaluate_tau: float = 0.05
    """Polyak rate of the target critics during re-evaluation only (alignment and fine-tuning use --tau). FQE's values
    approach their limit at a pace set by tau: with the paper's 0.005 they are still ~20% short after 23k steps (the
    paper runs 500k), 0.05 converges in ~8k; --reevaluate-tau 0.005 --reevaluate-tol 0 is the paper's re-evaluation"""
    reevaluate_tol: float = 0.01
    """stop re-evaluation once the gap to Q's limit, extrapolated from the mean target-critic value on fixed dataset
    (s, a) pairs read every 1000 steps, is below this fraction of that value; --reevaluate-steps is the cap (0 = always
    run --reevaluate-steps, the paper)"""
    critic_layer_norm: bool | None = None
    """LayerNorm after every hidden layer of the critics learned here. Default: from FAMILY_DEFAULTS (on for MuJoCo, off for
    AntMaze, as the official configs' critic_layernorm)"""
    critic_init: Literal["offline", "scratch"] = "offline"
    """where the critic comes from. offline: the offline checkpoint's side, re-evaluated from the offline actor, or with
    --no-reevaluate the checkpoint's own critic when it has one (it keeps the checkpoint's reward transform); scratch:
    a random critic (raw rewards, like every critic learned here). Re-evaluation always trains a new critic from random
    init, so scratch changes a run only with --no-reevaluate"""

    # --- alignment (paper: Value Alignment, O2TD3; docs/algorithms.md, section 4.2) ---
    no_align: bool = False
    """skip value alignment (ablation)"""
    align_steps: int | None = None
    """alignment gradient steps on the offline data. Default: from FAMILY_DEFAULTS (500k on MuJoCo, 1M on AntMaze)"""
    align_beta: float = 1.0
    """beta of the distance-shrunk targets"""
    align_max_distance: float = 0.2
    """cap of the normalised action distance delta"""
    align_actor: Literal["train", "frozen"] = "frozen"
    """train: the actor takes its DPG step -mean Q1(s, pi(s)) every alignment iteration (the paper); frozen: the actor
    stays pi0 during alignment, only the critic aligns, and fine-tuning starts from pi0 with the aligned critic (the
    actor's Adam then has no state yet when carried into the online phase). Default frozen: with the
    alignment budgets of a single machine the actor's updates during alignment cost score before the critic is
    aligned (O2SAC on local hopper-medium, TD3+BC checkpoint 44.1, seed 0: after alignment 36.9 trained, 46.3 frozen; see the
    README's "No drop at the switch"); --align-actor train is the paper's schedule"""

    # --- online fine-tuning (paper: Constrained Fine-Tuning, O2TD3; docs/algorithms.md, section 4.3) ---
    online_steps: int | None = None
    """environment steps of the online phase (OPT: including its collection steps); default: the mode's budget in
    FAMILY_DEFAULTS, 100k for O2TD3 and naive (OCR-CFT paper; 200k on AntMaze), 300k with --opt (OPT paper)"""
    learning_starts: int = 1_000
    """env steps before the first update (the policy acts from step 1)"""
    utd: int = 1
    """gradient updates per env step (O2TD3 and naive)"""
    explore_noise: float | None = None
    """std of the Gaussian exploration noise; default from FAMILY_DEFAULTS"""

    # --- constraint (paper: Constrained Fine-Tuning, O2TD3; docs/algorithms.md, section 4.3) ---
    no_constraint: bool = False
    """drop the MSE-to-reference constraint (ablation): lambda stays 0"""
    eps0: float | None = None
    """initial threshold of the per-dimension squared deviation; default from FAMILY_DEFAULTS"""
    eps_end: float | None = None
    """final threshold; default from FAMILY_DEFAULTS (divided by 4 with --reference interval)"""
    constraint_horizon: int = 100_000
    """env steps over which the threshold loosens linearly from eps0 to eps_end (the constraint's schedule)"""
    scale_constraint_horizon: bool = False
    """with --budget-scale F: also multiply --constraint-horizon by F, so the threshold reaches eps_end at the end of the
    shortened online phase. Off by default: the threshold loosens per env step of experience as in the paper's run, and a
    miniature covers the first F of that schedule (O2SAC's measurement, README, "No drop at the switch")"""
    lambda_init: float = 1.0
    """initial Lagrange multiplier"""
    lambda_lr: float = 5e-5
    """Adam learning rate of log lambda"""
    lagrange_tau: float = 0.7
    """asymmetric weight of violations (u < 0) in the Lagrange loss; 1 - tau on satisfied samples"""
    reference: Literal["best", "interval", "offline"] = "best"
    """reference policy: best evaluated so far, a copy every --reference-interval evaluations, or the offline actor"""
    reference_interval: int | None = None
    """with --reference interval: copy pi into pi_ref every this many evaluations of the --eval-every schedule (the
    table's eps_end is divided by 4). Default: 1, the official code's update_n; 10 for hopper medium-expert / expert and
    walker2d expert (REFERENCE_INTERVAL), as the official code (which also clips the actor's gradient there)"""

    # --- OPT (docs/algorithms.md, section 6) ---
    opt: bool = False
    """OPT mode: offline critic kept, new critic meta-pre-trained online, kappa-weighted fine-tuning"""
    opt_collect_steps: int = 25_000
    """env steps collected with the frozen actor before pre-training (counted in --online-steps)"""
    opt_pretrain_steps: int = 50_000
    """meta-objective gradient steps of the new critic"""
    opt_inner_lr: float = 3e-4
    """step size of the differentiable inner step psi - lr grad L_off"""
    opt_utd: int = 5
    """gradient updates per env step during OPT fine-tuning"""
    opt_actor_lr: float = 3e-4
    """actor learning rate during OPT fine-tuning"""
    kappa_start: float | None = None
    """weight of Q_on at --kappa-begin; default from FAMILY_DEFAULTS"""
    kappa_end: float | None = None
    """weight of Q_on from --kappa-finish on; default from FAMILY_DEFAULTS"""
    kappa_begin: int = 25_000
    """env step where kappa starts to rise"""
    kappa_finish: int = 150_000
    """env step where kappa reaches --kappa-end"""
    opt_balanced_replay: bool = False
    """sample offline and online transitions by an estimated density ratio (balanced replay) instead of --buffer-mode"""
    ratio_temperature: float = 5.0
    """balanced replay: temperature T of the priorities w(s, a)^(1/T) / mean_offline w^(1/T)"""
    ratio_lr: float = 3e-4
    """balanced replay: Adam learning rate of the density-ratio network (one step per gradient update)"""

    # --- evaluation and logging ---
    eval_every: int | None = None
    """evaluate every this many env steps. Default: from FAMILY_DEFAULTS (1k on MuJoCo, 5k on AntMaze)"""
    eval_episodes: int | None = None
    """evaluation episodes (deterministic actions, separate envs stepped together). Default: from FAMILY_DEFAULTS (10 on
    MuJoCo, 100 on AntMaze)"""
    headline_eval_episodes: int = 50
    """episodes of the evaluations results.json's headline numbers rest on: the offline policy, the distilled one, the
    one after alignment, every online evaluation in the first tenth of online learning and the last one (the first
    --eval-episodes of them start where the others do). A 5-point drop cannot be read from 5 or 10 episodes: the same
    hopper policy scores 43-56 over 5. 0 or fewer than --eval-episodes: --eval-episodes"""
    early_evals: int = 5
    """extra online evaluations inside the first tenth of the online phase, at env steps
    max(1, floor(online_steps / 10 * k / early_evals)), k = 1..early_evals (OPT: counted from the end of its
    collection, over the remaining steps), on top of the --eval-every schedule (0 = none). With --reference best they
    are reference-update points like any evaluation; --reference interval counts only the --eval-every evaluations"""
    align_eval_every: int | None = None
    """evaluate the actor's deterministic score every this many alignment steps (curve phase "align" with the alignment
    step, align/normalized_score). Default: align_steps // 10 (at least 1); 0 = never"""
    log_every: int = 1_000
    """write losses to tensorboard every this many steps"""
    checkpoint_every: int | None = None
    """write online.pt at the first episode end this many env steps after the last one, and at the last step (any
    interval; a resumed run continues from the step it holds, as the uninterrupted run would). Default: 10000 (times
    --budget-scale), at most a tenth of --online-steps, so a short run's online phase survives a kill too"""

    # --- speed (same math; eager is the reference) ---
    compile: bool = False
    """torch.compile the whole update (forward, losses, backward, optimizer steps)"""
    cudagraphs: bool = False
    """replay the update as a CUDA graph (CUDA only; add --compile for the fastest path)"""
    bf16: bool = False
    """bfloat16 autocast of the networks inside the update (losses, acting and evaluation stay float32)"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice; 1 is fastest on a small shared machine)"""

    # --- tracking (tensorboard is always written) ---
    track: bool = False
    """also log to Weights & Biases (wandb.init with sync_tensorboard: the tensorboard events are mirrored there);
    tensorboard stays the record. Needs `pip install wandb`"""
    wandb_project_name: str = "o2o"
    """the Weights & Biases project of --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user) of --track; default: wandb's default entity"""


# ---------------------------------------------------------------- defaults per dataset family (one visible table)
# A dataset's row: its family's ("mujoco" or "antmaze", by the environment of --env), then (MuJoCo) its level's; explicit
# flags override. FAMILY_FIELDS are filled into the args (with_mode_defaults; online_steps per mode), the rest are read
# by resolve_defaults. "random" has no OCR-CFT value: it takes the medium-replay exploration and thresholds; OPT uses
# kappa 1.0 -> 1.0 on random data (its offline critic is not worth weighting in the actor objective).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # the dataset families: the critics learned here, the states and rewards they see, the budgets and the evaluation
    "mujoco": dict(critic_layer_norm=True, normalize_states=True, reward="1,0", align_steps=500_000,
                   online_steps={"o2td3": 100_000, "opt": 300_000}, eval_every=1_000, eval_episodes=10),
    # the official AntMaze configs (config/finetune/O2TD3/antmaze/umaze*_v2.yaml): critic_layernorm false, normalize true,
    # rewards r - 1, align_steps 1M, online_steps 200k, eval_freq 5k, n_episodes 100, explore_noise 0.1, threshold 0.0025
    # -> end_threshold 0.04. They cover umaze and umaze-diverse only: the medium and large mazes get the same values.
    # OPT has no AntMaze config: its 300k budget and the medium kappa schedule.
    "antmaze": dict(critic_layer_norm=False, normalize_states=True, reward="1,-1", align_steps=1_000_000,
                    online_steps={"o2td3": 200_000, "opt": 300_000}, eval_every=5_000, eval_episodes=100,
                    explore_noise=0.1, eps0=0.0025, eps_end=0.04, kappa_start=0.3, kappa_end=0.9),
    #                 exploration sigma    threshold eps0 -> eps_end         OPT kappa --kappa-begin -> --kappa-finish
    "random":        dict(explore_noise=0.1, eps0=0.0025, eps_end=0.04, kappa_start=1.0, kappa_end=1.0),
    "medium":        dict(explore_noise=0.1, eps0=0.0025, eps_end=0.04, kappa_start=0.3, kappa_end=0.9),
    "medium-replay": dict(explore_noise=0.1, eps0=0.0025, eps_end=0.04, kappa_start=0.1, kappa_end=0.9),
    "medium-expert": dict(explore_noise=0.05, eps0=2.5e-5, eps_end=6.25e-4, kappa_start=0.3, kappa_end=0.9),
    "expert":        dict(explore_noise=0.05, eps0=2.5e-5, eps_end=6.25e-4, kappa_start=0.3, kappa_end=0.9),
}
FAMILY_FIELDS = ("critic_layer_norm", "normalize_states", "reward", "align_steps", "online_steps", "eval_every", "eval_episodes")
LEVEL_FIELDS = ("explore_noise", "eps0", "eps_end", "kappa_start", "kappa_end")
# The default --reference-interval where the official code does not copy the reference at every evaluation (keyed
# "<env>-<level>"; 1 elsewhere). The official code also clips the actor's gradient on these datasets; this script does not.
REFERENCE_INTERVAL = {"hopper-medium-expert": 10, "hopper-expert": 10, "walker2d-expert": 10}


def family_row(args: Args) -> tuple[str, str, dict[str, Any]]:
    """(family, level, row): the FAMILY_DEFAULTS rows of the run's dataset family (dataset_family: --family, else
    --env) merged, family first; an AntMaze maze has the antmaze row alone."""
    name, level = dataset_family(args.env, args.dataset_id, args.family)
    if name == "antmaze":
        return "antmaze", level, dict(FAMILY_DEFAULTS["antmaze"])
    return "mujoco", level, {**FAMILY_DEFAULTS["mujoco"], **FAMILY_DEFAULTS[level]}


def resolve_defaults(args: Args) -> dict[str, float]:
    """Exploration sigma, thresholds and kappa: explicit flags win, else the FAMILY_DEFAULTS row; the reference interval:
    --reference-interval, else REFERENCE_INTERVAL of --env's dataset, else 1."""
    _, level, full = family_row(args)
    row = {k: full[k] for k in LEVEL_FIELDS}
    if args.reference == "interval":  # a reference refreshed on a clock gets a tighter final threshold (docs/algorithms.md, section 1)
        row["eps_end"] /= 4.0
    for k in row:
        if getattr(args, k) is not None:
            row[k] = float(getattr(args, k))
    env = re.match(r"[a-z0-9]+", args.env)
    row["reference_interval"] = (args.reference_interval if args.reference_interval is not None
                                 else REFERENCE_INTERVAL.get(f"{env.group(0) if env else ''}-{level}", 1))
    return row


# ==================== ALGO LOGIC ====================
# ---------------------------------------------------------------- pure math (each has a unit test)
def smoothed_action(action: Tensor, noise: Tensor, noise_clip: float, max_action: float = 1.0) -> Tensor:
    """TD3 target policy smoothing: clip(a + clip(noise, +-c), +-max_action); noise ~ N(0, sigma^2) from the caller."""
    return (action + noise.clamp(-noise_clip, noise_clip)).clamp(-max_action, max_action)


def fqe_target(rewards: Tensor, terminals: Tensor, next_q: Tensor, gamma: float) -> Tensor:
    """Policy Re-evaluation (O2TD3; docs/algorithms.md, section 4.1): y = r + gamma (1 - d) min_i Qbar_i(s', a'); next_q is
    (n, B); d = 1 only for a true termination."""
    return rewards + gamma * (1.0 - terminals) * next_q.min(0).values


def alignment_targets(q_star: Tensor, q_bar_at: Tensor, at: Tensor, a_off: Tensor, beta: float, max_distance: float) -> Tensor:
    """Value Alignment (O2TD3; docs/algorithms.md, section 4.2): distance-shrunk targets y_i = min(y*, Qbar_i(s, at)),
    shape (n, B).

    delta = min(||at - a_off||_2 / sqrt|A|, max_distance); y* = Q* (1 + beta delta^2) if Q* < 0 else
    Q* / (1 + beta delta^2): either way y* <= Q*, so actions away from the offline action are pushed down.
    """
    delta = ((at - a_off).norm(dim=-1) / math.sqrt(at.shape[-1])).clamp(max=max_distance)
    shrink = 1.0 + beta * delta**2
    y_star = torch.where(q_star < 0, q_star * shrink, q_star / shrink)
    return torch.minimum(y_star.unsqueeze(0), q_bar_at)


def mse_to_reference(pi: Tensor, pi_ref: Tensor) -> Tensor:
    """M = mean over batch and action dims of (pi(s) - pi_ref(s))^2: one scalar per batch (Constrained Fine-Tuning, O2TD3;
    docs/algorithms.md, section 4.3)."""
    return ((pi - pi_ref) ** 2).mean()


def constrained_td_target(rewards: Tensor, terminals: Tensor, next_q: Tensor, lam: Tensor | float, m_next: Tensor | float, gamma: float) -> Tensor:
    """Constrained Fine-Tuning (O2TD3; docs/algorithms.md, section 4.3): y = r + gamma (1 - d) [min_i Qbar_i(s', a') - lam M'];
    next_q is (n, B)."""
    return rewards + gamma * (1.0 - terminals) * (next_q.min(0).values - lam * m_next)


def constrained_actor_loss(q1: Tensor, pi: Tensor, pi_ref: Tensor, lam: Tensor | float) -> Tensor:
    """-mean Q1(s, pi(s)) / mean|Q1| (detached scale) + lam mean (pi(s) - pi_ref(s))^2."""
    return -q1.mean() / q1.abs().mean().detach() + lam * mse_to_reference(pi, pi_ref)


def td_loss(q: Tensor, y: Tensor) -> Tensor:
    """sum over the n critics of the mean squared TD error; q (n, B), y (B,) or (n, B)."""
    return ((q - y) ** 2).mean(-1).sum()


def opt_meta_loss(qf: nn.Module, params: dict[str, Tensor], off: tuple[Tensor, Tensor, Tensor], on: tuple[Tensor, Tensor, Tensor],
                  inner_lr: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OPT (docs/algorithms.md, section 6): L_pre = L_off(psi) + w L_on(psi - inner_lr grad L_off(psi)), w = detached
    min(L_off, L_on) / L_on.

    off / on = (obs, actions, TD targets) of an offline and an online batch; the inner step stays differentiable,
    so the gradient of L_pre flows through grad L_off (second order). Returns (L_pre, L_off, L_on, w).

    grad L_off comes from torch.func.grad, not autograd.grad(create_graph=True): the whole meta-loss is then one
    forward that a single `L_pre.backward()` differentiates, which torch.compile can trace (a compiled forward is one
    autograd node and cannot be differentiated twice).
    """

    def offline_loss(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss = td_loss(functional_call(qf, p, (off[0], off[1])), off[2])
        return loss, loss

    grads, l_off = torch.func.grad(offline_loss, has_aux=True)(params)  # l_off and grads stay on the outer graph
    inner = {k: params[k] - inner_lr * grads[k] for k in params}
    l_on = td_loss(functional_call(qf, inner, (on[0], on[1])), on[2])
    w = (torch.minimum(l_off, l_on) / l_on).detach()
    return l_off + w * l_on, l_off, l_on, w


def kappa_schedule(step: int, start: float, end: float, begin: int, finish: int) -> float:
    """OPT weight of Q_on in the actor objective: start until `begin`, linear to `end` at `finish`, then end."""
    if step <= begin:
        return start
    if step >= finish:
        return end
    return start + (end - start) * (step - begin) / (finish - begin)


def opt_actor_loss(q_off: Tensor, q_on: Tensor, kappa: Tensor | float) -> Tensor:
    """OPT actor: maximise (1 - kappa) Q_off(s, pi(s)) + kappa Q_on(s, pi(s)); no BC term online."""
    return -((1.0 - kappa) * q_off + kappa * q_on).mean()


def density_ratio_loss(w_off: Tensor, w_on: Tensor) -> Tensor:
    """Balanced replay's density-ratio loss (Jensen-Shannon variational form, Lee et al. 2021), minimised at
    w = d_on / d_off: mean_off[-log(2 / (w + 1))] - mean_on[log(2 w / (w + 1))]."""
    return (-torch.log(2.0 / (w_off + 1.0) + 1e-10)).mean() - torch.log(2.0 * w_on / (w_on + 1.0) + 1e-10).mean()


def balanced_priority(w: Tensor, w_off: Tensor, temperature: float, low: float = 1e-3, high: float = 1e3) -> Tensor:
    """Balanced-replay priority w^(1/T) / mean_offline-batch(w_off^(1/T)), clipped to [low, high]: an offline-like
    transition has priority ~1, an online-like one more; the temperature T flattens the ratio."""
    return (w ** (1.0 / temperature) / ((w_off ** (1.0 / temperature)).mean() + 1e-10)).clamp(low, high)


def distillation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Distillation (docs/algorithms.md, section 4): regress the deterministic actor on the offline actor's mean action (MSE)."""
    return F.mse_loss(pred, target)


# ---------------------------------------------------------------- diagnostics at the phase boundaries (each has a unit test)
def q_stats(q: Tensor) -> dict[str, float]:
    """Mean and (population) std over the states of the min-over-critics Q; q is (n, B)."""
    m = q.min(0).values
    return {"mean": float(m.mean()), "std": float(m.std(correction=0))}


def policy_critic_agreement(q_mode: Tensor, q_samples: Tensor, sq_dist: Tensor) -> dict[str, float]:
    """Does the critic rank pi0's action above its perturbations? q_mode (B,) = Q(s, pi0(s)); q_samples (S, B) =
    Q(s, a_j) for S perturbed actions a_j per state; sq_dist (S, B) = ||a_j - pi0(s)||^2.

    agreement: fraction of pairs (s, a_j) with Q(s, pi0(s)) >= Q(s, a_j); agreement_all: fraction of states where
    Q(s, pi0(s)) >= Q(s, a_j) for every j; dist_q_corr: the Pearson correlation of -||a_j - pi0(s)||^2 and Q(s, a_j)
    over the samples of a state, averaged over the states where it is defined (1: Q falls with the distance to pi0)."""
    wins = q_mode.unsqueeze(0) >= q_samples
    x = -sq_dist - (-sq_dist).mean(0)
    y = q_samples - q_samples.mean(0)
    den = (x.pow(2).sum(0) * y.pow(2).sum(0)).sqrt()
    r = ((x * y).sum(0) / den)[den > 0]
    return {"agreement": float(wins.float().mean()), "agreement_all": float(wins.all(0).float().mean()),
            "dist_q_corr": float(r.mean()) if r.numel() else float("nan")}


def actor_stats(actions: Tensor, max_action: float = 1.0) -> dict[str, float]:
    """Mean |a| over states and action components, and the saturation: the fraction of components with |a| > 0.99 max_action."""
    return {"mean_abs_action": float(actions.abs().mean()), "saturation": float((actions.abs() > 0.99 * max_action).float().mean())}


# ---------------------------------------------------------------- networks of each mode
ACTOR_HIDDEN = (256, 256)  # online deterministic actor (distillation target)
CRITIC_HIDDEN = (256, 256)  # new online critics: 2 x [Linear 256 -> LayerNorm -> ReLU]


def new_critic(obs_dim: int, act_dim: int, layer_norm: bool = True) -> Critic:
    """Twin critics, 2 x [Linear 256 -> (LayerNorm: --critic-layer-norm) -> ReLU] -> Linear, orthogonal init."""
    return orthogonal_init_(Critic(obs_dim, act_dim, CRITIC_HIDDEN, n=2, layer_norm=layer_norm))


class DensityRatio(nn.Module):
    """Balanced replay (Lee et al. 2021, as OPT uses it): w(s, a) = relu(f(s, a)) >= 0 estimates d_on / d_off."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, (256, 256), 1)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return F.relu(fp32(self.net(torch.cat([obs, act], -1)))).squeeze(-1)


class Nets:
    """The networks and optimisers of one mode (the dataclasses below), checkpointed by field name as plain dicts:
    {"modules": {name: state_dict}, "optimizers": {name: state_dict}, "log_lam": log lambda or None}."""

    def modules(self) -> dict[str, nn.Module]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), nn.Module)}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.optim.Optimizer)}

    def critics(self) -> dict[str, Critic]:
        """The critics a checkpoint saves under "critics" ("qf" first: its architecture is the checkpoint's critic_config)."""
        return {}

    def reference(self) -> nn.Module | None:
        """The reference policy of the constraint (None: the mode has no constraint)."""
        return None

    def log_lambda(self) -> Tensor | None:
        """log lambda of the constraint (None: the mode has no constraint)."""
        return None

    def state(self) -> dict:
        log_lam = self.log_lambda()
        return {"modules": {k: state_dict_cpu(m) for k, m in self.modules().items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "log_lam": log_lam.detach().cpu().clone() if log_lam is not None else None}

    def load(self, state: dict, accel: Accel, names: Sequence[str] | None = None) -> None:
        """The saved networks and optimisers of `state` (only those in `names` when given) into these; log lambda only
        with everything (a resumed online phase): a reused phase keeps this run's --lambda-init, which no phase key holds."""
        for k, m in self.modules().items():
            if k in state["modules"] and (names is None or k in names):
                m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers().items():
            if k in state["optimizers"] and (names is None or k in names):
                accel.load_optimizer(o, state["optimizers"][k])
        log_lam = self.log_lambda()
        if state.get("log_lam") is not None and log_lam is not None and names is None:
            with torch.no_grad():
                log_lam.copy_(state["log_lam"])


@dataclass
class DistillNets(Nets):
    """Distillation: the deterministic actor being regressed on the offline actor, and its Adam."""
    actor: DeterministicActor
    actor_opt: torch.optim.Optimizer


@dataclass
class O2TD3Nets(Nets):
    """O2TD3 and naive TD3: pi0 (frozen), the actor and its target, the reference pi_ref of the constraint, the twin
    critic and its target, their Adams, and log lambda (shape (1,), not 0-d: compiled Adam skips 0-d float64
    parameters, PyTorch 2.13) with its Adam."""
    pi0: DeterministicActor
    actor: DeterministicActor
    actor_target: DeterministicActor
    actor_ref: DeterministicActor
    qf: Critic
    qf_target: Critic
    qf_opt: torch.optim.Optimizer
    actor_opt: torch.optim.Optimizer
    log_lam: nn.Parameter
    lam_opt: torch.optim.Optimizer

    def critics(self) -> dict[str, Critic]:
        return {"qf": self.qf}

    def reference(self) -> nn.Module | None:
        return self.actor_ref

    def log_lambda(self) -> Tensor | None:
        return self.log_lam


@dataclass
class OPTNets(Nets):
    """OPT: pi0 (frozen), the actor and its target, Q_off (the checkpoint's critic, `qf`) and Q_on (a new one) with
    their targets and Adams; with --opt-balanced-replay the density-ratio network and its Adam."""
    pi0: DeterministicActor
    actor: DeterministicActor
    actor_target: DeterministicActor
    qf: Critic
    qf_target: Critic
    qf_on: Critic
    qf_on_target: Critic
    qf_opt: torch.optim.Optimizer
    qf_on_opt: torch.optim.Optimizer
    actor_opt: torch.optim.Optimizer
    ratio: DensityRatio | None = None
    ratio_opt: torch.optim.Optimizer | None = None

    def critics(self) -> dict[str, Critic]:
        return {"qf": self.qf, "qf_on": self.qf_on}


# ---------------------------------------------------------------- one update per phase (tensors in, detached metrics out)
# Each update takes the networks and optimizers it reads and steps first, then the per-step inputs: tensors (batches; a
# threshold or weight that changes over time as a 0-d device tensor) and bool flags. The phase's constants are
# keyword-only; the phase binds networks and constants once with functools.partial into an Accel.update, so the same
# code runs eagerly, compiled, or as a CUDA graph. Hence: every loss between two optimizer steps goes through ONE
# backward (gradients isolated with detach / frozen_call), no host syncs, no Python side effects, metrics returned.
def td3_constants(a: Args) -> dict[str, float]:
    """The TD3 constants shared by the critic updates of every phase, as keywords for functools.partial."""
    return {"gamma": a.gamma, "tau": a.tau, "policy_noise": a.policy_noise, "noise_clip": a.noise_clip}


def distill_update(actor: nn.Module, opt: torch.optim.Optimizer, obs: Tensor, target: Tensor) -> dict[str, Tensor]:
    loss = distillation_loss(actor(obs), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"distill/loss": loss.detach()}


def reevaluate_update(pi0: nn.Module, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer, obs: Tensor, actions: Tensor,
                      rewards: Tensor, next_obs: Tensor, terminals: Tensor, *, gamma: float, tau: float, policy_noise: float,
                      noise_clip: float) -> dict[str, Tensor]:
    """Policy Re-evaluation (O2TD3; docs/algorithms.md, section 4.1): FQE of pi0 with TD3 targets and policy smoothing;
    Polyak every step."""
    with torch.no_grad():
        pi0_next = pi0(next_obs)
        next_a = smoothed_action(pi0_next, torch.randn_like(pi0_next) * policy_noise, noise_clip)
        y = fqe_target(rewards, terminals, qf_target(next_obs, next_a), gamma)
    q = qf(obs, actions)
    loss = td_loss(q, y)
    # the phase's own prefix: the online phase's losses/qf_loss is logged against env steps on an overlapping x-axis
    out = {"reevaluate/qf_loss": loss.detach(), "reevaluate/qf_values": q.mean().detach()}
    qf_opt.zero_grad(set_to_none=True)
    loss.backward()
    qf_opt.step()
    polyak_update(qf_target, qf, tau)
    return out


def align_update(pi0: nn.Module, actor: nn.Module, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer,
                 actor_opt: torch.optim.Optimizer, obs: Tensor, *, policy_noise: float, noise_clip: float, beta: float,
                 max_distance: float, train_actor: bool = True) -> dict[str, Tensor]:
    """Value Alignment (O2TD3; docs/algorithms.md, section 4.2): distance-shrunk targets from the frozen targets; the
    actor steps on -mean Q1(s, pi(s)) of the
    critic before its step (read frozen, so the summed backward gives each loss only its own parameters).
    With train_actor False (--align-actor frozen) the actor loss is only logged: pi stays pi0, only the critic aligns."""
    with torch.no_grad():
        a_off = pi0(obs)
    with torch.set_grad_enabled(train_actor):
        pi = actor(obs)
    with torch.no_grad():
        at = smoothed_action(pi.detach(), torch.randn_like(pi) * policy_noise, noise_clip)
        q_bar_off, q_bar_at = qf_target(torch.cat([obs, obs]), torch.cat([a_off, at])).split(obs.shape[0], dim=1)
        q_star = q_bar_off.min(0).values
        y = alignment_targets(q_star, q_bar_at, at, a_off, beta, max_distance)
    actor_loss = -frozen_call(qf, obs, pi)[0].mean()
    q_at, q_off = qf(torch.cat([obs, obs]), torch.cat([at, a_off])).split(obs.shape[0], dim=1)  # one fused call
    loss = td_loss(q_at, y) + td_loss(q_off, q_star)
    out = {"align/qf_loss": loss.detach(), "align/actor_loss": actor_loss.detach(), "align/qf_values": q_off.mean().detach()}
    qf_opt.zero_grad(set_to_none=True)
    if train_actor:
        actor_opt.zero_grad(set_to_none=True)
        loss = loss + actor_loss
    loss.backward()
    qf_opt.step()
    if train_actor:
        actor_opt.step()
    return out


def online_update(actor: nn.Module, actor_target: nn.Module, actor_ref: nn.Module, qf: Critic, qf_target: Critic,
                  qf_opt: torch.optim.Optimizer, actor_opt: torch.optim.Optimizer, log_lam: Tensor, lam_opt: torch.optim.Optimizer,
                  obs: Tensor, actions: Tensor, rewards: Tensor, next_obs: Tensor, terminals: Tensor, threshold: Tensor, update_actor: bool,
                  *, constraint: bool, gamma: float, tau: float, policy_noise: float, noise_clip: float,
                  lagrange_tau: float) -> dict[str, Tensor]:
    """Constrained Fine-Tuning (O2TD3; docs/algorithms.md, section 4.3): one constrained TD3 update (critic every call;
    Lagrange, actor and targets when update_actor).
    `threshold` is eps_t as a 0-d tensor; without `constraint` lambda stays 0 (plain TD3)."""
    # lambda of this update, read before the Lagrange step (log_lam has shape (1,) for compiled Adam; lambda is 0-d)
    lam = log_lam.detach().exp().reshape(()) if constraint else torch.zeros((), device=obs.device)
    with torch.no_grad():
        next_pi = actor_target(next_obs)
        next_a = smoothed_action(next_pi, torch.randn_like(next_pi) * policy_noise, noise_clip)
        m_next = mse_to_reference(actor(next_obs), actor_ref(next_obs)) if constraint else torch.zeros((), device=obs.device)
        y = constrained_td_target(rewards, terminals, qf_target(next_obs, next_a), lam, m_next, gamma)
    q = qf(obs, actions)
    qf_loss = td_loss(q, y)
    out = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q.mean().detach(), "losses/lambda": lam}
    qf_opt.zero_grad(set_to_none=True)
    qf_loss.backward()
    qf_opt.step()
    if update_actor:  # delayed: Lagrange multiplier, actor (on the critic just stepped), targets
        pi = actor(obs)
        with torch.no_grad():
            pi_ref = actor_ref(obs)
        actor_loss = constrained_actor_loss(frozen_call(qf, obs, pi)[0], pi, pi_ref, lam)
        out["losses/actor_loss"] = actor_loss.detach()
        out["losses/mse_to_reference"] = mse_to_reference(pi.detach(), pi_ref)
        loss = actor_loss
        actor_opt.zero_grad(set_to_none=True)
        if constraint:  # the Lagrange loss sees only detached deviations: its gradient reaches log_lam alone
            loss = loss + lagrange_loss(log_lam.reshape(()), (pi_ref - pi.detach()) ** 2, threshold, lagrange_tau)
            lam_opt.zero_grad(set_to_none=True)
        loss.backward()
        if constraint:
            lam_opt.step()
        actor_opt.step()
        polyak_update(qf_target, qf, tau)
        polyak_update(actor_target, actor, tau)
    return out


def opt_pretrain_update(actor: nn.Module, qf_on: Critic, qf_on_target: Critic, qf_on_opt: torch.optim.Optimizer, off: dict[str, Tensor],
                        on: dict[str, Tensor], update_targets: bool = True, *, gamma: float, tau: float, policy_noise: float,
                        noise_clip: float, inner_lr: float) -> dict[str, Tensor]:
    """OPT pre-training (docs/algorithms.md, section 6): one meta step of Q_on; both losses are TD3 losses with Q_on's own
    targets, the actor (still pi0: frozen during pre-training) acting. Q_on's targets
    are Polyak-updated only when `update_targets` (every second step, the TD3 delay, as the OPT code)."""
    ys = []
    with torch.no_grad():
        for b in (off, on):
            next_pi = actor(b["next_obs"])
            next_a = smoothed_action(next_pi, torch.randn_like(next_pi) * policy_noise, noise_clip)
            ys.append(fqe_target(b["rewards"], b["terminals"], qf_on_target(b["next_obs"], next_a), gamma))
    params = dict(qf_on.named_parameters())
    loss, l_off, l_on, w = opt_meta_loss(qf_on, params, (off["obs"], off["actions"], ys[0]), (on["obs"], on["actions"], ys[1]), inner_lr)
    out = {"opt_pretrain/meta_loss": loss.detach(), "opt_pretrain/l_off": l_off.detach(), "opt_pretrain/l_on": l_on.detach(), "opt_pretrain/w": w}
    qf_on_opt.zero_grad(set_to_none=True)
    loss.backward()
    qf_on_opt.step()
    if update_targets:
        polyak_update(qf_on_target, qf_on, tau)
    return out


def opt_finetune_update(actor: nn.Module, actor_target: nn.Module, qf: Critic, qf_target: Critic, qf_on: Critic, qf_on_target: Critic,
                        qf_opt: torch.optim.Optimizer, qf_on_opt: torch.optim.Optimizer, actor_opt: torch.optim.Optimizer, obs: Tensor,
                        actions: Tensor, rewards: Tensor, next_obs: Tensor, terminals: Tensor, kappa: Tensor, update_actor: bool, *,
                        gamma: float, tau: float, policy_noise: float, noise_clip: float, off_reward_scale: float = 1.0,
                        off_reward_shift: float = 0.0) -> dict[str, Tensor]:
    """OPT fine-tuning (docs/algorithms.md, section 6): both critics fitted on the same batch (own targets); the actor
    maximises the kappa mixture of the
    critics just stepped. `kappa` is a 0-d tensor. `rewards` are raw (Q_on's scale); Q_off (`qf`), the checkpoint's critic,
    sees them through the checkpoint's transform r * off_reward_scale + off_reward_shift, the scale it was trained on."""
    with torch.no_grad():
        next_pi = actor_target(next_obs)
        next_a = smoothed_action(next_pi, torch.randn_like(next_pi) * policy_noise, noise_clip)
        y_off = fqe_target(rewards * off_reward_scale + off_reward_shift, terminals, qf_target(next_obs, next_a), gamma)
        y_on = fqe_target(rewards, terminals, qf_on_target(next_obs, next_a), gamma)
    q_off, q_on = qf(obs, actions), qf_on(obs, actions)
    loss_off, loss_on = td_loss(q_off, y_off), td_loss(q_on, y_on)
    out = {"losses/qf_loss": loss_off.detach(), "losses/qf_on_loss": loss_on.detach(), "losses/qf_values": q_on.mean().detach()}
    qf_opt.zero_grad(set_to_none=True)
    qf_on_opt.zero_grad(set_to_none=True)
    (loss_off + loss_on).backward()
    qf_opt.step()
    qf_on_opt.step()
    if update_actor:
        pi = actor(obs)
        actor_loss = opt_actor_loss(frozen_call(qf, obs, pi)[0], frozen_call(qf_on, obs, pi)[0], kappa)
        out["losses/actor_loss"] = actor_loss.detach()
        actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_opt.step()
        polyak_update(qf_target, qf, tau)
        polyak_update(qf_on_target, qf_on, tau)
        polyak_update(actor_target, actor, tau)
    return out


def balanced_replay_update(ratio: DensityRatio, opt: torch.optim.Optimizer, rb_online: OnlineReplay, batch: dict[str, Tensor], *,
                           temperature: float) -> dict[str, Tensor]:
    """Balanced replay, once per gradient update (as Lee et al. 2021 / OPT): new priorities for the transitions of the
    RL batch from the density-ratio network before its step, normalised by an offline batch, then one step of the
    network on an offline and an online batch. Eager only: it writes into the replay's priorities."""
    off, on = rb_online.offline.sample(batch["obs"].shape[0]), rb_online.sample_online(batch["obs"].shape[0])
    w_off, w_on = ratio(off["obs"], off["actions"]), ratio(on["obs"], on["actions"])
    with torch.no_grad():
        priority = balanced_priority(ratio(batch["obs"], batch["actions"]), w_off, temperature)
    rb_online.set_priorities(batch["idx"], priority)
    loss = density_ratio_loss(w_off, w_on)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"losses/ratio_loss": loss.detach(), "charts/priority_mean": priority.mean()}


# ---------------------------------------------------------------- one function per phase
def mean_net_copy(offline_actor: nn.Module, ckpt: dict) -> nn.Module | None:
    """A DeterministicActor(ACTOR_HIDDEN) that computes exactly the offline actor's mean action, when the offline actor
    is a GaussianActor (mean max_action * tanh(mlp(s))) of those layer sizes; None when it must be distilled."""
    if not isinstance(offline_actor, GaussianActor) or tuple(ckpt["actor_config"]["hidden"]) != ACTOR_HIDDEN:
        return None
    actor = DeterministicActor(ckpt["obs_dim"], ckpt["act_dim"], ACTOR_HIDDEN, ckpt["max_action"])
    actor.net.load_state_dict(offline_actor.net.state_dict())
    return actor.to(next(offline_actor.parameters()).device)


def run_distillation(run: Run, offline_actor: nn.Module, rb_offline: ReplayBuffer, key: dict) -> tuple[nn.Module, dict]:
    """Distillation (docs/algorithms.md, section 4): a tanh-Gaussian or Gaussian offline actor becomes a
    DeterministicActor(256x256) regressed on its mean action."""
    a, t0 = run.args, time.time()
    run.enter("distill")
    actor = DeterministicActor(run.ckpt["obs_dim"], run.ckpt["act_dim"], ACTOR_HIDDEN, run.ckpt["max_action"]).to(run.device)
    nets = DistillNets(actor, run.accel.adam(actor.parameters(), a.distill_lr))
    saved = run.reuse("distilled", key)
    if saved is not None:
        info = run.restore(saved, nets)["distill"]
    else:
        offline_actor.eval()
        step_fn = run.accel.update(functools.partial(distill_update, nets.actor, nets.actor_opt))
        for step in tqdm(range(1, a.distill_steps + 1), desc="distill", disable=None):
            obs = rb_offline.sample(a.batch_size)["obs"]
            with torch.no_grad():
                target = offline_actor.act(obs)
            run.metrics.add(step_fn(obs, target))
            if step % a.log_every == 0:
                run.metrics.flush(step, "distillation")
        run.metrics.flush(a.distill_steps, "distillation")
        with torch.no_grad():  # distillation error on (up to) 10k fixed dataset states
            obs = rb_offline.data["obs"][: min(rb_offline.size, 10_000)]
            err = float(distillation_loss(actor(obs), offline_actor.act(obs)))
        ret, score = run.evaluate(actor, headline=True)
        info = {"distill_error": err, "distilled_return": ret, "distilled_score": score, "from_family": run.ckpt["actor_family"]}
        run.checkpoint("distilled", nets, key, {"distill": info}, score)
    run.writer.add_scalar("distill/action_mse", info["distill_error"], a.distill_steps)
    print(f"distilled the {info['from_family']} actor: MSE to its mean action {info['distill_error']:.4g}, normalized score {info['distilled_score']:.1f}")
    run.record(0, info["distilled_return"], info["distilled_score"], "distilled", quiet=True)
    run.phase_done("distilled", t0, saved is not None)
    return actor, info


def run_reevaluation(run: Run, nets: O2TD3Nets, rb_offline: ReplayBuffer, key: dict) -> None:
    """Policy Re-evaluation (O2TD3; docs/algorithms.md, section 4.1), into a NEW critic (orthogonal init, LayerNorm). The
    target critics move at --reevaluate-tau, and
    every REEVAL_CHECK_EVERY steps the mean target-critic value on the diagnostics' fixed dataset (s, a) pairs is read
    (the probe; reading it draws no random numbers, so the training streams are those of a run without it); the phase
    ends at the first reading where fqe_converged holds, at the latest after --reevaluate-steps. How it ended
    (run.reevaluation, results.json "reevaluation") is kept in reevaluated.pt, so a reused phase reports it too."""
    a, t0 = run.args, time.time()
    run.enter("reevaluate")
    saved = run.reuse("reevaluated", key)
    if saved is not None:
        info = run.restore(saved, nets, names=("qf", "qf_target", "qf_opt"))["reevaluation"]
    else:
        step_fn = run.accel.update(functools.partial(reevaluate_update, nets.pi0, nets.qf, nets.qf_target, nets.qf_opt,
                                                     **{**td3_constants(a), "tau": a.reevaluate_tau}))
        probe: list[float] = []  # the probe readings, in order
        steps_done, converged = a.reevaluate_steps, False  # a cap shorter than REEVAL_CHECK_EVERY reads nothing: not converged
        for step in tqdm(range(1, a.reevaluate_steps + 1), desc="re-evaluation", disable=None):
            b = rb_offline.sample(a.batch_size)
            run.metrics.add(step_fn(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"]))
            if step % a.log_every == 0:
                run.metrics.flush(step, "re-evaluation")
            if step % REEVAL_CHECK_EVERY == 0:
                with torch.no_grad():  # mean over both target critics and the probe states
                    probe.append(float(nets.qf_target(run.diag_obs, run.diag_actions).mean()))
                gap = fqe_gap(probe)
                run.writer.add_scalar("reevaluate/q_probe", probe[-1], step)
                if math.isfinite(gap):
                    run.writer.add_scalar("reevaluate/gap_estimate", gap, step)
                if fqe_converged(probe, a.reevaluate_tol):
                    steps_done, converged = step, True
                    break
        run.metrics.flush(steps_done, "re-evaluation")
        info = {"steps": steps_done, "cap": a.reevaluate_steps, "tau": a.reevaluate_tau, "tol": a.reevaluate_tol,
                "converged": converged, "check_every": REEVAL_CHECK_EVERY, "q_probe": probe}
        run.checkpoint("reevaluated", nets, key, {"reevaluation": info}, None)
    run.reevaluation = info
    q_last = info["q_probe"][-1] if info["q_probe"] else float("nan")
    print(f"re-evaluation: {info['steps']} steps, Q on the probe {q_last:.1f}" + (" (converged)" if info["converged"] else ""))
    run.phase_done("reevaluated", t0, saved is not None)


def run_alignment(run: Run, nets: O2TD3Nets, rb_offline: ReplayBuffer, key: dict) -> float:
    """Value Alignment (O2TD3; docs/algorithms.md, section 4.2); targets frozen for the whole phase, then critics and actor
    copied to the targets. With
    --align-eval-every N the actor is evaluated every N alignment steps: curve points of phase "align" (step = the
    alignment step; the last one is the aligned actor's evaluation). Returns the aligned actor's score."""
    a, t0 = run.args, time.time()
    run.enter("align")
    saved = run.reuse("aligned", key)
    if saved is not None:
        ts = run.restore(saved, nets, names=("actor", "actor_target", "actor_opt", "qf", "qf_target", "qf_opt"))
        ret, score = ts["aligned_return"], ts["aligned_score"]
        run.curve.extend(ts.get("align_curve", []))
    else:
        # tensorboard x-axis: gradient steps since the start (re-evaluation may stop before --reevaluate-steps)
        offset = run.reevaluation["steps"] if run.reevaluation is not None else 0
        step_fn = run.accel.update(functools.partial(align_update, nets.pi0, nets.actor, nets.qf, nets.qf_target, nets.qf_opt, nets.actor_opt,
                                                     policy_noise=a.policy_noise, noise_clip=a.noise_clip, beta=a.align_beta,
                                                     max_distance=a.align_max_distance, train_actor=a.align_actor == "train"))
        n0 = len(run.curve)
        for step in tqdm(range(1, a.align_steps + 1), desc="alignment", disable=None):
            run.metrics.add(step_fn(rb_offline.sample(a.batch_size)["obs"]))
            if step % a.log_every == 0:
                run.metrics.flush(offset + step, "alignment")
            if a.align_eval_every and step % a.align_eval_every == 0 and step < a.align_steps:  # evaluation draws no random numbers
                run.record(step, *run.evaluate(nets.actor), "align", quiet=True, tag="align")
        run.metrics.flush(offset + a.align_steps, "alignment")
        nets.qf_target.load_state_dict(nets.qf.state_dict())
        nets.actor_target.load_state_dict(nets.actor.state_dict())
        ret, score = run.evaluate(nets.actor, headline=True)
        if a.align_eval_every and a.align_steps % a.align_eval_every == 0:
            run.record(a.align_steps, ret, score, "align", quiet=True, tag="align")
        run.checkpoint("aligned", nets, key, {"aligned_return": ret, "aligned_score": score, "align_curve": run.curve[n0:]}, score)
    run.record(0, ret, score, "aligned")
    run.phase_done("aligned", t0, saved is not None)
    return score


def run_online(run: Run, nets: O2TD3Nets, rb_offline: ReplayBuffer) -> bool:
    """Constrained Fine-Tuning (O2TD3; docs/algorithms.md, section 4.3) or plain TD3 fine-tuning (--no-constraint): the
    constrained TD3 update with the threshold eps_t loosening over --constraint-horizon env steps. A killed run resumes
    from online.pt. Returns False when --stop-after stopped it."""
    a, d, t0 = run.args, run.defaults, time.time()
    constraint = not a.no_constraint
    rb_online = OnlineReplay(rb_offline, run.data, a.buffer_mode, a.online_steps, a.part_trajectories, False, run.device)
    run.enter("online", 0)
    resume_online(run, nets, rb_online)
    runner = EnvRunner(run.data["env_spec"], a.seed + run.loop["global_step"], run.obs_mean, run.obs_std, run.rewards["qf"], run.device,
                       run.loop["env_rng"])
    if constraint:
        run.writer.add_scalar("charts/kl_threshold", d["eps0"], 0)
    step_fn = run.accel.update(functools.partial(online_update, nets.actor, nets.actor_target, nets.actor_ref, nets.qf, nets.qf_target,
                                                 nets.qf_opt, nets.actor_opt, nets.log_lam, nets.lam_opt, constraint=constraint,
                                                 lagrange_tau=a.lagrange_tau, **td3_constants(a)))
    threshold = run.accel.scalar(d["eps0"])  # refilled every step: a value, never a new constant for compile or a graph

    def update(b: dict[str, Tensor], global_step: int, update_actor: bool) -> dict[str, Tensor]:
        threshold.fill_(constraint_threshold(global_step, d["eps0"], d["eps_end"], a.constraint_horizon))
        return step_fn(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], threshold, update_actor)

    def after_step(global_step: int) -> None:
        if constraint and global_step % a.log_every == 0:
            run.writer.add_scalar("charts/kl_threshold", constraint_threshold(global_step, d["eps0"], d["eps_end"], a.constraint_horizon),
                                  global_step)

    ok = online_loop(run, nets, nets.actor_ref, rb_online, runner, update, "online", d["explore_noise"], a.utd, a.learning_starts,
                     after_step, early_eval_steps(a.online_steps, a.early_evals))
    runner.close()
    run.phase_done("online", t0, False)
    return ok


def run_opt_pretraining(run: Run, nets: OPTNets, rb_offline: ReplayBuffer, rb_online: OnlineReplay) -> EnvRunner | None:
    """OPT's collection and pre-training (docs/algorithms.md, section 6): --opt-collect-steps env steps with the frozen
    actor (+ exploration noise, no updates; its score is the last evaluated one), then --opt-pretrain-steps meta steps
    of Q_on. Returns the collection's env runner, whose episode fine-tuning continues (None when the phase is reused)."""
    a, t0 = run.args, time.time()
    key = phase_key(a, "opt_pretrained", run.source, run.rewards)
    saved = run.reuse("opt_pretrained", key)
    run.enter("opt_collect", 0)
    runner = None
    if saved is not None:
        run.enter("opt_pretrain", a.opt_collect_steps)
        ts = run.restore(saved, nets, names=("qf_on", "qf_on_target", "qf_on_opt"))
        rb_online.load(ts["replay"])
        run.curve.extend(ts["collect_curve"])
    else:
        runner = EnvRunner(run.data["env_spec"], a.seed, run.obs_mean, run.obs_std, run.rewards["qf_on"], run.device)
        n0 = len(run.curve)
        for step in tqdm(range(1, a.opt_collect_steps + 1), desc="opt collect", disable=None):
            transition, ep_ret = runner.step(nets.actor, run.defaults["explore_noise"])
            rb_online.add(*transition)
            if ep_ret is not None:
                run.writer.add_scalar("charts/episodic_return", ep_ret, step)
            if step % a.eval_every == 0:  # actor unchanged: the deterministic evaluation would repeat the step-0 score
                run.record(step, run.curve[-1]["return"], run.curve[-1]["normalized_score"], "opt_collect", quiet=True)
        run.phase_done("opt_collect", t0, False)
        t0 = time.time()
        run.enter("opt_pretrain", a.opt_collect_steps)
        # pre-training of Q_on with the one-step meta objective; its targets move every policy_freq-th step
        step_fn = run.accel.update(functools.partial(opt_pretrain_update, nets.actor, nets.qf_on, nets.qf_on_target, nets.qf_on_opt,
                                                     inner_lr=a.opt_inner_lr, **td3_constants(a)))
        for step in tqdm(range(1, a.opt_pretrain_steps + 1), desc="opt pre-train", disable=None):
            run.metrics.add(step_fn(rb_offline.sample(a.batch_size), rb_online.sample_online(a.batch_size), step % a.policy_freq == 0))
            if step % a.log_every == 0:
                run.metrics.flush(a.opt_collect_steps + step, "opt pre-training")
        run.metrics.flush(a.opt_collect_steps + a.opt_pretrain_steps, "opt pre-training")
        run.checkpoint("opt_pretrained", nets, key, {"replay": rb_online.state(), "collect_curve": run.curve[n0:]}, None)
    run.phase_done("opt_pretrained", t0, saved is not None)
    diagnose(run, nets, "opt_pretrained")
    run.loop["global_step"] = a.opt_collect_steps
    run.enter("online", a.opt_collect_steps)
    return runner


def run_opt(run: Run, nets: OPTNets, rb_offline: ReplayBuffer) -> bool:
    """OPT (docs/algorithms.md, section 6): collect with the frozen actor and meta-pre-train Q_on (run_opt_pretraining),
    then kappa-weighted fine-tuning of both critics. The buffers hold raw rewards (Q_on learns from scratch); Q_off's
    update applies the checkpoint's transform. A killed run resumes from online.pt. Returns False when --stop-after
    stopped it."""
    a, d = run.args, run.defaults
    rb_online = OnlineReplay(rb_offline, run.data, a.buffer_mode, a.online_steps, a.part_trajectories, a.opt_balanced_replay, run.device)
    runner = None if resume_online(run, nets, rb_online) else run_opt_pretraining(run, nets, rb_offline, rb_online)
    if runner is None:
        runner = EnvRunner(run.data["env_spec"], a.seed + run.loop["global_step"], run.obs_mean, run.obs_std, run.rewards["qf_on"], run.device,
                           run.loop["env_rng"])
    t0 = time.time()
    off_rt = run.rewards["qf"]
    step_fn = run.accel.update(functools.partial(opt_finetune_update, nets.actor, nets.actor_target, nets.qf, nets.qf_target, nets.qf_on,
                                                 nets.qf_on_target, nets.qf_opt, nets.qf_on_opt, nets.actor_opt,
                                                 off_reward_scale=off_rt["scale"], off_reward_shift=off_rt["shift"], **td3_constants(a)))
    kappa = run.accel.scalar(d["kappa_start"])  # refilled every step, like the O2TD3 threshold

    def update(b: dict[str, Tensor], global_step: int, update_actor: bool) -> dict[str, Tensor]:
        kappa.fill_(kappa_schedule(global_step, d["kappa_start"], d["kappa_end"], a.kappa_begin, a.kappa_finish))
        out = step_fn(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], kappa, update_actor)
        if a.opt_balanced_replay:  # balanced replay: priorities of this batch refreshed, density-ratio network trained, every update
            run.metrics.add(balanced_replay_update(nets.ratio, nets.ratio_opt, rb_online, b, temperature=a.ratio_temperature))
        return out

    def after_step(global_step: int) -> None:
        if global_step % a.log_every == 0:
            run.writer.add_scalar("charts/kappa", kappa_schedule(global_step, d["kappa_start"], d["kappa_end"], a.kappa_begin, a.kappa_finish),
                                  global_step)

    early = [a.opt_collect_steps + s for s in early_eval_steps(a.online_steps - a.opt_collect_steps, a.early_evals)]  # from the first update on
    ok = online_loop(run, nets, None, rb_online, runner, update, "online", d["explore_noise"], a.opt_utd, 0, after_step, early)
    runner.close()
    run.phase_done("online", t0, False)
    return ok


def online_loop(run: Run, nets: O2TD3Nets | OPTNets, actor_ref: nn.Module | None, rb_online: OnlineReplay, runner: EnvRunner,
                update: Callable[[dict, int, bool], dict], phase: str, sigma: float, utd: int, learning_starts: int,
                after_step: Callable[[int], None] | None = None, early: Sequence[int] = ()) -> bool:
    """The env loop shared by O2TD3, naive and OPT fine-tuning: act, store, `utd` updates, log, evaluate, checkpoint.
    run.loop is its resumable state (global_step, n_updates, best, n_evals). Evaluations come every --eval-every env
    steps and at the `early` steps (--early-evals); both are reference-update points of --reference best for
    `actor_ref` (None: OPT has no reference), only the former count for --reference interval. Returns False when
    --stop-after hit."""
    a, st, actor = run.args, run.loop, nets.actor
    early = set(early)
    t0, s0 = time.time(), st["global_step"]
    if not any(p["phase"] == "online" for p in run.curve):  # where online learning starts (OPT: after its collection steps)
        run.curve.append({**run.curve[-1], "step": st["global_step"], "phase": "online"})  # the policy's last score
    bar = tqdm(range(st["global_step"] + 1, a.online_steps + 1), desc=phase, initial=st["global_step"], total=a.online_steps, disable=None)
    for global_step in bar:
        transition, ep_ret = runner.step(actor, sigma)
        rb_online.add(*transition)
        if ep_ret is not None:
            run.writer.add_scalar("charts/episodic_return", ep_ret, global_step)
        if global_step >= learning_starts:
            for _ in range(utd):
                st["n_updates"] += 1
                run.metrics.add(update(rb_online.sample(a.batch_size), global_step, st["n_updates"] % a.policy_freq == 0))
        if after_step is not None:
            after_step(global_step)
        st["global_step"] = global_step
        if global_step % a.log_every == 0:
            run.metrics.flush(global_step, phase)
            run.writer.add_scalar("charts/SPS", (global_step - s0) / max(time.time() - t0, 1e-9), global_step)
        regular = global_step % a.eval_every == 0 or global_step == a.online_steps  # the last step is always evaluated
        if regular or global_step in early:
            ret, score = run.evaluate(actor, headline=global_step <= a.online_steps / 10 or global_step == a.online_steps)
            st["n_evals"] += int(regular)
            run.record(global_step, ret, score, phase)
            atomic_save(run.results(False), run.out / "results.json")  # progress so far
            bar.set_postfix(score=f"{score:.1f}")
            if actor_ref is not None:  # the reference update (docs/algorithms.md, section 3.5)
                if a.reference == "best" and score > st["best"]:
                    actor_ref.load_state_dict(actor.state_dict())
                elif a.reference == "interval" and regular and st["n_evals"] % a.reference_interval == 0:
                    actor_ref.load_state_dict(actor.state_dict())
            st["best"] = max(st["best"], score)
        # online.pt at the first episode end --checkpoint-every env steps after the last one (and at the last step): a
        # resumed run redraws the next episode start from the env's saved random state and is the uninterrupted run
        if (ep_ret is not None and global_step - st["ckpt_step"] >= a.checkpoint_every) or global_step == a.online_steps:
            st["ckpt_step"], st["env_rng"] = global_step, runner.env_rng if ep_ret is not None else None
            run.checkpoint("online", nets, run.key, {"loop": dict(st), "curve": run.curve, "phases": run.phases, "diagnostics": run.diagnostics,
                                                     "replay": rb_online.state(), "evaluation_s": run.evaluator.seconds},
                           run.curve[-1]["normalized_score"])
        if a.stop_after is not None and global_step >= a.stop_after:
            bar.close()
            return False
    bar.close()
    run.metrics.flush(a.online_steps, phase)
    return True


def resume_online(run: Run, nets: O2TD3Nets | OPTNets, rb_online: OnlineReplay) -> bool:
    """Continue a killed run from online.pt (same arguments up to RESUMABLE_CHANGES, checked by check_run_folder before
    any phase ran): online.pt was written at an episode end with the env's random state, so the run continues as the
    uninterrupted one would (bit for bit on CPU); from the last step of a finished run (possibly mid-episode) a longer
    budget starts a fresh episode. False: nothing to resume."""
    saved = run.online_state
    if saved is None:
        return False
    print(f"reusing {run.phase_path('online')} (pass --no-resume to recompute)")
    ts = run.restore(saved, nets)
    rb_online.load(ts["replay"])
    run.loop.update(ts["loop"])
    run.curve[:] = ts["curve"]
    run.phases.update({k: {**v, "reused": True} for k, v in ts["phases"].items() if k not in run.phases})
    run.evaluator.seconds += ts.get("evaluation_s", 0.0)
    run.diagnostics.update({k: v for k, v in ts.get("diagnostics", {}).items() if k not in run.diagnostics})  # OPT: after pre-training
    print(f"resuming the online phase at env step {run.loop['global_step']}")
    return True


def main(args: Args) -> dict:
    check_tracking(args)
    given = args
    check_learning_rates(given)  # as given: --budget-scale divides the Lagrange multiplier's
    args = with_budget_scale(with_mode_defaults(args))  # --online-steps: the mode's budget unless given; then --budget-scale
    validate(args)
    device = pick_device(args.device)
    accel = Accel(device, args.compile, args.cudagraphs, args.bf16)  # bad flag combinations fail before any loading
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    defaults = resolve_defaults(args)
    args = dataclasses.replace(args, reference_interval=defaults["reference_interval"])  # the effective one, as the budgets
    out = run_folder(args)
    check_output_dir(out, "--run-dir")  # before the dataset is loaded: a bad folder fails in seconds
    ckpt_path = resolve_checkpoint(args)
    data = load_dataset(args.env, args.dataset_id, args.no_download)
    ckpt = load_checkpoint(ckpt_path, env_name=env_name(args), obs_dim=data["obs_dim"], act_dim=data["act_dim"])
    if not args.normalize_states and (ckpt["obs_mean"].any() or (ckpt["obs_std"] != 1).any()):
        fail(f"--no-normalize-states needs an offline actor trained on raw states, but {ckpt_path} ({ckpt['algo']}) normalises them; "
             f"pass --normalize-states or use a checkpoint without normalisation")
    offline_qf = critic_from_checkpoint(ckpt)
    if args.opt and offline_qf is None:
        fail(f"--opt needs the offline critic, but {ckpt_path} ({ckpt['algo']}) has none; use a checkpoint with one, e.g. "
             f"python offline_pretrain.py --algo td3_bc --env {args.env} --seed {args.seed}")
    rewards = reward_handling(args, ckpt, offline_qf is not None)
    # the run folder: a run of other settings is refused; an online.pt of the same settings is resumed
    online_state = check_run_folder(out, online_key(args, f"sha256:{file_digest(ckpt_path)}", rewards), args)
    if online_state is not None and online_state["train_state"]["loop"]["global_step"] > args.online_steps:
        fail(f"{out / 'online.pt'} is at env step {online_state['train_state']['loop']['global_step']} > --online-steps "
             f"{args.online_steps}; raise it or pass --no-resume")
    rb_offline = offline_buffer(args, data, ckpt, rewards, device)

    set_seed(args.seed)
    prepare_run_folder(out, args)
    atomic_save({**asdict(args), "resolved_defaults": defaults, "mode": mode_name(args), "offline_checkpoint": str(ckpt_path),
                 "reward_handling": rewards, "args_given": asdict(given)}, out / "args.json")  # the top level holds the effective (scaled) values
    tracker = start_tracking(args, asdict(given), out)  # before Run makes the SummaryWriter
    run = Run(args, out, ckpt, ckpt_path, data, device, accel, rewards, defaults, online_state)
    run.diag_obs, run.diag_actions = diagnostic_batch(rb_offline, args.seed)

    # --- the offline actor, and pi0 (copied exactly when deterministic or a same-sized Gaussian mean, distilled otherwise)
    t0 = time.time()
    offline_actor = actor_from_checkpoint(ckpt, device)
    run.enter("offline")
    ret, offline_score = run.evaluate(offline_actor, headline=True)
    run.record(0, ret, offline_score, "offline")
    run.phase_done("offline", t0, False)
    pi0, pi0_score = offline_actor, offline_score
    mean_net = mean_net_copy(offline_actor, ckpt) if args.copy_mean_net else None
    if mean_net is not None:  # the same deterministic actions as the offline actor's mean: its score, nothing to distil
        pi0, run.pi0_from = mean_net, "mean_network_copied"
        print(f"the {ckpt['actor_family']} actor's mean network copied exactly into the deterministic actor (--no-copy-mean-net: distil it)")
    elif ckpt["actor_family"] != "deterministic":
        pi0, run.distillation = run_distillation(run, offline_actor, rb_offline, phase_key(args, "distilled", run.source, rewards))
        run.pi0_from = "distilled"
        pi0_score = run.distillation["distilled_score"]
    pi0.requires_grad_(False)
    actor = copy.deepcopy(pi0).requires_grad_(True)
    actor_target = copy.deepcopy(actor)
    run.loop["best"] = pi0_score
    obs_dim, act_dim = data["obs_dim"], data["act_dim"]

    if args.opt:  # Q_off: the checkpoint's critic; Q_on: a new one
        qf, qf_on = offline_qf.to(device), new_critic(obs_dim, act_dim, args.critic_layer_norm).to(device)
        ratio = DensityRatio(obs_dim, act_dim).to(device) if args.opt_balanced_replay else None
        nets = OPTNets(pi0, actor, actor_target, qf, copy.deepcopy(qf), qf_on, copy.deepcopy(qf_on), accel.adam(qf.parameters(), args.critic_lr),
                       accel.adam(qf_on.parameters(), args.critic_lr), accel.adam(actor.parameters(), args.opt_actor_lr), ratio,
                       torch.optim.Adam(ratio.parameters(), lr=args.ratio_lr) if ratio is not None else None)  # eager, outside the compiled update
        diagnose(run, nets, "start")
        ok = run_opt(run, nets, rb_offline)
    else:  # the critic: re-evaluated into a new one, or (ablation) the offline one / scratch
        if not args.no_reevaluate or args.critic_init == "scratch" or offline_qf is None:
            if args.no_reevaluate and args.critic_init == "offline":
                print(f"NOTICE: {ckpt['algo']} checkpoint has no critic; the online critic starts from random init")
            qf = new_critic(obs_dim, act_dim, args.critic_layer_norm).to(device)
        else:
            qf = offline_qf.to(device)
        log_lam = nn.Parameter(torch.full((1,), math.log(args.lambda_init), device=device))
        nets = O2TD3Nets(pi0, actor, actor_target, copy.deepcopy(pi0), qf, copy.deepcopy(qf), accel.adam(qf.parameters(), args.critic_lr),
                         accel.adam(actor.parameters(), args.actor_lr), log_lam, accel.adam([log_lam], args.lambda_lr))  # lr / --budget-scale
        diagnose(run, nets, "start")
        if not args.no_reevaluate:
            run_reevaluation(run, nets, rb_offline, phase_key(args, "reevaluated", run.source, rewards))
            diagnose(run, nets, "reevaluated", agreement=True)
        if not args.no_align:
            aligned_score = run_alignment(run, nets, rb_offline, phase_key(args, "aligned", run.source, rewards))
            diagnose(run, nets, "aligned", agreement=True)
            # start from the aligned actor as reference only if it beats pi0 (docs/algorithms.md, section 3.4)
            if aligned_score > pi0_score and args.reference != "offline":
                nets.actor_ref.load_state_dict(nets.actor.state_dict())
                run.loop["best"] = aligned_score
        ok = run_online(run, nets, rb_offline)

    if ok:
        diagnose(run, nets, "end")
    else:  # --stop-after: as if killed; only online.pt (and the phases before it) is kept
        print(stop_notice(run.loop["global_step"], run.loop["ckpt_step"] if run.phase_path("online").exists() else None))
    result = run.results(ok)
    if ok:
        run.checkpoint("final", nets, run.key, {}, run.curve[-1]["normalized_score"])
        atomic_save(result, out / "results.json")
        print(f"o2o_td3 ({result['method']}) on {args.env}: offline {result['offline_score']:.1f} -> start of online "
              f"{result['online_start_score']:.1f} -> final {result['final_score']:.1f} (min over first tenth {result['min_first_tenth']:.1f}); "
              f"outputs in {out}")
    run.close()
    finish_tracking(tracker)
    return result


# ==================== INFRASTRUCTURE ====================
# ---------------------------------------------------------------- budgets, validation, run folder and checkpoint paths
CHECKPOINT_EVERY = 10_000  # the longest default interval of online.pt (env steps, before --budget-scale)


def with_mode_defaults(args: Args) -> Args:
    """A copy of args with the fields whose default depends on the dataset family and the mode filled in (FAMILY_FIELDS
    left at None, from FAMILY_DEFAULTS; --online-steps: the mode's budget, OCR-CFT 100k (200k on AntMaze), OPT 300k with
    its collection); the Args given are never mutated (no __post_init__ magic): main works on the resolved copy."""
    missing = [k for k in FAMILY_FIELDS if getattr(args, k) is None]
    if not missing:
        return args
    row = family_row(args)[2]
    row["online_steps"] = row["online_steps"]["opt" if args.opt else "o2td3"]
    return dataclasses.replace(args, **{k: row[k] for k in missing})


# Every step count --budget-scale multiplies (--checkpoint-every is scaled with --eval-every, see with_budget_scale).
BUDGET_FIELDS = ("reevaluate_steps", "align_steps", "online_steps", "learning_starts", "constraint_horizon", "eval_every",
                 "log_every", "align_eval_every", "stop_after", "opt_collect_steps", "opt_pretrain_steps", "kappa_begin", "kappa_finish")


def scale_steps(n: int, factor: float) -> int:
    """A step count times --budget-scale, rounded to an integer >= 1; 0 stays 0."""
    return 0 if n == 0 else max(1, round(n * factor))


def with_budget_scale(args: Args) -> Args:
    """A copy of args (after with_mode_defaults) with every step count of BUDGET_FIELDS multiplied by --budget-scale F
    (--constraint-horizon only with --scale-constraint-horizon),
    the Lagrange learning rate divided by F, and --align-eval-every resolved (default align_steps // 10, at least 1), as
    --checkpoint-every (default CHECKPOINT_EVERY scaled, at most online_steps // 10, at least 1).
    Adam moves log lambda by about lr per step: lr / F over F times the steps keeps the multiplier's reach."""
    args = with_mode_defaults(args)  # the family's budgets first (a no-op in main, which filled them already)
    f = args.budget_scale
    if not (math.isfinite(f) and f > 0):
        fail(f"--budget-scale must be a positive number, got {f}")
    changes: dict[str, Any] = {}
    if f != 1.0:
        fields = [k for k in BUDGET_FIELDS if k != "constraint_horizon" or args.scale_constraint_horizon]
        changes = {k: scale_steps(getattr(args, k), f) for k in fields
                   if getattr(args, k) is not None and getattr(args, k) >= 0}  # negatives are left for validate to reject
        if args.checkpoint_every is None:
            pass  # the default below, of the scaled budget
        elif args.eval_every > 0 and args.checkpoint_every % args.eval_every == 0:  # a multiple of --eval-every stays one
            changes["checkpoint_every"] = changes["eval_every"] * (args.checkpoint_every // args.eval_every)
        else:
            changes["checkpoint_every"] = scale_steps(args.checkpoint_every, f) if args.checkpoint_every >= 0 else args.checkpoint_every
        changes["lambda_lr"] = args.lambda_lr / f
    scaled = dataclasses.replace(args, **changes)
    if scaled.align_eval_every is None:
        scaled = dataclasses.replace(scaled, align_eval_every=max(1, scaled.align_steps // 10))
    if scaled.checkpoint_every is None and scaled.online_steps is not None:  # a killed short run keeps most of its online phase
        scaled = dataclasses.replace(scaled, checkpoint_every=min(scale_steps(CHECKPOINT_EVERY, f), max(1, scaled.online_steps // 10)))
    return scaled


def effective_budgets(args: Args) -> dict[str, Any]:
    """What results.json records of --budget-scale: the step counts and the Lagrange learning rate this run used."""
    return {k: getattr(args, k) for k in (*BUDGET_FIELDS, "checkpoint_every", "lambda_lr")}


def validate(args: Args) -> None:
    if args.offline_algo not in ("td3_bc", "cql", "iql", "bc"):
        fail(f"unknown --offline-algo {args.offline_algo!r}; known: td3_bc, cql, iql, bc")
    check_learning_rates(args)
    for flag in ("batch_size", "online_steps", "utd", "policy_freq", "eval_every", "eval_episodes", "log_every", "checkpoint_every",
                 "constraint_horizon", "part_trajectories", "opt_utd", "ratio_temperature"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("distill_steps", "learning_starts", "opt_pretrain_steps", "align_eval_every", "early_evals", "headline_eval_episodes"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not args.no_reevaluate and args.reevaluate_steps <= 0:
        fail(f"--reevaluate-steps must be positive, got {args.reevaluate_steps}; use --no-reevaluate to skip the phase")
    if not args.no_align and args.align_steps <= 0:
        fail(f"--align-steps must be positive, got {args.align_steps}; use --no-align to skip the phase")
    if args.batch_size < 2 and args.buffer_mode == "half":
        fail("--buffer-mode half needs --batch-size >= 2")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0 or not 0.0 < args.reevaluate_tau <= 1.0:
        fail("--gamma, --tau and --reevaluate-tau must lie in (0, 1]")
    if not (math.isfinite(args.reevaluate_tol) and args.reevaluate_tol >= 0):
        fail(f"--reevaluate-tol must be >= 0 (0 = run every --reevaluate-steps), got {args.reevaluate_tol}")
    if args.stop_after is not None and not 0 < args.stop_after < args.online_steps:
        fail(f"--stop-after must lie in (0, --online-steps={args.online_steps}), got {args.stop_after}")
    for flag in ("threads", "reference_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lambda_init <= 0:
        fail(f"--lambda-init must be positive, got {args.lambda_init}")
    if args.reward is not None:
        reward_affine(args.reward)
    d = resolve_defaults(args)  # also rejects an unknown --env
    if d["explore_noise"] < 0:
        fail(f"--explore-noise must be >= 0, got {d['explore_noise']}")
    if not 0 < d["eps0"] <= d["eps_end"]:
        fail(f"the threshold must loosen: need 0 < --eps0 ({d['eps0']}) <= --eps-end ({d['eps_end']})")
    if args.opt:
        if args.no_reevaluate or args.no_align or args.no_constraint:
            fail("--opt is its own pipeline (no re-evaluation, alignment or constraint); drop --no-reevaluate/--no-align/--no-constraint")
        if not 0 < args.opt_collect_steps < args.online_steps:
            fail(f"--opt-collect-steps ({args.opt_collect_steps}) must lie in (0, --online-steps={args.online_steps})")
        if args.stop_after is not None and args.stop_after <= args.opt_collect_steps:
            fail(f"--stop-after must exceed --opt-collect-steps ({args.opt_collect_steps}) with --opt")
        if not (0.0 <= d["kappa_start"] <= 1.0 and 0.0 <= d["kappa_end"] <= 1.0) or args.kappa_finish < args.kappa_begin:
            fail("kappa must lie in [0, 1] and --kappa-finish >= --kappa-begin")
    elif args.opt_balanced_replay:
        fail("--opt-balanced-replay belongs to --opt; add --opt or drop it")
    elif args.learning_starts >= args.online_steps:
        fail(f"--learning-starts {args.learning_starts} >= --online-steps {args.online_steps}: no update would happen")
    # no leading dot: `..` would leave <run_dir>/o2o_td3/<env>/, and a hidden folder hides the run
    if args.run_name is not None and not re.fullmatch(RUN_NAME_RE, args.run_name):
        fail(f"--run-name {args.run_name!r} may hold only letters, digits, '_', '.', '-' and may not start with '.'")
    if args.dataset_id is not None and not DATASET_ID_RE.match(args.dataset_id):
        fail(f"malformed dataset id {args.dataset_id!r}; Minari ids look like namespace/name-v0 (no part may start with '.')")


LEARNING_RATES = ("actor_lr", "critic_lr", "distill_lr", "lambda_lr", "opt_inner_lr", "opt_actor_lr", "ratio_lr")
RUN_NAME_RE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"


def check_learning_rates(args: Args) -> None:
    """Every learning rate positive and finite (`not x > 0` also catches NaN); main checks them as given, before
    --budget-scale divides the Lagrange multiplier's."""
    for flag in LEARNING_RATES:
        v = getattr(args, flag)
        if not v > 0.0 or not math.isfinite(v):
            fail(f"--{flag.replace('_', '-')} must be a positive finite number, got {v}")


def reward_handling(args: Args, ckpt: dict, has_offline_critic: bool) -> dict[str, dict]:
    """The reward transform each critic learns with. A critic learned from scratch (re-evaluation, alignment and
    fine-tuning of a new critic, OPT's Q_on) sees raw MuJoCo rewards, the scale OCR-CFT's thresholds and OPT were
    tuned for; only a critic kept from the checkpoint (naive / --critic-init offline, OPT's Q_off) keeps the offline
    method's transform, since its values are on that scale."""
    scale, shift = reward_affine(args.reward)
    raw = {"scale": 1.0, "shift": 0.0, "source": "raw"} if (scale, shift) == (1.0, 0.0) else {"scale": scale, "shift": shift,
                                                                                             "source": f"family ({args.reward})"}
    kept = {"scale": float(ckpt["reward_transform"]["scale"]), "shift": float(ckpt["reward_transform"]["shift"]),
            "source": f"checkpoint ({ckpt['algo']})"}
    if args.opt:
        return {"qf": kept, "qf_on": raw}
    keeps_offline_critic = args.no_reevaluate and args.critic_init == "offline" and has_offline_critic
    return {"qf": kept if keeps_offline_critic else raw}


def mode_name(args: Args) -> str:
    if args.opt:
        return "opt_balanced" if args.opt_balanced_replay else "opt"
    if args.no_reevaluate and args.no_align and args.no_constraint:
        return "naive"
    return "o2td3" + "".join(f"_no_{n}" for n in ("reevaluate", "align", "constraint") if getattr(args, f"no_{n}"))


def env_name(args: Args) -> str:
    """The dataset the run is keyed on: --dataset-id when given, else --env."""
    return args.env if args.dataset_id is None else args.dataset_id


def run_folder(args: Args) -> Path:
    """<run_dir>/o2o_td3/<env>/<run_name>, the run name defaulting to <mode>__<offline_algo>__seed<k>."""
    return (Path(args.run_dir) / "o2o_td3" / env_name(args).replace("/", "_")
            / (args.run_name or f"{mode_name(args)}__{args.offline_algo}__seed{args.seed}"))


def offline_buffer(args: Args, data: dict, ckpt: dict, rewards: dict, device: torch.device) -> ReplayBuffer:
    """The offline data on the device, normalised with the checkpoint's statistics, rewards through the transform the
    buffers store (OPT: raw; Q_off's transform is applied in its update); then the online replay (OnlineReplay: with
    --buffer-mode all / part the offline part first; balanced replay: a priority per transition) and a batch are
    allocated once, before any phase runs: a size no memory holds exits 2 with the flag to lower."""
    rt = rewards["qf_on" if args.opt else "qf"]
    try:
        rb_offline = ReplayBuffer.from_dataset(data, ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy(), device, rt["scale"], rt["shift"])
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"the dataset's {len(data['rewards'])} transitions do not fit in the memory of {device}; use another --device or a smaller dataset")
    n_pre = 0 if args.opt_balanced_replay else {"all": rb_offline.size, "part": len(top_trajectories(data, args.part_trajectories))}.get(args.buffer_mode, 0)
    capacity, row = n_pre + args.online_steps, 2 * data["obs_dim"] + data["act_dim"] + 2  # obs, action, reward, next obs, terminal
    buffer = f"--online-steps {args.online_steps}: a replay buffer of {capacity} transitions" + (
        f" ({n_pre} of them offline data, --buffer-mode {args.buffer_mode})" if n_pre else "")
    lower = "lower --online-steps" + (" or use --buffer-mode half" if n_pre else "")
    priorities = [(rb_offline.size + capacity, 1, buffer + " and its priorities", lower)] if args.opt_balanced_replay else []
    check_allocations([(capacity, row, buffer, lower), *priorities, (args.batch_size, row, f"a batch of --batch-size {args.batch_size}", "lower it")],
                      device)
    return rb_offline


def critic_config_of(qf: Critic) -> dict:
    hidden = [m.weight.shape[-1] for m in qf.net if isinstance(m, EnsembleLinear)][:-1]
    return {"hidden": hidden, "layer_norm": any(isinstance(m, EnsembleLayerNorm) for m in qf.net)}


def critic_from_checkpoint(ckpt: dict) -> Critic | None:
    """The checkpoint's twin Q critic in its own architecture, or None when it has none."""
    critics, cfg = ckpt.get("critics") or {}, ckpt.get("critic_config") or {}
    if "qf" not in critics or not cfg.get("hidden"):
        return None
    qf = Critic(ckpt["obs_dim"], ckpt["act_dim"], cfg["hidden"], n=2, layer_norm=bool(cfg.get("layer_norm", False)))
    try:
        qf.load_state_dict(critics["qf"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict's message spans lines
        fail(f"the checkpoint's critic weights do not match its critic_config ({reason}); the file is damaged or was edited; "
             f"retrain it with offline_pretrain.py or pass another checkpoint")
    return qf


# ---------------------------------------------------------------- what each saved phase depends on
PHASE_FORMAT = 3  # the layout of phase, online and final checkpoints (2: pi0 and the RNG states of the shared phases block; 3: re-evaluation stops after two consecutive converged readings)
PHASE_FIELDS: dict[str, tuple[str, ...]] = {
    "distilled": ("env", "dataset_id", "seed", "offline_algo", "checkpoint", "distill_steps", "distill_lr", "copy_mean_net", "batch_size",
                  "device"),
    "reevaluated": ("no_reevaluate", "reevaluate_steps", "reevaluate_tau", "reevaluate_tol", "critic_init", "gamma", "tau", "critic_lr",
                    "policy_noise", "noise_clip", "critic_layer_norm"),
    "aligned": ("no_align", "align_steps", "align_beta", "align_max_distance", "actor_lr", "align_actor"),
    "opt_pretrained": ("opt", "gamma", "tau", "critic_lr", "policy_noise", "noise_clip", "critic_layer_norm", "opt_collect_steps", "opt_pretrain_steps",
                       "opt_inner_lr", "explore_noise", "eval_every", "buffer_mode", "part_trajectories", "opt_balanced_replay"),
}
# fields a resumed online phase may change: the budget, when to stop, logging and checkpoint cadence, the speed flags,
# where the outputs go
RESUMABLE_CHANGES = ("online_steps", "stop_after", "no_resume", "overwrite", "log_every", "checkpoint_every", "align_eval_every",
                     "compile", "cudagraphs", "bf16", "threads", "run_dir", "run_name", "track", "wandb_project_name", "wandb_entity")


def phase_key(args: Args, phase: str, source: str, rewards: dict) -> dict:
    """What a phase result depends on: reused only when this matches (the phases before it included, and the reward
    handling of the critics)."""
    order = ["distilled", "reevaluated", "aligned"] if phase != "opt_pretrained" else ["distilled", "opt_pretrained"]
    key = {"source": source, "rewards": rewards, "phase_format": PHASE_FORMAT}
    for p in order[: order.index(phase) + 1]:
        key.update({f: getattr(args, f) for f in PHASE_FIELDS[p]})
    return key


def online_key(args: Args, source: str, rewards: dict) -> dict:
    return {"source": source, "rewards": rewards, "phase_format": PHASE_FORMAT,
            **{k: v for k, v in asdict(args).items() if k not in RESUMABLE_CHANGES}}


# ---------------------------------------------------------------- the run folder (the same rules in o2o_sac.py, o2o_td3.py, o2o_ppo.py)
# A run folder is never taken over silently; what it holds is checked before anything is computed or written. A
# finished run (final.pt) of other settings is refused unless --overwrite; an unfinished one (online.pt) of other
# settings is refused unless --no-resume (its online phase starts afresh) or --overwrite; a run of the same settings
# resumes (a finished one: extended to a larger --online-steps); a saved phase of other settings is recomputed with a
# notice. The settings are the online key: every argument that changes what the run computes, and the offline
# checkpoint's content.
RUN_OUTPUTS = ("args.json", "results.json", "final.pt", "online.pt", "distilled.pt", "reevaluated.pt", "aligned.pt", "opt_pretrained.pt")
KEY_WORDS = {"source": "another offline checkpoint (its content differs)", "rewards": "the reward handling of the critics",
             "phase_format": "an older format of the saved phases"}


class Run:
    """The run context: the outputs of one run (folder, tensorboard writer and metrics, evaluator, curve, phase
    wall-clock, diagnostics), the state of its online env loop, and its checkpoints."""

    def __init__(self, args: Args, out: Path, ckpt: dict, ckpt_path: Path, data: dict, device: torch.device, accel: Accel, rewards: dict,
                 defaults: dict, online_state: dict | None):
        self.args, self.out, self.ckpt, self.ckpt_path, self.data, self.device, self.accel = args, out, ckpt, ckpt_path, data, device, accel
        self.rewards = rewards  # reward transform of each critic (reward_handling)
        self.defaults = defaults  # exploration sigma, thresholds, kappa, reference interval (resolve_defaults)
        # phases are keyed on the checkpoint's content, not its path: retraining at the same path invalidates them
        self.source = f"sha256:{file_digest(ckpt_path)}"
        self.key = online_key(args, self.source, rewards)  # the settings of online.pt and final.pt
        self.obs_mean, self.obs_std = ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy()
        self.writer = SummaryWriter(str(out))
        self.metrics = Metrics(self.writer)
        self.evaluator = Evaluator(data["env_spec"], max(args.eval_episodes, args.headline_eval_episodes), args.seed + 100, self.obs_mean,
                                   self.obs_std, device)
        self.curve: list[dict] = []
        self.phases: dict[str, dict] = {}
        self.diagnostics: dict[str, dict[str, float]] = {}  # boundary -> statistics (diagnose)
        self.diag_obs: Tensor | None = None  # the fixed dataset states (and their actions) every diagnostic reads
        self.diag_actions: Tensor | None = None
        self.distillation: dict | None = None  # how distillation ended (run_distillation); None for a deterministic offline actor
        self.pi0_from = "copied"  # how pi0 was made from the offline actor: copied | mean_network_copied | distilled
        self.reevaluation: dict | None = None  # how re-evaluation ended (run_reevaluation); None when it is skipped
        self.online_state = online_state  # the online.pt to resume (check_run_folder); None: the online phase starts afresh
        # the resumable state of the online env loop (online_loop); best: the best score so far (--reference best)
        self.loop: dict[str, Any] = {"global_step": 0, "n_updates": 0, "n_evals": 0, "best": -math.inf, "ckpt_step": 0, "env_rng": None}
        self.writer.add_text("args", json.dumps(asdict(args)))
        self.writer.add_text("dataset", f"{','.join(data['dataset_ids'])} (local stand-in: {data['local_standin']})")

    def evaluate(self, actor: nn.Module, headline: bool = False) -> tuple[float, float]:
        """Mean return and normalised score over --eval-episodes episodes, or --headline-eval-episodes for a headline."""
        was_training = actor.training
        actor.eval()
        ret = float(self.evaluator(actor.act, None if headline else self.args.eval_episodes).mean())
        actor.train(was_training)
        return ret, float(normalized_score(ret, self.ckpt["ref_min_score"], self.ckpt["ref_max_score"]))

    def record(self, step: int, ret: float, score: float, phase: str, quiet: bool = False, tag: str = "eval") -> None:
        """One point of the curve; `tag` names its tensorboard scalars (align/...: on the alignment-step axis)."""
        self.curve.append({"step": step, "normalized_score": score, "return": ret, "phase": phase})
        self.writer.add_scalar(f"{tag}/normalized_score", score, step)
        self.writer.add_scalar(f"{tag}/episodic_return", ret, step)
        if not quiet:
            tqdm.write(f"[{phase}] step {step}: return {ret:.1f}, normalized score {score:.1f}")

    def phase_path(self, name: str) -> Path:
        return self.out / f"{name}.pt"

    def reuse(self, name: str, key: dict) -> dict | None:
        """The phase checkpoint <out>/<name>.pt of an earlier run with the same key, else None (load_phase)."""
        return load_phase(self.phase_path(name), key, self.args.no_resume)

    def restore(self, saved: dict, nets: Nets, names: Sequence[str] | None = None) -> dict:
        """A saved checkpoint's networks and optimisers (those in `names` when given) into `nets`, and the RNG states
        saved with it; returns its train_state."""
        ts = saved["train_state"]
        nets.load(ts, self.accel, names)
        set_rng_state(ts["rng"])
        return ts

    def checkpoint(self, name: str, nets: Nets, key: dict, extra: dict, score: float | None) -> dict:
        """Same format as an offline checkpoint (loadable by load_checkpoint), plus the training state."""
        c, actor, critics = self.ckpt, nets.actor, nets.critics()
        actor_ref, log_lam = nets.reference(), nets.log_lambda()
        ckpt = {
            "format_version": CHECKPOINT_FORMAT, "algo": "o2o_td3", "env_name": c["env_name"], "dataset_id": c["dataset_id"],
            "local_standin": self.data["local_standin"], "env_spec": c["env_spec"], "obs_dim": c["obs_dim"], "act_dim": c["act_dim"],
            "max_action": c["max_action"], "actor_family": "deterministic",
            "actor_config": {"hidden": [m.out_features for m in actor.net if isinstance(m, nn.Linear)][:-1]},
            "actor": state_dict_cpu(actor), "critics": {k: state_dict_cpu(q) for k, q in critics.items()} or None,
            "critic_config": critic_config_of(critics["qf"]) if critics else None,
            "obs_mean": c["obs_mean"], "obs_std": c["obs_std"],
            # the scale the saved critic qf was trained on (a naive run from this checkpoint keeps it); per critic below
            "reward_transform": {k: self.rewards["qf"][k] for k in ("scale", "shift")}, "reward_handling": self.rewards,
            "ref_min_score": c["ref_min_score"], "ref_max_score": c["ref_max_score"], "args": asdict(self.args), "grad_steps": c["grad_steps"],
            "eval_normalized_score": score, "phase": name, "phase_key": key, "source_checkpoint": self.source,
            "reference_actor": state_dict_cpu(actor_ref) if actor_ref is not None else None,
            "lagrange": {"log_lambda": log_lam.detach().cpu().clone()} if log_lam is not None else None,
            "train_state": {**nets.state(), "rng": rng_state(), **extra},
        }
        atomic_save(ckpt, self.phase_path(name))
        return ckpt

    def results(self, finished: bool) -> dict:
        """results.json so far (finished: the online phase ran to --online-steps)."""
        a = self.args
        start = next((p["normalized_score"] for p in self.curve if p["phase"] == "online"), self.curve[-1]["normalized_score"])
        return results_record(
            script="o2o_td3", algo="td3", method=method_name(not a.no_reevaluate, not a.no_align, not a.no_constraint, opt=a.opt),
            mode={"name": mode_name(a), "reevaluate": not a.no_reevaluate, "align": not a.no_align, "align_actor": a.align_actor,
                  "constraint": not a.no_constraint, "critic_init": a.critic_init, "reference": a.reference,
                  "buffer_mode": a.buffer_mode, "opt": a.opt, "opt_balanced_replay": a.opt_balanced_replay},
            env=a.env, data=self.data, seed=a.seed, offline_algo=self.ckpt["algo"], offline_checkpoint=self.ckpt_path, curve=self.curve,
            online_start_score=start, online_steps=a.online_steps, online_steps_done=self.loop["global_step"], budget_scale=a.budget_scale,
            wall_clock_s={k: v["wall_clock_s"] for k, v in self.phases.items()}, finished=finished, run_dir=self.out,
            evaluation_s=self.evaluator.seconds,
            offline_actor_family=self.ckpt["actor_family"], pi0_from=self.pi0_from, distillation=self.distillation, reevaluation=self.reevaluation,
            phases=self.phases, resolved_defaults=self.defaults, reward_handling=self.rewards, effective_budgets=effective_budgets(a),
            diagnostics=self.diagnostics)

    def enter(self, phase: str, env_step: int = 0) -> None:
        """charts/phase of a phase this run starts (log_phase); a resumed online phase logged its phases when it first
        started them."""
        if self.online_state is None:
            log_phase(self.writer, phase, env_step)

    def phase_done(self, name: str, t0: float, reused: bool) -> None:
        self.phases[name] = {"wall_clock_s": time.time() - t0, "reused": reused}

    def close(self) -> None:
        self.writer.close()
        self.evaluator.close()


# where diagnose() runs; tensorboard's diagnostics/* scalars use the index here as their step
BOUNDARIES = ("start", "reevaluated", "aligned", "opt_pretrained", "end")
DIAG_STATES, DIAG_SAMPLES = 2048, 16  # dataset states the diagnostics read; perturbed actions per state for the agreement


def diagnostic_batch(rb_offline: ReplayBuffer, seed: int, n: int = DIAG_STATES) -> tuple[Tensor, Tensor]:
    """A fixed set of dataset (s, a), drawn once with the run's seed from its own generator (the run's RNG stream,
    and so its training, is untouched)."""
    idx = torch.randperm(rb_offline.size, generator=torch.Generator().manual_seed(seed))[:n].to(rb_offline.device)
    return rb_offline.data["obs"][idx], rb_offline.data["actions"][idx]


@torch.no_grad()
def diagnose(run: Run, nets: O2TD3Nets | OPTNets, boundary: str, agreement: bool = False) -> dict[str, float]:
    """Statistics at a phase boundary on the fixed dataset states: q_{data,pi}_{mean,std} (min-over-critics Q on the
    dataset action and on pi(s); q_on_... for OPT's Q_on), the actor's mean |action| and saturation, and with
    `agreement` policy_critic_agreement of the critic with pi0 (perturbations N(0, policy_noise^2), clipped, drawn from
    a generator seeded with the run's seed: the same at every boundary). To results.json and diagnostics/*."""
    obs, actions, max_action = run.diag_obs, run.diag_actions, float(run.ckpt["max_action"])
    assert obs is not None and actions is not None
    pi = nets.actor(obs)
    out = actor_stats(pi, max_action)
    for name, qf in nets.critics().items():
        prefix = "q" if name == "qf" else "q_on"
        for where, a in (("data", actions), ("pi", pi)):
            out.update({f"{prefix}_{where}_{k}": v for k, v in q_stats(qf(obs, a)).items()})
    if agreement:
        a0 = nets.pi0(obs)
        gen = torch.Generator(device=obs.device).manual_seed(run.args.seed)
        noise = torch.randn((DIAG_SAMPLES, *a0.shape), generator=gen, device=obs.device) * run.args.policy_noise
        samples = (a0 + noise).clamp(-max_action, max_action)
        q_samples = nets.qf(obs.expand(DIAG_SAMPLES, *obs.shape).reshape(-1, obs.shape[-1]), samples.reshape(-1, a0.shape[-1]))
        out.update(policy_critic_agreement(nets.qf(obs, a0).min(0).values, q_samples.min(0).values.reshape(DIAG_SAMPLES, -1),
                                           ((samples - a0) ** 2).sum(-1)))
    run.diagnostics[boundary] = out
    for k, v in out.items():
        run.writer.add_scalar(f"diagnostics/{k}", v, BOUNDARIES.index(boundary))
    return out


# ---------------------------------------------------------------- replay and the training environment
def top_trajectories(data: dict, k: int) -> np.ndarray:
    """Indices of the transitions of the k highest-return offline episodes (--buffer-mode part)."""
    episode = np.concatenate([[0], np.cumsum(data["ends"])[:-1]]).astype(np.int64)  # episode index of each transition
    top = np.argsort(-data["episode_returns"], kind="stable")[:k]
    return np.flatnonzero(np.isin(episode, top))


class OnlineReplay:
    """The online buffer plus the offline data, sampled per --buffer-mode (or by density ratio for balanced replay).

    Offline-prefilled modes (all, part) put the offline transitions first; only the online slice after them is
    checkpointed, the prefix is rebuilt from the dataset on resume.

    Balanced replay keeps one priority per stored transition, offline ones first, then online ones; a batch is drawn
    proportionally to them (an exact cumulative sum, float64 so small priorities keep their share). As in prioritised
    replay, a new transition enters with the largest priority stored, so it can be drawn at once; the update that
    draws it then sets its priority from the density ratio (`balanced_replay_update`)."""

    def __init__(self, offline: ReplayBuffer, data: dict, mode: str, capacity: int, part_trajectories: int, balanced: bool, device: torch.device):
        self.offline, self.mode, self.balanced = offline, "balanced" if balanced else mode, balanced
        prefill: dict[str, Tensor] = {}
        if self.mode == "all":
            prefill = {k: v[: offline.size] for k, v in offline.data.items()}
        elif self.mode == "part":
            idx = torch.as_tensor(top_trajectories(data, part_trajectories), device=device)
            prefill = {k: v[idx] for k, v in offline.data.items()}
        self.prefill = len(prefill["rewards"]) if prefill else 0
        self.online = ReplayBuffer(data["obs_dim"], data["act_dim"], self.prefill + capacity, device)
        if prefill:
            self.online.add(prefill["obs"], prefill["actions"], prefill["rewards"], prefill["next_obs"], prefill["terminals"])
        self.n_off = offline.size
        self.priority = torch.ones(self.n_off + self.online.capacity, device=device) if balanced else None

    @property
    def n_online(self) -> int:
        return self.online.size - self.prefill

    def add(self, obs: Tensor, actions: Tensor, rewards: Tensor, next_obs: Tensor, terminals: Tensor) -> None:
        if self.priority is not None:  # new transitions: the largest stored priority (no host sync)
            idx = self.n_off + (torch.arange(len(rewards), device=self.priority.device) + self.online.ptr) % self.online.capacity
            self.priority[idx] = self.priority[: self.n_off + self.online.size].max()
        self.online.add(obs, actions, rewards, next_obs, terminals)

    def sample_online(self, batch_size: int) -> dict[str, Tensor]:
        """Online transitions only (never the offline prefix of --buffer-mode all/part)."""
        idx = self.prefill + torch.randint(self.n_online, (batch_size,), device=self.online.device)
        return {k: v[idx] for k, v in self.online.data.items()}

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        if self.mode == "half":  # half online, half offline (docs/algorithms.md, section 3.5)
            on, off = self.online.sample(batch_size // 2), self.offline.sample(batch_size - batch_size // 2)
            return {k: torch.cat([on[k], off[k]]) for k in on}
        if self.mode == "balanced":
            return self._sample_balanced(batch_size)
        return self.online.sample(batch_size)

    def _sample_balanced(self, batch_size: int) -> dict[str, Tensor]:
        """A batch drawn proportionally to the priorities; "idx" (offline first, then online) lets the update set them."""
        assert self.priority is not None
        cdf = torch.cumsum(self.priority[: self.n_off + self.online.size].double(), 0)
        u = torch.rand(batch_size, device=cdf.device, dtype=torch.float64) * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1)
        from_off = idx < self.n_off
        off_idx, on_idx = idx.clamp(max=self.n_off - 1), (idx - self.n_off).clamp(min=0)
        out = {}
        for k in self.online.data:
            off_v, on_v = self.offline.data[k][off_idx], self.online.data[k][on_idx]
            mask = from_off.view(-1, *([1] * (off_v.dim() - 1)))
            out[k] = torch.where(mask, off_v, on_v)
        out["idx"] = idx
        return out

    def set_priorities(self, idx: Tensor, priority: Tensor) -> None:
        assert self.priority is not None
        self.priority[idx] = priority.detach().to(self.priority.dtype)

    def state(self) -> dict[str, Tensor]:
        out = {k: v[self.prefill: self.online.size].cpu().clone() for k, v in self.online.data.items()}
        if self.priority is not None:
            out["priority"] = self.priority[: self.n_off + self.online.size].cpu().clone()
        return out

    def load(self, state: dict[str, Tensor]) -> None:
        if len(state["rewards"]):
            self.add(state["obs"], state["actions"], state["rewards"], state["next_obs"], state["terminals"])
        if self.priority is not None and "priority" in state:
            self.priority[: len(state["priority"])] = state["priority"].to(self.priority.device)


class EnvRunner:
    """The training environment: one step of pi(s) + N(0, sigma^2), clipped; returns the transition as device tensors.
    The EXECUTED (noisy, clipped) action is what the buffer stores (docs/algorithms.md, section 7)."""

    def __init__(self, env_spec: str, seed: int, obs_mean: np.ndarray, obs_std: np.ndarray, reward_transform: dict, device: torch.device,
                 env_rng: str | None = None):
        self.env = make_env(env_spec)
        self.env.action_space.seed(seed)
        self.obs, _ = self.env.reset(seed=seed)
        if env_rng is not None:  # a resumed run: the episode start the interrupted run drew next
            self.env.unwrapped.np_random.bit_generator.state = json.loads(env_rng)
            self.obs, _ = self.env.reset()
        self.env_rng: str | None = None  # the env's random state before the last episode's reset (set at episode ends)
        self.mean = torch.as_tensor(obs_mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(obs_std, dtype=torch.float32, device=device)
        self.scale, self.shift = float(reward_transform["scale"]), float(reward_transform["shift"])
        self.low, self.high = float(self.env.action_space.low.max()), float(self.env.action_space.high.min())
        self.device, self.ep_return, self.ep_len = device, 0.0, 0

    def normalize(self, obs: np.ndarray) -> Tensor:
        return (torch.as_tensor(obs, dtype=torch.float32, device=self.device) - self.mean) / self.std

    @torch.no_grad()
    def step(self, actor: nn.Module, sigma: float) -> tuple[tuple[Tensor, ...], float | None]:
        o = self.normalize(self.obs).unsqueeze(0)
        a = actor(o)
        a = (a + sigma * torch.randn_like(a)).clamp(self.low, self.high)
        next_obs, r, term, trunc, _ = self.env.step(a[0].cpu().numpy())
        # termination vs truncation: only a true termination stops the bootstrap
        transition = (o, a, torch.tensor([r * self.scale + self.shift], device=self.device), self.normalize(next_obs).unsqueeze(0),
                      torch.tensor([float(term)], device=self.device))
        self.ep_return += float(r)
        self.ep_len += 1
        finished = None
        if term or trunc:
            finished = self.ep_return
            self.ep_return, self.ep_len = 0.0, 0
            self.env_rng = json.dumps(self.env.unwrapped.np_random.bit_generator.state)
            self.obs, _ = self.env.reset()
        else:
            self.obs = next_obs
        return transition, finished

    def close(self) -> None:
        self.env.close()


# --- shared: utils ---
def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr that names the fix, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name} asked for, but CUDA is not available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        fail(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def file_mode() -> int:
    """The mode a plain new file gets here: 0666 less the umask (mkstemp's 0600 would hide results from collaborators).
    os.umask can only be read by setting it; it is put back at once (no thread of these scripts creates files meanwhile)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file. The file
    gets the mode any new file would get (the umask decides), not mkstemp's owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".json":
            Path(tmp).write_text(json.dumps(obj, indent=2, default=float))
        else:
            torch.save(obj, tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
def state_dict_cpu(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation (host or device), as opposed to any other error."""
    text = str(e).lower()
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text or "not enough memory" in text))


def check_output_dir(path: str | Path, flag: str) -> None:
    """Exit 2 unless `path` is a folder this process can write in, or can be created as one; creates nothing.
    os.access is no answer (root passes it even on a read-only mount), so the nearest existing folder is tried
    with a temporary folder, removed at once."""
    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{flag}: {probe} is a file, so {target} cannot be a folder; pass a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-test-"))
    except OSError as e:
        fail(f"{flag}: {probe} is not writable ({e.strerror}); pass a folder you can write to")


def parse_cli(cls: type) -> Any:
    """tyro.cli(cls) whose parse errors (a float for an int, an unknown flag or choice) are one line on stderr and
    exit 2, like every other bad input, instead of tyro's multi-line box; --help prints as usual."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            args = tyro.cli(cls)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stderr.write(buf.getvalue())
            raise
        # parse again with a wide "terminal" so the box does not wrap the message, then keep its first section
        wide, cols = io.StringIO(), os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100000"
        try:
            with contextlib.redirect_stderr(wide):
                tyro.cli(cls)
        except SystemExit:
            pass
        finally:
            if cols is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = cols
        fail(one_line_parse_error(wide.getvalue() or buf.getvalue(), Path(sys.argv[0]).name))
    sys.stderr.write(buf.getvalue())
    return args


def one_line_parse_error(box: str, prog: str) -> str:
    """The message of tyro's error box (its first section) and its first "Perhaps you meant" flag, on one line."""
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip().strip("│╭╮╰╯").strip() for line in box.splitlines()]
    sections: list[list[str]] = [[]]
    for row in rows[1:]:  # rows[0] is the box's title bar
        if row and set(row) <= set("─"):
            sections.append([])
        elif row:
            sections[-1].append(row)
    message = " ".join(sections[0]) or " ".join(r for r in rows if r and not set(r) <= set("─╭╮╰╯")) or "bad command line"
    hint = ""
    for sec in sections[1:]:
        if sec and sec[0].startswith("Perhaps you meant") and len(sec) > 1:
            hint = f" (did you mean {sec[1].split()[0]}?)"
    return f"{message.rstrip('.')}{hint}; see {prog} --help"
# --- end shared: utils ---


# --- shared: networks ---
def fp32(x: Tensor) -> Tensor:
    """Network outputs leave bf16 autocast as float32, so losses and log-probs are always computed in float32."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), act()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def tanh_gaussian_log_prob(mu: Tensor, log_std: Tensor, pre_tanh: Tensor) -> Tensor:
    """log pi(a|s) of a = tanh(u), u ~ N(mu, std), with the change-of-variables term, summed over action dims."""
    normal_lp = -0.5 * ((pre_tanh - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    # log(1 - tanh(u)^2) computed stably as 2 (log 2 - u - softplus(-2u))
    correction = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (normal_lp - correction).sum(-1)


class TanhGaussianActor(nn.Module):
    """SAC/CQL actor: a = max_action * tanh(u), u ~ N(mu(s), exp(log_std(s))^2)."""

    family = "tanh_gaussian"

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256, 256), max_action: float = 1.0):
        super().__init__()
        self.net = mlp(obs_dim, hidden[:-1], hidden[-1])
        self.head = nn.Linear(hidden[-1], 2 * act_dim)
        self.max_action = max_action

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_std = fp32(self.head(F.relu(self.net(obs)))).chunk(2, dim=-1)
        return mu, log_std.clamp(-20.0, 2.0)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised action and its log-prob."""
        mu, log_std = self(obs)
        u = mu + log_std.exp() * torch.randn_like(mu)
        return self.max_action * torch.tanh(u), tanh_gaussian_log_prob(mu, log_std, u)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        mu, log_std = self(obs)
        a = (action / self.max_action).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        return tanh_gaussian_log_prob(mu, log_std, torch.atanh(a))

    def act(self, obs: Tensor) -> Tensor:
        """Deterministic action: the mode tanh(mu)."""
        return self.max_action * torch.tanh(self(obs)[0])


class GaussianActor(nn.Module):
    """IQL/PPO actor: N(tanh-squashed mean(s), exp(log_std)^2) with a state-independent log_std."""

    family = "gaussian"

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), max_action: float = 1.0):
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.max_action = max_action

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.max_action * torch.tanh(fp32(self.net(obs)))
        return mu, self.log_std.clamp(-20.0, 2.0).expand_as(mu)

    def dist(self, obs: Tensor) -> torch.distributions.Normal:
        mu, log_std = self(obs)
        return torch.distributions.Normal(mu, log_std.exp(), validate_args=False)  # validation would sync the host

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        d = self.dist(obs)
        a = d.rsample()
        return a, d.log_prob(a).sum(-1)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.dist(obs).log_prob(action).sum(-1)

    def act(self, obs: Tensor) -> Tensor:
        return self(obs)[0]


class DeterministicActor(nn.Module):
    """TD3 actor: a = max_action * tanh(f(s))."""

    family = "deterministic"

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), max_action: float = 1.0):
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.max_action = max_action

    def forward(self, obs: Tensor) -> Tensor:
        return self.max_action * torch.tanh(fp32(self.net(obs)))

    def act(self, obs: Tensor) -> Tensor:
        return self(obs)


ACTOR_FAMILIES: dict[str, type[nn.Module]] = {
    "tanh_gaussian": TanhGaussianActor,
    "gaussian": GaussianActor,
    "deterministic": DeterministicActor,
}


def build_actor(family: str, obs_dim: int, act_dim: int, hidden: Sequence[int], max_action: float = 1.0) -> nn.Module:
    if family not in ACTOR_FAMILIES:
        fail(f"unknown actor family {family!r}; known: {', '.join(ACTOR_FAMILIES)}")
    return ACTOR_FAMILIES[family](obs_dim, act_dim, tuple(hidden), max_action)

class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: x (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class Critic(nn.Module):
    """`n` critics held as one module (fused twin critics): Q(s, a) for every member in one call, shape (n, ...).
    With act_dim = 0 it is a state-value function V(s)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), n: int = 2, layer_norm: bool = False, activation: str = "relu"):
        super().__init__()
        act_cls = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        layers: list[nn.Module] = []
        in_dim = obs_dim + act_dim
        for h in hidden:
            layers += [EnsembleLinear(n, in_dim, h)] + ([EnsembleLayerNorm(n, h)] if layer_norm else []) + [act_cls()]
            in_dim = h
        layers.append(EnsembleLinear(n, in_dim, 1))
        self.net = nn.Sequential(*layers)
        self.n = n

    def forward(self, obs: Tensor, act: Tensor | None = None) -> Tensor:
        x = obs if act is None else torch.cat([obs, act], -1)
        lead = x.shape[:-1]
        x = x.reshape(1, -1, x.shape[-1]).expand(self.n, -1, -1)
        return fp32(self.net(x)).reshape(self.n, *lead)


def orthogonal_init_(critic: Critic, gain: float = 1.0) -> Critic:
    """Orthogonal weights (gain 1) and zero biases on every linear layer of every member."""
    for m in critic.modules():
        if isinstance(m, EnsembleLinear):
            with torch.no_grad():
                for w in m.weight:
                    q = torch.empty(w.shape[1], w.shape[0])
                    nn.init.orthogonal_(q, gain)
                    w.copy_(q.T)
                m.bias.zero_()
    return critic


def frozen_call(module: nn.Module, *inputs: Tensor) -> Tensor:
    """module(*inputs) with its parameters detached: gradients reach the inputs (an actor), never the module (a
    critic). Lets an update sum its losses into ONE backward, which torch.compile needs: a compiled forward is one
    autograd node, and a second backward through it would find its saved tensors freed."""
    return torch.func.functional_call(module, {k: v.detach() for k, v in module.named_parameters()}, inputs)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, one fused lerp over all parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
# --- end shared: networks ---


# --- shared: accel ---
class Accel:
    """How the updates run. Eager PyTorch is the reference; --compile runs each phase's whole update (forward,
    losses, backward, optimizer steps) through torch.compile, --cudagraphs replays it as a CUDA graph, --bf16 runs
    the networks under bfloat16 autocast (their outputs, and so every loss, stay float32). All three keep the math.

    Under --compile or --cudagraphs the learning rates are 0-d device tensors and, on CUDA, Adam is capturable
    (its step count lives on the device), so a schedule or a Lagrange update changes values, never the code:
    nothing recompiles and nothing is re-captured."""

    def __init__(self, device: torch.device, compile: bool = False, cudagraphs: bool = False, bf16: bool = False):
        if cudagraphs and device.type != "cuda":
            fail(f"--cudagraphs captures CUDA graphs and needs a CUDA device, but this run is on {device}; drop --cudagraphs (--compile also works on CPU)")
        if compile and device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            fail("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")
        self.device, self.compile, self.cudagraphs, self.bf16 = device, compile, cudagraphs, bf16
        self.tensor_lr = compile or cudagraphs
        if compile:  # Adam.step is one code object compiled once per optimizer: allow many, and never fall back
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # to eager silently
            torch._dynamo.config.fail_on_recompile_limit_hit = True

    def adam(self, params: Any, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
        if not self.tensor_lr:
            return torch.optim.Adam(params, lr=lr, eps=eps)
        return torch.optim.Adam(params, lr=torch.tensor(float(lr), device=self.device), eps=eps, capturable=self.device.type == "cuda")

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """load_state_dict that keeps this run's kind of learning rate (tensor or float) and capturable flag: the
        saved ones come from whatever mode wrote the checkpoint."""
        kept = [(g["lr"], g.get("capturable", False)) for g in opt.param_groups]
        opt.load_state_dict(state)
        for g, (lr, capturable) in zip(opt.param_groups, kept):
            if torch.is_tensor(lr):
                lr.fill_(float(g["lr"]))
                g["lr"] = lr
            else:
                g["lr"] = float(g["lr"])
            g["capturable"] = capturable
            for p in g["params"]:
                st = opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(p.device if capturable else "cpu", torch.float32)

    def scalar(self, value: float) -> Tensor:
        """A 0-d device tensor for a value that changes during a phase (a threshold, a learning rate)."""
        return torch.tensor(float(value), device=self.device)

    def update(self, fn: Callable[..., dict[str, Tensor]], warmup: int = 3) -> "Update":
        return Update(fn, self, warmup)


class Update:
    """One phase's update `fn(*inputs) -> {name: 0-d tensor}`, run eagerly, compiled, and/or as a CUDA graph.

    Model state (modules, optimizers, Lagrange multipliers) is bound into `fn`; the call's arguments are what
    changes per step: tensors (a batch, a threshold) and a few flags (bools). Under CUDA graphs every distinct
    set of flags gets its own graph, captured after `warmup` ordinary calls with those flags (on a side
    stream, as CUDA graphs require); later calls copy the tensors into the graph's static inputs and replay.
    The returned metrics are then the graph's static outputs: read or accumulate them before the next call."""

    def __init__(self, fn: Callable[..., dict[str, Tensor]], accel: Accel, warmup: int = 3):
        self.accel, self.warmup = accel, warmup
        device_type, bf16 = accel.device.type, accel.bf16

        def run(*args: Any, **kwargs: Any) -> dict[str, Tensor]:  # autocast's weight cache must be off inside CUDA graphs
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not accel.cudagraphs):
                return fn(*args, **kwargs)

        self.run = torch.compile(run) if accel.compile else run
        self.graphs: dict[tuple, tuple] = {}
        self.calls: dict[tuple, int] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if not self.accel.cudagraphs:
            return self.run(*args, **kwargs)
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if torch.is_tensor(x)]
        key = tuple(None if torch.is_tensor(x) else x for x in leaves)
        if key in self.graphs:
            graph, static_in, static_out = self.graphs[key]
            if tensors:
                torch._foreach_copy_(static_in, tensors)
            graph.replay()
            return static_out
        n = self.calls[key] = self.calls.get(key, 0) + 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if n <= self.warmup:  # ordinary updates, on a side stream so the capture that follows sees a warm allocator
            with torch.cuda.stream(side):
                out = self.run(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        static_in = [t.clone() for t in tensors]
        it = iter(static_in)
        s_args, s_kwargs = torch.utils._pytree.tree_unflatten([next(it) if torch.is_tensor(x) else x for x in leaves], spec)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.run(*s_args, **s_kwargs)
        self.graphs[key] = (graph, static_in, static_out)
        graph.replay()  # capture records without running: this replay is the update of this call
        return static_out
# --- end shared: accel ---


# --- shared: dataset ---
D4RL_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
D4RL_LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
# D4RL's reference returns (random policy, expert policy), so normalised scores read on the usual 0-100 scale.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6727, 3879.7),
    "antmaze": (0.0, 1.0),  # D4RL's: an evaluation return is 1 for reaching the goal, else 0 (antmaze_eval_spec)
}
HOSTED_LEVELS = {"medium": ["medium-v0"], "expert": ["expert-v0"], "medium-expert": ["medium-v0", "expert-v0"]}
# AntMaze, D4RL's second benchmark: `antmaze-<name>-v2` -> Minari's re-collection on gymnasium-robotics (the id, and the
# env the data was collected on, continuing_task=True and reset_target=False: the episode never terminates, the goal
# stays put, and the sparse reward 1{|xy - goal| <= 0.45} accumulates while the ant stays at the goal; 700 steps per
# episode on umaze, 1000 on medium and large). Source: minari-dataset-generation-scripts, scripts/antmaze/.
ANTMAZE_DATASETS = {
    "umaze": ("D4RL/antmaze/umaze-v1", "AntMaze_UMaze-v4"),
    "umaze-diverse": ("D4RL/antmaze/umaze-diverse-v1", "AntMaze_UMaze-v4"),
    "medium-play": ("D4RL/antmaze/medium-play-v1", "AntMaze_Medium-v4"),
    "medium-diverse": ("D4RL/antmaze/medium-diverse-v1", "AntMaze_Medium_Diverse_GR-v4"),
    "large-play": ("D4RL/antmaze/large-play-v1", "AntMaze_Large-v4"),
    "large-diverse": ("D4RL/antmaze/large-diverse-v1", "AntMaze_Large_Diverse_GR-v4"),
}
# the maze of antmaze-umaze (D4RL's U_MAZE_TEST, rows in gymnasium-robotics' order): start r bottom left, goal g top left
ANTMAZE_UMAZE_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]
# the mazes of Minari's AntMaze evaluation envs (eval_env_spec), by size. The umaze one is the MIRROR image of the maze
# the umaze data were collected in (its gap is on the other side; Minari issue #304), so evaluation on umaze and
# umaze-diverse uses ANTMAZE_UMAZE_MAP instead, D4RL's task: the data's maze, from r to g (see antmaze_eval_spec)
ANTMAZE_EVAL_MAPS = {
    "umaze": [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]],
    "medium": [[1, 1, 1, 1, 1, 1, 1, 1], [1, "r", 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1],
               [1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0, "g", 1], [1, 1, 1, 1, 1, 1, 1, 1]],
    "large": [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, "r", 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
              [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
              [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1, 0, "g", 0, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
}
# Dict (goal-env) observations are flattened in this order, the same in the dataset, online and in evaluation: for
# AntMaze [achieved_goal (x, y), observation (the other 13 qpos and 14 qvel), desired_goal (x, y)], 31 numbers whose
# first 29 are D4RL's AntMaze state (qpos, qvel)
GOAL_OBS_KEYS = ("achieved_goal", "observation", "desired_goal")
# no part may start with a dot: `..` would leave the store, and hidden folders are make_dataset.py's staging area
DATASET_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*-v\d+$")


def parse_env_name(name: str) -> tuple[str, str]:
    """`hopper-medium-replay-v2` -> ("hopper", "medium-replay"), `antmaze-umaze-diverse-v2` -> ("antmaze", "umaze-diverse");
    unknown names exit 2 listing the known ones."""
    m = re.fullmatch(r"([a-z0-9]+)-(.+)-v\d+", name)
    if m is not None and m.group(1) == "antmaze" and m.group(2) in ANTMAZE_DATASETS:
        return m.group(1), m.group(2)
    if m is None or m.group(1) not in D4RL_ENVS or m.group(2) not in D4RL_LEVELS:
        known = ", ".join([f"{e}-{lvl}-v2" for e in D4RL_ENVS for lvl in D4RL_LEVELS] + [f"antmaze-{n}-v2" for n in ANTMAZE_DATASETS])
        fail(f"unknown env {name!r}; known: {known} (or pass any Minari id with --dataset-id)")
    return m.group(1), m.group(2)


def flatten_obs(obs: Any) -> np.ndarray:
    """One flat observation (or a batch, along the last axis) from a Box observation (returned as it is) or a goal-env
    Dict observation (its GOAL_OBS_KEYS concatenated in that order). THE flattening of the dataset, of the online env
    and of evaluation (make_env wraps Dict-observation envs in FlattenGoalObs, which calls this)."""
    if not isinstance(obs, dict):
        return obs
    missing = [k for k in GOAL_OBS_KEYS if k not in obs]
    if missing or len(obs) != len(GOAL_OBS_KEYS):
        fail(f"Dict observations with keys {sorted(obs)} are not supported; only goal-env observations {', '.join(GOAL_OBS_KEYS)}")
    return np.concatenate([np.asarray(obs[k]) for k in GOAL_OBS_KEYS], axis=-1)


def is_antmaze_spec(env_spec: str) -> bool:
    """Whether an env spec (JSON, or a plain id) is a gymnasium-robotics AntMaze env: the one test of the AntMaze family."""
    env_id = json.loads(env_spec)["id"] if env_spec.lstrip().startswith("{") else env_spec
    return env_id.startswith("AntMaze_")


def antmaze_eval_spec(env_spec: str) -> str:
    """The evaluation env of an AntMaze dataset, D4RL's protocol: the episode TERMINATES when the goal is reached
    (continuing_task=False, reset_target=False: reward 1 on that step, 0 before), so an episode's return is 1 for a
    success and 0 otherwise and the normalised score (reference returns 0 and 1) is 100 x the success rate; 700 steps
    on umaze, 1000 on medium and large, as the spec says. Minari's mirrored umaze evaluation maze (ANTMAZE_EVAL_MAPS)
    is replaced by the data's maze with D4RL's start and goal (ANTMAZE_UMAZE_MAP)."""
    spec = json.loads(env_spec) if env_spec.lstrip().startswith("{") else json.loads(make_env(env_spec, flatten=False).spec.to_json())
    kwargs = dict(spec.get("kwargs") or {})
    if kwargs.get("maze_map") == ANTMAZE_EVAL_MAPS["umaze"]:
        kwargs["maze_map"] = ANTMAZE_UMAZE_MAP
    kwargs.update(continuing_task=False, reset_target=False)
    spec["kwargs"] = kwargs
    return json.dumps(spec)


def minari_store(write: bool = False) -> Path:
    """The local Minari store (MINARI_DATASETS_PATH, else ~/.minari/datasets), created when missing, as minari does;
    exit 2 when it cannot be created or read, or (write) written."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    if env == "":
        fail("MINARI_DATASETS_PATH is set but empty; unset it or point it at a folder")
    root = Path(env) if env is not None else Path.home() / ".minari" / "datasets"
    fix = "set MINARI_DATASETS_PATH to a folder you can read and write"
    if root.exists() and not root.is_dir():
        fail(f"the Minari store {root} is a file, not a folder; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"the Minari store {root} cannot be created ({e.strerror}); {fix}")
    if not os.access(root, os.R_OK | os.X_OK):
        fail(f"the Minari store {root} cannot be read (permission denied); {fix}")
    if write:
        try:
            os.rmdir(tempfile.mkdtemp(dir=root, prefix=".write-test-"))
        except OSError as e:
            fail(f"the Minari store {root} is not writable ({e.strerror}); {fix}")
    return root


def _dataset_exists(dataset_id: str) -> bool:
    return (minari.storage.get_dataset_path(dataset_id) / "data").exists()


def _build_command(dataset_id: str) -> str:
    """How to (re)build a local/<env>/<level>-v0 dataset, for messages."""
    m = re.fullmatch(r"local/([a-z0-9]+)/(.+)-v0", dataset_id)
    if m and m.group(1) in D4RL_ENVS and m.group(2) in D4RL_LEVELS:
        return f"python make_dataset.py --env {m.group(1)}-{m.group(2)}-v2"
    if m and m.group(1) == "antmaze" and m.group(2) in ANTMAZE_DATASETS:
        return f"python make_dataset.py --env antmaze-{m.group(2)}-v2 --random-steps 100000"
    return "make_dataset.py"


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Short TCP probe so a missing network fails in seconds instead of minari's long retry loop."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)  # DNS resolution ignores the socket timeout
    return bool(result and result[0])


def _download(dataset_id: str) -> None:
    if not _network_reachable():
        fail(f"dataset {dataset_id} is not in the local Minari store and the network is unreachable")
    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # any failure of the remote is a missing dataset for the user
        fail(f"could not download {dataset_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def resolve_dataset(env: str, dataset_id: str | None = None, no_download: bool = False) -> tuple[list[str], bool]:
    """The Minari ids to load for --env / --dataset-id (in the order of the README, "Datasets") and whether they are a local
    stand-in."""
    if dataset_id is not None and not DATASET_ID_RE.match(dataset_id):
        fail(f"malformed dataset id {dataset_id!r}; Minari ids look like namespace/name-v0 (no part may start with '.')")
    store = minari_store()
    if dataset_id is not None:
        if not _dataset_exists(dataset_id):
            if dataset_id.startswith("local/"):  # built on this machine by make_dataset.py: nothing to download
                fail(f"dataset {dataset_id} is not in the local Minari store {store}; local/ datasets are built, not downloaded: "
                     f"build it with {_build_command(dataset_id)}, or point MINARI_DATASETS_PATH at the store that holds it")
            if no_download:
                fail(f"dataset {dataset_id} is not in the local Minari store; drop --no-download to fetch it")
            _download(dataset_id)
        return [dataset_id], dataset_id.startswith("local/")
    name, level = parse_env_name(env)
    if name == "antmaze":
        hosted = [ANTMAZE_DATASETS[level][0]]
    else:
        hosted = [f"mujoco/{name}/{v}" for v in HOSTED_LEVELS.get(level, [])]
    if hosted and all(_dataset_exists(i) for i in hosted):
        return hosted, False
    local = f"local/{name}/{level}-v0"
    if _dataset_exists(local):
        return [local], True
    if hosted and not no_download and _network_reachable():
        for i in hosted:
            if not _dataset_exists(i):
                _download(i)
        return hosted, False
    if name == "antmaze":  # make_dataset.py cannot rebuild the hosted data (a maze-solving controller), only a random stand-in
        fail(f"no dataset for {env} (looked for {', '.join(hosted + [local])}); download it on a machine with network "
             f"(minari download {hosted[0]}) into the Minari store, or build a random-action stand-in for trials: {_build_command(local)}")
    fail(f"no dataset for {env} (looked for {', '.join(hosted + [local])}); build it with: python make_dataset.py --env {env}")


def load_dataset(env: str, dataset_id: str | None = None, no_download: bool = False, quiet: bool = False) -> dict:
    """Transitions of every episode as float32 arrays, plus what evaluation needs.

    done = termination only: a time-limit truncation is not a terminal state and must be bootstrapped.
    `ends` marks the last transition of each episode (terminal or not) for Monte-Carlo returns.
    """
    ids, local = resolve_dataset(env, dataset_id, no_download)
    if local and not quiet:
        print(f"NOTICE: using LOCALLY BUILT dataset {ids[0]} (made by make_dataset.py, not the hosted D4RL/Minari data)")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "ends")}
    returns, meta = [], {}
    for i in ids:
        try:  # a truncated or damaged file surfaces here, as h5py's OSError or a JSON error of the metadata
            ds = minari.load_dataset(i)
            episodes = list(ds.iterate_episodes())
        except Exception as e:
            fix = f"rebuild it with {_build_command(i)} --overwrite" if i.startswith("local/") else "delete that folder and download it again"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"dataset {i} cannot be read ({type(e).__name__}: {reason}); its files in {minari.storage.get_dataset_path(i)} are damaged "
                 f"(a truncated copy?): {fix}")
        if not meta:
            meta = ds.storage.metadata
        for ep in episodes:
            obs = np.asarray(flatten_obs(ep.observations), dtype=np.float32)
            if obs.ndim != 2:
                fail(f"dataset {i} has non-flat observations {obs.shape}; only Box observations are supported")
            n = len(ep.rewards)
            if n == 0:
                continue
            parts["observations"].append(obs[:-1])
            parts["next_observations"].append(obs[1:])
            parts["actions"].append(np.asarray(ep.actions, dtype=np.float32).reshape(n, -1))
            parts["rewards"].append(np.asarray(ep.rewards, dtype=np.float32))
            parts["terminals"].append(np.asarray(ep.terminations, dtype=np.float32))
            end = np.zeros(n, dtype=np.float32)
            end[-1] = 1.0
            parts["ends"].append(end)
            returns.append(float(np.sum(ep.rewards)))
    if not returns:
        fail(f"dataset {', '.join(ids)} holds no transitions")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    env_spec = meta.get("eval_env_spec") or meta.get("env_spec")
    if env_spec is None:
        fail(f"dataset {ids[0]} records no environment spec; it cannot be evaluated")
    env_spec = env_spec if isinstance(env_spec, str) else json.dumps(env_spec)
    ref = (meta.get("ref_min_score"), meta.get("ref_max_score"))
    if is_antmaze_spec(env_spec):  # D4RL's protocol, whatever the metadata says: success rate x 100 (antmaze_eval_spec)
        env_spec, ref = antmaze_eval_spec(env_spec), D4RL_REF_SCORES["antmaze"]
    elif dataset_id is None and None in ref:
        ref = D4RL_REF_SCORES[parse_env_name(env)[0]]
    data.update(
        dataset_ids=ids,
        local_standin=local,
        env_spec=env_spec,
        ref_min_score=float(ref[0]) if ref[0] is not None else 0.0,
        ref_max_score=float(ref[1]) if ref[1] is not None else 1.0,
        episode_returns=np.asarray(returns, dtype=np.float32),
        obs_dim=data["observations"].shape[1],
        act_dim=data["actions"].shape[1],
    )
    return data


def obs_stats(observations: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """State normalisation fixed from the dataset: mean and std + eps."""
    return observations.mean(0).astype(np.float32), (observations.std(0) + eps).astype(np.float32)


def normalized_score(ret: float | np.ndarray, ref_min: float, ref_max: float) -> float | np.ndarray:
    return 100.0 * (ret - ref_min) / (ref_max - ref_min)
# --- end shared: dataset ---


# --- shared: buffer ---
class ReplayBuffer:
    """Transitions as preallocated device tensors (observations already normalised); sampling uses the
    device RNG, so neither adding a batch nor sampling syncs with the host."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device):
        def z(*shape: int) -> Tensor:
            return torch.zeros(capacity, *shape, dtype=torch.float32, device=device)

        self.data = {"obs": z(obs_dim), "actions": z(act_dim), "rewards": z(), "next_obs": z(obs_dim), "terminals": z()}
        self.capacity, self.size, self.ptr, self.device = capacity, 0, 0, device

    @classmethod
    def from_dataset(cls, data: dict, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device, reward_scale: float = 1.0, reward_shift: float = 0.0) -> "ReplayBuffer":
        n = len(data["rewards"])
        rb = cls(data["obs_dim"], data["act_dim"], n, device)
        rb.add(
            (data["observations"] - obs_mean) / obs_std, data["actions"], data["rewards"] * reward_scale + reward_shift,
            (data["next_observations"] - obs_mean) / obs_std, data["terminals"],
        )
        return rb

    def add(self, obs: Any, actions: Any, rewards: Any, next_obs: Any, terminals: Any) -> None:
        """Add a batch of transitions (ring buffer: the oldest are overwritten when full)."""
        batch = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs, "terminals": terminals}
        n = len(rewards)
        idx = (torch.arange(n, device=self.device) + self.ptr) % self.capacity
        for k, v in batch.items():
            self.data[k][idx] = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32).to(self.device).reshape(self.data[k][idx].shape)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        idx = torch.randint(self.size, (batch_size,), device=self.device)
        return {k: v[idx] for k, v in self.data.items()}
# --- end shared: buffer ---


# --- shared: evaluation ---
class FlattenGoalObs(gym.ObservationWrapper):
    """A goal env (Dict observations: achieved_goal, observation, desired_goal) seen as a Box env through flatten_obs."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        spaces = env.observation_space.spaces
        low = np.concatenate([np.broadcast_to(spaces[k].low, spaces[k].shape) for k in GOAL_OBS_KEYS])
        high = np.concatenate([np.broadcast_to(spaces[k].high, spaces[k].shape) for k in GOAL_OBS_KEYS])
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float64)

    def observation(self, observation: dict) -> np.ndarray:
        return flatten_obs(observation)


def make_env(env_spec: str, flatten: bool = True) -> gym.Env:
    """An environment from the JSON spec a dataset (and every checkpoint) records, or from a plain env id. Goal envs
    (AntMaze) come with their Dict observations flattened as in the dataset (FlattenGoalObs), unless flatten=False."""
    spec = EnvSpec.from_json(env_spec) if env_spec.lstrip().startswith("{") else env_spec
    if not is_antmaze_spec(env_spec):
        return gym.make(spec)
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stderr(io.StringIO()):  # its import prints a notice about the Adroit envs
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
    with warnings.catch_warnings():  # the datasets were collected on AntMaze_*-v4 on purpose: no "out of date" warning
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(spec)
    return FlattenGoalObs(env) if flatten else env


class Evaluator:
    """Deterministic evaluation on environments of its own (never the training env), all episodes stepped
    together with one batched actor call; every evaluation uses the same start seeds, so curves compare."""

    def __init__(self, env_spec: str, n_episodes: int, seed: int, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device):
        self.envs = [make_env(env_spec) for _ in range(n_episodes)]
        self.seed = seed
        self.obs_mean = torch.as_tensor(obs_mean, dtype=torch.float32, device=device)
        self.obs_std = torch.as_tensor(obs_std, dtype=torch.float32, device=device)
        self.device = device
        space = self.envs[0].action_space
        self.low, self.high = space.low, space.high
        self.seconds = 0.0  # wall-clock of every evaluation so far (results.json: evaluation_s, evaluation_share)

    @torch.no_grad()
    def __call__(self, act: Callable[[Tensor], Tensor], n_episodes: int | None = None) -> np.ndarray:
        """Undiscounted returns of one episode per environment (the first n_episodes of them; None: all); `act` maps
        normalised observations to actions. Episode i always starts from seed + i, so a smaller evaluation's start
        states are the first ones of a larger one."""
        t0 = time.time()
        envs = self.envs[:n_episodes]
        obs = np.stack([env.reset(seed=self.seed + i)[0] for i, env in enumerate(envs)])
        returns = np.zeros(len(envs))
        alive = list(range(len(envs)))
        while alive:
            o = torch.as_tensor(obs[alive], dtype=torch.float32, device=self.device)
            actions = act((o - self.obs_mean) / self.obs_std).cpu().numpy()
            for j, a in zip(list(alive), np.clip(actions, self.low, self.high)):
                obs[j], r, term, trunc, _ = envs[j].step(a)
                returns[j] += r
                if term or trunc:
                    alive.remove(j)
        self.seconds += time.time() - t0
        return returns

    def close(self) -> None:
        for env in self.envs:
            env.close()
# --- end shared: evaluation ---


# --- shared: checkpoint ---
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format_version", "algo", "env_name", "dataset_id", "obs_dim", "act_dim", "max_action", "actor_family",
                   "actor_config", "actor", "obs_mean", "obs_std", "reward_transform", "args", "grad_steps", "env_spec")


def load_checkpoint(path: str | Path, env_name: str | None = None, obs_dim: int | None = None, act_dim: int | None = None) -> dict:
    """A checkpoint of the README's format ("Checkpoints"), checked against the run that wants it; any mismatch exits 2."""
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}); delete it or pass another")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        fail(f"{path} is not a checkpoint of this project (missing fields); pass one written by offline_pretrain.py")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        fail(f"checkpoint {path} has format {ckpt['format_version']}, this code reads {CHECKPOINT_FORMAT}")
    if env_name is not None and ckpt["env_name"] != env_name:
        fail(f"checkpoint {path} was trained on {ckpt['env_name']}, not {env_name}; pass a checkpoint of {env_name}")
    if (obs_dim is not None and ckpt["obs_dim"] != obs_dim) or (act_dim is not None and ckpt["act_dim"] != act_dim):
        fail(f"checkpoint {path} has obs/act dims {ckpt['obs_dim']}/{ckpt['act_dim']}, the dataset {obs_dim}/{act_dim}")
    check_checkpoint_contents(ckpt, path)
    return ckpt


def check_checkpoint_contents(ckpt: dict, path: str | Path) -> None:
    """A damaged or hand-edited checkpoint exits 2 here rather than with a traceback (or NaNs) where it is used:
    the actor's weights must fit its declared family, dims and hidden sizes, and the state normalisation must be
    finite with a positive std."""
    redo = "the file is damaged or was edited; retrain it with offline_pretrain.py or pass another checkpoint"
    try:
        actor_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict's message spans lines
        fail(f"checkpoint {path}: its actor weights do not match its declared dims (obs {ckpt['obs_dim']}, act {ckpt['act_dim']}, "
             f"{ckpt['actor_family']} actor) ({reason}); {redo}")
    for key in ("obs_mean", "obs_std"):
        v = ckpt[key]
        if not torch.is_tensor(v) or tuple(v.shape) != (ckpt["obs_dim"],) or not bool(torch.isfinite(v).all()):
            fail(f"checkpoint {path}: {key} is not {ckpt['obs_dim']} finite numbers; {redo}")
    if not bool((ckpt["obs_std"] > 0).all()):
        fail(f"checkpoint {path}: obs_std has zero or negative entries, so observations cannot be normalised; {redo}")


def actor_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The checkpoint's actor, in its own family, weights copied exactly."""
    actor = build_actor(ckpt["actor_family"], ckpt["obs_dim"], ckpt["act_dim"], ckpt["actor_config"]["hidden"], ckpt["max_action"])
    actor.load_state_dict(ckpt["actor"])
    return actor.to(device)
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits): what identifies an offline checkpoint in the phase keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
# --- end shared: checkpoint ---


# --- shared: fqe-stop ---
REEVAL_CHECK_EVERY = 1000  # re-evaluation steps between two readings of Q on the fixed probe (the stopping rule's clock)


def fqe_gap(history: Sequence[float]) -> float:
    """Distance from the last probe value to the limit the values are heading for, by Aitken's extrapolation of the
    last three readings: with changes d1 then d2 and ratio r = d2 / d1, a geometric approach has |d2| r / (1 - r) left.
    inf while fewer than three readings exist or the changes are not shrinking (r >= 1); |d2| once they alternate in
    sign (r <= 0: the values wander around their limit)."""
    if len(history) < 3:
        return math.inf
    d1, d2 = history[-2] - history[-3], history[-1] - history[-2]
    if d1 == 0.0:
        return abs(d2) if d2 != 0.0 else 0.0
    r = d2 / d1
    if r >= 1.0:
        return math.inf
    if r <= 0.0:
        return abs(d2)
    return abs(d2) * r / (1.0 - r)


def fqe_converged(history: Sequence[float], tol: float) -> bool:
    """The re-evaluation stopping rule: the extrapolated gap is below tol times the size of the values at the last two
    readings (tol 0: never). One passing reading is not enough: where the critic's fast first fit bends into its slow
    growth (O2SAC on halfcheetah-medium: 72.7, 141.1, 148.0, then 162.1 and on to 171) three readings look converged."""
    return tol > 0 and len(history) >= 4 and all(fqe_gap(history[:n]) <= tol * max(abs(history[n - 1]), 1.0)
                                                  for n in (len(history) - 1, len(history)))
# --- end shared: fqe-stop ---


# --- shared: runfolder ---
def key_diff(saved: dict | None, now: dict) -> list[str]:
    """`--flag saved (now given)` for every argument of the key `now` that differs from an earlier run's, a few words
    for its other entries (KEY_WORDS); empty when they agree."""
    if saved is None:
        return ["settings not recorded"]
    same = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731  (a tuple and its list agree)
    return [KEY_WORDS.get(k) or f"--{k.replace('_', '-')} {saved.get(k)} (now {now.get(k)})"
            for k in sorted(set(saved) | set(now)) if same(saved.get(k)) != same(now.get(k))]


def read_saved(path: Path) -> dict | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return saved if isinstance(saved, dict) else None


def check_run_folder(out: Path, key: dict, args: Args) -> dict | None:
    """The rules above for the run folder `out` and this run's online key: exit 2 naming the flag, else the online.pt
    to resume (None: the online phase starts afresh)."""
    if args.overwrite:
        return None  # the folder's outputs are deleted before anything is written
    other = "choose another --run-name"
    online_path, online = out / "online.pt", None
    if (out / "final.pt").exists():
        saved = saved_key(read_saved(out / "final.pt"))
        if saved is None and online_path.exists():  # a final.pt without its key: the online.pt written with it
            online = read_saved(online_path)
            saved = saved_key(online)
        if saved is None:
            fail(f"{out} holds a finished run whose settings cannot be read from its final.pt; pass --overwrite to replace it or {other}")
        diff = key_diff(saved, key)
        if diff:
            fail(f"{out} holds a finished run with other settings ({', '.join(diff)}); pass --overwrite to replace it or {other}")
    if args.no_resume or not online_path.exists():
        return None
    online = online or read_saved(online_path)
    if saved_key(online) is None:
        fail(f"{online_path} cannot be read (damaged, or not written by this script); pass --no-resume to start the online phase "
             f"afresh or {other}")
    diff = key_diff(saved_key(online), key)
    if diff:
        fail(f"{out} holds an unfinished run with other settings ({', '.join(diff)}); pass --no-resume to start it afresh or {other}")
    return online


def clear_run_folder(out: Path) -> None:
    """--overwrite: an earlier run's outputs leave the folder before anything new is written, its tensorboard events too
    (the logs of two runs never mix)."""
    for p in [*(out / n for n in RUN_OUTPUTS), *out.glob("events.out.tfevents.*")]:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            fail(f"--overwrite: cannot delete {p} ({e.strerror}); delete it yourself or choose another --run-name")


def check_allocations(buffers: Sequence[tuple[int, int, str, str]], device: torch.device) -> None:
    """Every (rows, columns, what, fix) float32 buffer of the run allocated uninitialised, all held together, then freed,
    before any phase runs: a step count or batch size no memory can hold stops here at once with the flag to lower, not
    with a traceback after the offline phases. (A size that passes can still run short later, next to everything else.)"""
    held = []
    for rows, cols, what, fix in buffers:
        try:
            if rows * cols >= 2**62:  # more elements than torch can index
                raise MemoryError
            held.append(torch.empty(rows, cols, device=device))
        except Exception as e:
            if not out_of_memory(e):
                raise
            fail(f"{what} cannot be allocated on {device}; {fix}")
    del held


def resolve_checkpoint(args: Any) -> Path:
    """--checkpoint, else the convention <run-dir>/offline/<algo>/<env or dataset id>/seed<k>/checkpoint.pt; exit 2 naming
    the command that trains it when it does not exist."""
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if not path.is_file():
            fail(f"--checkpoint {path} does not exist; pass the checkpoint.pt written by offline_pretrain.py")
        return path
    env_key = args.env if args.dataset_id is None else args.dataset_id.replace("/", "_")
    path = Path(args.run_dir) / "offline" / args.offline_algo / env_key / f"seed{args.seed}" / "checkpoint.pt"
    if not path.is_file():
        cmd = f"python offline_pretrain.py --algo {args.offline_algo} --env {args.env} --seed {args.seed}"
        if args.dataset_id is not None:
            cmd += f" --dataset-id {args.dataset_id}"
        if args.run_dir != "runs":
            cmd += f" --run-dir {args.run_dir}"
        fail(f"no offline checkpoint at {path}; train one with: {cmd} (or pass --checkpoint PATH)")
    return path


def prepare_run_folder(out: Path, args: Any) -> None:
    """--overwrite: an earlier run's outputs deleted; the folder created; --no-resume: a stale online state deleted (a
    later run must not resume it either)."""
    if args.overwrite:
        clear_run_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--run-dir: cannot create {out} ({e.strerror}); pass a folder you can write to")
    if args.no_resume:
        for name in ("online.pt", "final.pt", "results.json"):
            (out / name).unlink(missing_ok=True)


def stop_notice(step: int, saved_step: int | None) -> str:
    """What a run stopped by --stop-after (as if killed) tells its user: where a rerun of the same command continues."""
    if saved_step is None:
        return (f"stopped after {step} env steps (--stop-after, as if killed); no online.pt was written yet: a rerun reuses the "
                f"saved phases and starts online learning again")
    return (f"stopped after {step} env steps (--stop-after, as if killed); online.pt holds env step {saved_step}: rerun the same "
            f"command without --stop-after to resume from there")
# --- end shared: runfolder ---


# --- shared: provenance ---
@functools.cache
def software_versions() -> dict[str, str]:
    """The versions a results.json was produced with (python, torch, gymnasium, mujoco, minari, numpy); looked up
    once per process (results.json is rewritten at every evaluation)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "gymnasium", "mujoco", "minari", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this script lives in (with "+dirty" when its files differ from it); None when the
    script is not in a git checkout or git is missing. Never waits more than a few seconds."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
                               timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
# --- end shared: provenance ---


# --- shared: tracking ---
def check_tracking(args: Any) -> None:
    """--track (CleanRL's convention) needs wandb, imported only then: without it, exit 2 before anything runs."""
    if args.track:
        import importlib

        try:
            importlib.import_module("wandb")
        except ImportError:
            fail("--track needs wandb, which is not installed; pip install wandb (pinned in requirements.txt) or drop --track")


def start_tracking(args: Any, config: dict, out: Path) -> Any:
    """With --track: a Weights & Biases run named after the run folder `out` (its last three parts), the run's arguments
    as its config, and sync_tensorboard, so every scalar the SummaryWriter writes into `out` is mirrored; call it before
    the SummaryWriter is made and finish_tracking at the end. None without --track. wandb's files go to the folder
    that holds the run folder (<parent>/wandb/<run>-<id>/), not into it: the tensorboard sync watches `out` and its
    subfolders, and would copy its own copies of the event files again and again."""
    if not args.track:
        return None
    import wandb

    return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=config, name="/".join(out.parts[-3:]),
                      sync_tensorboard=True, dir=str(out.parent))


def finish_tracking(tracker: Any) -> None:
    """wandb.finish() of the run start_tracking began (nothing without --track)."""
    if tracker is not None:
        import wandb

        wandb.finish()
# --- end shared: tracking ---


# --- shared: results ---
# results.json, one schema for o2o_sac.py, o2o_td3.py and o2o_ppo.py (README, "results.json"). The curve is a list of
# {phase, step, normalized_score, return}; phases in order: offline, distilled, align (evaluations during alignment,
# step = alignment gradient step), aligned, then the online phase (step = online env steps; its first entry is the
# policy online learning starts from, at step 0, or for OPT at the end of its collection; PORL's pre_sample stage
# counts as online). Every summary number below has ONE definition, whatever the script.
RESULTS_SCHEMA_VERSION = 1
ONLINE_PHASES = ("online", "pre_sample")


def method_name(reevaluate: bool, align: bool | None, constraint: bool, scratch: bool = False, opt: bool = False) -> str:
    """What a run is, in one word for tables: ocr-cft, naive, porl (SAC's critic from scratch), opt (TD3's OPT), else
    the parts switched off ("no-align", "no-reevaluate+no-constraint", ...). align=None: the method has no alignment."""
    if scratch:
        return "porl"
    if opt:
        return "opt"
    off = [name for name, on in (("no-reevaluate", reevaluate), ("no-align", align), ("no-constraint", constraint)) if on is False]
    if len(off) == (2 if align is None else 3):
        return "naive"
    return "+".join(off) or "ocr-cft"


def curve_summary(curve: list[dict], online_start_score: float, online_steps: int) -> dict:
    """The headline numbers of a run. min_first_tenth: the lowest of the score online learning starts from and every
    online evaluation at step <= online_steps / 10 (the early drop the paper is about); final: the last online
    evaluation (None before there is one); best: the highest of the start score and the online evaluations."""
    score = lambda phase: next((p["normalized_score"] for p in curve if p["phase"] == phase), None)  # noqa: E731
    online = [p for p in curve if p["phase"] in ONLINE_PHASES][1:]  # the evaluations; the first online entry is where it starts
    tenth = [p["normalized_score"] for p in online if p["step"] <= online_steps / 10]
    return {"offline_score": score("offline"), "distilled_score": score("distilled"), "aligned_score": score("aligned"),
            "online_start_score": online_start_score, "min_first_tenth": min([online_start_score, *tenth]),
            "final_score": online[-1]["normalized_score"] if online else None,
            "best_score": max([online_start_score, *(p["normalized_score"] for p in online)]),
            "evals_in_first_tenth": len(tenth)}


def results_record(*, script: str, algo: str, method: str, mode: dict, env: str, data: dict, seed: int, offline_algo: str,
                   offline_checkpoint: Path, curve: list[dict], online_start_score: float, online_steps: int, online_steps_done: int,
                   budget_scale: float, wall_clock_s: dict, finished: bool, run_dir: Path, evaluation_s: float, **extra: Any) -> dict:
    """The common part of every o2o script's results.json, then the script's own entries (`extra`). evaluation_s: the
    wall-clock of the run's evaluations (Evaluator.seconds, carried across a resume), a part of the phases' wall-clock;
    evaluation_share = evaluation_s / the total (None before any phase has ended; while a phase runs, its evaluations
    count before its wall-clock does, so read the share of a finished run)."""
    wall = {k: float(v) for k, v in wall_clock_s.items() if k != "total"}
    total = sum(wall.values())
    return {"schema_version": RESULTS_SCHEMA_VERSION, "script": script, "algo": algo, "method": method, "mode": mode, "env": env,
            "dataset_ids": list(data["dataset_ids"]), "local_standin": bool(data["local_standin"]), "seed": seed,
            "offline_algo": offline_algo, "offline_checkpoint": str(offline_checkpoint),
            **curve_summary(curve, online_start_score, online_steps), "online_steps": online_steps,
            "online_steps_done": online_steps_done, "budget_scale": budget_scale, "curve": curve,
            "wall_clock_s": {**wall, "total": total}, "evaluation_s": float(evaluation_s),
            "evaluation_share": float(evaluation_s) / total if total > 0 else None, "finished": finished, "versions": software_versions(),
            "git_commit": git_commit(), "run_dir": str(run_dir), **extra}


# tensorboard's charts/phase: one number per phase, the same in the three scripts, logged when a run enters the phase
# (a reused phase checkpoint included) at the global online env step where the phase starts: 0 for every phase before
# online learning; OPT's pre-training and fine-tuning at the end of its collection; PORL's fine-tuning at the end of its
# pre-sample stage. A resumed online phase logs nothing again.
PHASE_IDS = {"offline": 0, "distill": 1, "reevaluate": 2, "align": 3, "opt_collect": 4, "opt_pretrain": 5, "pre_sample": 6, "online": 7}


def early_eval_steps(online_steps: int, n: int) -> list[int]:
    """The extra evaluations inside the first tenth of the online phase: floor(online_steps / 10 * k / n), k = 1..n,
    at least step 1, without repeats (fewer than n when the first tenth has fewer than n env steps)."""
    return sorted({max(1, online_steps * k // (10 * n)) for k in range(1, n + 1)})


def log_phase(writer: SummaryWriter, phase: str, env_step: int) -> None:
    writer.add_scalar("charts/phase", PHASE_IDS[phase], env_step)
# --- end shared: results ---

# --- shared: family ---
# Which row of a script's family table applies: the dataset family `<env>-<level>` of --family, else the D4RL-style
# name --env gives (also for a --dataset-id run: --env, or --family, says which official configuration to follow).
def dataset_family(env: str, dataset_id: str | None, family: str | None) -> tuple[str, str]:
    """(environment, level), e.g. ("hopper", "medium-expert") or ("antmaze", "umaze-diverse"); a -vN suffix is allowed.
    Exit 2 for an unknown --family, an unknown --env, or a --dataset-id run whose --env names no D4RL dataset (then
    --family says which values apply)."""
    name = family if family is not None else env
    m = re.fullmatch(r"([a-z0-9]+)-(.+?)(?:-v\d+)?", name)
    if m is not None and m.group(1) == "antmaze" and m.group(2) in ANTMAZE_DATASETS:
        return "antmaze", m.group(2)
    if m is not None and m.group(1) in D4RL_ENVS and m.group(2) in D4RL_LEVELS:
        return m.group(1), m.group(2)
    if family is not None:
        fail(f"unknown --family {family!r}; use <env>-<level> with env in {', '.join(D4RL_ENVS)} and level in "
             f"{', '.join(D4RL_LEVELS)}, or antmaze-<maze> with maze in {', '.join(ANTMAZE_DATASETS)}")
    if dataset_id is None:
        parse_env_name(env)  # exits 2 listing the known names
    fail(f"--env {env!r} names no D4RL dataset, so the per-family values for --dataset-id {dataset_id} are unknown; "
         "pass --family <env>-<level> (e.g. hopper-medium) to choose them")


def reward_affine(spec: str) -> tuple[float, float]:
    """--reward `SCALE,SHIFT` -> (scale, shift); anything else exits 2."""
    try:
        scale, shift = (float(x) for x in spec.split(","))
    except ValueError:
        fail(f"--reward must be SCALE,SHIFT (two numbers, e.g. 10,-5 or 1,-1), got {spec!r}")
    if not (math.isfinite(scale) and math.isfinite(shift) and scale != 0):
        fail(f"--reward {spec!r}: SCALE must be a non-zero finite number and SHIFT finite")
    return scale, shift
# --- end shared: family ---


# --- shared: phases ---
# A phase (distillation, re-evaluation, alignment, ...) is saved as `<out>/<phase>.pt` with the key of everything it
# depends on (`phase_key`); a later run reuses it only when the key matches, and continues with the RNG states saved
# with it, so a reused phase and a computed one lead to the same run.
def rng_state() -> dict:
    """Every RNG a run draws from: torch (CPU and every CUDA device), numpy's global generator, Python's random."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": json.dumps(np_state[1].tolist()), "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", np.array(json.loads(s["numpy"]), dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    st = json.loads(s["python"])
    random.setstate((st[0], tuple(st[1]), st[2]))


def saved_key(saved: dict | None) -> dict | None:
    """The key a phase, online or final checkpoint of this script was written with (None: not recorded)."""
    key = saved.get("phase_key") if isinstance(saved, dict) else None
    return key if isinstance(key, dict) else None


def load_phase(path: Path, key: dict, no_resume: bool) -> dict | None:
    """A saved phase checkpoint written with the same key, else None (then the phase is recomputed)."""
    if no_resume or not path.is_file():
        return None
    saved = read_saved(path)
    if saved_key(saved) is None:
        print(f"NOTICE: {path} is unreadable; recomputing phase {path.stem}")
        return None
    if key_diff(saved_key(saved), key):
        print(f"NOTICE: {path} was made with other arguments; recomputing phase {path.stem}")
        return None
    print(f"reusing {path} (pass --no-resume to recompute)")
    return saved


class Metrics:
    """Training scalars summed on the device and read with one host sync at log time (none in the hot loop); a
    non-finite mean stops the run, and the checkpoints written so far stay valid."""

    def __init__(self, writer: SummaryWriter, prefix: str = ""):
        self.writer, self.prefix = writer, prefix
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, m: dict[str, Tensor | float]) -> None:
        # always a new tensor: a CUDA-graph update returns static outputs that its next call overwrites
        for k, v in m.items():
            v = v.detach().float().reshape(()) if isinstance(v, Tensor) else torch.tensor(float(v))
            if k in self.sums:
                self.sums[k] = self.sums[k] + v.to(self.sums[k].device)
                self.counts[k] += 1
            else:
                self.sums[k], self.counts[k] = v.clone(), 1

    def flush(self, step: int, phase: str) -> dict[str, float]:
        """Writes the means since the last flush at `step`; returns them."""
        if not self.sums:
            return {}
        device = next(iter(self.sums.values())).device
        totals = torch.stack([v.to(device) for v in self.sums.values()]).cpu().tolist()  # the one host sync
        out = {}
        for k, total in zip(self.sums, totals):
            v = total / self.counts[k]
            if not math.isfinite(v):
                fail(f"non-finite {self.prefix}{k} at step {step} of phase {phase}; lower the learning rates or check the data "
                     "(the checkpoints written so far stay valid)")
            self.writer.add_scalar(self.prefix + k, v, step)
            out[k] = v
        self.sums, self.counts = {}, {}
        return out
# --- end shared: phases ---


# --- shared: constraint ---
# The Lagrangian constraint of Constrained Fine-Tuning (O2SAC and O2TD3): a deviation D from the reference policy
# (O2SAC: the one-sample KL estimate; O2TD3: the squared action distance) must stay under a threshold that loosens
# with online env steps; the multiplier lambda = exp(log_lambda) is learned by an asymmetric (expectile-like) loss.
def constraint_threshold(t: int | float, eps0: float, eps_end: float, horizon: int) -> float:
    """eps_t = min(eps_end, eps0 + (eps_end - eps0) t / horizon): the threshold LOOSENS with env steps t."""
    return min(eps_end, eps0 + (eps_end - eps0) * t / horizon)


def lagrange_loss(log_lam: Tensor, deviation: Tensor, threshold: float | Tensor, tau: float = 0.7) -> Tensor:
    """lam * c with c = mean w(u) u, u = eps - D, w = tau where u < 0 (violated) else 1 - tau (linear, not squared).
    Violations make c < 0, so gradient descent on this loss raises lam; c is detached."""
    u = threshold - deviation.detach()
    c = (torch.where(u < 0, tau, 1.0 - tau) * u).mean()
    return log_lam.exp() * c.detach()
# --- end shared: constraint ---


if __name__ == "__main__":
    main(parse_cli(Args))
