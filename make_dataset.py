"""Build D4RL-style offline datasets for Gymnasium MuJoCo v5 envs, as local Minari datasets.

D4RL (mujoco-py, gym 0.23) no longer installs and hosted Minari data may be out of reach, so this script
follows the D4RL recipe locally: train SAC on `<Env>-v5` keeping behaviour-policy snapshots, then write
`local/<env>/<level>-v0` for the levels asked for:
    random         uniform random actions
    medium         rollouts of the first snapshot whose return reaches --medium-fraction of the D4RL expert return
    medium-replay  the SAC replay buffer up to that snapshot
    expert         rollouts of the final policy (needs the full --train-steps)
    medium-expert  medium + expert
Datasets carry D4RL's ref_min_score / ref_max_score so normalised scores read on the usual 0-100 scale.

AntMaze (`--env antmaze-<maze>-v2`): the hosted data (D4RL/antmaze/<maze>-v1) come from a maze-solving controller this
script does not have; `--random-steps N` builds `local/antmaze/<maze>-v0`, a RANDOM-ACTION stand-in for tests and trials
in the same Minari layout (Dict observations, sparse reward, the env and evaluation env specs of the hosted data), from the
real gymnasium-robotics env; every --near-goal-every-th episode has its goal moved next to the ant's start, so some
episodes reach it (see antmaze_random_episodes).

Usage:
    python make_dataset.py --env hopper-medium-v2 --levels medium medium-replay
    python make_dataset.py --env antmaze-umaze-v2 --random-steps 100000
    python make_dataset.py --env hopper-medium-v2 --policy benchmarks/behavior_policies/hopper/medium_policy.pt
    python make_dataset.py --env hopper-medium-replay-v2 --policy benchmarks/behavior_policies/hopper/snapshot_*.pt
"""

from __future__ import annotations

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import gymnasium as gym
import minari
import minari.namespace as minari_namespace
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from torch import Tensor
from tqdm import tqdm


@dataclass
class Args:
    # --- experiment ---
    env: str = "hopper-medium-v2"
    """D4RL-style name `<env>-<level>-v2`; the level is built unless --levels says otherwise"""
    levels: tuple[str, ...] = ()
    """levels to build, among random, medium, medium-replay, expert, medium-expert (default: the level of --env)"""
    seed: int = 0
    """seed of SAC training and of the collection environments"""
    out_dir: str = "runs/make_dataset"
    """behaviour-policy snapshots go to <out_dir>/<env>/seed<k>/"""
    overwrite: bool = False
    """replace datasets that already exist in the local Minari store"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""

    # --- collection ---
    size: int = 1_000_000
    """transitions per collected level (random, medium, expert; medium-expert holds twice this)"""
    num_envs: int = 10
    """environments stepped together during collection, with one batched actor call per step"""
    policy: tuple[str, ...] = ()
    """behaviour-policy snapshot(s) to collect from instead of training: one for medium or expert; the ordered
    snapshot chain of a training run for medium-replay; the medium snapshot for medium-expert"""
    expert_policy: str | None = None
    """with --policy and medium-expert: the expert snapshot"""

    # --- AntMaze random-action stand-in ---
    random_steps: int | None = None
    """AntMaze only (and required there): transitions of uniform random actions in local/antmaze/<maze>-v0"""
    episode_steps: int | None = None
    """AntMaze: steps per episode, each ended by a truncation (default: the env's time limit, 700 on umaze, else 1000)"""
    near_goal_every: int = 2
    """AntMaze: every this many episodes (the first included) the goal is moved to within 0.9 of the ant's start; 0 never"""

    # --- SAC training of the behaviour policy ---
    train_steps: int = 1_000_000
    """SAC environment steps (one update each); training stops early at the medium snapshot unless expert data is asked for"""
    medium_fraction: float = 0.4
    """a snapshot is `medium` once its mean return reaches this fraction of the D4RL expert reference return"""
    snapshot_every: int = 10_000
    """save and evaluate a behaviour-policy snapshot every this many environment steps"""
    snapshot_episodes: int = 5
    """episodes (stochastic actions, as collected) to estimate a snapshot's mean return"""
    learning_starts: int = 5_000
    """uniform random actions before the first update"""
    batch_size: int = 256
    """SAC batch size"""
    lr: float = 3e-4
    """SAC learning rate (actor, critics, temperature)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the SAC actor and critics"""


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


# ---------------------------------------------------------------- behaviour policy (SAC)
def sac_target(reward: Tensor, terminal: Tensor, next_q: Tensor, next_logp: Tensor, alpha: Tensor, gamma: float) -> Tensor:
    """y = r + gamma (1 - d) [min Qbar(s', a') - alpha log pi(a'|s')]; d is a true termination only."""
    return reward + gamma * (1.0 - terminal) * (next_q.min(0).values - alpha * next_logp)


def save_snapshot(path: Path, actor: TanhGaussianActor, env_spec: str, step: int, returns: np.ndarray, args: Args) -> None:
    """A behaviour policy: small file that acts on raw observations (no normalisation)."""
    atomic_save(
        {
            "format": "behavior_policy",
            "env_spec": env_spec,
            "obs_dim": actor.net[0].in_features,
            "act_dim": actor.head.out_features // 2,
            "hidden": list(args.hidden),
            "actor": state_dict_cpu(actor),
            "step": step,
            "return_mean": float(np.mean(returns)),
            "return_std": float(np.std(returns)),
            "learning_starts": args.learning_starts,
            "seed": args.seed,
        },
        path,
    )


def load_snapshot(path: str, env_spec: str, device: torch.device) -> tuple[TanhGaussianActor, dict]:
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"behaviour policy {path} is missing or corrupt ({type(e).__name__}); pass a snapshot written by make_dataset.py")
    if not isinstance(snap, dict) or snap.get("format") != "behavior_policy":
        fail(f"{path} is not a behaviour-policy snapshot of make_dataset.py")
    if EnvSpec.from_json(snap["env_spec"]).id != EnvSpec.from_json(env_spec).id:
        fail(f"behaviour policy {path} is for {EnvSpec.from_json(snap['env_spec']).id}, not {EnvSpec.from_json(env_spec).id}")
    actor = TanhGaussianActor(snap["obs_dim"], snap["act_dim"], snap["hidden"]).to(device)
    actor.load_state_dict(snap["actor"])
    return actor, snap


# ---------------------------------------------------------------- collection
def rollout(
    act: Callable[[np.ndarray], np.ndarray], env_spec: str, num_envs: int, seed: int, max_steps: int | None = None,
    max_episodes: int | None = None, desc: str = "collect",
) -> list[dict]:
    """Episodes from `num_envs` environments stepped together; `act` maps a batch of raw observations to actions.

    With max_steps the collection stops at exactly that many transitions; episodes cut there end with a
    truncation (a time-limit-like end, not a termination). With max_episodes only complete episodes are kept.
    """
    envs = [make_env(env_spec) for _ in range(num_envs)]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    bufs = [dict(obs=[o], act=[], rew=[], term=[], trunc=[]) for o in obs]
    episodes: list[dict] = []
    steps, next_seed = 0, seed + num_envs
    bar = tqdm(total=max_steps or max_episodes, desc=desc, unit="step" if max_steps else "ep", leave=False, disable=None)
    while (max_steps is None or steps < max_steps) and (max_episodes is None or len(episodes) < max_episodes):
        actions = np.clip(act(np.stack(obs)), low, high)
        for i, env in enumerate(envs):
            if max_steps is not None and steps >= max_steps:
                break
            o, r, term, trunc, _ = env.step(actions[i])
            b = bufs[i]
            b["act"].append(actions[i]), b["rew"].append(r), b["obs"].append(o), b["term"].append(term), b["trunc"].append(trunc)
            steps += 1
            if max_steps:
                bar.update(1)
            if term or trunc:
                episodes.append(b)
                if max_episodes:
                    bar.update(1)
                o, _ = env.reset(seed=next_seed)
                next_seed += 1
                bufs[i] = dict(obs=[o], act=[], rew=[], term=[], trunc=[])
            obs[i] = o
    bar.close()
    if max_steps is not None:  # cut the unfinished episodes at the step budget
        for b in bufs:
            if b["act"]:
                b["trunc"][-1] = True
                episodes.append(b)
    for env in envs:
        env.close()
    return [finish_episode(b) for b in episodes[: max_episodes or len(episodes)]]


def finish_episode(b: dict) -> dict:
    return dict(
        observations=np.asarray(b["obs"]),
        actions=np.asarray(b["act"], dtype=np.float32),
        rewards=np.asarray(b["rew"], dtype=np.float64),
        terminations=np.asarray(b["term"], dtype=bool),
        truncations=np.asarray(b["trunc"], dtype=bool),
    )


def policy_fn(actor: TanhGaussianActor, device: torch.device, stochastic: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return (actor.sample(o)[0] if stochastic else actor.act(o)).cpu().numpy()

    return act


def random_fn(env_spec: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    space = make_env(env_spec).action_space
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(space.low, space.high, size=(len(obs), space.shape[0])).astype(np.float32)


# ---------------------------------------------------------------- crash-safe dataset replacement
# A dataset is built in full under a hidden run folder at the top of the Minari store, `.make_dataset-<host>-<pid>/new/`
# (same filesystem, so the swap is a rename; minari's listings skip hidden folders), then swapped in: the old dataset is
# renamed into `.make_dataset-<host>-<pid>/backup/<id>` and the new one into its place. A kill before the swap leaves
# the old dataset in place and a stale run folder, removed by the next run. Two renames cannot be one atomic step: a
# kill in the microseconds between them leaves the id missing with a complete backup, which the next make_dataset.py
# run restores (_recover_store) before anything else, so the store never loses both the old and the new dataset.
RUN_PREFIX = ".make_dataset-"
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
FOREIGN_STALE_S = 3600.0  # a run folder of another host (e.g. a shared store) is taken as dead after an hour untouched


def _run_dir() -> Path:
    return minari.storage.get_dataset_path() / f"{RUN_PREFIX}{HOST}-{os.getpid()}"


def _run_alive(run_dir: Path) -> bool:
    host, _, pid = run_dir.name[len(RUN_PREFIX):].rpartition("-")
    if host != HOST:
        try:
            return time.time() - run_dir.stat().st_mtime < FOREIGN_STALE_S
        except OSError:  # removed meanwhile
            return True
    if not pid.isdigit() or int(pid) == os.getpid():  # our own pid: a dead run's folder (we clean ours up before returning)
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finish_run(run_dir: Path) -> None:
    """Put back every backed-up dataset whose id is missing (a run killed between the two renames), then drop the folder."""
    backup = run_dir / "backup"
    for meta in sorted(backup.glob("**/data/metadata.json")) if backup.is_dir() else []:
        old = meta.parent.parent
        dataset_id = old.relative_to(backup).as_posix()
        final = minari.storage.get_dataset_path(dataset_id)
        if (final / "data").exists():
            continue  # the id holds a dataset (the new one): the backup is the replaced old one
        try:
            if final.exists():
                final.rmdir()  # an empty leftover folder; a non-empty one raises and is left alone
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old, final)
            print(f"restored {dataset_id} from the backup of an interrupted make_dataset.py run ({run_dir.name})")
        except OSError as e:
            fail(f"could not restore {dataset_id} from {old} ({e}); move that folder to {final} by hand")
    shutil.rmtree(run_dir, ignore_errors=True)


def _recover_store() -> None:
    """Clean up after make_dataset.py runs killed while writing a dataset: restore lost ids, remove their run folders."""
    root = minari.storage.get_dataset_path()
    for run_dir in sorted(root.glob(RUN_PREFIX + "*")):
        if run_dir.is_dir() and not _run_alive(run_dir):
            _finish_run(run_dir)


def _pause_hook(var: str) -> None:
    """Test hook: with <var>=<file> in the environment, create that file and wait until it is removed (at most 60 s),
    so a test can kill the run at this exact point."""
    marker = os.environ.get(var)
    if not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + 60.0
    while Path(marker).exists() and time.time() < deadline:
        time.sleep(0.02)


def write_dataset(dataset_id: str, episodes: list[dict], env_spec: str, ref: tuple[float, float], description: str, overwrite: bool,
                  eval_env_spec: str | None = None) -> None:
    """Write `dataset_id` to the local Minari store; with overwrite, the store holds the old or the new dataset at every
    instant (see the comment above RUN_PREFIX), never neither and never a partial one."""
    _recover_store()
    if _dataset_exists(dataset_id) and not overwrite:
        fail(f"dataset {dataset_id} already exists; pass --overwrite to replace it")
    buffers = [
        EpisodeBuffer(id=i, observations=ep["observations"], actions=ep["actions"], rewards=list(ep["rewards"]),
                      terminations=list(ep["terminations"]), truncations=list(ep["truncations"]))
        for i, ep in enumerate(episodes)
    ]
    spec = EnvSpec.from_json(env_spec)
    eval_spec = EnvSpec.from_json(eval_env_spec) if eval_env_spec is not None else spec
    namespace = dataset_id.rpartition("/")[0]
    if namespace and namespace not in minari_namespace.list_local_namespaces():
        minari_namespace.create_namespace(namespace)  # in the real store: the build below happens in a staging store
    final = minari.storage.get_dataset_path(dataset_id)
    run_dir = _run_dir()
    staging = run_dir / "new"
    new, backup = staging / dataset_id, run_dir / "backup" / dataset_id
    store_env = os.environ.get("MINARI_DATASETS_PATH")
    try:
        # built with its final id (metadata.json names it; nothing else does) in a store of its own inside the real one
        os.environ["MINARI_DATASETS_PATH"] = str(staging)
        with warnings.catch_warnings():  # minari nags about a missing code link and author e-mail
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id, buffer=buffers, env=spec, eval_env=eval_spec, algorithm_name="SAC (make_dataset.py)",
                author="make_dataset.py", ref_min_score=ref[0], ref_max_score=ref[1], description=description, data_format="hdf5",
            )
        _pause_hook("MAKE_DATASET_PAUSE_BEFORE_SWAP")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            backup.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, backup)
            # killed here: the id is missing for an instant, and the next run restores it from `backup` (_finish_run)
            _pause_hook("MAKE_DATASET_PAUSE_IN_SWAP")
        os.rename(new, final)
    finally:
        if store_env is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = store_env
        _finish_run(run_dir)  # after success: drops the old dataset; after an error: puts it back if the swap was cut
    n = sum(len(ep["rewards"]) for ep in episodes)
    rets = [float(ep["rewards"].sum()) for ep in episodes]
    print(f"wrote {dataset_id}: {len(episodes)} episodes, {n} transitions, return mean {np.mean(rets):.1f} (min {np.min(rets):.1f}, max {np.max(rets):.1f})")


# ---------------------------------------------------------------- SAC training
def train_sac(args: Args, env_spec: str, medium_return: float, stop_at_medium: bool, snap_dir: Path, device: torch.device) -> dict:
    """SAC from scratch; returns the medium snapshot step, the replay episodes up to it, and the final actor."""
    env = make_env(env_spec)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = TanhGaussianActor(obs_dim, act_dim, args.hidden).to(device)
    qf, qf_target = Critic(obs_dim, act_dim, args.hidden, n=2).to(device), Critic(obs_dim, act_dim, args.hidden, n=2).to(device)
    qf_target.load_state_dict(qf.state_dict())
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.lr)
    target_entropy = -float(act_dim)
    n = args.train_steps
    try:  # the whole replay buffer up front: a budget too large for the device fails here, before any training
        rb = {k: torch.zeros((n, d) if d else (n,), device=device) for k, d in (("obs", obs_dim), ("act", act_dim), ("rew", 0), ("next_obs", obs_dim), ("term", 0))}
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"--train-steps {n}: the SAC replay buffer ({n * (2 * obs_dim + act_dim + 2) * 4 / 2**30:.1f} GiB) cannot be allocated on {device}; "
             f"lower --train-steps")
    episodes: list[dict] = []  # the replay buffer, episode by episode (medium-replay)
    ep = dict(obs=[], act=[], rew=[], term=[], trunc=[])
    obs, _ = env.reset(seed=args.seed)
    ep["obs"].append(obs)
    ep_ret, recent = 0.0, []
    medium = None
    act_fn = policy_fn(actor, device)
    bar = tqdm(range(n), desc="SAC", unit="step", disable=None)
    for step in bar:
        if step < args.learning_starts:
            action = env.action_space.sample()
        else:
            action = act_fn(obs[None])[0]
        next_obs, r, term, trunc, _ = env.step(action)
        rb["obs"][step] = torch.as_tensor(obs)
        rb["act"][step] = torch.as_tensor(action)
        rb["rew"][step] = float(r)
        rb["next_obs"][step] = torch.as_tensor(next_obs)
        rb["term"][step] = float(term)
        ep["act"].append(action), ep["rew"].append(r), ep["obs"].append(next_obs), ep["term"].append(term), ep["trunc"].append(trunc)
        ep_ret += r
        obs = next_obs
        if term or trunc:
            episodes.append(ep)
            recent = (recent + [ep_ret])[-10:]
            obs, _ = env.reset()
            ep, ep_ret = dict(obs=[obs], act=[], rew=[], term=[], trunc=[]), 0.0

        if step >= args.learning_starts:
            idx = torch.randint(step + 1, (args.batch_size,), device=device)
            b = {k: v[idx] for k, v in rb.items()}
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                next_a, next_logp = actor.sample(b["next_obs"])
                y = sac_target(b["rew"], b["term"], qf_target(b["next_obs"], next_a), next_logp, alpha, args.gamma)
            q_loss = ((qf(b["obs"], b["act"]) - y) ** 2).mean(-1).sum()
            q_opt.zero_grad(set_to_none=True)
            q_loss.backward()
            q_opt.step()
            a, logp = actor.sample(b["obs"])
            actor_loss = (alpha * logp - qf(b["obs"], a).min(0).values).mean()
            actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_opt.step()
            alpha_loss = -(log_alpha * (logp.detach() + target_entropy)).mean()
            alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            alpha_opt.step()
            polyak_update(qf_target, qf, args.tau)

        done_steps = step + 1
        if done_steps == args.learning_starts or (done_steps % args.snapshot_every == 0 and done_steps > args.learning_starts):
            # snapshot = the policy that acts from this step on; its return is estimated as it will be collected (stochastic)
            rets = np.array([e["rewards"].sum() for e in rollout(act_fn, env_spec, args.snapshot_episodes, args.seed + 10_000, max_episodes=args.snapshot_episodes, desc="snapshot eval")])
            save_snapshot(snap_dir / f"snapshot_{done_steps:08d}.pt", actor, env_spec, done_steps, rets, args)
            bar.set_postfix(snapshot_return=f"{rets.mean():.0f}", train_return=f"{np.mean(recent) if recent else 0:.0f}")
            tqdm.write(f"step {done_steps}: snapshot return {rets.mean():.1f} +- {rets.std():.1f}")
            if medium is None and rets.mean() >= medium_return and done_steps > args.learning_starts:
                medium = dict(step=done_steps, path=snap_dir / f"snapshot_{done_steps:08d}.pt", episodes=list(episodes), partial=ep, ret=float(rets.mean()))
                if stop_at_medium:
                    break
    bar.close()
    if medium is not None:  # the replay buffer up to the medium snapshot: cut the running episode there
        part = medium.pop("partial")
        if part["act"]:
            part = {k: list(v) for k, v in part.items()}
            part["trunc"][-1] = True
            medium["episodes"].append(part)
        medium["episodes"] = [finish_episode(e) for e in medium["episodes"]]
    final = snap_dir / f"snapshot_{done_steps:08d}.pt"
    if not final.exists():
        rets = np.array([e["rewards"].sum() for e in rollout(act_fn, env_spec, args.snapshot_episodes, args.seed + 10_000, max_episodes=args.snapshot_episodes, desc="snapshot eval")])
        save_snapshot(final, actor, env_spec, done_steps, rets, args)
    return dict(medium=medium, final=final)


def replay_from_snapshots(paths: Sequence[str], env_spec: str, args: Args, device: torch.device) -> list[dict]:
    """Rebuild medium-replay from a training run's snapshot chain: uniform actions until learning_starts, then
    each snapshot acts for the steps until the next one, as the policies did in the original replay buffer."""
    snaps = sorted((load_snapshot(p, env_spec, device) for p in paths), key=lambda s: s[1]["step"])
    episodes = rollout(random_fn(env_spec, args.seed), env_spec, 1, args.seed, max_steps=snaps[0][1]["learning_starts"], desc="replay: random")
    for k, (actor, snap) in enumerate(snaps[:-1]):
        n = snaps[k + 1][1]["step"] - snap["step"]
        episodes += rollout(policy_fn(actor, device), env_spec, 1, args.seed + 1000 * (k + 1), max_steps=n, desc=f"replay: snapshot {snap['step']}")
    return episodes


# ---------------------------------------------------------------- AntMaze random-action stand-in
def antmaze_specs(maze: str) -> tuple[str, str]:
    """The env spec the hosted D4RL/antmaze/<maze>-v1 data were collected on and its evaluation env spec, as Minari's
    generation script (minari-dataset-generation-scripts, scripts/antmaze/create_antmaze_dataset.py) makes them: the
    registered env with continuing_task=True, reset_target=False (umaze: the maze with D4RL's start and goal), and
    for evaluation the same with Minari's evaluation maze of that size (load_dataset turns it into D4RL's protocol)."""
    env_id = ANTMAZE_DATASETS[maze][1]
    make_env(env_id, flatten=False).close()  # imports gymnasium-robotics and registers its envs
    spec = gym.spec(env_id)
    kwargs = {**spec.kwargs, "continuing_task": True, "reset_target": False}
    if maze == "umaze":
        kwargs["maze_map"] = ANTMAZE_UMAZE_MAP
    data_spec = EnvSpec.from_json(spec.to_json())
    data_spec.kwargs = kwargs
    eval_spec = EnvSpec.from_json(spec.to_json())
    eval_spec.kwargs = {**kwargs, "maze_map": ANTMAZE_EVAL_MAPS[maze.split("-")[0]]}
    return data_spec.to_json(), eval_spec.to_json()


def antmaze_random_episodes(env_spec: str, n_steps: int, episode_steps: int | None, seed: int, near_goal_every: int) -> list[dict]:
    """Episodes of uniform random actions in the real AntMaze env (Dict observations kept), `n_steps` transitions in all,
    each episode ended by a truncation after `episode_steps` steps (or the env's time limit); no episode terminates (a
    continuing task). Random actions never cross a maze, so every `near_goal_every`-th episode (the first included) gets
    its goal moved to a uniform direction and distance in [0, 0.9) from the ant's start (the success radius is 0.45): the
    ant starts at the goal or may stumble into it, and those episodes hold rewards of 1."""
    env = make_env(env_spec, flatten=False)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    limit = episode_steps or env.spec.max_episode_steps
    episodes: list[dict] = []
    steps = 0
    bar = tqdm(total=n_steps, desc="antmaze random", unit="step", leave=False, disable=None)
    while steps < n_steps:
        obs, _ = env.reset(seed=seed + len(episodes))
        if near_goal_every and len(episodes) % near_goal_every == 0:
            maze = env.unwrapped
            angle, dist = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.9)
            maze.goal = obs["achieved_goal"] + dist * np.array([np.cos(angle), np.sin(angle)])
            maze.update_target_site_pos()
            obs = {**obs, "desired_goal": maze.goal.copy()}
        b = dict(obs={k: [obs[k]] for k in GOAL_OBS_KEYS}, act=[], rew=[], term=[], trunc=[])
        while steps < n_steps:
            action = rng.uniform(low, high).astype(np.float32)
            obs, r, term, trunc, _ = env.step(action)
            for k in GOAL_OBS_KEYS:
                b["obs"][k].append(obs[k])
            b["act"].append(action), b["rew"].append(float(r)), b["term"].append(bool(term)), b["trunc"].append(bool(trunc))
            steps += 1
            bar.update(1)
            if term or trunc or len(b["act"]) >= limit:
                break
        if not b["term"][-1]:
            b["trunc"][-1] = True  # the episode's end (its length or the step budget) is a time limit, never a terminal state
        episodes.append(dict(observations={k: np.asarray(v) for k, v in b["obs"].items()}, actions=np.asarray(b["act"], dtype=np.float32),
                             rewards=np.asarray(b["rew"], dtype=np.float64), terminations=np.asarray(b["term"], dtype=bool),
                             truncations=np.asarray(b["trunc"], dtype=bool)))
    bar.close()
    env.close()
    return episodes


def build_antmaze(args: Args, maze: str) -> dict:
    """local/antmaze/<maze>-v0: the random-action stand-in (module docstring)."""
    if args.levels:
        fail("AntMaze has no --levels: --env antmaze-<maze>-v2 names the dataset")
    if args.random_steps is None:
        fail(f"make_dataset.py cannot rebuild the hosted {ANTMAZE_DATASETS[maze][0]} (a maze-solving controller); pass --random-steps N "
             f"for a random-action stand-in, or download the hosted data (minari download {ANTMAZE_DATASETS[maze][0]})")
    if args.random_steps <= 0:
        fail(f"--random-steps must be positive, got {args.random_steps}")
    if args.episode_steps is not None and args.episode_steps <= 0:
        fail(f"--episode-steps must be positive, got {args.episode_steps}")
    if args.near_goal_every < 0:
        fail(f"--near-goal-every must be >= 0, got {args.near_goal_every}")
    dataset_id = f"local/antmaze/{maze}-v0"
    minari_store(write=True)
    _recover_store()
    if _dataset_exists(dataset_id) and not args.overwrite:
        fail(f"dataset {dataset_id} already exists; pass --overwrite to replace it")
    set_seed(args.seed)
    t0 = time.time()
    env_spec, eval_spec = antmaze_specs(maze)
    eps = antmaze_random_episodes(env_spec, args.random_steps, args.episode_steps, args.seed, args.near_goal_every)
    desc = (f"Locally built RANDOM-ACTION stand-in for {ANTMAZE_DATASETS[maze][0]} (not the hosted data: tests and trials only), on "
            f"{ANTMAZE_DATASETS[maze][1]} with continuing_task=True, reset_target=False like the hosted data; uniform random actions; "
            f"every {args.near_goal_every}-th episode has its goal moved within 0.9 of the ant's start (0: never). "
            f"ref_min/max_score 0 and 1: D4RL's success rate.")
    write_dataset(dataset_id, eps, env_spec, D4RL_REF_SCORES["antmaze"], desc, args.overwrite, eval_env_spec=eval_spec)
    written = {maze: dict(dataset_id=dataset_id, episodes=len(eps), transitions=int(sum(len(e["rewards"]) for e in eps)),
                          reward_sum=float(sum(e["rewards"].sum() for e in eps)),
                          episodes_reaching_goal=int(sum(bool(e["rewards"].max() > 0) for e in eps)), behaviour="uniform random actions")}
    result = dict(datasets=written, times={"collect_s": time.time() - t0}, snapshot_dir=None)
    print(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- main
def main(args: Args) -> dict:
    name, level = parse_env_name(args.env)
    if name == "antmaze":
        return build_antmaze(args, level)
    if args.random_steps is not None or args.episode_steps is not None:
        fail("--random-steps and --episode-steps build AntMaze stand-ins; for a MuJoCo random dataset pass --levels random --size N")
    levels = tuple(args.levels) or (level,)
    for lvl in levels:
        if lvl not in D4RL_LEVELS:
            fail(f"unknown level {lvl!r}; known: {', '.join(D4RL_LEVELS)}")
    for flag in ("size", "num_envs", "train_steps", "snapshot_every", "snapshot_episodes", "batch_size"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 < args.learning_starts < args.train_steps:
        fail(f"--learning-starts must lie in (0, --train-steps={args.train_steps}), got {args.learning_starts}")
    if not args.lr > 0.0 or not math.isfinite(args.lr):  # `not x > 0` also catches NaN
        fail(f"--lr must be a positive finite number, got {args.lr}")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail("--gamma and --tau must lie in (0, 1]")
    if args.policy and "random" in levels and len(levels) == 1:
        fail("random data needs no --policy")
    if args.policy and "medium-replay" in levels and len(args.policy) < 2:
        fail("medium-replay is a training replay buffer: rebuild it from the snapshot chain (--policy <dir>/snapshot_*.pt up to the medium snapshot)")
    if "medium-expert" in levels and args.policy and args.expert_policy is None:
        fail("medium-expert from stored policies needs --policy <medium snapshot> --expert-policy <expert snapshot>")
    ids = {lvl: f"local/{name}/{lvl}-v0" for lvl in levels}
    snap_dir = Path(args.out_dir) / name / f"seed{args.seed}"
    if any(lvl != "random" for lvl in levels) and not args.policy:  # training writes behaviour-policy snapshots there
        check_output_dir(snap_dir, "--out-dir")
    minari_store(write=True)
    _recover_store()  # a dataset lost to a run killed mid-swap is back before we judge what exists
    for dataset_id in ids.values():
        if _dataset_exists(dataset_id) and not args.overwrite:
            fail(f"dataset {dataset_id} already exists; pass --overwrite to replace it")

    set_seed(args.seed)
    device = pick_device(args.device)
    env_spec = make_env(D4RL_ENVS[name]).spec.to_json()
    ref = D4RL_REF_SCORES[name]
    medium_return = args.medium_fraction * ref[1]
    times: dict[str, float] = {}
    sources: dict[str, tuple[Any, str]] = {}  # level -> (actor, description of the behaviour policy)
    replay: list[dict] | None = None
    t0 = time.time()

    needs_policy = [lvl for lvl in levels if lvl != "random"]
    if needs_policy and args.policy:
        if "medium-replay" in levels:
            replay = replay_from_snapshots(args.policy, env_spec, args, device)
        # the medium (or expert) behaviour policy is the last snapshot given
        actor, snap = load_snapshot(sorted(args.policy)[-1], env_spec, device)
        who = f"{Path(sorted(args.policy)[-1]).name}: SAC snapshot at step {snap['step']}, return {snap['return_mean']:.0f}"
        sources = {"medium": (actor, who), "expert": (actor, who), "medium-replay": (None, f"replay of a SAC run up to {who}, rebuilt from its snapshot chain")}
        if args.expert_policy:
            actor, snap = load_snapshot(args.expert_policy, env_spec, device)
            sources["expert"] = (actor, f"{Path(args.expert_policy).name}: SAC snapshot at step {snap['step']}, return {snap['return_mean']:.0f}")
    elif needs_policy:
        needs_expert = any(lvl in ("expert", "medium-expert") for lvl in levels)
        print(f"training SAC on {D4RL_ENVS[name]} (medium = first snapshot with return >= {medium_return:.0f}); snapshots in {snap_dir}")
        out = train_sac(args, env_spec, medium_return, stop_at_medium=not needs_expert, snap_dir=snap_dir, device=device)
        times["train_s"] = time.time() - t0
        med = out["medium"]
        if med is None and any(lvl.startswith("medium") for lvl in levels):
            fail(f"no snapshot reached return {medium_return:.0f} in {args.train_steps} steps (snapshots kept in {snap_dir}); raise --train-steps or lower --medium-fraction")
        if med is not None:
            actor, _ = load_snapshot(str(med["path"]), env_spec, device)
            sources["medium"] = (actor, f"{med['path'].name}: SAC snapshot at step {med['step']}, return {med['ret']:.0f}")
            replay = med["episodes"]
            sources["medium-replay"] = (None, f"SAC replay buffer up to step {med['step']} (snapshot return {med['ret']:.0f})")
            atomic_save(torch.load(med["path"], weights_only=True), snap_dir / "medium_policy.pt")
        if needs_expert:
            actor, snap = load_snapshot(str(out["final"]), env_spec, device)
            sources["expert"] = (actor, f"{out['final'].name}: final SAC policy at step {snap['step']}, return {snap['return_mean']:.0f}")
            atomic_save(torch.load(out["final"], weights_only=True), snap_dir / "expert_policy.pt")

    t1 = time.time()
    written = {}
    for lvl in levels:
        env_id = D4RL_ENVS[name]
        if lvl == "random":
            eps = rollout(random_fn(env_spec, args.seed), env_spec, args.num_envs, args.seed, max_steps=args.size, desc="random")
            who = "uniform random actions"
        elif lvl == "medium-replay":
            eps, who = replay, sources["medium-replay"][1]
        elif lvl == "medium-expert":
            eps = rollout(policy_fn(sources["medium"][0], device), env_spec, args.num_envs, args.seed, max_steps=args.size, desc="medium")
            eps += rollout(policy_fn(sources["expert"][0], device), env_spec, args.num_envs, args.seed + 7919, max_steps=args.size, desc="expert")
            who = f"medium ({sources['medium'][1]}) + expert ({sources['expert'][1]})"
        else:
            eps = rollout(policy_fn(sources[lvl][0], device), env_spec, args.num_envs, args.seed, max_steps=args.size, desc=lvl)
            who = sources[lvl][1]
        desc = (f"Locally built D4RL-style '{lvl}' dataset for {env_id} (Gymnasium MuJoCo v5, not the mujoco-py v2 envs of D4RL). "
                f"Behaviour policy: {who}. ref_min/max_score are D4RL's {name} reference returns.")
        write_dataset(ids[lvl], eps, env_spec, ref, desc, args.overwrite)
        written[lvl] = dict(dataset_id=ids[lvl], episodes=len(eps), transitions=int(sum(len(e["rewards"]) for e in eps)),
                            mean_return=float(np.mean([e["rewards"].sum() for e in eps])), behaviour=who)
    times["collect_s"] = time.time() - t1
    result = dict(datasets=written, times=times, snapshot_dir=str(snap_dir))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(parse_cli(Args))
