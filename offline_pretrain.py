"""Offline pre-training: CQL, IQL, TD3+BC or BC on a Minari dataset -> one self-contained checkpoint.

The checkpoint (actor, its family, critics where the method has them, state normalisation, reward transform)
is what the offline-to-online scripts o2o_sac.py / o2o_td3.py / o2o_ppo.py start from.
Defaults follow CORL's 1M-step MuJoCo settings.

Usage:
    python offline_pretrain.py --algo iql --env hopper-medium-v2
    python offline_pretrain.py --algo cql --env hopper-medium-v2 --total-steps 100000
    python offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --resume
    python offline_pretrain.py --algo iql --env hopper-medium-v2 --resume --total-steps 2000000   # extend a finished run

A run folder that already holds a checkpoint is never replaced silently: continue it with --resume (the same
training settings; a larger --total-steps extends it), start over with --overwrite, or pick another --run-name.
"""

from __future__ import annotations

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
from typing import Any, Callable, NoReturn, Sequence

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
    algo: str = "iql"
    """offline method: cql | iql | td3_bc | bc"""
    env: str = "hopper-medium-v2"
    """D4RL-style dataset name (resolved to a Minari dataset, see README)"""
    dataset_id: str | None = None
    """any Minari dataset id; overrides the name resolution of --env"""
    no_download: bool = False
    """never try to download a hosted dataset"""
    seed: int = 0
    """random seed"""
    run_dir: str = "runs"
    """outputs go to <run_dir>/offline/<algo>/<env>/<run_name>/"""
    run_name: str | None = None
    """name of the output folder; default seed<k>, where the o2o scripts look (point them at another name with --checkpoint)"""
    resume: bool = False
    """continue from the checkpoint in the output folder (same training settings; a larger --total-steps extends the run)"""
    overwrite: bool = False
    """start afresh in an output folder that holds another run: its checkpoint, results and tensorboard logs are deleted"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice; 1 is fastest when two jobs share a small machine)"""
    track: bool = False
    """also log to Weights & Biases (wandb.init with sync_tensorboard: the tensorboard events are mirrored there);
    tensorboard stays the record. Needs `pip install wandb`"""
    wandb_project_name: str = "o2o"
    """the Weights & Biases project of --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team or user) of --track; default: wandb's default entity"""

    # --- training ---
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """batch size"""
    gamma: float = 0.99
    """discount"""
    eval_every: int = 10_000
    """evaluate (and write the checkpoint) every this many gradient steps"""
    eval_episodes: int = 10
    """evaluation episodes (deterministic actions, separate env)"""
    log_every: int = 1_000
    """log losses to tensorboard every this many gradient steps"""
    normalize_states: bool | None = None
    """normalise observations by the dataset's mean and std (default: from FAMILY_DEFAULTS: yes, except CQL on AntMaze)"""
    reward: str | None = None
    """the rewards the critics learn on: `SCALE,SHIFT` (r * SCALE + SHIFT, e.g. `10,-5`) or `return-range` (r x 1000 / (max -
    min episode return)); default from FAMILY_DEFAULTS (MuJoCo: IQL return-range, others 1,0; AntMaze: CQL 10,-5, IQL and
    TD3+BC 1,-1)"""

    # --- CQL ---
    cql_alpha: float | None = None
    """weight of the conservative penalty (default: from FAMILY_DEFAULTS, 10 on MuJoCo, 5 on AntMaze)"""
    cql_lagrange: bool | None = None
    """CQL-Lagrange: the penalty's weight is cql_alpha x alpha', alpha' learned so that the penalty (the Q gap between
    sampled and dataset actions) stays at --cql-target-action-gap (default: from FAMILY_DEFAULTS, on for AntMaze)"""
    cql_target_action_gap: float = 0.8
    """with --cql-lagrange: the target of the conservative penalty"""
    cql_max_target_backup: bool | None = None
    """TD target from the max over --cql-n-actions next-state policy actions of the twin-min target Q instead of one
    sampled action (default: from FAMILY_DEFAULTS, on for AntMaze)"""
    cql_clip_diff_min: float | None = None
    """clip each state's penalty term (logsumexp - Q(s, a_data)) from below at this value; -inf never clips (default:
    from FAMILY_DEFAULTS, -200 on AntMaze)"""
    cql_critic_layers: int | None = None
    """hidden layers (of 256) of CQL's critics (default: from FAMILY_DEFAULTS, 3 on MuJoCo, 5 on AntMaze)"""
    cql_n_actions: int = 10
    """sampled actions per state (uniform, current policy, next-state policy) in the penalty"""
    cql_temp: float = 1.0
    """temperature of the logsumexp"""
    cql_actor_lr: float | None = None
    """actor learning rate (default: from FAMILY_DEFAULTS, 3e-5 on MuJoCo, 1e-4 on AntMaze)"""
    cql_critic_lr: float = 3e-4
    """critic and temperature learning rate"""

    # --- IQL ---
    iql_expectile: float | None = None
    """expectile of the value regression (default: from FAMILY_DEFAULTS, 0.7 on MuJoCo, 0.9 on AntMaze)"""
    iql_beta: float | None = None
    """inverse temperature of the advantage weights (default: from FAMILY_DEFAULTS, 3 on MuJoCo, 10 on AntMaze)"""
    iql_lr: float = 3e-4
    """learning rate of actor (cosine schedule), critics and value"""

    # --- TD3+BC ---
    td3_bc_alpha: float = 2.5
    """weight of the normalised Q term against the BC term"""
    td3_bc_lr: float = 3e-4
    """actor and critic learning rate"""
    policy_noise: float = 0.2
    """target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the smoothing noise"""
    policy_freq: int = 2
    """actor and target update every this many critic updates"""

    # --- BC ---
    bc_family: str = "tanh_gaussian"
    """BC actor: tanh_gaussian (maximum likelihood) | deterministic (MSE)"""
    bc_lr: float = 3e-4
    """learning rate"""

    tau: float = 5e-3
    """Polyak rate of target networks (all methods with targets)"""

    # --- speed (same math; eager is the reference) ---
    compile: bool = False
    """torch.compile the whole update (forward, losses, backward, optimizer steps)"""
    cudagraphs: bool = False
    """replay the update as a CUDA graph (CUDA only; add --compile for the fastest path)"""
    bf16: bool = False
    """bfloat16 autocast of the networks inside the update (losses, acting and evaluation stay float32)"""


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


# ---------------------------------------------------------------- networks per method (CORL's MuJoCo architectures)
ALGO_TABLE: dict[str, dict[str, Any]] = {
    "cql": dict(actor_family="tanh_gaussian", actor_hidden=(256, 256, 256), critic_hidden=(256, 256, 256)),
    "iql": dict(actor_family="gaussian", actor_hidden=(256, 256), critic_hidden=(256, 256)),
    "td3_bc": dict(actor_family="deterministic", actor_hidden=(256, 256), critic_hidden=(256, 256)),
    "bc": dict(actor_family=None, actor_hidden=(256, 256), critic_hidden=None),  # family from --bc-family
}


# ---------------------------------------------------------------- per-dataset-family values
# The values that differ between the MuJoCo locomotion datasets and AntMaze (the official OCR-CFT offline configs, which
# follow CORL's), filled into every Args field left at None; explicit flags override. The family is "antmaze" when the
# dataset's env is a gymnasium-robotics AntMaze (is_antmaze_spec), else "mujoco". `normalize_states` and `reward` are
# per method; `reward` is `SCALE,SHIFT` (r * SCALE + SHIFT) or `return-range` (r x 1000 / (max - min episode return)).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mujoco": dict(cql_alpha=10.0, cql_lagrange=False, cql_max_target_backup=False, cql_clip_diff_min=float("-inf"), cql_critic_layers=3,
                   cql_actor_lr=3e-5, iql_beta=3.0, iql_expectile=0.7,
                   normalize_states=dict(cql=True, iql=True, td3_bc=True, bc=True),
                   reward=dict(cql="1,0", iql="return-range", td3_bc="1,0", bc="1,0")),
    "antmaze": dict(cql_alpha=5.0, cql_lagrange=True, cql_max_target_backup=True, cql_clip_diff_min=-200.0, cql_critic_layers=5,
                    cql_actor_lr=1e-4, iql_beta=10.0, iql_expectile=0.9,
                    normalize_states=dict(cql=False, iql=True, td3_bc=True, bc=True),
                    reward=dict(cql="10,-5", iql="1,-1", td3_bc="1,-1", bc="1,0")),
}
FAMILY_ARGS = ("cql_alpha", "cql_lagrange", "cql_max_target_backup", "cql_clip_diff_min", "cql_critic_layers", "cql_actor_lr", "iql_beta",
               "iql_expectile", "normalize_states", "reward")


def dataset_family(data: dict) -> str:
    """The FAMILY_DEFAULTS row of a loaded dataset."""
    return "antmaze" if is_antmaze_spec(data["env_spec"]) else "mujoco"


def family_filled(args: dict, family: str) -> dict:
    """`args` (asdict of Args, or a checkpoint's saved args) with every family value it leaves at None, or lacks,
    taken from FAMILY_DEFAULTS[family] for its --algo."""
    row, algo = FAMILY_DEFAULTS[family], args.get("algo", "iql")
    out = dict(args)
    for k in FAMILY_ARGS:
        if out.get(k) is None:
            out[k] = row[k][algo] if isinstance(row[k], dict) else row[k]
    return out


def with_family(args: Args, family: str = "mujoco") -> Args:
    """`args` with the family values it leaves at None filled from FAMILY_DEFAULTS[family]. main() fills them from the
    dataset's family before anything is built; a learner made from Args directly (benchmarks, tests) gets the MuJoCo
    values for whatever is still None."""
    if all(getattr(args, k) is not None for k in FAMILY_ARGS):
        return args
    return Args(**family_filled(asdict(args), family))


def parse_reward(spec: str) -> tuple[float, float] | None:
    """--reward `SCALE,SHIFT` -> (scale, shift); `return-range` -> None; anything else exits 2."""
    if spec == "return-range":
        return None
    try:
        scale, shift = (float(x) for x in spec.split(","))
    except ValueError:
        fail(f"--reward {spec!r}: pass SCALE,SHIFT (e.g. 10,-5 for r * 10 - 5) or return-range")
    if not (math.isfinite(scale) and math.isfinite(shift)):
        fail(f"--reward {spec!r}: SCALE and SHIFT must be finite numbers")
    return scale, shift


# ---------------------------------------------------------------- pure loss pieces
def td_target(rewards: Tensor, terminals: Tensor, next_value: Tensor, gamma: float) -> Tensor:
    """y = r + gamma (1 - d) V'; d is 1 only for a true termination (a time-limit end bootstraps)."""
    return rewards + gamma * (1.0 - terminals) * next_value


def cql_penalty(q_data: Tensor, q_rand: Tensor, q_pi: Tensor, q_next_pi: Tensor, logp_pi: Tensor, logp_next_pi: Tensor, act_dim: int, temp: float = 1.0,
                clip_diff_min: float = float("-inf")) -> Tensor:
    """CQL(H) with importance sampling, one value per critic: mean_s[temp logsumexp_j(Q(s,a_j)/temp) - Q(s,a_data)].

    q_data (n, B); q_rand, q_pi, q_next_pi (n, B, N) at uniform actions, pi(.|s) and pi(.|s') actions; each
    sample is divided by its sampling density: 0.5^|A| for uniform on [-1, 1]^|A|, pi for the policy ones.
    clip_diff_min (finite): each state's term is clipped from below before the mean (CORL's cql_clip_diff_min).
    """
    log_uniform = act_dim * math.log(0.5)
    cat = torch.cat([q_rand - log_uniform, q_next_pi - logp_next_pi, q_pi - logp_pi], dim=-1)
    diff = temp * torch.logsumexp(cat / temp, dim=-1) - q_data
    if clip_diff_min > float("-inf"):
        diff = diff.clamp(min=clip_diff_min)
    return diff.mean(-1)


def cql_lagrange_losses(penalty: Tensor, log_alpha_prime: Tensor, cql_alpha: float, target_gap: float) -> tuple[Tensor, Tensor, Tensor]:
    """CQL-Lagrange (CORL's form), for penalty (n,) one value per critic: alpha' = clamp(exp(log alpha'), 0, 1e6);
    the critics minimise sum alpha' cql_alpha (penalty - gap) (alpha' held fixed); alpha' minimises the mean over critics
    of -alpha' cql_alpha (penalty - gap) (penalty held fixed), so alpha' grows while the penalty is above the gap and
    shrinks below it. Returns (critic term, alpha' loss, alpha')."""
    alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)
    critic_term = (alpha_prime.detach() * cql_alpha * (penalty - target_gap)).sum()
    alpha_prime_loss = -(alpha_prime * cql_alpha * (penalty.detach() - target_gap)).mean()
    return critic_term, alpha_prime_loss, alpha_prime.detach()


def max_target_backup(q_target: Tensor) -> Tensor:
    """q_target (n, B, N): twin-min over the n critics of N next-state actions each, then the max over the N actions."""
    return q_target.min(0).values.max(-1).values


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Asymmetric squared loss |expectile - 1(diff < 0)| diff^2 (IQL's value regression, diff = Q - V)."""
    return torch.abs(expectile - (diff < 0).float()) * diff**2


def iql_weights(adv: Tensor, beta: float, max_weight: float = 100.0) -> Tensor:
    """Advantage-weighted regression weights exp(beta A), clipped for stability."""
    return torch.exp(beta * adv).clamp(max=max_weight)


def td3_bc_actor_loss(q: Tensor, pi: Tensor, data_actions: Tensor, alpha: float) -> Tensor:
    """-lambda mean Q(s, pi(s)) + mean (pi(s) - a)^2 with lambda = alpha / mean|Q| (detached): Q's scale drops out."""
    lmbda = alpha / q.abs().mean().detach()
    return -lmbda * q.mean() + F.mse_loss(pi, data_actions)


# ---------------------------------------------------------------- learners: one update = one gradient step
class CQL:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device, accel: Accel | None = None):
        accel, args = accel or Accel(device), with_family(args)
        cfg = ALGO_TABLE["cql"]
        self.args, self.act_dim = args, act_dim
        self.actor = TanhGaussianActor(obs_dim, act_dim, cfg["actor_hidden"]).to(device)
        with torch.no_grad():  # small last layer: the initial policy is near uniform
            self.actor.head.weight.uniform_(-1e-3, 1e-3)
            self.actor.head.bias.zero_()
        hidden = critic_hidden_of(args)
        self.qf = Critic(obs_dim, act_dim, hidden, n=2).to(device)
        self.qf_target = Critic(obs_dim, act_dim, hidden, n=2).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        # shape (1,), not 0-d: compiled Adam skips 0-d float64 parameters (PyTorch 2.13), which the float64
        # compile-equals-eager test would otherwise trip over
        self.log_alpha = nn.Parameter(torch.zeros(1, device=device))
        self.target_entropy = -float(act_dim)
        self.opts = {
            "actor": accel.adam(self.actor.parameters(), args.cql_actor_lr),
            "qf": accel.adam(self.qf.parameters(), args.cql_critic_lr),
            "alpha": accel.adam([self.log_alpha], args.cql_critic_lr),
        }
        if args.cql_lagrange:  # log alpha' starts at 1.0 and learns at the critic's rate, as in CORL
            self.log_alpha_prime = nn.Parameter(torch.ones(1, device=device))
            self.opts["alpha_prime"] = accel.adam([self.log_alpha_prime], args.cql_critic_lr)
        self.step_fn = accel.update(self.gradient_step)

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "qf": self.qf, "qf_target": self.qf_target}

    def update(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return self.step_fn(b)

    def gradient_step(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        a = self.args
        obs, next_obs = b["obs"], b["next_obs"]
        pi, logp = self.actor.sample(obs)
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        alpha = self.log_alpha.exp().detach()
        actor_loss = (alpha * logp - frozen_call(self.qf, obs, pi).min(0).values).mean()

        B, N = obs.shape[0], a.cql_n_actions
        with torch.no_grad():
            if a.cql_max_target_backup:  # the best of N next-state policy actions (CORL's cql_max_target_backup)
                next_rep = next_obs.repeat_interleave(N, 0)
                next_a, _ = self.actor.sample(next_rep)
                next_q = max_target_backup(self.qf_target(next_rep, next_a).view(2, B, N))
            else:
                next_a, _ = self.actor.sample(next_obs)
                next_q = self.qf_target(next_obs, next_a).min(0).values
            y = td_target(b["rewards"], b["terminals"], next_q, a.gamma)
        q_data = self.qf(obs, b["actions"])
        td_loss = ((q_data - y) ** 2).mean(-1).sum()
        # conservative penalty on N actions per state from three proposals
        obs_rep, next_rep = obs.repeat_interleave(N, 0), next_obs.repeat_interleave(N, 0)
        rand_a = torch.empty(B * N, self.act_dim, device=obs.device).uniform_(-1.0, 1.0)
        with torch.no_grad():
            pi_a, logp_pi = self.actor.sample(obs_rep)
            next_pi_a, logp_next = self.actor.sample(next_rep)
        q_rand = self.qf(obs_rep, rand_a).view(2, B, N)
        q_pi = self.qf(obs_rep, pi_a).view(2, B, N)
        q_next_pi = self.qf(obs_rep, next_pi_a).view(2, B, N)
        penalty = cql_penalty(q_data, q_rand, q_pi, q_next_pi, logp_pi.view(B, N), logp_next.view(B, N), self.act_dim, a.cql_temp,
                              a.cql_clip_diff_min)
        extra: dict[str, Tensor] = {}
        if a.cql_lagrange:
            term, alpha_prime_loss, alpha_prime = cql_lagrange_losses(penalty, self.log_alpha_prime, a.cql_alpha, a.cql_target_action_gap)
            qf_loss = td_loss + term
            alpha_loss = alpha_loss + alpha_prime_loss  # one backward: alpha' is a parameter of its own
            extra["losses/alpha_prime"] = alpha_prime[0]
        else:
            qf_loss = td_loss + a.cql_alpha * penalty.sum()

        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        # one backward: each loss reaches only its own parameters (the actor reads the critics frozen)
        (alpha_loss + actor_loss + qf_loss).backward()
        for opt in self.opts.values():
            opt.step()
        polyak_update(self.qf_target, self.qf, a.tau)
        return {"losses/qf_loss": td_loss.detach(), "losses/cql_penalty": penalty.mean().detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/alpha": alpha, "losses/qf_values": q_data.mean().detach(), **extra}


class IQL:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device, accel: Accel | None = None):
        accel, args = accel or Accel(device), with_family(args)
        cfg = ALGO_TABLE["iql"]
        self.args = args
        self.actor = GaussianActor(obs_dim, act_dim, cfg["actor_hidden"]).to(device)
        self.qf = Critic(obs_dim, act_dim, cfg["critic_hidden"], n=2).to(device)
        self.qf_target = Critic(obs_dim, act_dim, cfg["critic_hidden"], n=2).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.vf = Critic(obs_dim, 0, cfg["critic_hidden"], n=1).to(device)
        self.opts = {
            "actor": accel.adam(self.actor.parameters(), args.iql_lr),
            "qf": accel.adam(self.qf.parameters(), args.iql_lr),
            "vf": accel.adam(self.vf.parameters(), args.iql_lr),
        }
        self.step_fn = accel.update(self.gradient_step)

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "qf": self.qf, "qf_target": self.qf_target, "vf": self.vf}

    def update(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        m = self.step_fn(b)
        self.set_actor_lr(step + 1)  # outside the update: with a tensor learning rate this only refills it
        return m

    def set_actor_lr(self, steps_done: int) -> None:
        """Cosine decay of the actor's learning rate from --iql-lr to 0 over --total-steps (CosineAnnealingLR's closed
        form). It depends only on the step and the current budget, so a run resumed with a larger --total-steps
        follows the schedule of an uninterrupted run of that budget."""
        lr = self.args.iql_lr * 0.5 * (1.0 + math.cos(math.pi * min(steps_done, self.args.total_steps) / self.args.total_steps))
        for g in self.opts["actor"].param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def gradient_step(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        a = self.args
        with torch.no_grad():
            target_q = self.qf_target(b["obs"], b["actions"]).min(0).values
            next_v = self.vf(b["next_obs"])[0]
        v = self.vf(b["obs"])[0]
        adv = target_q - v
        v_loss = expectile_loss(adv, a.iql_expectile).mean()
        y = td_target(b["rewards"], b["terminals"], next_v, a.gamma)
        q = self.qf(b["obs"], b["actions"])
        q_loss = ((q - y) ** 2).mean(-1).sum() / 2
        weights = iql_weights(adv.detach(), a.iql_beta)
        actor_loss = (weights * -self.actor.log_prob(b["obs"], b["actions"])).mean()
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        (v_loss + q_loss + actor_loss).backward()  # one backward: the three losses share no parameters
        for opt in self.opts.values():
            opt.step()
        polyak_update(self.qf_target, self.qf, a.tau)
        return {"losses/qf_loss": q_loss.detach(), "losses/vf_loss": v_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/qf_values": q.mean().detach()}


class TD3BC:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device, accel: Accel | None = None):
        accel, args = accel or Accel(device), with_family(args)
        cfg = ALGO_TABLE["td3_bc"]
        self.args = args
        self.actor = DeterministicActor(obs_dim, act_dim, cfg["actor_hidden"]).to(device)
        self.actor_target = DeterministicActor(obs_dim, act_dim, cfg["actor_hidden"]).to(device)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.qf = Critic(obs_dim, act_dim, cfg["critic_hidden"], n=2).to(device)
        self.qf_target = Critic(obs_dim, act_dim, cfg["critic_hidden"], n=2).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.opts = {"actor": accel.adam(self.actor.parameters(), args.td3_bc_lr), "qf": accel.adam(self.qf.parameters(), args.td3_bc_lr)}
        self.step_fn = accel.update(self.gradient_step)

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "actor_target": self.actor_target, "qf": self.qf, "qf_target": self.qf_target}

    def update(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return self.step_fn(b, step % self.args.policy_freq == 0)

    def gradient_step(self, b: dict[str, Tensor], actor_step: bool) -> dict[str, Tensor]:
        """A critic step; with actor_step also the delayed actor step and the target updates."""
        a = self.args
        with torch.no_grad():
            noise = (torch.randn_like(b["actions"]) * a.policy_noise).clamp(-a.noise_clip, a.noise_clip)
            next_a = (self.actor_target(b["next_obs"]) + noise).clamp(-1.0, 1.0)
            y = td_target(b["rewards"], b["terminals"], self.qf_target(b["next_obs"], next_a).min(0).values, a.gamma)
        q = self.qf(b["obs"], b["actions"])
        q_loss = ((q - y) ** 2).mean(-1).sum()
        self.opts["qf"].zero_grad(set_to_none=True)
        q_loss.backward()
        self.opts["qf"].step()
        m = {"losses/qf_loss": q_loss.detach(), "losses/qf_values": q.mean().detach()}
        if actor_step:  # delayed actor and target updates
            pi = self.actor(b["obs"])
            actor_loss = td3_bc_actor_loss(self.qf(b["obs"], pi)[0], pi, b["actions"], a.td3_bc_alpha)
            self.opts["actor"].zero_grad(set_to_none=True)
            actor_loss.backward()
            self.opts["actor"].step()
            polyak_update(self.actor_target, self.actor, a.tau)
            polyak_update(self.qf_target, self.qf, a.tau)
            m["losses/actor_loss"] = actor_loss.detach()
        return m


class BC:
    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device, accel: Accel | None = None):
        accel, args = accel or Accel(device), with_family(args)
        self.args = args
        self.actor = build_actor(args.bc_family, obs_dim, act_dim, ALGO_TABLE["bc"]["actor_hidden"]).to(device)
        self.opts = {"actor": accel.adam(self.actor.parameters(), args.bc_lr)}
        self.step_fn = accel.update(self.gradient_step)

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor}

    def update(self, b: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return self.step_fn(b)

    def gradient_step(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.args.bc_family == "deterministic":
            loss = F.mse_loss(self.actor(b["obs"]), b["actions"])
        else:  # maximum likelihood of the dataset action under the tanh-Gaussian
            loss = -self.actor.log_prob(b["obs"], b["actions"]).mean()
        self.opts["actor"].zero_grad(set_to_none=True)
        loss.backward()
        self.opts["actor"].step()
        return {"losses/actor_loss": loss.detach()}


LEARNERS = {"cql": CQL, "iql": IQL, "td3_bc": TD3BC, "bc": BC}


# ---------------------------------------------------------------- checkpoint
def critic_hidden_of(args: Args) -> tuple[int, ...] | None:
    """The critics' hidden sizes: ALGO_TABLE's, CQL's with --cql-critic-layers layers of 256."""
    hidden = ALGO_TABLE[args.algo]["critic_hidden"]
    return (256,) * args.cql_critic_layers if args.algo == "cql" else hidden


def reward_transform_for(args: Args, data: dict) -> dict[str, float]:
    """The critics learn on r * scale + shift, from --reward (filled from FAMILY_DEFAULTS): `return-range` is IQL's MuJoCo
    rule, 1000 / (max - min episode return); AntMaze's 10r - 5 (CQL) and r - 1 (IQL, TD3+BC) make the sparse reward
    a cost of every step that has not reached the goal."""
    affine = parse_reward(args.reward)
    if affine is None:
        r = data["episode_returns"]
        return {"scale": float(1000.0 / max(float(r.max() - r.min()), 1e-6)), "shift": 0.0}
    return {"scale": affine[0], "shift": affine[1]}


def make_checkpoint(args: Args, learner: Any, data: dict, obs_mean: np.ndarray, obs_std: np.ndarray, reward_transform: dict, step: int, score: float, history: list) -> dict:
    actor = learner.actor
    critics = {k: state_dict_cpu(m) for k, m in learner.modules().items() if k in ("qf", "vf")}
    critic_hidden = critic_hidden_of(args)
    return {
        "format_version": CHECKPOINT_FORMAT, "algo": args.algo, "env_name": args.env if args.dataset_id is None else args.dataset_id,
        "dataset_id": ",".join(data["dataset_ids"]), "local_standin": data["local_standin"], "env_spec": data["env_spec"],
        "obs_dim": data["obs_dim"], "act_dim": data["act_dim"], "max_action": 1.0,
        "actor_family": actor.family, "actor_config": {"hidden": list(ALGO_TABLE[args.algo]["actor_hidden"])}, "actor": state_dict_cpu(actor),
        "critics": critics or None, "critic_config": {"hidden": list(critic_hidden), "layer_norm": False} if critic_hidden else None,
        "obs_mean": torch.as_tensor(obs_mean), "obs_std": torch.as_tensor(obs_std), "reward_transform": reward_transform,
        "ref_min_score": data["ref_min_score"], "ref_max_score": data["ref_max_score"],
        "args": asdict(args), "grad_steps": step, "eval_normalized_score": score, "eval_history": history,
        "train_state": {
            "modules": {k: state_dict_cpu(m) for k, m in learner.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in learner.opts.items()},
            "log_alpha": learner.log_alpha.detach().cpu() if hasattr(learner, "log_alpha") else None,
            **({"log_alpha_prime": learner.log_alpha_prime.detach().cpu()} if hasattr(learner, "log_alpha_prime") else {}),
            "actor_sched": None,  # kept for the format: IQL's schedule is recomputed from the step (IQL.set_actor_lr)
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": json.dumps(np.random.get_state()[1].tolist()), "numpy_pos": int(np.random.get_state()[2])},
        },
    }


def restore(learner: Any, ckpt: dict, args: Args, accel: Accel, path: Path) -> None:
    ts = ckpt.get("train_state")
    if not isinstance(ts, dict) or ckpt["algo"] != args.algo:
        fail(f"checkpoint is from --algo {ckpt['algo']} or has no training state; cannot resume --algo {args.algo} from it")
    try:
        for k, m in learner.modules().items():
            m.load_state_dict(ts["modules"][k])
        for k, o in learner.opts.items():
            accel.load_optimizer(o, ts["optimizers"][k])
        if ts["log_alpha"] is not None:
            with torch.no_grad():
                learner.log_alpha.copy_(ts["log_alpha"])
        if hasattr(learner, "log_alpha_prime"):
            with torch.no_grad():
                learner.log_alpha_prime.copy_(ts["log_alpha_prime"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict's message spans lines
        fail(f"--resume: the training state in {path} does not match its declared dims (obs {ckpt['obs_dim']}, act {ckpt['act_dim']}) "
             f"({reason}); the file is damaged or was edited: pass --overwrite to start over")
    if hasattr(learner, "set_actor_lr"):  # the schedule of this run's budget at the step reached (not the saved learning rate)
        learner.set_actor_lr(ckpt["grad_steps"])
    torch.set_rng_state(ts["rng"]["torch"])
    if ts["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
    np.random.set_state(("MT19937", np.array(json.loads(ts["rng"]["numpy"]), dtype=np.uint32), ts["rng"]["numpy_pos"], 0, 0.0))


# ---------------------------------------------------------------- main
LEARNING_RATES = ("cql_actor_lr", "cql_critic_lr", "iql_lr", "td3_bc_lr", "bc_lr")


def validate(args: Args) -> None:
    if args.algo not in LEARNERS:
        fail(f"unknown --algo {args.algo!r}; known: {', '.join(LEARNERS)}")
    if args.bc_family not in ("tanh_gaussian", "deterministic"):
        fail(f"unknown --bc-family {args.bc_family!r}; known: tanh_gaussian, deterministic")
    for flag in ("total_steps", "batch_size", "eval_every", "eval_episodes", "log_every", "cql_n_actions", "policy_freq") + (("threads",) if args.threads is not None else ()):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail("--gamma and --tau must lie in (0, 1]")
    # None = from FAMILY_DEFAULTS (filled once the dataset is loaded; those values are valid)
    for flag in LEARNING_RATES + ("cql_temp",):  # `not x > 0` also catches NaN
        if getattr(args, flag) is not None and (not getattr(args, flag) > 0.0 or not math.isfinite(getattr(args, flag))):
            fail(f"--{flag.replace('_', '-')} must be a positive finite number, got {getattr(args, flag)}")
    for flag in ("cql_alpha", "iql_beta", "td3_bc_alpha", "policy_noise", "noise_clip"):
        if getattr(args, flag) is not None and (not getattr(args, flag) >= 0.0 or not math.isfinite(getattr(args, flag))):
            fail(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    if args.iql_expectile is not None and not 0.0 < args.iql_expectile < 1.0:
        fail(f"--iql-expectile must lie in (0, 1), got {args.iql_expectile}")
    if args.cql_critic_layers is not None and args.cql_critic_layers <= 0:
        fail(f"--cql-critic-layers must be positive, got {args.cql_critic_layers}")
    if args.cql_clip_diff_min is not None and (math.isnan(args.cql_clip_diff_min) or args.cql_clip_diff_min == float("inf")):
        fail(f"--cql-clip-diff-min must be a number below +inf (-inf: no clip), got {args.cql_clip_diff_min}")
    if not math.isfinite(args.cql_target_action_gap):
        fail(f"--cql-target-action-gap must be a finite number, got {args.cql_target_action_gap}")
    if args.reward is not None:
        parse_reward(args.reward)
    if args.resume and args.overwrite:
        fail("--resume continues the run in the output folder and --overwrite deletes it; pass one of them")
    # no leading dot: `..` would leave <run_dir>/offline/<algo>/<env>/, and a hidden folder hides the run
    if args.run_name is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", args.run_name):
        fail(f"--run-name {args.run_name!r} may hold only letters, digits, '_', '.', '-' and may not start with '.'")


# Args that do not change what is trained: where outputs go, how fast and how often it is evaluated or logged.
# Everything else, restricted to the method being trained, is a run's training settings: a run folder holding a
# run of other settings is never resumed or replaced silently. --total-steps is a setting too, but --resume may
# raise it (the remaining schedule stretches over the new budget).
RUN_ARGS = ("run_dir", "run_name", "resume", "overwrite", "device", "threads", "compile", "cudagraphs", "no_download",
            "log_every", "eval_every", "eval_episodes", "track", "wandb_project_name", "wandb_entity")
# the arguments of one method only: they do not change a run of another method
METHOD_ARGS = {"cql": ("cql_",), "iql": ("iql_",), "td3_bc": ("td3_bc_", "policy_noise", "noise_clip", "policy_freq"), "bc": ("bc_",)}
UNUSED_BY = {"bc": ("gamma", "tau", "reward")}  # BC has no critic and no target network


def training_settings(args: dict) -> dict:
    """The settings of `args` (asdict of Args, or a checkpoint's saved args) that change what a run trains; a field
    missing from an older checkpoint counts as its default, a family value (FAMILY_DEFAULTS) as the MuJoCo one: the
    only family before AntMaze."""
    defaults = asdict(Args())
    algo = args.get("algo", defaults["algo"])
    args = {**{k: v for k, v in family_filled({"algo": algo}, "mujoco").items() if k not in args}, **args}
    others = tuple(p for a, prefixes in METHOD_ARGS.items() if a != algo for p in prefixes)
    unused = UNUSED_BY.get(algo, ()) + (("env",) if args.get("dataset_id") is not None else ())  # --dataset-id overrides --env
    return {k: args.get(k, d) for k, d in defaults.items() if k not in RUN_ARGS and not k.startswith(others) and k not in unused}


def settings_diff(saved: dict, given: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """`--flag saved (now given)` for every training setting that differs."""
    a, b = training_settings(saved), training_settings(given)
    return [f"--{k.replace('_', '-')} {a[k]} (now {b[k]})" for k in a if a[k] != b[k] and k not in ignore]


def read_run(path: Path) -> dict | None:
    """The checkpoint of an earlier run in this output folder, or None when it is not a readable checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    ok = isinstance(ckpt, dict) and all(k in ckpt for k in CHECKPOINT_KEYS) and isinstance(ckpt["args"], dict)
    return ckpt if ok else None


def refuse_existing_run(out: Path, ckpt_path: Path, args: Args) -> NoReturn:
    """Without --resume or --overwrite an earlier run's checkpoint is never replaced: say what the folder holds and
    which flag does what the user most likely wants."""
    other = "choose another --run-name"
    prev = read_run(ckpt_path)
    if prev is None:
        fail(f"{ckpt_path} exists but is not a readable checkpoint; pass --overwrite to replace it or {other}")
    saved, given = prev["args"], asdict(args)
    done, budget = int(prev["grad_steps"]), int(saved.get("total_steps", prev["grad_steps"]))
    diff = settings_diff(saved, given, ignore=("total_steps",))
    if diff:
        state = "a finished run" if done >= budget else f"an unfinished run (step {done} of {budget})"
        fail(f"{out} holds {state} with other settings ({', '.join(diff)}); pass --overwrite to replace it or {other}")
    if done < budget:
        fail(f"{out} holds an unfinished run of these settings (step {done} of {budget}); pass --resume to continue it, "
             f"--overwrite to start over, or {other}")
    if args.total_steps > done:
        fail(f"{out} holds a finished run of these settings with {done} steps; pass --resume to extend it to {args.total_steps}, "
             f"--overwrite to start over, or {other}")
    fail(f"{out} already holds a finished run of these settings ({done} steps, normalized score {prev['eval_normalized_score']:.1f}); "
         f"pass --overwrite to train it again or {other}")


def main(args: Args) -> dict:
    check_tracking(args)
    validate(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    accel = Accel(device, args.compile, args.cudagraphs, args.bf16)  # bad combinations fail before any loading
    env_key = args.env if args.dataset_id is None else args.dataset_id.replace("/", "_")
    out = Path(args.run_dir) / "offline" / args.algo / env_key / (args.run_name or f"seed{args.seed}")
    check_output_dir(out, "--run-dir")  # before the dataset is loaded: a bad folder fails in seconds
    data = load_dataset(args.env, args.dataset_id, args.no_download)
    family = dataset_family(data)
    args = with_family(args, family)  # every None (from the family table) now holds its value
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.exists():
            fail(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = load_checkpoint(ckpt_path, env_name=args.env if args.dataset_id is None else args.dataset_id, obs_dim=data["obs_dim"], act_dim=data["act_dim"])
        if ckpt["algo"] != args.algo:
            fail(f"--resume: {ckpt_path} holds a {ckpt['algo']} run, not {args.algo}")
        diff = settings_diff(ckpt["args"], asdict(args), ignore=("total_steps",))
        if diff:
            fail(f"--resume: {ckpt_path} was trained with other settings ({', '.join(diff)}); resume with its values, "
                 f"or pass --overwrite (or another --run-name) to start a new run")
        if ckpt["grad_steps"] >= args.total_steps:
            fail(f"--resume: {ckpt_path} already has {ckpt['grad_steps']} steps >= --total-steps {args.total_steps}; raise --total-steps")
    elif ckpt_path.exists() and not args.overwrite:
        refuse_existing_run(out, ckpt_path, args)

    set_seed(args.seed)
    if args.normalize_states:
        obs_mean, obs_std = obs_stats(data["observations"])
    else:  # identity, kept in the checkpoint like any other normalisation
        obs_mean, obs_std = np.zeros(data["obs_dim"], np.float32), np.ones(data["obs_dim"], np.float32)
    reward_transform = reward_transform_for(args, data)
    try:
        rb = ReplayBuffer.from_dataset(data, obs_mean, obs_std, device, reward_transform["scale"], reward_transform["shift"])
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"the dataset's {len(data['rewards'])} transitions do not fit in the memory of {device}; use another --device or a smaller dataset")
    learner = LEARNERS[args.algo](args, data["obs_dim"], data["act_dim"], device, accel)
    batch_sizes = f"--batch-size {args.batch_size}" + (f" and --cql-n-actions {args.cql_n_actions}" if args.algo == "cql" else "")
    lower = "lower them" if args.algo == "cql" else "lower it"
    try:  # about one batch's tensors (CQL's: one per sampled action), before anything is written: a size no device
        # can hold fails here; the update itself needs a few times more, caught in the loop below
        rows = args.batch_size * (args.cql_n_actions if args.algo == "cql" else 1)
        torch.empty(rows, 2 * data["obs_dim"] + data["act_dim"] + 4, device=device)  # freed at once
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(f"a batch of {batch_sizes} cannot be allocated on {device}; {lower}")
    start, history = 0, []
    if ckpt is not None:
        restore(learner, ckpt, args, accel, ckpt_path)
        start, history = ckpt["grad_steps"], list(ckpt.get("eval_history", []))
        print(f"resuming {ckpt_path} at step {start}")
    evaluator = Evaluator(data["env_spec"], args.eval_episodes, args.seed + 100, obs_mean, obs_std, device)

    def evaluate() -> tuple[float, float]:
        learner.actor.eval()
        returns = evaluator(learner.actor.act)
        learner.actor.train()
        return float(returns.mean()), float(normalized_score(returns.mean(), data["ref_min_score"], data["ref_max_score"]))

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--run-dir: cannot create {out} ({e.strerror}); pass a folder you can write to")
    if ckpt is None:  # a fresh start: logs and results of an earlier run here (--overwrite, or one that never checkpointed) go
        for old in [*out.glob("events.out.tfevents.*"), out / "results.json", ckpt_path]:
            old.unlink(missing_ok=True)
    else:  # resumed: a results.json of the shorter finished run no longer describes this folder until the end
        (out / "results.json").unlink(missing_ok=True)
    # resumed: tensorboard drops the logged points past the checkpoint (written before the earlier run stopped)
    tracker = start_tracking(args, asdict(args), out)
    writer = SummaryWriter(str(out), purge_step=start if ckpt is not None else None)
    writer.add_text("args", json.dumps(asdict(args)))
    writer.add_text("dataset", f"{','.join(data['dataset_ids'])} (local stand-in: {data['local_standin']}, family {family})")
    metrics: dict[str, list] = {}  # name -> [device sum, count]
    score = history[-1][2] if history else float("nan")
    saved_step = start if ckpt is not None else None  # the step of the checkpoint at ckpt_path that belongs to this run
    t0, steps_t0 = time.time(), start
    bar = tqdm(range(start, args.total_steps), desc=f"{args.algo} {args.env}", initial=start, total=args.total_steps, disable=None)
    for step in bar:
        try:
            m = learner.update(rb.sample(args.batch_size), step)
        except Exception as e:
            if not out_of_memory(e):
                raise
            last = f"the last good checkpoint is {ckpt_path} (step {saved_step})" if saved_step is not None else "no checkpoint was written"
            fail(f"an update with {batch_sizes} cannot allocate its tensors on {device} (at step {step}); {lower}; {last}")
        for k, v in m.items():  # accumulate on the device; read only at log time
            acc = metrics.setdefault(k, [0.0, 0])
            acc[0], acc[1] = acc[0] + v, acc[1] + 1
        done = step + 1
        if done % args.log_every == 0:
            for k, (v, n) in metrics.items():
                val = float(v) / n
                if not math.isfinite(val):
                    last = f"the last good checkpoint is {ckpt_path} (step {saved_step})" if saved_step is not None else "no checkpoint was written"
                    fail(f"non-finite {k} at step {done} of {args.algo}; {last}")
                writer.add_scalar(k, val, done)
            writer.add_scalar("charts/SPS", (done - steps_t0) / (time.time() - t0), done)
            metrics = {}
        if done % args.eval_every == 0 or done == args.total_steps:
            ret, score = evaluate()
            history.append([done, ret, score])
            writer.add_scalar("eval/episodic_return", ret, done)
            writer.add_scalar("eval/normalized_score", score, done)
            bar.set_postfix(score=f"{score:.1f}")
            tqdm.write(f"step {done}: return {ret:.1f}, normalized score {score:.1f}")
            atomic_save(make_checkpoint(args, learner, data, obs_mean, obs_std, reward_transform, done, score, history), ckpt_path)
            saved_step = done
    bar.close()
    writer.close()
    finish_tracking(tracker)
    evaluator.close()
    # the o2o scripts' results.json schema where it applies (README, "results.json"); curve: [step, return, score] rows
    result = {"schema_version": 1, "script": "offline_pretrain", "algo": args.algo, "env": args.env, "seed": args.seed,
              "dataset_ids": data["dataset_ids"], "local_standin": data["local_standin"], "family": family, "checkpoint": str(ckpt_path),
              "grad_steps": args.total_steps, "eval_normalized_score": score, "eval_history": history,
              "wall_clock_s": time.time() - t0, "finished": True, "versions": software_versions(), "git_commit": git_commit()}
    atomic_save(result, out / "results.json")
    print(f"offline {args.algo} on {args.env}: normalized score {score:.1f}; checkpoint {ckpt_path}")
    return result


if __name__ == "__main__":
    main(parse_cli(Args))
