"""O2PPO: offline-to-online fine-tuning with PPO (OCR-CFT, Luo et al., NeurIPS 2024, arXiv 2412.18855).

Phases (the paper's O2PPO: policy re-evaluation, then constrained fine-tuning; PPO has no value alignment): load the
offline actor (a Gaussian actor is copied exactly, any other family is distilled into the Gaussian family;
docs/algorithms.md, section 5)
-> re-evaluation: regress V on discounted Monte-Carlo returns of the offline episodes -> online PPO whose advantages
are mixed with an auxiliary reference advantage that keeps pi near a reference policy, with a weight decaying
linearly to 0 (the constraint). results.json "diagnostics" holds V and actor statistics at the phase boundaries and
at every online evaluation (--early-evals adds some inside the first tenth); --budget-scale shrinks the whole protocol.
Naive PPO fine-tuning (the ablation baseline) is `--no-reevaluate --no-constraint`.
V learns from the rewards of the family table (raw; running return-std scaling for halfcheetah, see --reward-scaling),
and the reference advantage, its mixing and the advantage normalisation are computed once per rollout.

Usage:
    python o2o_ppo.py --env hopper-medium-v2                                  # IQL checkpoint by convention
    python o2o_ppo.py --env hopper-medium-v2 --offline-algo cql               # any offline method (distilled)
    python o2o_ppo.py --env hopper-medium-v2 --no-reevaluate --no-constraint  # naive PPO fine-tuning
    python o2o_ppo.py --env hopper-medium-v2 --budget-scale 0.1               # the paper's protocol at a tenth of its steps
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
    """D4RL-style dataset name (resolved to a Minari dataset, see README)"""
    dataset_id: str | None = None
    """any Minari dataset id; overrides the name resolution of --env"""
    no_download: bool = False
    """never try to download a hosted dataset"""
    offline_algo: Literal["iql", "cql", "td3_bc", "bc"] = "iql"
    """offline method whose checkpoint is used (runs/offline/<algo>/<env>/seed<k>/checkpoint.pt)"""
    checkpoint: str | None = None
    """path of an offline checkpoint; overrides the --offline-algo convention"""
    seed: int = 0
    """random seed (also selects the offline checkpoint seed<k>)"""
    run_dir: str = "runs"
    """outputs go to <run_dir>/o2o_ppo/<env>/<run_name>/"""
    run_name: str | None = None
    """name of the output folder; default <mode>_seed<k> with mode o2ppo, naive, no_reevaluate or no_constraint"""
    no_resume: bool = False
    """recompute every phase even when the run folder holds phase checkpoints of the same args, and start the online
    phase afresh instead of resuming an unfinished run's online.pt (a finished run of other settings still needs
    --overwrite)"""
    overwrite: bool = False
    """start afresh in a run folder that holds a run of other settings: its checkpoints, results and tensorboard logs
    are deleted first"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    family: str | None = None
    """dataset family `<env>-<level>` (e.g. hopper-medium-expert, antmaze-umaze) whose PPO_FAMILY_DEFAULTS row and environment entry apply; default:
    the one --env names (a --dataset-id run whose --env names no D4RL dataset must pass it)"""
    budget_scale: float = 1.0
    """multiplies every step count given or defaulted: --reevaluate-steps, --online-steps, --eval-every, --log-every,
    --checkpoint-every, each rounded to an integer >= 1 (not --distill-steps, which fits the offline actor to an
    accuracy, nor --rollout-size, kept at 2048, nor --stop-after, an absolute step; --constraint-horizon only with
    --scale-constraint-horizon). 1 = the paper's protocol; F = 0.03 compresses it (the learning-rate decay and the
    evaluation clock shrink with the budget) instead of truncating it"""

    # --- any offline actor -> Gaussian actor (docs/algorithms.md, section 5) ---
    distill_steps: int = 5_000
    """gradient steps distilling a tanh-Gaussian or deterministic offline actor into the Gaussian family"""
    distill_batch_size: int = 256
    """batch of dataset states per distillation step"""
    distill_lr: float = 3e-4
    """learning rate of the distillation"""
    distill_log_std: float | None = None
    """fixed log-std of the distilled actor; default: the offline policy's mean action std on dataset states
    (tanh-Gaussian) or DETERMINISTIC_LOG_STD (a deterministic actor has none)"""

    # --- re-evaluation (paper: Policy Re-evaluation, O2PPO; docs/algorithms.md, section 5.1) ---
    no_reevaluate: bool = False
    """ablation: skip re-evaluation, start online PPO with a freshly initialised V"""
    reevaluate_steps: int = 1_000_000
    """gradient steps of V on the Monte-Carlo returns of the offline episodes"""
    reevaluate_batch_size: int = 512
    """batch size of the re-evaluation"""
    reevaluate_lr: float = 1e-4
    """learning rate of the re-evaluation"""
    reward_scaling: Literal["family", "checkpoint", "return-std", "none"] = "family"
    """rewards V learns from (offline Monte-Carlo returns and online rewards alike, so V sees one scale): family = the
    PPO_FAMILY_DEFAULTS entry (raw for hopper and walker2d, return-std for halfcheetah, as the official configs);
    checkpoint = the offline checkpoint's reward_transform (IQL: 1000 / return range; identity for CQL, TD3+BC, BC);
    return-std = divided by the running std of the discounted return, started from the offline data; none = raw"""
    gamma: float = 0.99
    """discount"""

    # --- online PPO (paper: Constrained Fine-Tuning, O2PPO; docs/algorithms.md, section 5.2) ---
    online_steps: int = 250_000
    """online environment steps (rounded down to whole rollouts)"""
    num_envs: int = 1
    """parallel training environments (1 = the paper's setting); --rollout-size is split over them"""
    rollout_size: int = 2048
    """transitions per rollout (all envs together)"""
    update_epochs: int | None = None
    """PPO epochs per rollout; default from PPO_FAMILY_DEFAULTS (10; 5 for hopper medium-expert/expert)"""
    minibatch_size: int = 128
    """PPO minibatch size"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    ent_coef: float = 0.01
    """entropy bonus weight"""
    max_grad_norm: float = 0.5
    """gradient-norm clip (actor and V separately)"""
    actor_lr: float = 3e-5
    """actor learning rate (decays linearly to 0)"""
    critic_lr: float = 2e-4
    """V learning rate (decays linearly to 0)"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    gae_lambda: float = 0.95
    """GAE lambda"""

    # --- constraint (paper: Constrained Fine-Tuning, O2PPO; docs/algorithms.md, section 5.2) ---
    no_constraint: bool = False
    """ablation: plain PPO advantages, no auxiliary reference advantage"""
    constraint_horizon: int | None = None
    """T_end, the env step at which the reference-advantage weight w_t = max(0, 1 - t / T_end) reaches 0 (the
    constraint's schedule); default from PPO_FAMILY_DEFAULTS (250k; 500k for medium-expert/expert)"""
    scale_constraint_horizon: bool = False
    """with --budget-scale F: also multiply T_end by F, so w_t reaches 0 at the end of the shortened online phase. Off by
    default: w_t falls per env step of experience as in the paper's run, and a miniature covers the first F of that
    schedule (local hopper-medium, F = 0.02, IQL checkpoint at 45.4 over 50 episodes: compressed, the policy after two
    PPO updates scored 39.4, 39.9, 44.0 over 50 episodes for seeds 0-2; per env step, see the README's "No drop at the
    switch")"""
    reference: Literal["best", "offline"] = "best"
    """best: pi_ref <- pi whenever an evaluation beats the best score so far; offline: pi_ref = pi0 always"""
    log_std_max: float | None = None
    """cap on log sigma of the actor and of the reference actor (the distributions use min(log_std, cap)); default from
    PPO_FAMILY_DEFAULTS (log 0.05 for hopper medium-expert/expert, no cap otherwise)"""

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 2_500
    """evaluate every this many env steps (at the end of the rollout that crosses the mark); --reference best moves
    pi_ref only at evaluations, so this is part of the algorithm (2500 as the official code)"""
    eval_episodes: int | None = None
    """evaluation episodes (deterministic actions, separate envs stepped together); default from PPO_FAMILY_DEFAULTS (10;
    100 on AntMaze, as the official configs)"""
    headline_eval_episodes: int = 50
    """episodes of the evaluations results.json's headline numbers rest on: the offline policy, the distilled one, every
    online evaluation in the first tenth of online learning and the last one (the first --eval-episodes of them start
    where the others do). A 5-point drop cannot be read from 5 or 10 episodes: the same hopper policy scores 43-56 over
    5. 0 or fewer than --eval-episodes: --eval-episodes"""
    early_evals: int = 5
    """extra evaluations inside the first tenth of the online steps (0 = none): one at the last rollout end at or before
    each mark total/10 * k/K, k = 1..K. Marks before the first rollout's end get none and marks inside one rollout share
    one evaluation, so a rollout longer than total/10/K gives fewer (none when one rollout is longer than the tenth).
    Like every evaluation they move pi_ref under --reference best"""
    log_every: int = 2_048
    """log losses every this many env steps (offline phases: every this many gradient steps)"""
    checkpoint_every: int | None = None
    """write online.pt every this many env steps (a killed run resumes from it). Default: 20480 (times --budget-scale),
    at most a tenth of --online-steps, so a short run's online phase survives a kill too"""
    stop_after: int | None = None
    """stop (as if killed) after this many online env steps, after writing online.pt; rerun to resume"""

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


# Per dataset family (the level of --env, or --family), as the official O2PPO configs; --update-epochs,
# --constraint-horizon, --log-std-max and --reward-scaling override. Rows: level -> constraint_horizon (T_end), and per
# environment ("*" = any other): PPO epochs,
# the log-std cap of actor and reference (None = none) and the reward handling of V (see --reward-scaling).
# The row is the level --family or --env names (dataset_family); every AntMaze maze takes the "antmaze" row (the official AntMaze
# configs: raw 0/1 rewards, 100 evaluation episodes, 250k steps as every family: --online-steps' default).
RAW_EXCEPT_HALFCHEETAH = {"halfcheetah": "return-std", "*": "none"}  # official: raw rewards, "dynamic" scaling for halfcheetah
HOPPER_STD_CAP = {"hopper": math.log(0.05), "*": None}
PPO_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "random": dict(constraint_horizon=250_000, update_epochs={"*": 10}, log_std_max={"*": None}, reward_scaling=RAW_EXCEPT_HALFCHEETAH,
                   eval_episodes=10),
    "medium": dict(constraint_horizon=250_000, update_epochs={"*": 10}, log_std_max={"*": None}, reward_scaling=RAW_EXCEPT_HALFCHEETAH,
                   eval_episodes=10),
    "medium-replay": dict(constraint_horizon=250_000, update_epochs={"*": 10}, log_std_max={"*": None}, reward_scaling=RAW_EXCEPT_HALFCHEETAH,
                          eval_episodes=10),
    "medium-expert": dict(constraint_horizon=500_000, update_epochs={"hopper": 5, "*": 10}, log_std_max=HOPPER_STD_CAP, reward_scaling=RAW_EXCEPT_HALFCHEETAH,
                          eval_episodes=10),
    "expert": dict(constraint_horizon=500_000, update_epochs={"hopper": 5, "*": 10}, log_std_max=HOPPER_STD_CAP, reward_scaling=RAW_EXCEPT_HALFCHEETAH,
                   eval_episodes=10),
    "antmaze": dict(constraint_horizon=250_000, update_epochs={"*": 10}, log_std_max={"*": None}, reward_scaling={"*": "none"}, eval_episodes=100),
}
ACTOR_HIDDEN = (256, 256)  # the Gaussian actor a non-Gaussian offline actor is distilled into
VALUE_HIDDEN = (256, 256, 256)  # V: 3 x [Linear 256 -> tanh], Linear -> 1
DETERMINISTIC_LOG_STD = math.log(0.2)  # distilled std of a deterministic actor: TD3's smoothing-noise scale


def family_defaults(args: Args) -> dict[str, Any]:
    """update_epochs, constraint_horizon, log_std_max, the reward handling and eval_episodes: the explicit flag, else the
    PPO_FAMILY_DEFAULTS row of the dataset's level (dataset_family: --family, else --env; any
    AntMaze maze: the "antmaze" row), entry of its environment."""
    env, level = dataset_family(args.env, args.dataset_id, args.family)
    if env == "antmaze":
        level = "antmaze"
    row = PPO_FAMILY_DEFAULTS[level]
    pick = lambda key: row[key].get(env, row[key]["*"])  # noqa: E731
    return {"family_row": level, "family_env": env,
            "update_epochs": args.update_epochs if args.update_epochs is not None else pick("update_epochs"),
            "constraint_horizon": args.constraint_horizon if args.constraint_horizon is not None else row["constraint_horizon"],
            "log_std_max": args.log_std_max if args.log_std_max is not None else pick("log_std_max"),
            "reward_scaling": pick("reward_scaling") if args.reward_scaling == "family" else args.reward_scaling,
            "eval_episodes": args.eval_episodes if args.eval_episodes is not None else row["eval_episodes"]}


def with_family(args: Args) -> Args:
    """A copy of args with the family values the run's budgets and evaluators read from args (eval_episodes) filled in
    from family_defaults when left at None; Args itself is never mutated."""
    if args.eval_episodes is not None:
        return args
    return dataclasses.replace(args, eval_episodes=family_defaults(args)["eval_episodes"])


# ==================== ALGO LOGIC ====================
# ---------------------------------------------------------------- pure math (the paper: re-evaluation and constrained fine-tuning of O2PPO)
def monte_carlo_returns(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return G_t = r_t + gamma G_{t+1} of every transition, transitions stored episode after episode.
    The return restarts at EVERY episode end (`ends`), a termination or a time limit alike (docs/algorithms.md, section 7)."""
    r, end = np.asarray(rewards, dtype=np.float64).tolist(), np.asarray(ends).tolist()  # plain floats: a fast Python loop
    out, g = [0.0] * len(r), 0.0
    for t in range(len(r) - 1, -1, -1):
        g = r[t] + (0.0 if end[t] else gamma * g)
        out[t] = g
    return np.asarray(out, dtype=np.float32)


def running_discounted_returns(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray:
    """R_t = r_t + gamma R_{t-1}, restarted after every episode end, transitions stored episode after episode: the
    backward-looking return whose running std PPO's reward scaling divides the rewards by (not the Monte-Carlo return)."""
    r, end = np.asarray(rewards, dtype=np.float64).tolist(), np.asarray(ends).tolist()
    out, g = [0.0] * len(r), 0.0
    for t in range(len(r)):
        g = r[t] + gamma * g
        out[t] = g
        if end[t]:
            g = 0.0
    return np.asarray(out, dtype=np.float64)


class ReturnStd:
    """Reward scaling by the running std of the discounted return ("dynamic" in the official O2PPO configs, the usual
    PPO reward scaling): every training env accumulates R = gamma R + r (restarted after its episode ends), the
    population std of all R seen so far is updated with it, and the reward is divided by std + 1e-8.

    Started from the offline data (`from_offline`): V is re-evaluated on Monte-Carlo returns of the offline rewards
    divided by that offline std, one constant, so the returns keep their relative sizes; online, the same statistic
    goes on absorbing the online returns, and V's targets stay on the scale it was re-evaluated on. (The official
    code instead divides each offline reward by the std reached at that point of one pass over the data.)"""

    EPS = 1e-8

    def __init__(self, gamma: float, count: float = 0.0, mean: float = 0.0, m2: float = 0.0):
        self.gamma, self.count, self.mean, self.m2 = gamma, float(count), float(mean), float(m2)
        self.ret: np.ndarray | None = None  # per training env; a resumed run restarts its episodes, so R starts at 0

    @classmethod
    def from_offline(cls, rewards: np.ndarray, ends: np.ndarray, gamma: float) -> "ReturnStd":
        g = running_discounted_returns(rewards, ends, gamma)
        return cls(gamma, len(g), float(g.mean()), float(((g - g.mean()) ** 2).sum()))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    @property
    def scale(self) -> float:
        """What a reward is multiplied by now: 1 / (std + 1e-8)."""
        return 1.0 / (self.std + self.EPS)

    def update(self, x: np.ndarray) -> None:
        """Merge a batch of returns into (count, mean, M2) (Chan et al.'s parallel form of Welford's update)."""
        x = np.asarray(x, dtype=np.float64)
        n, mean = len(x), float(x.mean())
        delta, total = mean - self.mean, self.count + n
        self.m2 += float(((x - mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def __call__(self, rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Scaled rewards of a rollout (T, num_envs), in time order: row t is divided by the std after R_t joined it."""
        rewards, ends = np.asarray(rewards, dtype=np.float64), np.asarray(ends)
        if self.ret is None or self.ret.shape != rewards.shape[1:]:
            self.ret = np.zeros(rewards.shape[1:])
        out = np.empty_like(rewards)
        for t in range(len(rewards)):
            self.ret = self.gamma * self.ret + rewards[t]
            self.update(self.ret)
            out[t] = rewards[t] * self.scale
            self.ret = np.where(ends[t] > 0, 0.0, self.ret)
        return out.astype(np.float32)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, terminations: Tensor, ends: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a rollout; every input has shape (T, num_envs).

    next_values[t] = V(s_{t+1}) of the TRUE successor (the final observation when the episode ended at t).
    The bootstrap is masked by termination only (a time-limit end bootstraps from V of the final observation);
    the GAE chain is cut at every end (termination or time limit): the next row belongs to a new episode.
    Returns (advantages, value targets = advantages + values).
    """
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (1.0 - terminations[t]) * next_values[t] - values[t]
        last = delta + gamma * lam * (1.0 - ends[t]) * last
        adv[t] = last
    return adv, adv + values


def reference_advantage(actions: Tensor, ref_mean: Tensor, ref_std: Tensor, advantages: Tensor) -> Tensor:
    """Auxiliary reference advantage of Constrained Fine-Tuning (O2PPO; docs/algorithms.md, section 5.2), one value per
    sample, shape (B, 1) like A_hat:
        z_j = (a_j - mu_ref_j) / sigma_ref_j,  g = 0.5 sum_j (1 - z_j^2),
        A_ref = (2 / |A|) [softplus(g + 4|A|) - 4|A|] |std(A_hat)|
    (close to (2/|A|) g near the reference mean, floored at -8 |std(A_hat)| far from it)."""
    if advantages.dim() != 2 or advantages.shape[1] != 1 or advantages.shape[0] != actions.shape[0]:
        raise ValueError(f"advantages must have shape (B, 1) with B = {actions.shape[0]}, got {tuple(advantages.shape)}")
    n = actions.shape[-1]
    z = (actions - ref_mean) / ref_std
    g = 0.5 * (1.0 - z**2).sum(-1, keepdim=True)  # (B, 1): per sample, no (B, B) broadcast (docs/algorithms.md, section 7)
    return (2.0 / n) * (F.softplus(g + 4.0 * n) - 4.0 * n) * advantages.std().abs()


def constrained_advantages(advantages: Tensor, ref_advantages: Tensor, weight: Tensor | float) -> Tensor:
    """A_hat <- (A_hat + w A_ref) / (1 + w), elementwise; both (B, 1)."""
    if ref_advantages.shape != advantages.shape:
        raise ValueError(f"A_ref {tuple(ref_advantages.shape)} and A_hat {tuple(advantages.shape)} must have one shape")
    return (advantages + weight * ref_advantages) / (1.0 + weight)


def constraint_weight(step: int, horizon: int) -> float:
    """w_t = max(0, 1 - t / T_end), T_end = `horizon` (--constraint-horizon): the reference term fades out linearly over
    the first T_end env steps."""
    return max(0.0, 1.0 - step / horizon)


def linear_lr(lr0: float, iteration: int, num_iterations: int) -> float:
    """Learning rate decayed linearly to 0 over the online iterations (iteration counts from 0)."""
    return lr0 * (1.0 - iteration / num_iterations)


def early_rollout_ends(total_steps: int, rollout_size: int, k: int) -> list[int]:
    """Env steps (rollout ends) of the --early-evals extra evaluations: each of the marks `early_eval_steps` puts in the
    first tenth, moved back to the last rollout end at or before it; marks before the first rollout's end are dropped,
    marks inside one rollout share one evaluation. A rollout no longer than total/10/k gives k of them."""
    return sorted({s // rollout_size * rollout_size for s in early_eval_steps(total_steps, k)} - {0})


def normalize_advantages(advantages: Tensor, eps: float = 1e-5) -> Tensor:
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def rollout_advantages(advantages: Tensor, actions: Tensor, ref_mean: Tensor | None, ref_std: Tensor | None,
                       weight: float) -> tuple[Tensor, Tensor | None]:
    """The advantages PPO trains on, computed ONCE per rollout (as the official O2PPO; per minibatch, std(A_hat) and the
    normalisation would be those of 128 samples): A_ref of the whole rollout (its |std(A_hat)| over all B samples), the
    mixing A_hat <- (A_hat + w A_ref) / (1 + w), then normalisation with eps 1e-5. Without a reference (ref_mean None:
    no constraint) only the normalisation. advantages (B, 1) -> (normalised (B, 1), A_ref (B, 1) or None)."""
    a_ref = None
    if ref_mean is not None:
        a_ref = reference_advantage(actions, ref_mean, ref_std, advantages)
        advantages = constrained_advantages(advantages, a_ref, weight)
    return normalize_advantages(advantages), a_ref


def capped_log_std(log_std: Tensor, log_std_max: float | None) -> Tensor:
    """min(log sigma, cap): the official O2PPO caps the actor's and the reference's log-std at log 0.05 for hopper
    medium-expert/expert (above the cap sigma stays at the cap, and log_std gets no gradient)."""
    return log_std if log_std_max is None else log_std.clamp(max=log_std_max)


def policy_dist(actor: GaussianActor, obs: Tensor, log_std_max: float | None) -> torch.distributions.Normal:
    """pi(.|s) with the log-std cap (acting, PPO's ratio and entropy, and the reference all use this)."""
    mu, log_std = actor(obs)
    return torch.distributions.Normal(mu, capped_log_std(log_std, log_std_max).exp(), validate_args=False)  # validation syncs


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate mean[max(-A r, -A clip(r, 1 - c, 1 + c))], r = pi / pi_old; all (B,).
    Also returns the approximate KL ((r - 1) - log r) and the clipped fraction (diagnostics)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return loss, approx_kl, clipfrac


def distill_loss(mean: Tensor, log_std: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the offline actor's mean action under the Gaussian N(mean, exp(log_std)^2)."""
    return -torch.distributions.Normal(mean, log_std.exp(), validate_args=False).log_prob(target).sum(-1).mean()  # validation syncs


SATURATION = 0.99  # a mean-action component beyond this fraction of the action bound counts as saturated


def value_stats(values: Tensor, returns: Tensor) -> dict[str, float]:
    """V on a fixed set of dataset states against the offline Monte-Carlo returns of those states, both (B,):
    mean and population std of V, mean error mean(V - G), mean absolute error, and mean(G)."""
    err = values - returns
    return {"v_mean": float(values.mean()), "v_std": float(values.std(correction=0)), "v_mean_error": float(err.mean()),
            "v_mean_abs_error": float(err.abs().mean()), "mc_return_mean": float(returns.mean())}


def actor_stats(mean: Tensor, log_std: Tensor, max_action: float) -> dict[str, float]:
    """The Gaussian policy on a fixed set of states, mean and (capped) log_std (B, |A|): entropy sum_j [0.5 log(2 pi e)
    + log sigma_j] averaged over states; after clipping the mean action to the box [-max_action, max_action], the mean
    of |a| / max_action and the saturation, the fraction of components with |a| / max_action > 0.99."""
    entropy = (0.5 * math.log(2.0 * math.pi * math.e) + log_std).sum(-1).mean()
    a = mean.clamp(-max_action, max_action).abs() / max_action
    return {"entropy": float(entropy), "mean_abs_action": float(a.mean()), "saturation": float((a > SATURATION).float().mean())}


# ---------------------------------------------------------------- networks, rewards, rollouts
def build_value(obs_dim: int) -> Critic:
    """V(s): 3 x [Linear 256 -> tanh], Linear -> 1 (the official O2PPO value network), orthogonal init; returns shape (1, B)."""
    return orthogonal_init_(Critic(obs_dim, 0, VALUE_HIDDEN, n=1, activation="tanh"))


@torch.no_grad()
def update_reference(actor_ref: nn.Module, actor: nn.Module, score: float, best: float) -> float:
    """The reference update (docs/algorithms.md, section 5.2): pi_ref <- copy(pi) when an evaluation beats the best score
    so far; returns the new best."""
    if score > best:
        actor_ref.load_state_dict(actor.state_dict())
        return score
    return best


class RewardScaling:
    """The rewards V learns from, offline Monte-Carlo returns and online rewards alike (--reward-scaling): an affine
    transform (raw, or the checkpoint's reward_transform), or division by the running std of the discounted return
    (ReturnStd: started from the offline data; a resumed run goes on from the statistic online.pt saved, `saved`).
    A V learned here from scratch uses the family table's handling, not the offline method's transform, unless
    --reward-scaling checkpoint asks for it."""

    def __init__(self, mode: str, gamma: float, data: dict, ckpt: dict, saved: dict | None = None):
        rt = ckpt["reward_transform"] if mode == "checkpoint" else {"scale": 1.0, "shift": 0.0}
        self.mode, self.affine = mode, {"scale": float(rt["scale"]), "shift": float(rt["shift"])}
        self.return_std = ReturnStd.from_offline(data["rewards"], data["ends"], gamma) if mode == "return-std" else None
        self.offline_return_std = self.return_std.std if self.return_std is not None else None
        if self.return_std is not None and saved is not None:  # the running statistic goes on from where the run stopped
            self.return_std = ReturnStd(gamma, **saved)

    def transform(self) -> dict[str, float]:
        """The transform V's targets are on now (checkpoints record it): affine, or 1 / (std + eps) of the running return-std."""
        return {"scale": self.return_std.scale, "shift": 0.0} if self.return_std is not None else dict(self.affine)

    def offline(self, rewards: np.ndarray) -> np.ndarray:
        """The offline rewards with the online handling (return-std: divided by the offline std, one constant)."""
        return rewards * self.return_std.scale if self.return_std is not None else rewards * self.affine["scale"] + self.affine["shift"]

    def __call__(self, rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The online rewards of a rollout (T, num_envs), in time order."""
        return self.return_std(rewards, ends) if self.return_std is not None else rewards * self.affine["scale"] + self.affine["shift"]

    def state_dict(self) -> dict[str, float] | None:
        return self.return_std.state_dict() if self.return_std is not None else None


@torch.no_grad()
def collect_rollout(pool: EnvPool, actor: GaussianActor, vf: Critic, steps: int, obs_mean: Tensor, obs_std: Tensor,
                    reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, log_std_max: float | None = None,
                    ) -> tuple[dict[str, Tensor], list[tuple[float, int]]]:
    """`steps` steps of every env with a ~ pi(.|s); tensors of shape (steps, num_envs, ...) on the actor's device.
    Actions are stored unclipped (their log-prob is the one PPO's ratio needs); the env gets them clipped.
    `rewards` = reward_fn(raw rewards, ends) (the reward handling V learns from; raw when None), `raw_rewards` as given."""
    device = obs_mean.device
    keys = ("obs", "actions", "logprobs", "values", "successors")
    rows: dict[str, list[Tensor]] = {k: [] for k in keys}
    rewards, terms, truncs, finished = [], [], [], []
    for _ in range(steps):
        obs = (torch.as_tensor(pool.obs, device=device) - obs_mean) / obs_std
        dist = policy_dist(actor, obs, log_std_max)
        action = dist.sample()
        successor, r, term, trunc, fin = pool.step(action.cpu().numpy())
        rows["obs"].append(obs)
        rows["actions"].append(action)
        rows["logprobs"].append(dist.log_prob(action).sum(-1))
        rows["values"].append(vf(obs)[0])
        rows["successors"].append(torch.as_tensor(successor))
        rewards.append(r)
        terms.append(term)
        truncs.append(trunc)
        finished += fin
    out = {k: torch.stack(v).to(device) for k, v in rows.items()}
    out["successors"] = (out["successors"] - obs_mean) / obs_std
    out["next_values"] = vf(out["successors"])[0]  # V of the true successor; only read where not terminated
    raw, ends = np.stack(rewards), np.maximum(np.stack(terms), np.stack(truncs))
    out["raw_rewards"] = torch.as_tensor(raw, device=device)
    out["rewards"] = torch.as_tensor(reward_fn(raw, ends) if reward_fn is not None else raw, device=device)
    # termination only: a time-limit end is not terminal, GAE bootstraps it from V(final obs)
    out["terminations"] = torch.as_tensor(np.stack(terms), device=device)
    out["ends"] = torch.as_tensor(ends, device=device)
    return out, finished


# ---------------------------------------------------------------- updates (one gradient step each; tensors in, tensors out)
# Each phase wraps its update once: accel.update(functools.partial(update, <modules, optimizers>, <constants as keywords>)),
# then calls it with the minibatch tensors only (a weight that changes over time is a 0-d device tensor). The bodies are
# compile- and CUDA-graph-safe: one backward per update, no host reads, no Python side effects.
def set_lr(accel: Accel, opt: torch.optim.Optimizer, lr: float) -> None:
    """A schedule refills a tensor learning rate in place (a compiled update or a captured graph reads that tensor);
    an eager run keeps a plain float."""
    for g in opt.param_groups:
        if accel.tensor_lr:
            g["lr"].fill_(lr)
        else:
            g["lr"] = float(lr)


def distill_update(student: GaussianActor, opt: torch.optim.Optimizer, obs: Tensor, target: Tensor) -> dict[str, Tensor]:
    mean, log_std = student(obs)
    loss = distill_loss(mean, log_std.detach(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"distill/loss": loss.detach()}


def reevaluate_update(vf: Critic, opt: torch.optim.Optimizer, obs: Tensor, returns: Tensor) -> dict[str, Tensor]:
    """Regress V(s) on Monte-Carlo returns (Policy Re-evaluation, O2PPO; docs/algorithms.md, section 5.1)."""
    loss = F.mse_loss(vf(obs)[0], returns)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"reevaluate/value_loss": loss.detach()}


def online_update(actor: GaussianActor, vf: Critic, actor_opt: torch.optim.Optimizer, vf_opt: torch.optim.Optimizer,
                  obs: Tensor, actions: Tensor, old_logp: Tensor, advantages: Tensor, returns: Tensor,
                  clip_coef: float, ent_coef: float, max_grad_norm: float, log_std_max: float | None) -> dict[str, Tensor]:
    """One PPO minibatch step on advantages (B,) already mixed and normalised for the whole rollout (rollout_advantages):
    clipped surrogate + entropy bonus for the actor, 0.5 MSE to the GAE targets for V, gradient clipping."""
    dist = policy_dist(actor, obs, log_std_max)
    logp = dist.log_prob(actions).sum(-1)
    pg_loss, approx_kl, clipfrac = ppo_clip_loss(logp, old_logp, advantages, clip_coef)
    entropy = dist.entropy().sum(-1).mean()
    actor_loss = pg_loss - ent_coef * entropy
    v_loss = 0.5 * ((vf(obs)[0] - returns) ** 2).mean()
    actor_opt.zero_grad(set_to_none=True)
    vf_opt.zero_grad(set_to_none=True)
    # one backward: the actor and V share no parameters, so each loss reaches only its own network
    (actor_loss + v_loss).backward()
    nn.utils.clip_grad_norm_(actor.parameters(), max_grad_norm)
    nn.utils.clip_grad_norm_(vf.parameters(), max_grad_norm)
    actor_opt.step()
    vf_opt.step()
    return {"losses/actor_loss": pg_loss.detach(), "losses/value_loss": v_loss.detach(), "losses/entropy": entropy.detach(),
            "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac}


# ---------------------------------------------------------------- phases
def distill_actor(args: Args, teacher: nn.Module, obs_all: Tensor, writer: SummaryWriter, accel: Accel | None = None) -> tuple[GaussianActor, dict]:
    """Distillation (docs/algorithms.md, section 5): a tanh-Gaussian or deterministic offline actor -> GaussianActor(256 x 2)
    by maximum likelihood of
    the offline mean action on dataset states. The state-independent log_std is held fixed during the fit (the ML
    std of a deterministic target would collapse to the fitting error and leave PPO nothing to explore with)."""
    device = obs_all.device
    accel = accel or Accel(device)
    student = GaussianActor(obs_all.shape[1], teacher.act(obs_all[:1]).shape[1], ACTOR_HIDDEN).to(device)
    teacher.eval()
    with torch.no_grad():
        if args.distill_log_std is not None:
            log_std = torch.full_like(student.log_std, args.distill_log_std)
        elif isinstance(teacher, TanhGaussianActor):  # match its average per-dimension action std on dataset states
            probe = obs_all[torch.randint(len(obs_all), (512,), device=device)]
            samples = teacher.sample(probe.repeat_interleave(16, 0))[0].view(len(probe), 16, -1)
            log_std = samples.std(1).mean(0).clamp_min(1e-3).log()
        else:
            log_std = torch.full_like(student.log_std, DETERMINISTIC_LOG_STD)
        student.log_std.copy_(log_std)
    opt = accel.adam(student.net.parameters(), args.distill_lr)
    step_fn = accel.update(functools.partial(distill_update, student, opt))
    metrics = Metrics(writer)
    for step in tqdm(range(1, args.distill_steps + 1), desc="distill", disable=None):
        obs = obs_all[torch.randint(len(obs_all), (args.distill_batch_size,), device=device)]
        with torch.no_grad():
            target = teacher.act(obs)
        metrics.add(step_fn(obs, target))
        if step % args.log_every == 0 or step == args.distill_steps:
            metrics.flush(step, "distill")
    with torch.no_grad():  # distillation error on (up to) 10k dataset states
        probe = obs_all[: min(len(obs_all), 10_000)]
        err = student(probe)[0] - teacher.act(probe)
        info = {"teacher_family": teacher.family, "steps": args.distill_steps, "log_std": student.log_std.tolist(),
                "mse": float((err**2).mean()), "max_abs_error": float(err.abs().max())}
    writer.add_scalar("distill/action_mse", info["mse"], args.distill_steps)
    writer.add_scalar("distill/max_abs_error", info["max_abs_error"], args.distill_steps)
    return student, info


def run_distillation(run: Run, teacher: nn.Module, obs_all: Tensor, key: dict) -> GaussianActor:
    """Any offline actor -> the Gaussian family (docs/algorithms.md, section 5), reusing distilled.pt when it was made
    with the same key; pi0 is evaluated and recorded as the curve's "distilled" point."""
    t0 = time.time()
    run.enter("distill")
    saved = load_phase(run.out / "distilled.pt", key, run.args.no_resume)
    if saved is not None:
        pi0 = actor_from_checkpoint(saved, run.device)
        run.distillation, ret, score = saved["distillation"], saved["eval_return"], saved["eval_normalized_score"]
    else:
        torch.manual_seed(run.args.seed + 1)  # every phase draws from its own seed: a reused phase leaves the next ones unchanged
        pi0, run.distillation = distill_actor(run.args, teacher, obs_all, run.writer, run.accel)
        ret, score = run.evaluate(pi0, headline=True)
        atomic_save(run.checkpoint(pi0, None, score, key, grad_steps=run.args.distill_steps, distillation=run.distillation, eval_return=ret),
                    run.out / "distilled.pt")
    run.record(0, ret, score, "distilled")
    tqdm.write(f"distilled {teacher.family} -> gaussian: mse {run.distillation['mse']:.4g}, max abs error {run.distillation['max_abs_error']:.3g}")
    run.phase_done("distill", t0)
    return pi0


def reevaluate_value(args: Args, vf: Critic, obs_all: Tensor, returns_all: Tensor, writer: SummaryWriter, accel: Accel | None = None) -> dict:
    """Policy Re-evaluation (O2PPO; docs/algorithms.md, section 5.1): V(s) regressed on the offline Monte-Carlo returns,
    `reevaluate_steps` steps of batch `reevaluate_batch_size`."""
    device = obs_all.device
    accel = accel or Accel(device)
    opt = accel.adam(vf.parameters(), args.reevaluate_lr)
    step_fn = accel.update(functools.partial(reevaluate_update, vf, opt))
    metrics, loss = Metrics(writer), float("nan")
    for step in tqdm(range(1, args.reevaluate_steps + 1), desc="re-evaluation", disable=None):
        idx = torch.randint(len(obs_all), (args.reevaluate_batch_size,), device=device)
        metrics.add(step_fn(obs_all[idx], returns_all[idx]))
        if step % args.log_every == 0 or step == args.reevaluate_steps:
            loss = metrics.flush(step, "reevaluate")["reevaluate/value_loss"]
    with torch.no_grad():
        probe = torch.arange(min(len(obs_all), 100_000), device=device)
        v, g = vf(obs_all[probe])[0], returns_all[probe]
        explained = float(1.0 - (g - v).var() / g.var().clamp_min(1e-8))
    writer.add_scalar("reevaluate/explained_variance", explained, args.reevaluate_steps)
    return {"steps": args.reevaluate_steps, "final_loss": loss, "explained_variance": explained}


def run_reevaluation(run: Run, pi0: GaussianActor, vf: Critic, obs_all: Tensor, key: dict) -> None:
    """Policy Re-evaluation (O2PPO; docs/algorithms.md, section 5.1) of `vf` in place, reusing reevaluated.pt when it
    was made with the same key. The targets are the discounted Monte-Carlo returns of the offline rewards under the
    online reward handling, restarted at every episode end (time limits too)."""
    t0 = time.time()
    run.enter("reevaluate")
    saved = load_phase(run.out / "reevaluated.pt", key, run.args.no_resume)
    if saved is not None:
        vf.load_state_dict(saved["critics"]["vf"])
        run.reevaluation = saved["reevaluation"]
    else:
        returns = monte_carlo_returns(run.rewards.offline(run.data["rewards"]), run.data["ends"], run.args.gamma)
        run.reevaluation = reevaluate_value(run.args, vf, obs_all, torch.as_tensor(returns, device=run.device), run.writer, run.accel)
        atomic_save(run.checkpoint(pi0, vf, run.curve[-1]["normalized_score"], key, grad_steps=run.args.reevaluate_steps,
                                   reevaluation=run.reevaluation), run.out / "reevaluated.pt")
    tqdm.write(f"re-evaluation: value loss {run.reevaluation['final_loss']:.4g}, explained variance {run.reevaluation['explained_variance']:.3f}")
    run.phase_done("reevaluate", t0)


def run_online(run: Run, pi0: GaussianActor | None, vf: Critic | None, resume: dict | None, online_key: dict, obs_mean: Tensor,
               obs_std: Tensor) -> tuple[GaussianActor, GaussianActor, Critic, dict]:
    """Online PPO (paper: Constrained Fine-Tuning, O2PPO; docs/algorithms.md, section 5.2) from pi0 and V, or from the
    unfinished run's online.pt (`resume`): per rollout GAE, the reference advantage mixed in with the weight w_t and the
    normalisation (once per rollout), then update_epochs epochs of minibatch updates; evaluations (which move pi_ref
    under --reference best), logs and online.pt on their clocks. Returns actor, actor_ref, V and the loop's state
    (global_step, iteration, best, start_score, resumed_from; finished: False when --stop-after stopped it)."""
    args, device, accel = run.args, run.device, run.accel
    update_epochs, horizon, log_std_max = (run.defaults[k] for k in ("update_epochs", "constraint_horizon", "log_std_max"))
    if resume is None:
        torch.manual_seed(args.seed + 3)
        actor, actor_ref = copy.deepcopy(pi0).train(), copy.deepcopy(pi0).eval()
        start = run.curve[-1]
        st = {"global_step": 0, "iteration": 0, "best": start["normalized_score"], "start_score": start["normalized_score"], "resumed_from": None}
        run.curve.append({"step": 0, "normalized_score": start["normalized_score"], "return": start["return"], "phase": "online"})  # where online starts
        run.enter("online")
    else:
        actor, actor_ref, vf, st = run.restore(resume)
        print(f"resuming {run.out / 'online.pt'} at env step {st['global_step']}")
    actor.log_std.requires_grad_(True)
    actor_ref.requires_grad_(False)
    global_step, iteration, best = st["global_step"], st["iteration"], st["best"]
    steps_per_env = args.rollout_size // args.num_envs
    num_iterations = args.online_steps // args.rollout_size
    actor_opt = accel.adam(actor.parameters(), args.actor_lr, eps=args.adam_eps)
    vf_opt = accel.adam(vf.parameters(), args.critic_lr, eps=args.adam_eps)
    if resume is not None:  # the optimizers and every RNG as online.pt saved them
        accel.load_optimizer(actor_opt, resume["optimizers"]["actor"])
        accel.load_optimizer(vf_opt, resume["optimizers"]["vf"])
        set_rng_state(resume["rng"])
    # built once: the modules and optimizers are bound, the constants are keywords; per call only the minibatch
    update = accel.update(functools.partial(online_update, actor, vf, actor_opt, vf_opt, clip_coef=args.clip_coef,
                                            ent_coef=args.ent_coef, max_grad_norm=args.max_grad_norm, log_std_max=log_std_max))
    # a resumed run restarts its training episodes (simulator states are not saved); new seeds for new starts
    pool = EnvPool(run.data["env_spec"], args.num_envs, args.seed + 1000 + global_step)
    t_online = time.time() - run.wall.get("online", 0.0)
    metrics = Metrics(run.writer)
    next_log = (global_step // args.log_every + 1) * args.log_every
    next_eval = (global_step // args.eval_every + 1) * args.eval_every
    early = early_rollout_ends(num_iterations * args.rollout_size, args.rollout_size, args.early_evals)  # extra evaluations in the first tenth
    next_ckpt = (global_step // args.checkpoint_every + 1) * args.checkpoint_every
    bar = tqdm(total=num_iterations * args.rollout_size, initial=global_step, desc=f"o2o_ppo {run.mode}", disable=None)
    sps_t0, sps_step0 = time.time(), global_step
    stopped = False
    while iteration < num_iterations:
        for opt, lr0 in ((actor_opt, args.actor_lr), (vf_opt, args.critic_lr)):
            set_lr(accel, opt, linear_lr(lr0, iteration, num_iterations))
        roll, finished = collect_rollout(pool, actor, vf, steps_per_env, obs_mean, obs_std, run.rewards, log_std_max)
        global_step += args.rollout_size
        iteration += 1
        for ep_ret, ep_len in finished:
            run.writer.add_scalar("charts/episodic_return", ep_ret, global_step)
            run.writer.add_scalar("charts/episodic_length", ep_len, global_step)
        advantages, returns = gae(roll["rewards"], roll["values"], roll["next_values"], roll["terminations"], roll["ends"], args.gamma, args.gae_lambda)
        b_obs, b_actions = roll["obs"].reshape(args.rollout_size, -1), roll["actions"].reshape(args.rollout_size, -1)
        b_logp, b_ret = roll["logprobs"].reshape(-1), returns.reshape(-1)
        w = constraint_weight(global_step, horizon) if not args.no_constraint else 0.0
        # once per rollout, as the official code: A_ref, mixing with w_t and normalisation over all rollout_size samples
        with torch.no_grad():
            ref_mean = ref_std = None
            if not args.no_constraint:
                ref = policy_dist(actor_ref, b_obs, log_std_max)
                ref_mean, ref_std = ref.mean, ref.stddev
            b_adv, a_ref = rollout_advantages(advantages.reshape(-1, 1), b_actions, ref_mean, ref_std, w)
        b_adv = b_adv.squeeze(-1)
        if a_ref is not None:
            metrics.add({"losses/ref_advantage": a_ref.mean()})
        for _ in range(update_epochs):
            perm = torch.randperm(args.rollout_size, device=device)
            # validate() makes --rollout-size a multiple of --minibatch-size: every minibatch has one shape (one graph)
            for start in range(0, args.rollout_size, args.minibatch_size):
                idx = perm[start : start + args.minibatch_size]
                metrics.add(update(b_obs[idx], b_actions[idx], b_logp[idx], b_adv[idx], b_ret[idx]))
        bar.update(args.rollout_size)
        last = iteration == num_iterations
        if global_step >= next_log or last:
            metrics.flush(global_step, "online")
            run.writer.add_scalar("charts/constraint_weight", w, global_step)
            run.writer.add_scalar("charts/learning_rate", float(actor_opt.param_groups[0]["lr"]), global_step)
            run.writer.add_scalar("charts/actor_std", float(capped_log_std(actor.log_std.detach(), log_std_max).exp().mean()), global_step)
            run.writer.add_scalar("charts/SPS", (global_step - sps_step0) / max(time.time() - sps_t0, 1e-9), global_step)
            next_log = (global_step // args.log_every + 1) * args.log_every
        if global_step >= next_eval or global_step in early or last:
            ret, score = run.evaluate(actor, headline=global_step <= num_iterations * args.rollout_size / 10 or last)
            run.record(global_step, ret, score, "online")
            run.diagnostics["evaluations"].append(run.diagnose("eval", global_step, actor, vf))
            bar.set_postfix(score=f"{score:.1f}")
            if args.reference == "best":  # an early evaluation too: every evaluation may move pi_ref
                best = update_reference(actor_ref, actor, score, best)
            next_eval = (global_step // args.eval_every + 1) * args.eval_every
        stop = args.stop_after is not None and global_step >= args.stop_after and not last
        if global_step >= next_ckpt or last or stop:
            run.wall["online"] = time.time() - t_online
            st.update(global_step=global_step, iteration=iteration, best=best)
            atomic_save(run.checkpoint(
                actor, vf, run.curve[-1]["normalized_score"], online_key, grad_steps=iteration * update_epochs * (args.rollout_size // args.minibatch_size),
                env_steps=global_step, iteration=iteration, actor_ref=state_dict_cpu(actor_ref), best_score=best, start_score=st["start_score"],
                curve=run.curve, wall_clock_s=run.wall, distillation=run.distillation, reevaluation=run.reevaluation,
                optimizers={"actor": actor_opt.state_dict(), "vf": vf_opt.state_dict()}, return_std=run.rewards.state_dict(),
                diagnostics=run.diagnostics, rng=rng_state(), evaluation_s=run.evaluator.seconds), run.out / "online.pt")
            atomic_save(run.results(False, st), run.out / "results.json")  # progress so far
            next_ckpt = (global_step // args.checkpoint_every + 1) * args.checkpoint_every
        if stop:
            stopped = True
            break
    bar.close()
    pool.close()
    run.wall["online"] = time.time() - t_online
    st.update(global_step=global_step, iteration=iteration, best=best, finished=not stopped)
    return actor, actor_ref, vf, st


def main(args: Args) -> dict:
    check_tracking(args)
    args = with_family(args)  # the PPO_FAMILY_DEFAULTS values kept in args (eval_episodes)
    validate(args)
    given = args
    args = scale_budgets(args)  # from here on every step budget is the effective one (times --budget-scale)
    device = pick_device(args.device)
    accel = Accel(device, args.compile, args.cudagraphs, args.bf16)  # bad combinations fail before any loading
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env_name = args.env if args.dataset_id is None else args.dataset_id
    env_key = args.env if args.dataset_id is None else args.dataset_id.replace("/", "_")
    mode = mode_name(args)
    out = Path(args.run_dir) / "o2o_ppo" / env_key / (args.run_name or f"{mode}_seed{args.seed}")
    check_output_dir(out, "--run-dir")  # before the dataset is loaded: a bad folder fails in seconds
    data = load_dataset(args.env, args.dataset_id, args.no_download)
    ckpt_path = resolve_checkpoint(args)
    ckpt = load_checkpoint(ckpt_path, env_name=env_name, obs_dim=data["obs_dim"], act_dim=data["act_dim"])
    defaults = family_defaults(args)
    digest = file_digest(ckpt_path)
    online_key = phase_key(args, "online", digest, device, defaults["reward_scaling"])
    # the run folder: a run of other settings is refused; an online.pt of the same settings is resumed
    resume = check_run_folder(out, online_key, args)
    # the dataset's states on the device, then the rollout and the batches of every phase, before any phase runs
    obs_all = dataset_states(data, ckpt, device)
    check_memory(args, data, device)

    set_seed(args.seed)
    obs_mean, obs_std = (torch.as_tensor(ckpt[k].numpy(), device=device) for k in ("obs_mean", "obs_std"))  # the actor was trained on these
    rewards = RewardScaling(defaults["reward_scaling"], args.gamma, data, ckpt, resume["return_std"] if resume is not None else None)
    prepare_run_folder(out, args)
    atomic_save(json.loads(json.dumps(asdict(args))), out / "args.json")
    tracker = start_tracking(args, asdict(given), out)  # before Run makes the SummaryWriter
    run = Run(args, given, out, data, ckpt, ckpt_path, defaults, rewards, accel, obs_all)
    print(f"o2o_ppo {mode} on {env_name} from {ckpt_path} ({ckpt['actor_family']} actor); epochs {defaults['update_epochs']}, constraint "
          f"horizon {defaults['constraint_horizon']}, log-std cap {defaults['log_std_max']}, rewards {rewards.mode} (row "
          f"{defaults['family_row']!r}, {defaults['family_env']!r} of PPO_FAMILY_DEFAULTS unless set by flags)")
    if args.budget_scale != 1.0:
        print(f"--budget-scale {args.budget_scale}: " + ", ".join(f"{k} {getattr(args, k)}" for k in BUDGET_STEPS))

    pi0 = vf = None
    if resume is None:  # (a resumed run continues its online phase: everything before it is in online.pt)
        # --- the offline actor in, evaluated (the curve starts with its score at step 0)
        t0 = time.time()
        run.enter("offline")
        teacher = actor_from_checkpoint(ckpt, device)
        run.record(0, *run.evaluate(teacher, headline=True), "offline")
        run.phase_done("offline_eval", t0)
        # --- any family -> Gaussian (docs/algorithms.md, section 5); a Gaussian actor is copied exactly
        pi0 = teacher if isinstance(teacher, GaussianActor) else run_distillation(run, teacher, obs_all, phase_key(args, "distilled", digest, device))
        # --- V: re-evaluated (paper: Policy Re-evaluation, O2PPO; docs/algorithms.md, section 5.1), or fresh (ablation)
        torch.manual_seed(args.seed + 2)
        vf = build_value(data["obs_dim"]).to(device)
        run.diagnostics = {"states": len(run.probe_obs), "start": run.diagnose("start", 0, pi0, vf), "evaluations": []}
        if not args.no_reevaluate:
            run_reevaluation(run, pi0, vf, obs_all, phase_key(args, "reevaluated", digest, device, defaults["reward_scaling"]))
        run.diagnostics["reevaluated"] = run.diagnose("reevaluated", 0, pi0, vf)  # the switch to online learning
    # --- online PPO (paper: Constrained Fine-Tuning, O2PPO; docs/algorithms.md, section 5.2)
    actor, actor_ref, vf, st = run_online(run, pi0, vf, resume, online_key, obs_mean, obs_std)

    if st["finished"]:
        run.diagnostics["end"] = run.diagnose("end", st["global_step"], actor, vf)
    run.close()
    finish_tracking(tracker)
    result = run.results(st["finished"], st)
    if not st["finished"]:  # as if killed: only online.pt (and what came before) is on disk
        print(stop_notice(st["global_step"], st["global_step"]))  # online.pt is written at the stop
        return result
    grad_steps = st["iteration"] * defaults["update_epochs"] * (args.rollout_size // args.minibatch_size)
    atomic_save(run.checkpoint(actor, vf, run.curve[-1]["normalized_score"], online_key, grad_steps=grad_steps, env_steps=st["global_step"],
                               actor_ref=state_dict_cpu(actor_ref), best_score=st["best"], curve=run.curve), out / "final.pt")
    atomic_save(result, out / "results.json")
    print(f"o2o_ppo ({result['method']}) on {env_name}: offline {result['offline_score']:.1f} -> start of online {result['online_start_score']:.1f} "
          f"-> final {result['final_score']:.1f} (min over first tenth {result['min_first_tenth']:.1f}); outputs in {out}")
    return result


# ==================== INFRASTRUCTURE ====================
CKPT_NAME = "o2o_ppo"
CHECKPOINT_EVERY = 20_480  # the longest default interval of online.pt (env steps, before --budget-scale)
RUN_NAME_RE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
DIAG_STATES = 2048  # dataset states the phase-boundary diagnostics are computed on


def mode_name(args: Args) -> str:
    if args.no_reevaluate and args.no_constraint:
        return "naive"
    return "no_reevaluate" if args.no_reevaluate else "no_constraint" if args.no_constraint else "o2ppo"


BUDGET_STEPS = ("reevaluate_steps", "online_steps", "constraint_horizon", "eval_every", "log_every", "checkpoint_every")


def scaled_steps(n: int, scale: float) -> int:
    """round(n * scale) (halves up), at least 1; a count of 0 (--reevaluate-steps 0 with --no-reevaluate) stays 0."""
    return max(1, int(math.floor(n * scale + 0.5))) if n > 0 else n


def scale_budgets(args: Args) -> Args:
    """--budget-scale: a copy of args whose BUDGET_STEPS are the effective ones, given or defaulted (the constraint
    horizon: the family table's when --constraint-horizon is not given, times the scale only with
    --scale-constraint-horizon; --checkpoint-every: CHECKPOINT_EVERY, at most a tenth of the scaled online steps, at
    least 1) times the scale. Exits 2 when the online budget is less than one rollout."""
    horizon = args.constraint_horizon if args.constraint_horizon is not None else family_defaults(args)["constraint_horizon"]
    given = {**{k: getattr(args, k) for k in BUDGET_STEPS}, "constraint_horizon": horizon}
    fields = [k for k in BUDGET_STEPS if k != "constraint_horizon" or args.scale_constraint_horizon]
    scaled = {k: scaled_steps(v, args.budget_scale) if v is not None and k in fields else v for k, v in given.items()}
    if scaled["checkpoint_every"] is None:  # a killed short run keeps most of its online phase
        scaled["checkpoint_every"] = min(scaled_steps(CHECKPOINT_EVERY, args.budget_scale), max(1, scaled["online_steps"] // 10))
    if scaled["online_steps"] < args.rollout_size:
        how = f" x --budget-scale {args.budget_scale} = {scaled['online_steps']}" if args.budget_scale != 1.0 else ""
        least = args.rollout_size / args.online_steps
        digits = 2 - math.floor(math.log10(least))  # rounded up to 3 significant digits: that scale fits
        fix = "raise it" if args.budget_scale == 1.0 else \
            f"raise --online-steps or --budget-scale (to at least {math.ceil(least * 10**digits) / 10**digits:g})"
        fail(f"--online-steps {args.online_steps}{how} is less than one rollout (--rollout-size {args.rollout_size}); {fix}")
    return dataclasses.replace(args, **scaled)


def validate(args: Args) -> None:
    for flag in ("distill_steps", "distill_batch_size", "reevaluate_batch_size", "online_steps", "num_envs", "rollout_size",
                 "minibatch_size", "eval_every", "eval_episodes", "log_every"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("update_epochs", "constraint_horizon", "stop_after", "threads", "checkpoint_every"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not (args.budget_scale > 0.0 and math.isfinite(args.budget_scale)):
        fail(f"--budget-scale must be a positive number, got {args.budget_scale}")
    if args.early_evals < 0 or args.headline_eval_episodes < 0:
        fail(f"--early-evals and --headline-eval-episodes must be >= 0 (0 = none), got {args.early_evals}, {args.headline_eval_episodes}")
    if not args.no_reevaluate and args.reevaluate_steps <= 0:
        fail(f"--reevaluate-steps must be positive, got {args.reevaluate_steps} (or pass --no-reevaluate)")
    if args.rollout_size % args.num_envs:
        fail(f"--rollout-size {args.rollout_size} must be a multiple of --num-envs {args.num_envs}")
    if args.rollout_size % args.minibatch_size:
        fail(f"--rollout-size {args.rollout_size} must be a multiple of --minibatch-size {args.minibatch_size}")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        fail("--gamma must lie in (0, 1] and --gae-lambda in [0, 1]")
    for flag in ("actor_lr", "critic_lr", "reevaluate_lr", "distill_lr", "clip_coef", "max_grad_norm", "adam_eps"):
        if not getattr(args, flag) > 0.0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.ent_coef < 0.0:
        fail(f"--ent-coef must be >= 0, got {args.ent_coef}")
    # no leading dot: `..` would leave <run_dir>/o2o_ppo/<env>/, and a hidden folder hides the run
    if args.run_name is not None and not re.fullmatch(RUN_NAME_RE, args.run_name):
        fail(f"--run-name {args.run_name!r} may hold only letters, digits, '_', '.', '-' and may not start with '.'")
    if args.dataset_id is not None and not DATASET_ID_RE.match(args.dataset_id):
        fail(f"malformed dataset id {args.dataset_id!r}; Minari ids look like namespace/name-v0 (no part may start with '.')")
    if args.dataset_id is None:
        parse_env_name(args.env)  # unknown names exit 2 listing the known ones
    if args.family is not None:
        dataset_family(args.env, args.dataset_id, args.family)


def dataset_states(data: dict, ckpt: dict, device: torch.device) -> Tensor:
    """The dataset's states, normalised with the checkpoint's statistics, on the device (exit 2 when they do not fit)."""
    try:
        obs_all_np = (data["observations"] - ckpt["obs_mean"].numpy()) / ckpt["obs_std"].numpy()
        return torch.as_tensor(obs_all_np, device=device)
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"the dataset's {len(data['rewards'])} transitions do not fit in the memory of {device}; use another --device or a smaller dataset")


def check_memory(args: Args, data: dict, device: torch.device) -> None:
    """A rollout and the batches of every phase fit on the device (check_allocations), before any phase runs."""
    row = 2 * data["obs_dim"] + data["act_dim"] + 8  # a rollout's transition: obs, successor, action, log-prob, values, rewards, ends
    check_allocations([(args.rollout_size, row, f"a rollout of --rollout-size {args.rollout_size}", "lower it")]
                      + [(getattr(args, f), row, f"a batch of --{f.replace('_', '-')} {getattr(args, f)}", "lower it")
                         for f in ("minibatch_size", "distill_batch_size", "reevaluate_batch_size")], device)


# ---------------------------------------------------------------- the run folder (the same rules in o2o_sac.py, o2o_td3.py, o2o_ppo.py)
# A run folder is never taken over silently; what it holds is checked before anything is computed or written. A
# finished run (final.pt) of other settings is refused unless --overwrite; an unfinished one (online.pt) of other
# settings is refused unless --no-resume (its online phase starts afresh) or --overwrite; a run of the same settings
# resumes (a finished one: extended to a larger --online-steps); a saved phase of other settings is recomputed with a
# notice. The settings are the online key: every argument that changes what the run computes, and the offline
# checkpoint's content.
#
# BUDGET_ARGS: args that do not change what a resumed online run computed up to where it stopped (a longer
# --online-steps resumes and stretches the remaining learning-rate decay over the new budget; --compile and
# --cudagraphs keep the math, --bf16 does not and stays in the key; so does --eval-every: evaluations move pi_ref)
BUDGET_ARGS = ("online_steps", "stop_after", "log_every", "checkpoint_every", "no_resume", "overwrite", "run_dir", "run_name", "checkpoint",
               "device", "compile", "cudagraphs", "threads", "track", "wandb_project_name", "wandb_entity")
RUN_OUTPUTS = ("args.json", "results.json", "final.pt", "online.pt", "distilled.pt", "reevaluated.pt")
PHASE_FORMAT = 2  # the layout of phase, online and final checkpoints (2: every RNG state, from the shared phases block)
KEY_WORDS = {"offline_checkpoint": "another offline checkpoint (its content differs)", "phase_format": "an older format of the saved phases"}


def phase_key(args: Args, phase: str, digest: str, device: torch.device, reward_mode: str | None = None) -> dict:
    """What a saved phase depends on: the offline checkpoint's content (`digest`) and the arguments that change what it
    computes. online: the run folder's settings (every argument but BUDGET_ARGS); distilled, reevaluated: the seed, the
    device, --bf16 and the phase's own arguments (reevaluated: also the reward handling `reward_mode`)."""
    a = json.loads(json.dumps(asdict(args)))
    if phase == "online":
        return {"offline_checkpoint": digest, "phase_format": PHASE_FORMAT, **{k: v for k, v in a.items() if k not in BUDGET_ARGS}}
    base = {"offline_checkpoint": digest, "phase_format": PHASE_FORMAT, "seed": args.seed, "device": str(device), "bf16": args.bf16}
    if phase == "distilled":
        return {**base, **{k: a[k] for k in ("distill_steps", "distill_batch_size", "distill_lr", "distill_log_std")}}
    return {**base, "reward_scaling": reward_mode, **{k: a[k] for k in ("reevaluate_steps", "reevaluate_batch_size", "reevaluate_lr", "gamma")}}


class Run:
    """Outputs of one run: folder, tensorboard, evaluation, curve, phase wall-clock, the phase-boundary diagnostics,
    checkpoints and results.json."""

    def __init__(self, args: Args, given: Args, out: Path, data: dict, ckpt: dict, ckpt_path: Path, defaults: dict, rewards: RewardScaling,
                 accel: Accel, obs_all: Tensor):
        self.args, self.given, self.out, self.data, self.ckpt, self.ckpt_path = args, given, out, data, ckpt, ckpt_path
        self.defaults, self.rewards, self.accel, self.device = defaults, rewards, accel, obs_all.device
        self.mode = mode_name(args)
        self.env_name = args.env if args.dataset_id is None else args.dataset_id
        self.evaluator = Evaluator(data["env_spec"], max(args.eval_episodes, args.headline_eval_episodes), args.seed + 100, ckpt["obs_mean"].numpy(),
                                   ckpt["obs_std"].numpy(), self.device)
        self.writer = SummaryWriter(str(out))
        self.writer.add_text("args", json.dumps(json.loads(json.dumps(asdict(args)))))
        self.writer.add_text("dataset", f"{','.join(data['dataset_ids'])} (local stand-in: {data['local_standin']})")
        self.curve: list[dict] = []
        self.wall: dict[str, float] = {}
        self.diagnostics: dict[str, Any] = {}
        self.distillation: dict | None = None
        self.reevaluation: dict | None = None
        # diagnostics: V and the actor on DIAG_STATES dataset states drawn once from the run's seed (numpy's own generator:
        # the runs' random streams are untouched), V against the offline Monte-Carlo returns of those states
        probe = np.sort(np.random.default_rng(args.seed).choice(len(obs_all), min(DIAG_STATES, len(obs_all)), replace=False))
        self.probe_obs = obs_all[torch.as_tensor(probe, device=self.device)]
        self.mc_raw, self.mc_ones = (torch.as_tensor(monte_carlo_returns(r, data["ends"], args.gamma)[probe], device=self.device)
                                     for r in (data["rewards"], np.ones_like(data["rewards"])))

    def evaluate(self, actor: nn.Module, headline: bool = False) -> tuple[float, float]:
        """Mean return and normalised score over --eval-episodes episodes, or --headline-eval-episodes for a headline."""
        actor.eval()
        returns = self.evaluator(actor.act, None if headline else self.args.eval_episodes)
        actor.train()
        ret = float(returns.mean())
        return ret, float(normalized_score(ret, self.data["ref_min_score"], self.data["ref_max_score"]))

    def record(self, step: int, ret: float, score: float, phase: str) -> None:
        """One point of the curve, on tensorboard and the console too."""
        self.curve.append({"step": step, "normalized_score": score, "return": ret, "phase": phase})
        self.writer.add_scalar("eval/episodic_return", ret, step)
        self.writer.add_scalar("eval/normalized_score", score, step)
        tqdm.write(f"[{phase}] step {step}: return {ret:.1f}, normalized score {score:.1f}")

    def enter(self, phase: str, env_step: int = 0) -> None:
        """charts/phase of a phase this run starts (log_phase); a resumed online phase logs none again."""
        log_phase(self.writer, phase, env_step)

    def phase_done(self, name: str, t0: float) -> None:
        self.wall[name] = time.time() - t0

    @torch.no_grad()
    def diagnose(self, tag: str, step: int, pi: GaussianActor, v: Critic) -> dict[str, float]:
        """value_stats and actor_stats now; tensorboard diagnostics/<stat>/<tag> (an evaluation: diagnostics/<stat>)."""
        rt = self.rewards.transform()  # the Monte-Carlo returns on the scale V learns now (affine in the rewards)
        mu, log_std = pi(self.probe_obs)
        stats = {**value_stats(v(self.probe_obs)[0], rt["scale"] * self.mc_raw + rt["shift"] * self.mc_ones),
                 **actor_stats(mu, capped_log_std(log_std, self.defaults["log_std_max"]), pi.max_action)}
        for k, val in stats.items():
            self.writer.add_scalar(f"diagnostics/{k}" + (f"/{tag}" if tag != "eval" else ""), val, step)
        return {"step": step, **stats}

    def checkpoint(self, actor: nn.Module, vf: Critic | None, score: float, phase_key: dict, **extra: Any) -> dict:
        """Same format as the offline checkpoints (load_checkpoint / actor_from_checkpoint read it), plus V and extras."""
        ckpt, data = self.ckpt, self.data
        return {
            "format_version": CHECKPOINT_FORMAT, "algo": CKPT_NAME, "offline_algo": ckpt["algo"], "env_name": ckpt["env_name"],
            "dataset_id": ckpt["dataset_id"], "local_standin": data["local_standin"], "env_spec": ckpt["env_spec"],
            "obs_dim": ckpt["obs_dim"], "act_dim": ckpt["act_dim"], "max_action": ckpt["max_action"],
            "actor_family": "gaussian", "actor_config": {"hidden": [m.out_features for m in actor.net if isinstance(m, nn.Linear)][:-1]},
            "actor": state_dict_cpu(actor),
            "critics": {"vf": state_dict_cpu(vf)} if vf is not None else None,
            "critic_config": {"hidden": list(VALUE_HIDDEN), "layer_norm": False, "activation": "tanh"} if vf is not None else None,
            "obs_mean": ckpt["obs_mean"], "obs_std": ckpt["obs_std"], "reward_transform": self.rewards.transform(),
            "ref_min_score": data["ref_min_score"], "ref_max_score": data["ref_max_score"],
            "args": asdict(self.args), "grad_steps": extra.pop("grad_steps", 0), "eval_normalized_score": score, "phase_key": phase_key, **extra,
        }

    def restore(self, saved: dict) -> tuple[GaussianActor, GaussianActor, Critic, dict]:
        """The unfinished run of online.pt: its curve, wall-clock, diagnostics and phase summaries, its actor, reference
        actor and V, and the online loop's state."""
        self.curve, self.wall, self.diagnostics = saved["curve"], dict(saved["wall_clock_s"]), saved["diagnostics"]
        self.evaluator.seconds += saved.get("evaluation_s", 0.0)
        self.distillation, self.reevaluation = saved["distillation"], saved["reevaluation"]
        actor = actor_from_checkpoint(saved, self.device).train()
        actor_ref = build_actor("gaussian", self.data["obs_dim"], self.data["act_dim"], saved["actor_config"]["hidden"], saved["max_action"])
        actor_ref = actor_ref.to(self.device).eval()
        actor_ref.load_state_dict(saved["actor_ref"])
        vf = build_value(self.data["obs_dim"]).to(self.device)
        vf.load_state_dict(saved["critics"]["vf"])
        st = {"global_step": saved["env_steps"], "iteration": saved["iteration"], "best": saved["best_score"], "start_score": saved["start_score"],
              "resumed_from": saved["env_steps"]}
        return actor, actor_ref, vf, st

    def results(self, finished: bool, st: dict) -> dict:
        """results.json now; `st`: the online loop's state (run_online)."""
        args, d, rw = self.args, self.defaults, self.rewards
        total_steps = args.online_steps // args.rollout_size * args.rollout_size
        return results_record(
            script="o2o_ppo", algo="ppo", method=method_name(not args.no_reevaluate, None, not args.no_constraint),
            mode={"name": self.mode, "reevaluate": not args.no_reevaluate, "constraint": not args.no_constraint, "reference": args.reference},
            env=self.env_name, data=self.data, seed=args.seed, offline_algo=self.ckpt["algo"], offline_checkpoint=self.ckpt_path, curve=self.curve,
            online_start_score=st["start_score"], online_steps=total_steps, online_steps_done=st["global_step"], budget_scale=args.budget_scale,
            wall_clock_s=self.wall, finished=finished, run_dir=self.out, evaluation_s=self.evaluator.seconds, run_name=self.out.name, offline_actor_family=self.ckpt["actor_family"],
            update_epochs=d["update_epochs"], constraint_horizon=d["constraint_horizon"], family_row=d["family_row"], family_env=d["family_env"],
            log_std_max=d["log_std_max"], reward_transform=rw.transform(),
            reward_scaling={"mode": rw.mode, "from": "family table" if args.reward_scaling == "family" else "--reward-scaling",
                            "affine": rw.affine if rw.mode != "return-std" else None, "offline_return_std": rw.offline_return_std,
                            "final_return_std": rw.return_std.std if rw.return_std is not None else None},
            num_envs=args.num_envs, iterations=st["iteration"], resumed_from=st["resumed_from"], distillation=self.distillation,
            reevaluation=self.reevaluation,
            budget={"given": {k: getattr(self.given, k) for k in BUDGET_STEPS},  # constraint_horizon None: the family table's
                    "effective": {k: getattr(args, k) for k in BUDGET_STEPS}},
            diagnostics={**{k: self.diagnostics.get(k) for k in ("states", "start", "reevaluated", "end")},
                         "early_evals": {"requested": args.early_evals, "steps": early_rollout_ends(total_steps, args.rollout_size, args.early_evals)},
                         "evaluations": self.diagnostics["evaluations"]})

    def close(self) -> None:
        self.writer.close()
        self.evaluator.close()


# ---------------------------------------------------------------- online environments
class EnvPool:
    """`n` training environments stepped one after another (no subprocesses: MuJoCo steps are cheap next to
    the networks). An environment whose episode ends is reset in the SAME step: `step` returns the true
    successor (the final observation) separately, and `self.obs` holds what to act on next (the reset one)."""

    def __init__(self, env_spec: str, n: int, seed: int):
        self.envs = [make_env(env_spec) for _ in range(n)]
        self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]).astype(np.float32)
        space = self.envs[0].action_space
        self.low, self.high = space.low, space.high
        self.episode_return = np.zeros(n)
        self.episode_length = np.zeros(n, dtype=np.int64)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[float, int]]]:
        """-> (successor obs, rewards, terminations, truncations, [(return, length) of every finished episode])."""
        n = len(self.envs)
        successor = np.empty_like(self.obs)
        rewards, terms, truncs = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
        finished = []
        for i, (env, a) in enumerate(zip(self.envs, np.clip(actions, self.low, self.high))):
            obs, r, term, trunc, _ = env.step(a)
            successor[i], rewards[i] = obs, r
            # termination wins when both happen: the state is terminal, nothing to bootstrap
            terms[i], truncs[i] = float(term), float(trunc and not term)
            self.episode_return[i] += r
            self.episode_length[i] += 1
            if term or trunc:
                finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                obs, _ = env.reset()
            self.obs[i] = obs
        return successor, rewards, terms, truncs, finished

    def close(self) -> None:
        for env in self.envs:
            env.close()


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


if __name__ == "__main__":
    main(parse_cli(Args))
