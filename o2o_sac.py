"""O2SAC: offline-to-online SAC with optimistic critic reconstruction and constrained fine-tuning (OCR-CFT).

Takes the actor of any offline_pretrain.py checkpoint (a tanh-Gaussian actor is copied, other families are
distilled into one), re-evaluates it with entropy-regularised FQE into new LayerNorm critics, aligns the critics
with the actor, then fine-tunes online with a Lagrangian KL constraint to a reference policy whose threshold
loosens over time. Paper: Luo et al., NeurIPS 2024, https://arxiv.org/abs/2412.18855 (O2SAC: the
paper's re-evaluation, value alignment and constrained fine-tuning for SAC). Also PORL (policy-only fine-tuning, https://arxiv.org/abs/2505.16856) with `--critic-init scratch`.

Usage:
    python o2o_sac.py --env hopper-medium-v2                                   # O2SAC from the CQL checkpoint
    python o2o_sac.py --env hopper-medium-v2 --offline-algo iql --reference offline --buffer-mode all
    python o2o_sac.py --env hopper-medium-v2 --no-reevaluate --no-align --no-constraint   # naive fine-tuning
    python o2o_sac.py --env hopper-medium-v2 --offline-algo bc --critic-init scratch       # PORL
    python o2o_sac.py --env hopper-medium-v2 --budget-scale 0.03 --align-actor frozen      # the paper's protocol, compressed
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    # --- experiment ---
    env: str = "hopper-medium-v2"
    """D4RL-style dataset name (resolved to a Minari dataset); its level picks the per-family defaults"""
    dataset_id: str | None = None
    """any Minari dataset id; overrides the name resolution of --env"""
    family: str | None = None
    """dataset family `<env>-<level>` (e.g. hopper-medium-expert, antmaze-umaze) whose per-family values apply; default:
    the one --env names (a --dataset-id run whose --env names no D4RL dataset must pass it)"""
    no_download: bool = False
    """never try to download a hosted dataset"""
    seed: int = 0
    """random seed (also picks the offline checkpoint runs/offline/<algo>/<env>/seed<k>)"""
    offline_algo: Literal["cql", "iql", "td3_bc", "bc"] = "cql"
    """offline method whose checkpoint is loaded by the path convention (the paper pairs O2SAC with CQL)"""
    checkpoint: str | None = None
    """explicit offline checkpoint path; overrides the convention"""
    run_dir: str = "runs"
    """outputs go to <run_dir>/o2o_sac/<env>/<run_name>/; offline checkpoints are looked up under it"""
    run_name: str | None = None
    """output sub-folder; default: <offline_algo>_<mode>_seed<k>"""
    no_resume: bool = False
    """recompute every phase even when the run folder holds phase checkpoints of the same args, and start the online
    phase afresh instead of resuming an unfinished run's online.pt (a finished run of other settings still needs
    --overwrite)"""
    overwrite: bool = False
    """start afresh in a run folder that holds a run of other settings: its checkpoints, results and tensorboard logs
    are deleted first"""
    stop_after: int | None = None
    """stop (as if killed, without final outputs) after this many online env steps; for resume tests"""
    budget_scale: float = 1.0
    """multiplies every step count given or defaulted (distill, re-evaluation, alignment and online steps, PORL's
    pre-sample steps, learning starts, the eval / align-eval / checkpoint / log intervals,
    --stop-after), rounded to an integer >= 1 (0 stays 0), and divides the Lagrange multiplier's learning rate by it,
    so that log lambda can move as far over a compressed online phase as over the paper's: F < 1 gives a miniature of
    the paper's protocol rather than a truncation of it; the KL-threshold horizon only with --scale-constraint-horizon.
    1 = the paper's protocol; the effective values go to results.json"""

    # --- modes: OCR-CFT's ablations, PORL, naive fine-tuning ---
    no_reevaluate: bool = False
    """skip re-evaluation: keep the checkpoint's critic, its target critics and its reward transform if it has them
    (CQL, IQL, TD3+BC), else fresh critics on raw rewards"""
    no_align: bool = False
    """skip value alignment (the target critics then carry on from the phase before instead of being reset to the
    critics)"""
    no_constraint: bool = False
    """online SAC without the KL constraint. All three flags = naive fine-tuning, which keeps training what the
    checkpoint holds: its critics, its target critics and its learned alpha when it has them (CQL), otherwise a copy
    of the critics as targets and alpha0; rewards get the checkpoint's transform whenever its critic is kept"""
    critic_init: Literal["offline", "scratch"] = "offline"
    """where the critics come from. offline: the offline checkpoint's side, re-evaluated from the offline actor (the
    OCR-CFT pipeline above), or with --no-reevaluate the checkpoint's own critic when it has one; scratch: random critics,
    i.e. PORL (no re-evaluation, alignment or constraint, a pre-sample stage, then plain SAC)"""
    reference: Literal["best", "interval", "offline"] = "best"
    """reference policy: best evaluated so far, a copy every --reference-interval evaluations, or the offline one"""
    reference_interval: int | None = None
    """with --reference interval: copy pi into pi_ref every this many evaluations of the --eval-every schedule (the
    table's eps_end is divided by 4). Default: 1, the official code's update_n; 10 for hopper medium-expert / expert
    (FAMILY_DEFAULTS), where the official code also clips the actor's gradient"""
    buffer_mode: Literal["half", "all", "part", "none"] | None = None
    """half: batches half online half offline; all / part: offline data (all / top trajectories) inside the
    online buffer; none: online data only. Default: half, none with --critic-init scratch"""
    part_trajectories: int = 50
    """with --buffer-mode part: how many top-return offline trajectories to keep"""

    # --- per-dataset-family values (None = from FAMILY_DEFAULTS by the level of --env) ---
    alpha0: float | None = None
    """entropy weight of re-evaluation and alignment, initial online alpha (naive fine-tuning starts from the
    checkpoint's learned alpha when it has one)"""
    eps0: float | None = None
    """initial KL threshold"""
    eps_end: float | None = None
    """final KL threshold (the threshold loosens from eps0 to eps_end)"""
    actor_grad_clip: float | None = None
    """max gradient norm of the online actor updates; 0 never clips. Default: from FAMILY_DEFAULTS (0.25 for hopper
    medium-expert / expert with --reference interval, as the official configs; no clipping otherwise)"""
    n_critics: int | None = None
    """critics of the new critic ensemble; every target and actor loss reads the min over them (1: the single critic's
    value, the official double_critic off). Default: from FAMILY_DEFAULTS (2 on MuJoCo, 1 on AntMaze)"""
    critic_layers: int | None = None
    """hidden layers (Linear 256 -> LayerNorm -> ReLU) of the new critics. Default: from FAMILY_DEFAULTS (3 on MuJoCo, 5 on
    AntMaze)"""
    normalize_states: bool | None = None
    """feed the networks states normalised with the offline actor's statistics (the checkpoint's); off: raw states,
    which needs an offline actor trained on raw states (CQL's on AntMaze). Default: from FAMILY_DEFAULTS (on for MuJoCo,
    off for AntMaze)"""
    reward: str | None = None
    """`SCALE,SHIFT`: new critics learn (offline and online) on r * SCALE + SHIFT. Default: from FAMILY_DEFAULTS (1,0 on
    MuJoCo; 10,-5 on AntMaze, as the official configs)"""

    # --- offline phases ---
    distill_steps: int = 5_000
    """gradient steps distilling a non-tanh-Gaussian offline actor into a tanh-Gaussian one (docs/algorithms.md, section 3.1)"""
    distill_fit: Literal["mode", "likelihood"] = "mode"
    """likelihood: the student maximises the likelihood of the offline actor's actions (the paper's recipe; docs/algorithms.md,
    section 3.1); mode:
    its spread still comes from them, but its mode tanh(mu), the action evaluated and aligned on, is fitted to the
    offline actor's deterministic action (local hopper-medium, 5k steps, seed 0: from IQL, action MSE 0.0088 -> 0.0039
    and score 31.3 -> 34.6 against the offline 34.5; from TD3+BC, MSE 0.0064 -> 0.0038, score 51.0 -> 46.3 against 44.1)"""
    distill_noise: float = 0.1
    """std of the Gaussian noise added to a deterministic offline actor's action when distilling (a stochastic
    actor is distilled from its own samples); fitting the bare mean action drives the student's std towards 0,
    and log pi0 in the alignment targets then explodes"""
    reevaluate_steps: int = 500_000
    """re-evaluation (FQE) gradient steps; with --reevaluate-tol > 0 the cap of a run that stops once Q has converged"""
    reevaluate_tau: float = 0.05
    """Polyak rate of the target critics during re-evaluation only (later phases use --tau). FQE's values approach
    their limit at a pace set by tau: on hopper-medium 0.05 converges in ~8k steps, the paper's 0.005 is still 17%
    short after 23k (it has 500k steps); --reevaluate-tau 0.005 --reevaluate-tol 0 is the paper's re-evaluation"""
    reevaluate_tol: float = 0.01
    """stop re-evaluation once the gap to Q's limit, extrapolated from the mean target-critic value on fixed dataset
    (s, a) pairs read every 1000 steps, is below this fraction of that value; --reevaluate-steps is the cap (0 = always
    run --reevaluate-steps, the paper)"""
    align_steps: int | None = None
    """value-alignment gradient steps. Default: from FAMILY_DEFAULTS (500k on MuJoCo, 1M on AntMaze)"""
    align_actor: Literal["train", "frozen"] = "frozen"
    """train: the actor keeps training during alignment with the SAC loss (the paper); frozen: the actor stays pi0
    during alignment, only the critics align, and online fine-tuning starts from pi0 with the aligned critics (its
    Adam then has no state yet when carried into online). Default frozen: with the
    alignment budgets of a single machine the actor's updates during alignment cost score before the critic is
    aligned (local hopper-medium, TD3+BC checkpoint 44.1, seed 0: after alignment 36.9 trained, 46.3 frozen; see the
    README's "No drop at the switch"); --align-actor train is the paper's schedule"""
    batch_size: int = 256
    """batch size of every phase"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """Polyak rate of the target critics"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    actor_lr: float = 1e-4
    """actor learning rate of alignment and online fine-tuning (distillation uses a fixed 3e-4)"""

    # --- online phase ---
    online_steps: int | None = None
    """online env steps (PORL: including the pre-sample stage). Default: from FAMILY_DEFAULTS (100k on MuJoCo, 200k on
    AntMaze)"""
    utd: int = 10
    """gradient updates per env step"""
    learning_starts: int | None = None
    """updates start after this many env steps (the policy acts from step 1, no random warm-up). Default: from
    FAMILY_DEFAULTS (1k on MuJoCo, 5k on AntMaze)"""
    pre_sample_steps: int = 5_000
    """PORL only: env steps with the frozen policy while only the critics learn"""
    alpha_lr: float = 3e-4
    """temperature learning rate (auto-tuned online, target entropy -|A|)"""
    lambda_init: float | None = None
    """initial Lagrange multiplier. Default: from FAMILY_DEFAULTS (1 on MuJoCo and the AntMaze umazes, 2 on the
    medium and large mazes)"""
    lambda_lr: float = 5e-5
    """learning rate of log lambda (updated once per env step)"""
    constraint_horizon: int = 100_000
    """env steps over which the KL threshold loosens linearly from eps0 to eps_end (the constraint's schedule)"""
    scale_constraint_horizon: bool = False
    """with --budget-scale F: also multiply --constraint-horizon by F, so the threshold reaches eps_end at the end of the
    shortened online phase. Off by default: the threshold loosens per env step of experience as in the paper's run, and a
    miniature covers the first F of that schedule (local hopper-medium, F = 0.02: compressed, the KL to pi_ref grew to
    0.5-1.7 and each of 3 seeds had online evaluations at 0.7-0.8; per env step, it stayed near 0.06; README, "No drop
    at the switch")"""
    kl_floor: float = -50.0
    """lower clamp of log pi_ref(a|s) in the KL estimate"""

    # --- evaluation and logging ---
    eval_every: int | None = None
    """evaluate every this many online env steps. Default: from FAMILY_DEFAULTS (1k on MuJoCo, 5k on AntMaze)"""
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
    floor(online_steps / 10 * k / early_evals), k = 1..early_evals, on top of the --eval-every schedule (0 = none).
    With --reference best they are reference-update points like any evaluation; --reference interval counts only the
    --eval-every evaluations"""
    align_eval_every: int | None = None
    """evaluate the actor's deterministic score every this many alignment steps (curve phase "align",
    align/normalized_score). Default: align_steps // 10 (at least 1); 0 = never"""
    log_every: int = 1_000
    """log losses every this many steps (gradient steps offline, env steps online)"""
    checkpoint_every: int | None = None
    """write online.pt at the first episode end after this many env steps since the last one. Default: 5000 (times
    --budget-scale), at most a tenth of --online-steps, so a short run's online phase survives a kill too"""

    # --- performance ---
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice; 1 is fastest on a small shared machine)"""

    # --- speed (same math; eager is the reference) ---
    compile: bool = False
    """torch.compile the whole update (forward, losses, backward, optimizer steps)"""
    cudagraphs: bool = False
    """replay the update as a CUDA graph (CUDA only; add --compile for the fastest path)"""
    bf16: bool = False
    """bfloat16 autocast of the networks inside the update (losses, acting and evaluation stay float32)"""

    # --- tracking (tensorboard is always written) ---
    track: bool = False
    """also log to Weights & Biases (wandb.init with sync_tensorboard: the tensorboard events are mirrored there);
    tensorboard stays the record. Needs `pip install wandb`"""
    wandb_project_name: str = "o2o"
    """the Weights & Biases project of --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user) of --track; default: wandb's default entity"""


# ---------------------------------------------------------------- per-dataset-family defaults (the official O2SAC configs)
# A dataset's row: its family's ("mujoco" or "antmaze", by the environment of --env), then its level's, then its
# "<env>-<level>" row, each overriding the one before; explicit flags override them all (FAMILY_FIELDS are filled into
# the args, with_family; alpha0, eps0, eps_end, actor_grad_clip and reference_interval are read by family_values).
# "random" is not in the paper: it gets the medium values. interval_grad_clip: the actor's gradient-norm clip with
# --reference interval (0 = none); reference_interval: the default --reference-interval (1 where a row has none).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # the dataset families: the critics, the states and rewards they see, the budgets and the evaluation
    "mujoco": dict(n_critics=2, critic_layers=3, normalize_states=True, reward="1,0", align_steps=500_000, online_steps=100_000,
                   learning_starts=1_000, eval_every=1_000, eval_episodes=10, lambda_init=1.0),
    # the official AntMaze configs (config/finetune/O2SAC/antmaze/*): double_critic false, q_n_hidden_layers 5, normalize
    # false, reward_scale 10 / reward_bias -5, align_steps 1M, online_steps 200k, warmup_steps 5k, eval_freq 5k,
    # n_episodes 100, threshold 0.125 -> end_threshold 2.0; alpha 0.5 and lmbda 2 on medium and large, 0.2 and 1 on umaze
    "antmaze": dict(n_critics=1, critic_layers=5, normalize_states=False, reward="10,-5", align_steps=1_000_000, online_steps=200_000,
                    learning_starts=5_000, eval_every=5_000, eval_episodes=100, lambda_init=2.0, alpha0=0.5, eps0=0.125, eps_end=2.0,
                    interval_grad_clip=0.0),
    "antmaze-umaze": dict(alpha0=0.2, lambda_init=1.0),
    "antmaze-umaze-diverse": dict(alpha0=0.2, lambda_init=1.0),
    # the MuJoCo levels
    "medium": dict(alpha0=0.2, eps0=0.125, eps_end=2.0, interval_grad_clip=0.0),
    "medium-replay": dict(alpha0=0.2, eps0=0.125, eps_end=2.0, interval_grad_clip=0.0),
    "random": dict(alpha0=0.2, eps0=0.125, eps_end=2.0, interval_grad_clip=0.0),
    "medium-expert": dict(alpha0=0.5, eps0=0.005, eps_end=0.125, interval_grad_clip=0.0),
    "expert": dict(alpha0=0.5, eps0=0.005, eps_end=0.125, interval_grad_clip=0.0),
    # the official code copies the reference every 10 evaluations on hopper's expert data, and clips the actor at 0.25
    "hopper-medium-expert": dict(interval_grad_clip=0.25, reference_interval=10),
    "hopper-expert": dict(interval_grad_clip=0.25, reference_interval=10),
}
# the Args fields the table fills when left at None (with_family)
FAMILY_FIELDS = ("n_critics", "critic_layers", "normalize_states", "reward", "align_steps", "online_steps", "learning_starts", "eval_every",
                 "eval_episodes", "lambda_init")


def family_row(args: Args) -> tuple[str, str, dict[str, Any]]:
    """(family, level, row): the FAMILY_DEFAULTS rows of the run's dataset family (dataset_family: --family, else
    --env) merged: "mujoco" or "antmaze", then the level's (MuJoCo), then "<env>-<level>"."""
    name, level = dataset_family(args.env, args.dataset_id, args.family)
    family = "antmaze" if name == "antmaze" else "mujoco"
    level_row = FAMILY_DEFAULTS.get(level, {}) if family == "mujoco" else {}
    return family, level, {**FAMILY_DEFAULTS[family], **level_row, **FAMILY_DEFAULTS.get(f"{name}-{level}", {})}


def with_family(args: Args) -> Args:
    """A copy of args with every FAMILY_FIELDS value it leaves at None taken from its FAMILY_DEFAULTS row (Args itself
    is never mutated)."""
    missing = [k for k in FAMILY_FIELDS if getattr(args, k) is None]
    if not missing:
        return args
    row = family_row(args)[2]
    return dataclasses.replace(args, **{k: row[k] for k in missing})


def family_values(args: Args) -> dict[str, Any]:
    """alpha0, eps0, eps_end, actor_grad_clip, reference_interval: explicit flags first, else the FAMILY_DEFAULTS row of
    --env (family_row)."""
    family, level, row = family_row(args)
    vals: dict[str, Any] = {"family": family, "level": level}
    for k in ("alpha0", "eps0", "eps_end"):
        v = getattr(args, k)
        if v is None:
            if level is None:
                fail(f"--env {args.env} names no dataset level ({', '.join(D4RL_LEVELS)}); pass --alpha0, --eps0 and --eps-end")
            v = row[k] / 4.0 if (k == "eps_end" and args.reference == "interval") else row[k]
        vals[k] = float(v)
    clip = args.actor_grad_clip
    if clip is None:
        clip = row.get("interval_grad_clip", 0.0) if args.reference == "interval" else 0.0
    vals["actor_grad_clip"] = float(clip) if clip > 0 else None
    vals["reference_interval"] = args.reference_interval if args.reference_interval is not None else int(row.get("reference_interval", 1))
    return vals


# ==================== ALGO LOGIC ====================
# ---------------------------------------------------------------- pure math (the paper's O2SAC; docs/algorithms.md, section 3)
# The constraint's threshold schedule and Lagrange loss are the shared block "constraint" at the bottom of the file.
def fqe_target(rewards: Tensor, terminals: Tensor, next_q: Tensor, next_logp: Tensor, alpha: float | Tensor, gamma: float) -> Tensor:
    """Soft TD target y = r + gamma (1 - d) [min_i Qbar_i(s', a') - alpha log pi(a'|s')] (paper: Policy Re-evaluation,
    O2SAC; docs/algorithms.md, section 3.2); next_q is (n, B).
    d = 1 only for a true termination: a time-limit end is bootstrapped."""
    return rewards + gamma * (1.0 - terminals) * (next_q.min(0).values - alpha * next_logp)


def constrained_target(rewards: Tensor, terminals: Tensor, next_q: Tensor, next_logp: Tensor, next_kl: Tensor, alpha: float | Tensor,
                       lam: float | Tensor, gamma: float) -> Tensor:
    """Critic target of constrained fine-tuning (paper: Constrained Fine-Tuning, O2SAC; docs/algorithms.md, section 3.5): the
    soft target minus gamma (1 - d) lam (l' - lr')."""
    return fqe_target(rewards, terminals, next_q, next_logp, alpha, gamma) - gamma * (1.0 - terminals) * lam * next_kl


def alignment_targets(qbar_star: Tensor, qbar_an: Tensor, logp0_star: Tensor, logp0_an: Tensor, alpha0: float) -> tuple[Tensor, Tensor]:
    """Value alignment (paper: Value Alignment, O2SAC; docs/algorithms.md, section 3.3). qbar_* are the frozen target
    critics (n, B) at a* = tanh(mu0(s)) and at an ~ pi(.|s);
    logp0_* are log pi0 at those actions. Returns Q* = min_i Qbar_i(s, a*) and
    y = min(Q* - alpha0 (log pi0(a*|s) - log pi0(an|s)), min_i Qbar_i(s, an)): values are only pushed down."""
    q_star = qbar_star.min(0).values
    y = torch.minimum(q_star - alpha0 * (logp0_star - logp0_an), qbar_an.min(0).values)
    return q_star, y


def kl_estimate(logp: Tensor, logp_ref: Tensor, floor: float = -50.0) -> Tensor:
    """One-sample KL(pi || pi_ref) at a ~ pi: D = log pi(a|s) - max(log pi_ref(a|s), floor)."""
    return logp - logp_ref.clamp(min=floor)


def sac_alpha_loss(log_alpha: Tensor, logp: Tensor, target_entropy: float) -> Tensor:
    """Standard temperature auto-tuning: alpha rises while the entropy -log pi is below the target."""
    return -(log_alpha * (logp.detach() + target_entropy)).mean()


def reference_update_due(reference: str, score: float, best: float, scheduled: bool, n_scheduled: int, interval: int) -> bool:
    """Whether an online evaluation copies pi into pi_ref (the reference update; docs/algorithms.md, section 3.5). best:
    the score beats the best so far, at any
    evaluation (the extra early ones are candidates too); interval: every `interval`-th evaluation of the --eval-every
    schedule (n_scheduled counts those, this one included), so extra evaluations never shift the cadence; offline:
    never."""
    if reference == "best":
        return score > best
    return reference == "interval" and scheduled and n_scheduled % interval == 0


# diagnostics at the phase boundaries: whether the hand-over between phases keeps the offline policy's behaviour (the
# paper's claim of no drop at the switch): the critics' values, how they rank the actor's actions, and the actor itself
def q_stats(q_data: Tensor, q_pi: Tensor) -> dict[str, float]:
    """Mean and (population) std over states of min_i Q_i(s, a) at the dataset actions (q_data) and at the actor's
    mode (q_pi), both of shape (n critics, B)."""
    qd, qp = q_data.min(0).values, q_pi.min(0).values
    return {"q_data_mean": float(qd.mean()), "q_data_std": float(qd.std(correction=0)),
            "q_pi_mean": float(qp.mean()), "q_pi_std": float(qp.std(correction=0))}


def policy_critic_agreement(q_mode: Tensor, q_samples: Tensor, logp0_samples: Tensor) -> dict[str, float]:
    """q_mode (B,): min_i Q_i(s, mode of pi); q_samples and logp0_samples (K, B): min_i Q_i(s, a_k) and log pi0(a_k|s)
    at K actions a_k ~ pi(.|s). mode_preferred: the fraction of (state, sample) pairs where Q(s, mode) >= Q(s, a_k)
    (after alignment the actor's mode should rank first); logp0_q_corr: the Pearson correlation of log pi0(a_k|s)
    and Q(s, a_k) over the K samples of each state, averaged over states (alignment aims at Q - alpha0 log pi0 flat in
    a, i.e. a correlation near 1); a state where either is constant counts 0."""
    x = logp0_samples - logp0_samples.mean(0)
    y = q_samples - q_samples.mean(0)
    denom = ((x * x).sum(0) * (y * y).sum(0)).sqrt()
    corr = torch.where(denom > 0, (x * y).sum(0) / denom.clamp(min=1e-30), torch.zeros_like(denom))
    return {"mode_preferred": float((q_mode.unsqueeze(0) >= q_samples).float().mean()), "logp0_q_corr": float(corr.mean())}


def actor_stats(mode: Tensor, logp_samples: Tensor, max_action: float = 1.0) -> dict[str, float]:
    """mode (B, |A|): the actor's deterministic actions; logp_samples (K, B): log pi(a_k|s) at a_k ~ pi. entropy: the
    Monte-Carlo estimate -E[log pi(a|s)]; mean_abs_action: mean |mode| / max_action; saturation: the fraction of mode
    components with |a| > 0.99 max_action (where tanh's Jacobian vanishes and the gradient dies)."""
    m = mode.abs() / max_action
    return {"entropy": float(-logp_samples.mean()), "mean_abs_action": float(m.mean()), "saturation": float((m > 0.99).float().mean())}


# ---------------------------------------------------------------- networks and helpers
ACTOR_HIDDEN = (256, 256, 256)
CRITIC_HIDDEN = (256, 256, 256)
DISTILL_LR = 3e-4


def make_critic(obs_dim: int, act_dim: int, n: int = 2, layers: int = len(CRITIC_HIDDEN)) -> Critic:
    """n critics (twin on MuJoCo, one on AntMaze: --n-critics), each `layers` x [Linear 256 -> LayerNorm -> ReLU] -> Linear
    (--critic-layers), orthogonal init gain 1, zero bias."""
    return orthogonal_init_(Critic(obs_dim, act_dim, (CRITIC_HIDDEN[0],) * layers, n=n, layer_norm=True))


def frozen(module: nn.Module) -> nn.Module:
    """A copy that never trains (pi0, pi_ref, target critics)."""
    m = copy.deepcopy(module)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def distill_targets(teacher: nn.Module, obs: Tensor, noise_std: float, max_action: float = 1.0) -> Tensor:
    """Actions whose likelihood the tanh-Gaussian student maximises (docs/algorithms.md, section 3.1): the offline actor's
    own samples when
    it is stochastic, its mean action plus N(0, noise_std^2) when it is deterministic, so the student inherits a
    spread instead of collapsing onto the mean; kept inside the open action box where atanh is finite."""
    if hasattr(teacher, "sample"):
        a = teacher.sample(obs)[0]
    else:
        a = teacher.act(obs)
        a = a + noise_std * torch.randn_like(a)
    return a.clamp(-0.999 * max_action, 0.999 * max_action)


def offline_trajectory_indices(data: dict, top_k: int) -> np.ndarray:
    """Transition indices of the top_k offline episodes by return (--buffer-mode part)."""
    ends = np.flatnonzero(data["ends"] > 0.5)
    starts = np.concatenate([[0], ends[:-1] + 1])
    order = np.argsort(-data["episode_returns"])[:top_k]
    return np.concatenate([np.arange(starts[i], ends[i] + 1) for i in sorted(order)])


def subset(data: dict, idx: np.ndarray) -> dict:
    out = dict(data)
    for k in ("observations", "actions", "rewards", "next_observations", "terminals", "ends"):
        out[k] = data[k][idx]
    return out


DIAG_STATES, DIAG_SAMPLES = 2048, 8
BOUNDARIES = ("start", "reevaluated", "aligned", "end")  # tensorboard step of diagnostics/* = the index here


@torch.no_grad()
def boundary_diagnostics(actor: TanhGaussianActor, pi0: TanhGaussianActor, qf: Critic, obs: Tensor, actions: Tensor,
                         n_samples: int = DIAG_SAMPLES, seed: int = 0) -> dict[str, float]:
    """q_stats, policy_critic_agreement and actor_stats on the states `obs` with their dataset `actions`. The action
    samples come from a generator of their own, so a diagnostic never moves the run's random streams."""
    g = torch.Generator(device=obs.device).manual_seed(seed)
    mu, log_std = actor(obs)
    u = mu.unsqueeze(0) + log_std.exp().unsqueeze(0) * torch.randn((n_samples, *mu.shape), generator=g, device=obs.device, dtype=mu.dtype)
    a, logp = actor.max_action * torch.tanh(u), tanh_gaussian_log_prob(mu.unsqueeze(0), log_std.unsqueeze(0), u)
    mode = actor.max_action * torch.tanh(mu)
    obs_k = obs.unsqueeze(0).expand(n_samples, *obs.shape)
    q_samples = qf(obs_k, a).min(0).values
    q_mode = qf(obs, mode)
    return {**q_stats(qf(obs, actions), q_mode), **policy_critic_agreement(q_mode.min(0).values, q_samples, pi0.log_prob(obs_k, a)),
            **actor_stats(mode, logp, actor.max_action)}


# ---------------------------------------------------------------- one gradient step per phase (tensors in, metrics out)
def distill_update(student: TanhGaussianActor, opt: torch.optim.Optimizer, obs: Tensor, target_actions: Tensor,
                   target_mode: Tensor | None = None) -> dict[str, Tensor]:
    """Maximum likelihood of the offline actor's actions (distill_targets) under the tanh-Gaussian student
    (docs/algorithms.md, section 3.1).
    With target_mode (the offline actor's deterministic action), the student's mode is fitted to it explicitly: the
    samples' likelihood then trains only the spread (mu detached), and mu maximises the likelihood of atanh(target
    mode) under N(mu, std) with std detached, i.e. a squared error in pre-tanh space weighted by 1 / std^2. The
    evaluated policy is tanh(mu); the plain fit leaves it where the samples' likelihood puts it, which for a teacher
    that is not tanh-Gaussian (IQL's Gaussian clipped to the box, TD3+BC's action plus noise) is not the teacher's
    action."""
    mu, log_std = student(obs)
    pre = torch.atanh((target_actions / student.max_action).clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    if target_mode is None:
        loss = -tanh_gaussian_log_prob(mu, log_std, pre).mean()
        metrics = {}
    else:
        spread = -tanh_gaussian_log_prob(mu.detach(), log_std, pre).mean()
        mode_pre = torch.atanh((target_mode / student.max_action).clamp(-0.999, 0.999))
        mode = (0.5 * ((mode_pre - mu) / log_std.detach().exp()) ** 2).sum(-1).mean()
        loss = spread + mode
        metrics = {"mode_mse": (student.max_action * torch.tanh(mu.detach()) - target_mode).pow(2).mean()}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.detach(), **metrics}


def reevaluate_update(pi0: TanhGaussianActor, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer, b: dict[str, Tensor], *,
                      alpha0: float, gamma: float, tau: float) -> dict[str, Tensor]:
    """Entropy-regularised FQE of the frozen pi0 (paper: Policy Re-evaluation, O2SAC; docs/algorithms.md, section 3.2);
    a' is a reparameterised sample, not the mean."""
    with torch.no_grad():
        next_a, next_logp = pi0.sample(b["next_obs"])
        y = fqe_target(b["rewards"], b["terminals"], qf_target(b["next_obs"], next_a), next_logp, alpha0, gamma)
    q = qf(b["obs"], b["actions"])
    qf_loss = ((q - y) ** 2).mean(-1).sum()
    qf_opt.zero_grad(set_to_none=True)
    qf_loss.backward()
    qf_opt.step()
    polyak_update(qf_target, qf, tau)
    return {"qf_loss": qf_loss.detach(), "qf_values": q.mean().detach()}


def align_update(pi0: TanhGaussianActor, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer,
                 actor_opt: torch.optim.Optimizer, b: dict[str, Tensor], *, alpha0: float, train_actor: bool = True) -> dict[str, Tensor]:
    """Value alignment (paper: Value Alignment, O2SAC; docs/algorithms.md, section 3.3): targets frozen; the actor takes a
    plain SAC step against the critics as they were before
    this step (it reads them frozen), and the critic targets use the same sample an ~ pi, detached. train_actor=False
    (--align-actor frozen): the actor loss is only reported, the actor is never stepped, so pi stays pi0."""
    obs = b["obs"]
    B = obs.shape[0]
    an, logp_an = actor.sample(obs)
    actor_loss = (alpha0 * logp_an - frozen_call(qf, obs, an).min(0).values).mean()
    with torch.no_grad():
        mu0, log_std0 = pi0(obs)
        a_star = pi0.max_action * torch.tanh(mu0)
        logp0_star = tanh_gaussian_log_prob(mu0, log_std0, mu0)  # log pi0 at its own mode tanh(mu0), exact
        an = an.detach()
        logp0_an = pi0.log_prob(obs, an)
        qbar = qf_target(torch.cat([obs, obs]), torch.cat([a_star, an]))
        q_star, y = alignment_targets(qbar[:, :B], qbar[:, B:], logp0_star, logp0_an, alpha0)
    q = qf(torch.cat([obs, obs]), torch.cat([a_star, an]))  # both action sets in one fused call
    qf_loss = ((q[:, :B] - q_star) ** 2).mean(-1).sum() + ((q[:, B:] - y) ** 2).mean(-1).sum()
    actor_opt.zero_grad(set_to_none=True)
    qf_opt.zero_grad(set_to_none=True)
    (actor_loss + qf_loss if train_actor else qf_loss).backward()  # one backward: each loss reaches only its own parameters
    if train_actor:
        actor_opt.step()
    qf_opt.step()
    return {"qf_loss": qf_loss.detach(), "actor_loss": actor_loss.detach(), "q_star": q_star.mean().detach(),
            "q_gap": (q[:, :B] - q[:, B:]).min(0).values.mean().detach()}


def online_update(actor: TanhGaussianActor, actor_ref: TanhGaussianActor | None, qf: Critic, qf_target: Critic, log_alpha: Tensor,
                  log_lam: Tensor, opts: dict[str, torch.optim.Optimizer], b: dict[str, Tensor], eps_t: Tensor, update_lam: bool,
                  update_actor: bool, *, target_entropy: float, gamma: float, tau: float, kl_floor: float,
                  actor_grad_clip: float | None = None) -> dict[str, Tensor]:
    """One constrained SAC update (paper: Constrained Fine-Tuning, O2SAC; docs/algorithms.md, section 3.5); actor_ref None =
    unconstrained. eps_t is the KL threshold (a 0-d tensor, so a
    compiled or captured update reads its current value). Every loss comes from the same pre-update forward pass and
    all go through ONE backward, each reaching only its own parameters: lam and alpha enter the actor loss and the
    critic target detached, the actor reads the critics frozen, the Lagrange and temperature losses read detached
    log-probs. Then steps: lam (update_lam), alpha and actor (update_actor; its gradient norm clipped at
    actor_grad_clip when given), critics, Polyak."""
    obs, next_obs = b["obs"], b["next_obs"]
    constrained = actor_ref is not None
    alpha = log_alpha.detach().exp().reshape(())  # log_alpha and log_lam have shape (1,); the metrics are 0-d
    lam = log_lam.detach().exp().reshape(()) if constrained else torch.zeros((), device=obs.device)
    pi_a, logp = actor.sample(obs)
    kl = kl_estimate(logp, actor_ref.log_prob(obs, pi_a), kl_floor) if constrained else torch.zeros_like(logp)
    actor_loss = (alpha * logp - frozen_call(qf, obs, pi_a).min(0).values + lam * kl).mean()
    with torch.no_grad():
        next_a, next_logp = actor.sample(next_obs)
        next_kl = kl_estimate(next_logp, actor_ref.log_prob(next_obs, next_a), kl_floor) if constrained else torch.zeros_like(next_logp)
        y = constrained_target(b["rewards"], b["terminals"], qf_target(next_obs, next_a), next_logp, next_kl, alpha, lam, gamma)
    q = qf(obs, b["actions"])
    qf_loss = ((q - y) ** 2).mean(-1).sum()
    loss = qf_loss
    if constrained and update_lam:
        loss = loss + lagrange_loss(log_lam, kl, eps_t).sum()
    if update_actor:
        loss = loss + sac_alpha_loss(log_alpha, logp, target_entropy) + actor_loss

    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if constrained and update_lam:
        opts["lambda"].step()
    if update_actor:
        opts["alpha"].step()
        if actor_grad_clip is not None:  # only the actor loss reaches the actor's parameters, so this is its own norm
            torch.nn.utils.clip_grad_norm_(actor.parameters(), actor_grad_clip)
        opts["actor"].step()
    opts["qf"].step()
    polyak_update(qf_target, qf, tau)
    return {"losses/qf_loss": qf_loss.detach(), "losses/actor_loss": actor_loss.detach(), "losses/alpha": alpha,
            "losses/lambda": lam, "losses/kl": kl.mean().detach(), "losses/qf_values": q.mean().detach(), "losses/entropy": -logp.mean().detach()}


# ---------------------------------------------------------------- one function per phase
# Each phase first looks for a saved checkpoint of itself made with the same key (Run.reuse): found, it restores what
# the phase left and returns; else it runs, saves its checkpoint and returns. The target critics and the critic Adam
# travel from re-evaluation through alignment into online fine-tuning, the actor Adam from alignment into online, as in
# the official code.
def run_distillation(run: Run, rb_offline: ReplayBuffer, accel: Accel) -> TanhGaussianActor:
    """Phase 0 (docs/algorithms.md, section 3.1): the offline actor and its score; a tanh-Gaussian actor is pi0 as it is
    (its own widths), any other family is distilled into a 3 x 256 one. Saved with the phase that follows it. Returns
    pi0, frozen."""
    args, ckpt, device = run.args, run.ckpt, run.device
    t0 = time.time()
    saved = run.reuse("aligned") or run.reuse("reevaluated")
    log_phase(run.writer, "offline", 0)
    if saved is not None:
        o = saved["o2o"]
        pi0 = TanhGaussianActor(ckpt["obs_dim"], ckpt["act_dim"], run.actor_hidden, ckpt["max_action"]).to(device)
        pi0.load_state_dict(o["pi0"])
        run.offline, run.distillation, run.diagnostics = (o["offline_return"], o["offline_score"]), o["distill"], dict(o["diagnostics"])
        if run.distillation is not None:
            log_phase(run.writer, "distill", 0)
    else:
        offline_actor = actor_from_checkpoint(ckpt, device)
        run.offline = run.evaluate(offline_actor, headline=True)
        tqdm.write(f"offline {ckpt['algo']} actor ({ckpt['actor_family']}): return {run.offline[0]:.1f}, normalized score {run.offline[1]:.1f}")
        if ckpt["actor_family"] == "tanh_gaussian":
            pi0 = offline_actor
        else:
            log_phase(run.writer, "distill", 0)
            pi0 = TanhGaussianActor(ckpt["obs_dim"], ckpt["act_dim"], run.actor_hidden, ckpt["max_action"]).to(device)
            distill_step = accel.update(functools.partial(distill_update, pi0, accel.adam(pi0.parameters(), DISTILL_LR)))
            met = Metrics(run.writer, "distill/")
            for step in tqdm(range(args.distill_steps), desc="distill", disable=None):
                obs = rb_offline.sample(args.batch_size)["obs"]
                with torch.no_grad():
                    target = distill_targets(offline_actor, obs, args.distill_noise, ckpt["max_action"])
                    mode = offline_actor.act(obs) if args.distill_fit == "mode" else None
                met.add(distill_step(obs, target, mode))
                if (step + 1) % args.log_every == 0 or step + 1 == args.distill_steps:
                    met.flush(step + 1, "distill")
            with torch.no_grad():
                idx = torch.randperm(rb_offline.size, device=device)[:10_000]
                obs = rb_offline.data["obs"][idx]
                mse = float(F.mse_loss(pi0.act(obs), offline_actor.act(obs)))
            d_ret, d_score = run.evaluate(pi0, headline=True)
            run.distillation = {"from_family": ckpt["actor_family"], "steps": args.distill_steps, "action_mse": mse, "return": d_ret,
                           "normalized_score": d_score}
            run.writer.add_scalar("distill/action_mse", mse, args.distill_steps)
            run.writer.add_scalar("distill/normalized_score", d_score, args.distill_steps)
            tqdm.write(f"distilled {ckpt['actor_family']} -> tanh_gaussian: action MSE {mse:.4g}, normalized score {d_score:.1f}")
    run.writer.add_scalar("eval/normalized_score", run.offline[1], 0)
    run.record("offline", 0, *run.offline)
    if run.distillation is not None:
        run.record("distilled", 0, run.distillation["return"], run.distillation["normalized_score"])
    run.phase_done("load_and_distill", t0)
    return frozen(pi0)


def run_reevaluation(run: Run, pi0: TanhGaussianActor, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer,
                     actor_opt: torch.optim.Optimizer, rb_offline: ReplayBuffer, accel: Accel) -> None:
    """Phase 1 (paper: Policy Re-evaluation, O2SAC; docs/algorithms.md, section 3.2): entropy-regularised FQE of the
    frozen pi0 into the critics, until Q on a fixed probe has converged (shared block fqe-stop) or for
    --reevaluate-steps. A saved aligned.pt holds its outcome too."""
    args = run.args
    t0 = time.time()
    log_phase(run.writer, "reevaluate", 0)
    saved = run.reuse("aligned") or run.reuse("reevaluated")
    if saved is not None:
        run.reused.append("reevaluated")
        run.reevaluation = saved["o2o"].get("reevaluation")
        run.restore(saved, qf, qf_target, {"qf": qf_opt, "actor": actor_opt}, accel)
        run.phase_done("reevaluate", t0)
        return
    reevaluate_step = accel.update(functools.partial(reevaluate_update, pi0, qf, qf_target, qf_opt, alpha0=run.fam["alpha0"], gamma=args.gamma,
                                                     tau=args.reevaluate_tau))
    met = Metrics(run.writer, "reevaluate/")
    probe: list[float] = []  # mean target-critic value on the diagnostics' dataset (s, a) pairs (no randomness drawn)
    bar = tqdm(range(args.reevaluate_steps), desc="re-evaluation", disable=None)
    steps_done, converged = args.reevaluate_steps, False
    for step in bar:
        met.add(reevaluate_step(rb_offline.sample(args.batch_size)))
        if (step + 1) % args.log_every == 0 or step + 1 == args.reevaluate_steps:
            vals = met.flush(step + 1, "re-evaluation")
            bar.set_postfix(qf_loss=f"{vals['qf_loss']:.3g}")
        if (step + 1) % REEVAL_CHECK_EVERY == 0:
            with torch.no_grad():
                probe.append(float(qf_target(run.diag_obs, run.diag_actions).mean()))
            gap = fqe_gap(probe)
            run.writer.add_scalar("reevaluate/q_probe", probe[-1], step + 1)
            if math.isfinite(gap):
                run.writer.add_scalar("reevaluate/gap_estimate", gap, step + 1)
            if fqe_converged(probe, args.reevaluate_tol):
                steps_done, converged = step + 1, True
                break
    run.reevaluation = {"steps": steps_done, "cap": args.reevaluate_steps, "tau": args.reevaluate_tau, "tol": args.reevaluate_tol,
                        "converged": converged, "check_every": REEVAL_CHECK_EVERY, "q_probe": probe}
    tqdm.write(f"re-evaluation: {steps_done} steps" + (f", Q on the probe {probe[-1]:.1f}" if probe else "") + (" (converged)" if converged else ""))
    run.diagnose("reevaluated", actor, pi0, qf)
    run.save_phase("reevaluated", pi0, actor, qf, qf_target, steps_done, run.offline[1], {"optimizers": {"qf": qf_opt.state_dict()}})
    run.phase_done("reevaluate", t0)


def run_alignment(run: Run, pi0: TanhGaussianActor, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer,
                  actor_opt: torch.optim.Optimizer, rb_offline: ReplayBuffer, accel: Accel) -> tuple[float, float]:
    """Phase 2 (paper: Value Alignment, O2SAC; docs/algorithms.md, section 3.3): targets frozen at the re-evaluation's
    target critics; the actor keeps training (--align-actor train, the paper) or stays pi0 (frozen). Then Q -> Qbar, as
    the official code. Returns the return and score of the actor online fine-tuning starts from."""
    args = run.args
    t0 = time.time()
    log_phase(run.writer, "align", 0)
    saved = run.reuse("aligned")
    if saved is not None:
        run.reused.append("aligned")
        run.restore(saved, qf, qf_target, {"qf": qf_opt, "actor": actor_opt}, accel)
        actor.load_state_dict(saved["actor"])
        after = saved["o2o"]["after_align_return"], saved["o2o"]["after_align_score"]
        run.curve.extend(p for p in saved["o2o"]["curve"] if p["phase"] == "align")
    else:
        align_step = accel.update(functools.partial(align_update, pi0, actor, qf, qf_target, qf_opt, actor_opt, alpha0=run.fam["alpha0"],
                                                    train_actor=args.align_actor == "train"))
        met = Metrics(run.writer, "align/")
        bar = tqdm(range(args.align_steps), desc="alignment", disable=None)
        for step in bar:
            met.add(align_step(rb_offline.sample(args.batch_size)))
            if (step + 1) % args.log_every == 0 or step + 1 == args.align_steps:
                vals = met.flush(step + 1, "alignment")
                bar.set_postfix(qf_loss=f"{vals['qf_loss']:.3g}", q_gap=f"{vals['q_gap']:.3g}")
            if args.align_eval_every and (step + 1) % args.align_eval_every == 0:  # evaluation draws no training randomness
                ret, score = run.evaluate(actor)
                run.record("align", step + 1, ret, score)
                run.writer.add_scalar("align/normalized_score", score, step + 1)
                bar.set_postfix(score=f"{score:.1f}")
        after = run.evaluate(actor, headline=True)
        run.diagnose("aligned", actor, pi0, qf)
        run.save_phase("aligned", pi0, actor, qf, qf, args.align_steps, after[1],
                       {"after_align_return": after[0], "after_align_score": after[1],
                        "optimizers": {"qf": qf_opt.state_dict(), "actor": actor_opt.state_dict()}})
    qf_target.load_state_dict(qf.state_dict())  # the official code copies Q -> Qbar after alignment
    run.phase_done("align", t0)
    return after


def online_start(run: Run, pi0: TanhGaussianActor, actor: TanhGaussianActor, after: tuple[float, float] | None) -> dict:
    """Start of online (docs/algorithms.md, section 3.4) from the return and score `after` alignment (None: no alignment,
    pi0's): the curve's start point, pi_ref <- pi if alignment improved on pi0's score (else pi0), the temperature (naive
    fine-tuning continues the checkpoint's learned one, CQL's; every other mode starts at alpha0), lambda_init. The
    online phase's starting state, as online.pt keeps it."""
    args, mode = run.args, run.mode
    ret0, score0 = run.offline if run.distillation is None else (run.distillation["return"], run.distillation["normalized_score"])
    ret, score = after or (ret0, score0)
    tqdm.write(f"start of online: return {ret:.1f}, normalized score {score:.1f}")
    if mode["align"]:
        run.record("aligned", 0, ret, score)
    run.record("online", 0, ret, score)  # where online starts
    if args.reference != "offline" and score > score0:
        actor_ref_sd, best = state_dict_cpu(actor), score
    else:
        actor_ref_sd, best = state_dict_cpu(pi0), score0
    ckpt_log_alpha = (run.ckpt.get("train_state") or {}).get("log_alpha")
    naive = not (mode["reevaluate"] or mode["align"] or mode["constraint"] or args.critic_init == "scratch")
    alpha_from = "checkpoint" if naive and ckpt_log_alpha is not None else "alpha0"
    log_alpha = float(ckpt_log_alpha) if alpha_from == "checkpoint" else math.log(run.fam["alpha0"])
    # where the online phase's target critics come from (the official code copies Q -> Qbar only after alignment)
    targets_from = ("aligned_critics" if mode["align"] else "reevaluation" if mode["reevaluate"]
                    else "checkpoint" if run.critic["qf_target"] is not None else "critics_copy")
    # n_evals counts the evaluations of the --eval-every schedule only (the cadence of --reference interval)
    return {"t": 0, "best": best, "n_evals": 0, "env_rng": None, "after_align_score": score, "pi_ref": actor_ref_sd,
            "start": {"alpha_from": alpha_from, "alpha": math.exp(log_alpha), "qf_target_from": targets_from},
            "log_alpha": log_alpha, "log_lam": math.log(args.lambda_init), "optimizers": None, "online_rb": None}


def run_online(run: Run, pi0: TanhGaussianActor, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, qf_opt: torch.optim.Optimizer,
               actor_opt: torch.optim.Optimizer, rb_offline: ReplayBuffer, accel: Accel, start: dict | None) -> dict:
    """Phase 3 (paper: Constrained Fine-Tuning, O2SAC; docs/algorithms.md, section 3.5; PORL: pre-sample stage then plain
    SAC, section 6) from `start` (online_start), or from the online.pt of an unfinished run of the same settings. Writes
    online.pt at episode ends every --checkpoint-every env steps and results.json at every evaluation. Returns the
    final state: {"finished": False, "step"} when --stop-after stopped it."""
    args, device, fam, mode, writer = run.args, run.device, run.fam, run.mode, run.writer
    obs_dim, act_dim = run.ckpt["obs_dim"], run.ckpt["act_dim"]
    reward_transform = run.critic["reward_transform"]
    t_phase = time.time()
    saved = run.online_state
    if saved is not None:
        o = saved["o2o"]
        actor.load_state_dict(saved["actor"])
        qf.load_state_dict(saved["critics"]["qf"])
        qf_target.load_state_dict(saved["critics"]["qf_target"])
        state = run.load_progress(o["run"])
        start = {"pi_ref": o["pi_ref"], "log_alpha": float(o["log_alpha"]), "log_lam": float(o["log_lam"]), "optimizers": o["optimizers"],
                 "online_rb": o["online_rb"]}
        set_rng_state(o["rng"])
        tqdm.write(f"resuming online fine-tuning from {run.out / 'online.pt'} at env step {state['t']}")
    else:
        assert start is not None
        state = {k: start[k] for k in ("t", "best", "n_evals", "env_rng", "after_align_score", "start")}
    actor_ref_sd = start["pi_ref"]
    actor_ref = None
    if mode["constraint"]:
        actor_ref = frozen(actor)
        actor_ref.load_state_dict(actor_ref_sd)
    # shape (1,), not 0-d: compiled Adam skips 0-d float64 parameters (PyTorch 2.13)
    log_alpha = torch.full((1,), start["log_alpha"], device=device, requires_grad=True)
    log_lam = torch.full((1,), start["log_lam"], device=device, requires_grad=True)
    opts = {"actor": actor_opt, "qf": qf_opt, "alpha": accel.adam([log_alpha], args.alpha_lr), "lambda": accel.adam([log_lam], args.lambda_lr)}
    if start["optimizers"] is not None:
        for k, opt in opts.items():
            accel.load_optimizer(opt, start["optimizers"][k])
    online_step = accel.update(functools.partial(online_update, actor, actor_ref, qf, qf_target, log_alpha, log_lam, opts,
                                                 target_entropy=-float(act_dim), gamma=args.gamma, tau=args.tau, kl_floor=args.kl_floor,
                                                 actor_grad_clip=fam["actor_grad_clip"]))
    eps_t = accel.scalar(fam["eps0"])  # the KL threshold as a device tensor: refilled each env step, never recompiled
    # replay (--buffer-mode; docs/algorithms.md, section 3.5): the offline part of all/part lives at the front of the
    # online buffer and is never overwritten
    data, (obs_mean, obs_std) = run.data, run.obs_stats
    if mode["buffer_mode"] in ("all", "part"):
        pre = data if mode["buffer_mode"] == "all" else subset(data, offline_trajectory_indices(data, args.part_trajectories))
        n_pre = len(pre["rewards"])
    else:
        pre, n_pre = None, 0
    rb_online = ReplayBuffer(obs_dim, act_dim, n_pre + max(args.online_steps, state["t"]), device)
    if pre is not None:
        rb_online.add((pre["observations"] - obs_mean) / obs_std, pre["actions"],
                      pre["rewards"] * reward_transform["scale"] + reward_transform["shift"], (pre["next_observations"] - obs_mean) / obs_std,
                      pre["terminals"])
    online_rb = start["online_rb"]
    if online_rb is not None and len(online_rb["rewards"]):
        rb_online.add(online_rb["obs"], online_rb["actions"], online_rb["rewards"], online_rb["next_obs"], online_rb["terminals"])
    half = args.batch_size // 2

    def sample() -> dict[str, Tensor]:
        if mode["buffer_mode"] != "half":
            return rb_online.sample(args.batch_size)
        on, off = rb_online.sample(half), rb_offline.sample(args.batch_size - half)
        return {k: torch.cat([on[k], off[k]]) for k in on}

    env = make_env(data["env_spec"])
    obs, _ = env.reset(seed=args.seed)
    if state["env_rng"] is not None:  # continue the episode-start sequence of the interrupted run
        env.unwrapped.np_random.bit_generator.state = json.loads(state["env_rng"])
        obs, _ = env.reset()
    obs_mean_t = torch.as_tensor(obs_mean, device=device)
    obs_std_t = torch.as_tensor(obs_std, device=device)
    met = Metrics(writer)
    ep_ret, ep_len = 0.0, 0
    ckpt_t = state["t"]
    sps_t0, sps_step0 = time.time(), state["t"]
    score = run.curve[-1]["normalized_score"]

    def final_o2o() -> dict:
        return {"pi0": state_dict_cpu(pi0), "pi_ref": actor_ref_sd, "log_alpha": log_alpha.item(), "log_lam": log_lam.item(),
                "critic_config": run.critic["config"], "reward_transform": reward_transform}

    def save_online(env_rng: str | None) -> None:
        state["env_rng"] = env_rng
        o2o = {**final_o2o(), "run": run.progress(state), "online_rb": {k: v[n_pre:rb_online.size].cpu().clone() for k, v in rb_online.data.items()},
               "rng": rng_state(), "optimizers": {k: opt.state_dict() for k, opt in opts.items()}}
        run.save_checkpoint("online", actor, qf, qf_target, state["t"], score, o2o)

    porl_pre = args.pre_sample_steps if args.critic_init == "scratch" else 0
    early = set(early_eval_steps(args.online_steps, args.early_evals))
    bar = tqdm(range(state["t"], args.online_steps), desc="online", initial=state["t"], total=args.online_steps, disable=None)
    if state["t"] == 0:  # a resumed run logged its phases when it started them
        log_phase(writer, "pre_sample" if porl_pre else "online", 0)
    for _ in bar:
        with torch.no_grad():
            o_t = (torch.as_tensor(obs, dtype=torch.float32, device=device) - obs_mean_t) / obs_std_t
            action = actor.sample(o_t.unsqueeze(0))[0][0].cpu().numpy()
        next_obs, reward, term, trunc, _ = env.step(np.clip(action, env.action_space.low, env.action_space.high))
        # store termination only: a time-limit truncation must still be bootstrapped
        rb_online.add(o_t.unsqueeze(0), action[None], [reward * reward_transform["scale"] + reward_transform["shift"]],
                      ((torch.as_tensor(next_obs, dtype=torch.float32, device=device) - obs_mean_t) / obs_std_t).unsqueeze(0), [float(term)])
        obs = next_obs
        ep_ret, ep_len = ep_ret + float(reward), ep_len + 1
        state["t"] += 1
        global_step = state["t"]
        if porl_pre and global_step == porl_pre:  # PORL: the actor trains from the next env step on
            log_phase(writer, "online", global_step)
        if global_step > args.learning_starts:
            eps_t.fill_(constraint_threshold(global_step, fam["eps0"], fam["eps_end"], args.constraint_horizon))
            for k in range(args.utd):  # lam steps once per env step; PORL's actor stays frozen during the pre-sample stage
                met.add(online_step(sample(), eps_t, update_lam=mode["constraint"] and k == 0, update_actor=global_step > porl_pre))
        if global_step % args.log_every == 0 and met.sums:
            met.flush(global_step, "online")
            writer.add_scalar("charts/kl_threshold", constraint_threshold(global_step, fam["eps0"], fam["eps_end"], args.constraint_horizon), global_step)
            writer.add_scalar("charts/SPS", (global_step - sps_step0) / max(time.time() - sps_t0, 1e-9), global_step)
        scheduled = global_step % args.eval_every == 0 or global_step == args.online_steps
        if scheduled or global_step in early:
            ret, score = run.evaluate(actor, headline=global_step <= args.online_steps / 10 or global_step == args.online_steps)
            state["n_evals"] += scheduled
            run.record("pre_sample" if global_step <= porl_pre else "online", global_step, ret, score)
            writer.add_scalar("eval/episodic_return", ret, global_step)
            writer.add_scalar("eval/normalized_score", score, global_step)
            # reference update (docs/algorithms.md, section 3.5)
            if mode["constraint"] and reference_update_due(args.reference, score, state["best"], scheduled, state["n_evals"],
                                                           fam["reference_interval"]):
                actor_ref.load_state_dict(actor.state_dict())
                actor_ref_sd = state_dict_cpu(actor)
            state["best"] = max(state["best"], score)
            bar.set_postfix(score=f"{score:.1f}")
            tqdm.write(f"env step {global_step}: return {ret:.1f}, normalized score {score:.1f}")
            atomic_save(run.results(state, False), run.out / "results.json")
        if term or trunc:
            writer.add_scalar("charts/episodic_return", ep_ret, global_step)
            writer.add_scalar("charts/episodic_length", ep_len, global_step)
            ep_ret, ep_len = 0.0, 0
            # periodic checkpoint at episode boundaries, so a resumed run restarts exactly at an episode start
            if global_step - ckpt_t >= args.checkpoint_every or global_step == args.online_steps:
                save_online(json.dumps(env.unwrapped.np_random.bit_generator.state))
                ckpt_t = global_step
            obs, _ = env.reset()
        if args.stop_after is not None and global_step >= args.stop_after and global_step < args.online_steps:
            bar.close()
            env.close()
            return {"finished": False, "step": global_step, "saved_step": ckpt_t if (run.out / "online.pt").exists() else None}
    bar.close()
    env.close()
    run.phase_done("online", t_phase)
    run.diagnose("end", actor, pi0, qf)
    if ckpt_t != state["t"] or not (run.out / "online.pt").exists():
        save_online(None)  # mid-episode end: a longer rerun continues from here with a fresh episode
    return {"finished": True, "step": state["t"], "score": score, "state": state, "o2o": {**final_o2o(), "curve": run.curve}}


# ---------------------------------------------------------------- main
def main(args: Args) -> dict:
    check_tracking(args)
    args = with_family(args)  # the FAMILY_DEFAULTS values of --env for every family flag left at None
    validate(args)
    given, args = args, resolve_budgets(args)  # from here on, the step counts and the lambda lr of --budget-scale
    device = pick_device(args.device)
    accel = Accel(device, args.compile, args.cudagraphs, args.bf16)  # bad combinations fail before any loading
    fam, mode = family_values(args), run_mode(args)
    env_key = args.env if args.dataset_id is None else args.dataset_id.replace("/", "_")
    out = Path(args.run_dir) / "o2o_sac" / env_key / (args.run_name or default_run_name(args, mode["buffer_mode"]))
    check_output_dir(out, "--run-dir")  # before the dataset is loaded: a bad folder fails in seconds
    data = load_dataset(args.env, args.dataset_id, args.no_download)
    ckpt_path = resolve_checkpoint(args)
    ckpt = load_checkpoint(ckpt_path, env_name=args.env if args.dataset_id is None else args.dataset_id, obs_dim=data["obs_dim"], act_dim=data["act_dim"])
    # the run folder: a run of other settings is refused; an online.pt of the same settings skips every offline phase
    online_state = check_run_folder(out, phase_key(args, "online", ckpt_path, ckpt), args)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    obs_dim, act_dim = data["obs_dim"], data["act_dim"]
    obs_stats = ckpt["obs_mean"].numpy().astype(np.float32), ckpt["obs_std"].numpy().astype(np.float32)  # the actor's own statistics
    if not args.normalize_states and (obs_stats[0].any() or (obs_stats[1] != 1).any()):
        fail(f"--no-normalize-states (the {fam['family']} default) needs an offline actor trained on raw states, but {ckpt_path} "
             f"({ckpt['algo']}) normalises them; pass --normalize-states or use a checkpoint without normalisation (CQL's on AntMaze)")
    critic = critic_source(args, ckpt, ckpt_path, obs_dim, act_dim)
    rb_offline = offline_buffer(args, data, obs_stats, critic["reward_transform"], mode["buffer_mode"], online_state, device)
    run = Run(args, given, out, data, ckpt, ckpt_path, fam, mode, critic, online_state, rb_offline, obs_stats, device)

    # a tanh-Gaussian offline actor is copied exactly (its own widths); other families are distilled into 3 x 256
    actor = TanhGaussianActor(obs_dim, act_dim, run.actor_hidden, ckpt["max_action"]).to(device)
    if online_state is None:
        pi0 = run_distillation(run, rb_offline, accel)
    else:
        pi0 = TanhGaussianActor(obs_dim, act_dim, run.actor_hidden, ckpt["max_action"]).to(device)
        pi0.load_state_dict(online_state["o2o"]["pi0"])
        pi0 = frozen(pi0)
    actor.load_state_dict(pi0.state_dict())
    qf, qf_target = make_critics(critic, obs_dim, act_dim, device)  # after distillation: pi0 is the same whichever critic a mode uses
    qf_opt, actor_opt = accel.adam(qf.parameters(), args.critic_lr), accel.adam(actor.parameters(), args.actor_lr)
    start = None
    if online_state is None:  # a fresh online phase: the offline phases first, each reused when saved with the same key
        if "start" not in run.diagnostics:  # (a reused phase brings the diagnostics of the boundaries before it)
            run.diagnose("start", actor, pi0, qf)
        if mode["reevaluate"]:
            run_reevaluation(run, pi0, actor, qf, qf_target, qf_opt, actor_opt, rb_offline, accel)
        after = run_alignment(run, pi0, actor, qf, qf_target, qf_opt, actor_opt, rb_offline, accel) if mode["align"] else None
        start = online_start(run, pi0, actor, after)
    end = run_online(run, pi0, actor, qf, qf_target, qf_opt, actor_opt, rb_offline, accel, start)
    if not end["finished"]:  # --stop-after: as if killed, without final outputs
        run.close()
        print(stop_notice(end["step"], end["saved_step"]))
        return {"stopped_at": end["step"], "run_dir": str(out)}

    run.save_checkpoint("final", actor, qf, qf_target, end["step"], end["score"], end["o2o"])
    res = run.results(end["state"], True)
    atomic_save(res, out / "results.json")
    run.close()
    print(f"o2o_sac on {args.env}: offline {res['offline_score']:.1f} -> start of online {res['online_start_score']:.1f} -> final "
          f"{res['final_score']:.1f} (min over first tenth {res['min_first_tenth']:.1f}); outputs in {out}")
    return res


# ==================== INFRASTRUCTURE ====================
# ---------------------------------------------------------------- arguments: validation, budgets, mode, run name
RUN_NAME_RE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"


def validate(args: Args) -> None:
    """Bad args exit 2 before anything is read or written."""
    if args.distill_noise < 0:
        fail(f"--distill-noise must be >= 0, got {args.distill_noise}")
    if not (math.isfinite(args.budget_scale) and args.budget_scale > 0):
        fail(f"--budget-scale must be a positive number, got {args.budget_scale}")
    if args.early_evals < 0 or args.headline_eval_episodes < 0 or (args.align_eval_every is not None and args.align_eval_every < 0):
        fail("--early-evals, --headline-eval-episodes and --align-eval-every must be >= 0 (0 = none)")
    positive = ["distill_steps", "online_steps", "utd", "batch_size", "eval_every", "eval_episodes", "log_every",
                "part_trajectories", "constraint_horizon"]
    if args.critic_init != "scratch":
        if not args.no_reevaluate:
            positive.append("reevaluate_steps")
        if not args.no_align:
            positive.append("align_steps")
    positive += [flag for flag in ("threads", "checkpoint_every", "reference_interval") if getattr(args, flag) is not None]
    for flag in positive:
        if getattr(args, flag) <= 0:
            hint = {"reevaluate_steps": " (or pass --no-reevaluate)", "align_steps": " (or pass --no-align)"}.get(flag, "")
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}{hint}")
    for flag in ("reevaluate_steps", "align_steps", "learning_starts", "pre_sample_steps"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.learning_starts >= args.online_steps:
        fail(f"--learning-starts {args.learning_starts} >= --online-steps {args.online_steps}: no update would ever run; lower it")
    if args.critic_init == "scratch" and args.pre_sample_steps >= args.online_steps:
        fail(f"--pre-sample-steps {args.pre_sample_steps} >= --online-steps {args.online_steps}: PORL would never fine-tune; lower it")
    if args.stop_after is not None and not 0 < args.stop_after:
        fail(f"--stop-after must be positive, got {args.stop_after}")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0 or not 0.0 < args.reevaluate_tau <= 1.0:
        fail("--gamma, --tau and --reevaluate-tau must lie in (0, 1]")
    if not (math.isfinite(args.reevaluate_tol) and args.reevaluate_tol >= 0):
        fail(f"--reevaluate-tol must be >= 0 (0 = run every --reevaluate-steps), got {args.reevaluate_tol}")
    for flag in ("critic_lr", "actor_lr", "alpha_lr", "lambda_lr", "lambda_init"):
        if not getattr(args, flag) > 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("alpha0", "eps0", "eps_end"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {v}")
    for flag in ("n_critics", "critic_layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.reward is not None:
        reward_affine(args.reward)
    if args.actor_grad_clip is not None and not args.actor_grad_clip >= 0:
        fail(f"--actor-grad-clip must be >= 0 (0 never clips), got {args.actor_grad_clip}")
    if args.eps0 is not None and args.eps_end is not None and args.eps_end < args.eps0:
        fail(f"--eps-end {args.eps_end} < --eps0 {args.eps0}: the KL threshold must loosen; swap them")
    # no leading dot: `..` would leave <run_dir>/o2o_sac/<env>/, and a hidden folder hides the run
    if args.run_name is not None and not re.fullmatch(RUN_NAME_RE, args.run_name):
        fail(f"--run-name {args.run_name!r} may hold only letters, digits, '_', '.', '-' and may not start with '.'")
    if args.dataset_id is not None and not DATASET_ID_RE.match(args.dataset_id):
        fail(f"malformed dataset id {args.dataset_id!r}; Minari ids look like namespace/name-v0 (no part may start with '.')")


CHECKPOINT_EVERY = 5_000  # the longest default interval of online.pt (env steps, before --budget-scale)
# the step counts --budget-scale multiplies (every budget and every schedule tied to one; constraint_horizon only with
# --scale-constraint-horizon)
BUDGET_FIELDS = ("reevaluate_steps", "align_steps", "online_steps", "pre_sample_steps", "learning_starts", "constraint_horizon",
                 "eval_every", "align_eval_every", "checkpoint_every", "log_every", "stop_after")


def resolve_budgets(args: Args) -> Args:
    """The effective args of a run (Args itself is never mutated): every step count in BUDGET_FIELDS given or defaulted
    (--constraint-horizon only with --scale-constraint-horizon) times --budget-scale F, rounded to an integer >= 1 (0
    and None stay as they are), the Lagrange multiplier's learning rate divided by F (Adam moves log lambda by about lr per step, so lr / F over F times the steps reaches as far as
    the paper's protocol), the default --align-eval-every (align_steps // 10, at least 1) of the scaled budget, and the
    default --checkpoint-every (CHECKPOINT_EVERY scaled, at most online_steps // 10, at least 1)."""
    args = with_family(args)  # the budgets of the family first (a no-op in main, which filled them already)
    f = args.budget_scale

    def scaled(v: int | None) -> int | None:
        return v if not v else max(1, math.floor(v * f + 0.5))

    fields = [k for k in BUDGET_FIELDS if k != "constraint_horizon" or args.scale_constraint_horizon]
    eff = dataclasses.replace(args, **{k: scaled(getattr(args, k)) for k in fields}, lambda_lr=args.lambda_lr / f)
    if eff.align_eval_every is None:
        eff = dataclasses.replace(eff, align_eval_every=max(1, eff.align_steps // 10))
    if eff.checkpoint_every is None:  # at most a tenth of the online phase: a killed short run keeps most of it
        eff = dataclasses.replace(eff, checkpoint_every=min(scaled(CHECKPOINT_EVERY), max(1, eff.online_steps // 10)))
    note = f" after --budget-scale {f:g}" if f != 1.0 else ""
    if eff.learning_starts >= eff.online_steps:
        fail(f"--learning-starts {eff.learning_starts} >= --online-steps {eff.online_steps}{note}: no update would ever run; lower it")
    if eff.critic_init == "scratch" and eff.pre_sample_steps >= eff.online_steps:
        fail(f"--pre-sample-steps {eff.pre_sample_steps} >= --online-steps {eff.online_steps}{note}: PORL would never fine-tune; lower it")
    return eff


def run_mode(args: Args) -> dict[str, Any]:
    """Which of OCR-CFT's parts run (results.json's "mode"): re-evaluation, alignment and the constraint unless switched
    off (PORL, --critic-init scratch, runs none of them), and the replay of the online phase (--buffer-mode; default
    half, none for PORL)."""
    scratch = args.critic_init == "scratch"
    align = not (args.no_align or scratch)
    return {"reevaluate": not (args.no_reevaluate or scratch), "align": align, "align_actor": args.align_actor if align else None,
            "constraint": not (args.no_constraint or scratch), "critic_init": args.critic_init, "reference": args.reference,
            "buffer_mode": args.buffer_mode or ("none" if scratch else "half")}


def default_run_name(args: Args, buffer_mode: str) -> str:
    if args.critic_init == "scratch":
        mode = "porl"
    elif args.no_reevaluate and args.no_align and args.no_constraint:
        mode = "naive"
    else:
        off = [n for n, f in (("noreeval", args.no_reevaluate), ("noalign", args.no_align), ("noconstraint", args.no_constraint)) if f]
        mode = "-".join(["o2sac", *off])
    if args.reference != "best":
        mode += f"_ref-{args.reference}"
    if buffer_mode != ("none" if args.critic_init == "scratch" else "half"):
        mode += f"_buf-{buffer_mode}"
    return f"{args.offline_algo if args.checkpoint is None else 'ckpt'}_{mode}_seed{args.seed}"


# ---------------------------------------------------------------- inputs: offline checkpoint, critics, replay memory
def critic_source(args: Args, ckpt: dict, ckpt_path: Path, obs_dim: int, act_dim: int) -> dict:
    """Where the critics come from. --no-reevaluate keeps the checkpoint's critic when it has one, with its target
    critics and its reward scale (keeping the critic means keeping the rewards it learned on); otherwise new LayerNorm
    critics (--n-critics of --critic-layers) learn on the family's rewards (--reward: raw on MuJoCo, 10 r - 5 on AntMaze).
    A damaged checkpoint critic exits 2 here, before any phase."""
    keep = args.no_reevaluate and args.critic_init != "scratch" and bool(ckpt.get("critics")) and "qf" in ckpt["critics"]
    if not keep:  # new critics of the family's shape (--n-critics, --critic-layers) on the family's rewards (--reward)
        scale, shift = reward_affine(args.reward)
        config = {"hidden": [CRITIC_HIDDEN[0]] * args.critic_layers, "layer_norm": True, "from": "new"}
        if args.n_critics != 2:  # recorded where it differs from the twin critics of every checkpoint
            config["n"] = args.n_critics
        return {"config": config, "reward_transform": {"scale": scale, "shift": shift},
                "handling": "raw" if (scale, shift) == (1.0, 0.0) else f"family ({args.reward})", "qf": None, "qf_target": None}
    cc = ckpt["critic_config"] or {}
    config = {"hidden": list(cc.get("hidden", CRITIC_HIDDEN)), "layer_norm": bool(cc.get("layer_norm", False)), "from": "checkpoint"}
    qf_target = ((ckpt.get("train_state") or {}).get("modules") or {}).get("qf_target")
    try:  # a damaged critic stops here, before any phase, rather than with a traceback where the phase loads it
        trial = Critic(obs_dim, act_dim, config["hidden"], n=2, layer_norm=config["layer_norm"])
        for sd in (ckpt["critics"]["qf"], qf_target):
            if sd is not None:
                trial.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict's message spans lines
        fail(f"checkpoint {ckpt_path}: its critic weights do not match its critic_config ({reason}); the file is damaged or was "
             f"edited; retrain it with offline_pretrain.py or pass another checkpoint")
    return {"config": config, "reward_transform": dict(ckpt["reward_transform"]), "handling": "checkpoint", "qf": ckpt["critics"]["qf"],
            "qf_target": qf_target}


def make_critics(critic: dict, obs_dim: int, act_dim: int, device: torch.device) -> tuple[Critic, Critic]:
    """The critics and their targets of critic_source: new ones (targets a copy), or the checkpoint's with its targets
    (a copy of the critics when it has none)."""
    if critic["config"]["from"] == "checkpoint":
        qf = Critic(obs_dim, act_dim, critic["config"]["hidden"], n=2, layer_norm=critic["config"]["layer_norm"]).to(device)
        qf.load_state_dict(critic["qf"])
    else:
        qf = make_critic(obs_dim, act_dim, critic["config"].get("n", 2), len(critic["config"]["hidden"])).to(device)
    qf_target = frozen(qf)
    if critic["qf_target"] is not None:
        qf_target.load_state_dict(critic["qf_target"])
    return qf, qf_target


def offline_buffer(args: Args, data: dict, obs_stats: tuple[np.ndarray, np.ndarray], reward_transform: dict, buffer_mode: str,
                   online_state: dict | None, device: torch.device) -> ReplayBuffer:
    """The offline data on the device, normalised with the offline actor's statistics, rewards through the critics'
    transform; then the online replay (with --buffer-mode all / part, the offline part first) and a batch are
    allocated once, before any phase runs: a size no memory holds exits 2 with the flag to lower."""
    try:
        rb_offline = ReplayBuffer.from_dataset(data, *obs_stats, device, reward_transform["scale"], reward_transform["shift"])
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"the dataset's {len(data['rewards'])} transitions do not fit in the memory of {device}; use another --device or a smaller dataset")
    n_pre = {"all": len(data["rewards"]), "part": len(offline_trajectory_indices(data, args.part_trajectories))}.get(buffer_mode, 0)
    capacity = n_pre + max(args.online_steps, online_state["o2o"]["run"]["t"] if online_state is not None else 0)
    row = 2 * data["obs_dim"] + data["act_dim"] + 2  # obs, action, reward, next obs, terminal
    check_allocations([
        (capacity, row, f"--online-steps {args.online_steps}: a replay buffer of {capacity} transitions"
         + (f" ({n_pre} of them offline data, --buffer-mode {buffer_mode})" if n_pre else ""),
         "lower --online-steps" + (" or use --buffer-mode half" if n_pre else "")),
        (args.batch_size, row, f"a batch of --batch-size {args.batch_size}", "lower it")], device)
    return rb_offline


# ---------------------------------------------------------------- phase keys and checkpoints
# args that never change what a phase computes (excluded when deciding whether a saved phase can be reused); the
# speed flags compute the same math, so a run may be resumed with or without them
NOT_STATE = {"no_resume", "overwrite", "stop_after", "log_every", "online_steps", "device", "threads", "run_dir", "run_name",
             "checkpoint_every", "compile", "cudagraphs", "bf16", "budget_scale",  # the phase keys hold the scaled values themselves
             "track", "wandb_project_name", "wandb_entity"}
ONLINE_ONLY = {"no_constraint", "reference", "reference_interval", "buffer_mode", "part_trajectories", "eps0", "eps_end", "utd",
               "learning_starts", "pre_sample_steps", "alpha_lr", "lambda_init", "lambda_lr", "constraint_horizon", "scale_constraint_horizon",
               "kl_floor", "eval_every",
               "actor_grad_clip", "early_evals"}
ALIGN_ONLY = {"no_align", "align_steps", "align_actor", "align_eval_every"}
# bumped whenever what a saved phase holds or means changes, so older phase checkpoints are recomputed, never misread
# (2: target critics and optimiser states carried across the phases; 3: the key at the top level, "phase_key")
PHASE_FORMAT = 4  # 4: re-evaluation stops after two consecutive converged readings (a saved phase of the old rule is recomputed)


def phase_key(args: Args, phase: str, ckpt_path: Path, ckpt: dict) -> dict:
    """The args that determine what a phase computes; a saved phase is reused only when this matches."""
    drop = set(NOT_STATE)
    if phase in ("reevaluated", "aligned"):
        drop |= ONLINE_ONLY
    if phase == "reevaluated":
        drop |= ALIGN_ONLY
    key = {k: v for k, v in asdict(args).items() if k not in drop}
    # the checkpoint's content, not its path: a checkpoint retrained at the same path invalidates every saved phase
    key["offline_checkpoint"] = [file_digest(ckpt_path), ckpt["algo"]]
    key["phase_format"] = PHASE_FORMAT
    return key


# ---------------------------------------------------------------- the run context
class Run:
    """Outputs of one run: folder, tensorboard, evaluator, curve, phase wall-clock, boundary diagnostics, the phases it
    reused, and its phase checkpoints (reuse / save_phase / save_checkpoint) and results.json (results)."""

    def __init__(self, args: Args, given: Args, out: Path, data: dict, ckpt: dict, ckpt_path: Path, fam: dict, mode: dict, critic: dict,
                 online_state: dict | None, rb_offline: ReplayBuffer, obs_stats: tuple[np.ndarray, np.ndarray], device: torch.device):
        self.args, self.out, self.data, self.ckpt, self.ckpt_path, self.device = args, out, data, ckpt, ckpt_path, device
        self.fam, self.mode, self.critic, self.online_state, self.obs_stats = fam, mode, critic, online_state, obs_stats
        self.actor_hidden = list(ckpt["actor_config"]["hidden"]) if ckpt["actor_family"] == "tanh_gaussian" else list(ACTOR_HIDDEN)
        self.evaluator = Evaluator(data["env_spec"], max(args.eval_episodes, args.headline_eval_episodes), args.seed + 100, obs_stats[0],
                                   obs_stats[1], device)
        # diagnostics: the same dataset states (and actions) at every phase boundary, drawn once from the run's seed with a
        # generator of their own, so the training's random streams are the same with or without them
        idx = torch.randperm(rb_offline.size, generator=torch.Generator().manual_seed(args.seed))[:DIAG_STATES].to(device)
        self.diag_obs, self.diag_actions = rb_offline.data["obs"][idx], rb_offline.data["actions"][idx]
        prepare_run_folder(out, args)
        atomic_save(asdict(given), out / "args.json")
        self.tracker = start_tracking(args, asdict(given), out)
        self.writer = SummaryWriter(str(out))
        self.writer.add_text("args", json.dumps(asdict(given)))
        self.writer.add_text("dataset", f"{','.join(data['dataset_ids'])} (local stand-in: {data['local_standin']})")
        self.curve: list[dict] = []
        self.wall: dict[str, float] = {}
        self.reused: list[str] = []
        self.diagnostics: dict[str, dict[str, float]] = {}  # per phase boundary, kept in the phase checkpoints
        self.offline: tuple[float, float] | None = None  # the offline actor's return and score
        self.distillation: dict | None = None  # how distillation ended (run_distillation); None: no distillation
        self.reevaluation: dict | None = None  # how re-evaluation ended (run_reevaluation); None: no re-evaluation
        self.keys: dict[str, dict] = {}
        self.saved: dict[str, dict | None] = {}  # phase -> its reusable checkpoint (reuse)

    def evaluate(self, actor: nn.Module, headline: bool = False) -> tuple[float, float]:
        """Mean return and normalised score over --eval-episodes episodes, or --headline-eval-episodes for a headline."""
        returns = self.evaluator(actor.act, None if headline else self.args.eval_episodes)
        return float(returns.mean()), float(normalized_score(returns.mean(), self.data["ref_min_score"], self.data["ref_max_score"]))

    def record(self, phase: str, step: int, ret: float, score: float) -> None:
        """One point of the curve (the shared block "results" says what each phase means)."""
        self.curve.append({"step": step, "normalized_score": score, "return": ret, "phase": phase})

    def diagnose(self, boundary: str, actor: TanhGaussianActor, pi0: TanhGaussianActor, qf: Critic) -> None:
        self.diagnostics[boundary] = boundary_diagnostics(actor, pi0, qf, self.diag_obs, self.diag_actions, seed=self.args.seed)
        for k, v in self.diagnostics[boundary].items():
            self.writer.add_scalar(f"diagnostics/{k}", v, BOUNDARIES.index(boundary))

    def phase_done(self, name: str, t0: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + time.time() - t0

    def key(self, phase: str) -> dict:
        """phase_key of reevaluated.pt, aligned.pt, or the online phase's (online.pt, final.pt); computed once."""
        if phase not in self.keys:
            self.keys[phase] = phase_key(self.args, phase, self.ckpt_path, self.ckpt)
        return self.keys[phase]

    def reuse(self, phase: str) -> dict | None:
        """The saved checkpoint of `phase` (reevaluated, aligned) made with this run's key, when this run's mode has the
        phase; None: the phase is computed. Read once per run."""
        if phase not in self.saved:
            on = self.mode[{"reevaluated": "reevaluate", "aligned": "align"}[phase]]
            self.saved[phase] = load_phase(self.out / f"{phase}.pt", self.key(phase), self.args.no_resume) if on else None
        return self.saved[phase]

    def restore(self, saved: dict, qf: Critic, qf_target: Critic, opts: dict[str, torch.optim.Optimizer], accel: Accel) -> None:
        """Critics, target critics, optimisers and RNG states as a phase checkpoint left them."""
        qf.load_state_dict(saved["critics"]["qf"])
        qf_target.load_state_dict(saved["critics"]["qf_target"])
        for k, opt in opts.items():
            if k in saved["o2o"]["optimizers"]:
                accel.load_optimizer(opt, saved["o2o"]["optimizers"][k])
        set_rng_state(saved["o2o"]["rng"])

    def save_checkpoint(self, name: str, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, step: int, score: float, o2o: dict) -> None:
        """<out>/<name>.pt in the format of offline checkpoints (loadable by load_checkpoint and actor_from_checkpoint),
        with the critics and the key of the settings it was made with (phase_key); the run state (pi0, reference actor,
        Lagrange and temperature, optimisers, RNG, curve) under "o2o"."""
        c, data = self.ckpt, self.data
        atomic_save({
            "format_version": CHECKPOINT_FORMAT, "algo": "o2o_sac", "env_name": c["env_name"], "dataset_id": c["dataset_id"],
            "local_standin": data["local_standin"], "env_spec": c["env_spec"], "obs_dim": c["obs_dim"], "act_dim": c["act_dim"],
            "max_action": c["max_action"], "actor_family": "tanh_gaussian",
            "actor_config": {"hidden": [m.out_features for m in actor.net if isinstance(m, nn.Linear)]},
            "actor": state_dict_cpu(actor), "critics": {"qf": state_dict_cpu(qf), "qf_target": state_dict_cpu(qf_target)},
            "critic_config": o2o["critic_config"], "obs_mean": c["obs_mean"], "obs_std": c["obs_std"],
            "reward_transform": o2o["reward_transform"], "ref_min_score": data["ref_min_score"], "ref_max_score": data["ref_max_score"],
            "args": asdict(self.args), "grad_steps": step, "eval_normalized_score": score,
            "phase_key": self.key(name if name in ("reevaluated", "aligned") else "online"), "o2o": o2o,
        }, self.out / f"{name}.pt")

    def save_phase(self, name: str, pi0: TanhGaussianActor, actor: TanhGaussianActor, qf: Critic, qf_target: Critic, step: int, score: float,
                   extra: dict) -> None:
        """reevaluated.pt / aligned.pt: the phase's networks with what the phases before it produced (pi0, the offline
        and distilled scores, the re-evaluation's outcome), the curve and diagnostics so far, the RNG states."""
        o2o = {"pi0": state_dict_cpu(pi0), "offline_return": self.offline[0], "offline_score": self.offline[1], "distill": self.distillation,
               "critic_config": self.critic["config"], "reward_transform": self.critic["reward_transform"], "reevaluation": self.reevaluation,
               "rng": rng_state(), "curve": self.curve, "diagnostics": self.diagnostics, **extra}
        self.save_checkpoint(name, actor, qf, qf_target, step, score, o2o)

    def progress(self, state: dict) -> dict:
        """The online phase's progress as online.pt keeps it: `state` (run_online's counters) and what this run holds."""
        return {**state, "curve": self.curve, "wall": self.wall, "reused": self.reused, "distill": self.distillation,
                "diagnostics": self.diagnostics, "reevaluation": self.reevaluation, "evaluation_s": self.evaluator.seconds}

    def load_progress(self, saved: dict) -> dict:
        """The inverse of progress, for a resumed online phase; returns run_online's counters."""
        saved = dict(saved)
        self.curve, self.wall, self.distillation = saved.pop("curve"), saved.pop("wall"), saved.pop("distill")
        self.diagnostics, self.reevaluation = saved.pop("diagnostics"), saved.pop("reevaluation")
        self.evaluator.seconds += saved.pop("evaluation_s", 0.0)
        self.reused = sorted(set(saved.pop("reused")) | {"online"})
        return saved

    def results(self, state: dict, finished: bool) -> dict:
        args, mode, c = self.args, self.mode, self.curve
        return results_record(
            script="o2o_sac", algo="sac", method=method_name(mode["reevaluate"], mode["align"], mode["constraint"], scratch=args.critic_init == "scratch"),
            mode=mode, env=args.env, data=self.data, seed=args.seed, offline_algo=self.ckpt["algo"], offline_checkpoint=self.ckpt_path,
            curve=c, online_start_score=state["after_align_score"], online_steps=args.online_steps, online_steps_done=state["t"],
            budget_scale=args.budget_scale, wall_clock_s=self.wall, finished=finished, run_dir=self.out, evaluation_s=self.evaluator.seconds,
            offline_actor_family=self.ckpt["actor_family"], critic=self.critic["config"],
            budget={**{k: getattr(args, k) for k in BUDGET_FIELDS}, "lambda_lr": args.lambda_lr},
            family_defaults=self.fam, reward_handling=self.critic["handling"], reward_transform=self.critic["reward_transform"],
            online_start=state.get("start"), distillation=self.distillation, reevaluation=self.reevaluation, reused_phases=self.reused,
            diagnostics={"states": int(self.diag_obs.shape[0]), "samples_per_state": DIAG_SAMPLES, "boundaries": self.diagnostics,
                         "align_eval_every": args.align_eval_every if mode["align"] else None,
                         "align_scores": [[p["step"], p["normalized_score"]] for p in c if p["phase"] == "align"],
                         "early_eval_steps": early_eval_steps(args.online_steps, args.early_evals)})

    def close(self) -> None:
        self.writer.close()
        finish_tracking(self.tracker)
        self.evaluator.close()


# the run folder (the same rules in o2o_sac.py, o2o_td3.py, o2o_ppo.py; the shared block "runfolder")
# A run folder is never taken over silently; what it holds is checked before anything is computed or written. A
# finished run (final.pt) of other settings is refused unless --overwrite; an unfinished one (online.pt) of other
# settings is refused unless --no-resume (its online phase starts afresh) or --overwrite; a run of the same settings
# resumes (a finished one: extended to a larger --online-steps); a saved phase of other settings is recomputed with a
# notice. The settings are the online key: every argument that changes what the run computes, and the offline
# checkpoint's content.
RUN_OUTPUTS = ("args.json", "results.json", "final.pt", "online.pt", "reevaluated.pt", "aligned.pt")
KEY_WORDS = {"offline_checkpoint": "another offline checkpoint (its content differs)", "phase_format": "an older format of the saved phases"}


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
