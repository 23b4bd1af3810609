"""Bad input to the scripts, as a user meets it on the command line: every row runs a script as a subprocess and
expects exit status 2, exactly one non-empty line on stderr that holds the expected words, no traceback, and
every file that was there before (dataset store, run folders, checkpoints) byte-identical afterwards.

A row is (id, script, build, expected): `build(ctx)` prepares what the case needs under ctx.tmp (a damaged
checkpoint, a truncated dataset, ...) and returns the script's argv, optionally with extra environment variables.
Rows of other scripts can be appended to CASES the same way. The o2o rows run on tiny budgets, so a guard that is
missing shows as a run that finishes (exit 0, files written) within seconds rather than one that trains for hours.

Most rows run through a fork server (conftest.ForkServer): one interpreter that has imported torch, gymnasium,
minari, tyro, ... forks a child per row that runs the script as __main__ with the row's argv, environment and cwd, its
stdout and stderr in files, and exits as the interpreter would (an uncaught exception: traceback, status 1). That
saves the 2-3 s interpreter start and imports per row. The rows in REAL_INTERPRETER, and the --help rows, still run
`python script.py ...` as a fresh subprocess, so the path from a shell (import-time output, interpreter exit) stays
covered for every script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import ROOT, TINY_OFFLINE, ForkServer

HUGE = str(10**15)  # more elements than any machine can address: the allocation fails at once, never swaps


@dataclass
class Ctx:
    """What a row may use: its own copy of the tiny dataset store, an empty run folder, a finished IQL checkpoint."""

    tmp: Path
    store: Path
    runs: Path
    iql_checkpoint: Path  # a finished tiny IQL run (TINY_OFFLINE: 60 steps), to copy into a run folder
    finished: Callable[[str], Path]  # the run folder of a finished tiny run of an o2o script (made once per module)
    watch: list[Path] = field(default_factory=list)  # files and folders that must come out unchanged

    def file(self, name: str = "a_file", text: str = "not a folder\n") -> Path:
        p = self.tmp / name
        p.write_text(text)
        self.watch.append(p)
        return p

    def run_folder(self, algo: str = "iql") -> Path:
        return self.runs / "offline" / algo / "hopper-medium-v2" / "seed0"

    def place_checkpoint(self, edit: Callable[[dict], None] | None = None) -> Path:
        """The finished IQL checkpoint in the default run folder, optionally edited (damaged) first."""
        dst = self.run_folder("iql") / "checkpoint.pt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if edit is None:
            shutil.copy(self.iql_checkpoint, dst)
        else:
            ckpt = torch.load(self.iql_checkpoint, map_location="cpu", weights_only=True)
            edit(ckpt)
            torch.save(ckpt, dst)
        return dst


    def damaged_checkpoint(self, edit: Callable[[dict], None]) -> Path:
        """A copy of the IQL checkpoint, edited (damaged), for --checkpoint."""
        ckpt = torch.load(self.iql_checkpoint, map_location="cpu", weights_only=True)
        edit(ckpt)
        dst = self.tmp / "damaged.pt"
        torch.save(ckpt, dst)
        self.watch.append(dst)
        return dst

    def place_o2o_run(self, script: str, unfinished: bool = False, online: bytes | None = None) -> Path:
        """The finished tiny run of `script` as run `r` of ctx.runs; `unfinished`: without final.pt and results.json, as
        a run killed after its last online.pt; `online`: those bytes as its online.pt."""
        dst = self.runs / O2O_DIR[script] / "hopper-medium-v2" / "r"
        shutil.copytree(self.finished(script), dst)
        if unfinished:
            (dst / "final.pt").unlink()
            (dst / "results.json").unlink()
        if online is not None:
            (dst / "online.pt").write_bytes(online)
        return dst


def unwritable_dir(ctx: Ctx) -> Path:
    """A folder in which this process cannot create anything. Root ignores mode bits, so for root a sysfs folder
    (mkdir there is refused to everyone) stands in; without one the case is skipped."""
    if os.geteuid() != 0:
        d = ctx.tmp / "read_only"
        d.mkdir()
        d.chmod(0o500)
        ctx.watch.append(d)
        return d
    d, probe = Path("/sys/fs"), Path(f"/sys/fs/probe-{os.getpid()}")
    try:
        probe.mkdir()
    except OSError:
        return d
    probe.rmdir()
    pytest.skip("no unwritable folder available to root here")


def op_args(ctx: Ctx, *extra: str, algo: str = "iql") -> list[str]:
    return ["--algo", algo, "--env", "hopper-medium-v2", "--run-dir", str(ctx.runs), *TINY_OFFLINE, *extra]


def md_args(ctx: Ctx, *extra: str, env: str = "hopper-expert-v2") -> list[str]:
    return ["--env", env, "--out-dir", str(ctx.tmp / "md_runs"), "--device", "cpu", *extra]


SAC, TD3, PPO = "o2o_sac.py", "o2o_td3.py", "o2o_ppo.py"
O2O_DIR = {SAC: "o2o_sac", TD3: "o2o_td3", PPO: "o2o_ppo"}
# tiny budgets of every phase (IQL's Gaussian actor: SAC and TD3 distil it, PPO copies it); a later flag overrides one here
O2O_TINY = {
    SAC: ["--distill-steps", "10", "--reevaluate-steps", "10", "--align-steps", "10", "--online-steps", "40", "--learning-starts", "20",
          "--utd", "1", "--eval-every", "20", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--batch-size", "32", "--log-every", "10", "--early-evals", "0",
          "--align-eval-every", "0"],
    TD3: ["--distill-steps", "10", "--reevaluate-steps", "10", "--align-steps", "10", "--online-steps", "40", "--learning-starts", "20",
          "--eval-every", "20", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--batch-size", "32", "--log-every", "10", "--early-evals", "0",
          "--align-eval-every", "0"],
    PPO: ["--distill-steps", "10", "--reevaluate-steps", "10", "--rollout-size", "32", "--minibatch-size", "32", "--update-epochs", "1",
          "--online-steps", "64", "--eval-every", "32", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--log-every", "32", "--early-evals", "0"],
}


def o2o_args(ctx: Ctx, script: str, *extra: str, run_dir: Path | None = None, run_name: str = "r", ckpt: Path | None = None) -> list[str]:
    return ["--env", "hopper-medium-v2", "--checkpoint", str(ckpt or ctx.iql_checkpoint), "--run-dir", str(run_dir or ctx.runs),
            "--run-name", run_name, "--device", "cpu", *O2O_TINY[script], *extra]


def o2o_cases(script: str, p: str, other: list[str]) -> list[tuple[str, str, Build, str]]:
    """The rows every o2o script shares; `other` changes a setting of its online key."""
    s = script
    return [
        # --- output folder, Minari store, dataset
        (f"{p}-run-dir-is-file", s, lambda c: o2o_args(c, s, run_dir=c.file()), "is a file"),
        (f"{p}-run-dir-not-writable", s, lambda c: o2o_args(c, s, run_dir=unwritable_dir(c) / "runs"), "not writable"),
        (f"{p}-store-is-file", s, lambda c: (o2o_args(c, s), {"MINARI_DATASETS_PATH": str(c.file("store_file"))}), "Minari store"),
        (f"{p}-truncated-dataset", s, lambda c: (truncate_dataset(c), o2o_args(c, s))[1], "cannot be read"),
        # --- names that would leave their folder
        (f"{p}-run-name-traversal", s, lambda c: o2o_args(c, s, run_name="../../x"), "--run-name"),
        (f"{p}-run-name-dotdot", s, lambda c: o2o_args(c, s, run_name=".."), "--run-name"),
        (f"{p}-dataset-id-traversal", s, lambda c: o2o_args(c, s, "--dataset-id", "../../evil-v0"), "malformed dataset id"),
        # --- damaged offline checkpoints
        (f"{p}-ckpt-weights-vs-dims", s, lambda c: o2o_args(c, s, ckpt=c.damaged_checkpoint(wrong_actor_weights)), "do not match its declared dims"),
        (f"{p}-ckpt-obs-std-zero", s, lambda c: o2o_args(c, s, ckpt=c.damaged_checkpoint(zero_obs_std)), "obs_std"),
        # --- a run folder that holds a run
        (f"{p}-finished-run-other-settings", s, lambda c: (c.place_o2o_run(s), o2o_args(c, s, *other))[1], "pass --overwrite"),
        (f"{p}-finished-run-other-settings-no-resume", s, lambda c: (c.place_o2o_run(s), o2o_args(c, s, "--no-resume", *other))[1],
         "pass --overwrite"),
        (f"{p}-unfinished-run-other-settings", s, lambda c: (c.place_o2o_run(s, unfinished=True), o2o_args(c, s, *other))[1], "pass --no-resume"),
        (f"{p}-online-pt-corrupt", s, lambda c: (c.place_o2o_run(s, unfinished=True, online=b"junk"), o2o_args(c, s))[1], "pass --no-resume"),
        # --- parser errors
        (f"{p}-parser-float-for-int", s, lambda c: o2o_args(c, s, "--online-steps", "1e6"), "--online-steps"),
    ]


def truncate_dataset(ctx: Ctx) -> None:
    f = ctx.store / "local" / "hopper" / "medium-v0" / "data" / "main_data.hdf5"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)


def wrong_actor_weights(ckpt: dict) -> None:
    w = ckpt["actor"]["net.0.weight"]
    ckpt["actor"]["net.0.weight"] = torch.zeros(w.shape[0], w.shape[1] + 2)  # declares obs_dim 11, weights take 13


def wrong_critic_weights(ckpt: dict) -> None:
    qf = ckpt["critics"]["qf"]
    k = next(k for k in qf if k.endswith("weight"))
    qf[k] = torch.zeros(*qf[k].shape[:-1], qf[k].shape[-1] + 2)


def zero_obs_std(ckpt: dict) -> None:
    ckpt["obs_std"] = torch.zeros_like(ckpt["obs_std"])


OP, MD = "offline_pretrain.py", "make_dataset.py"
Build = Callable[[Ctx], "list[str] | tuple[list[str], dict[str, str]]"]

CASES: list[tuple[str, str, Build, str]] = [
    # --- offline_pretrain.py: learning rates
    ("op-lr-nan", OP, lambda c: op_args(c, "--iql-lr", "nan"), "--iql-lr must be a positive finite number"),
    ("op-lr-negative", OP, lambda c: op_args(c, "--cql-actor-lr=-0.0003", algo="cql"), "--cql-actor-lr must be a positive"),
    ("op-lr-zero", OP, lambda c: op_args(c, "--td3-bc-lr", "0", algo="td3_bc"), "--td3-bc-lr must be a positive"),
    # --- output folder and Minari store
    ("op-run-dir-is-file", OP, lambda c: op_args(c, "--run-dir", str(c.file())), "is a file"),
    ("op-run-dir-not-writable", OP, lambda c: op_args(c, "--run-dir", str(unwritable_dir(c) / "runs")), "not writable"),
    ("op-store-is-file", OP, lambda c: (op_args(c), {"MINARI_DATASETS_PATH": str(c.file("store_file"))}), "Minari store"),
    ("op-store-cannot-be-created", OP, lambda c: (op_args(c), {"MINARI_DATASETS_PATH": str(unwritable_dir(c) / "minari")}), "cannot be created"),
    ("op-truncated-dataset", OP, lambda c: (truncate_dataset(c), op_args(c))[1], "cannot be read"),
    ("op-missing-local-dataset", OP, lambda c: op_args(c, "--dataset-id", "local/walker2d/medium-v0"),
     "build it with python make_dataset.py --env walker2d-medium-v2"),
    # --- sizes that cannot be allocated
    ("op-batch-unallocatable", OP, lambda c: op_args(c, "--batch-size", HUGE), "--batch-size"),
    # --- damaged checkpoints
    ("op-ckpt-weights-vs-dims", OP, lambda c: (c.place_checkpoint(wrong_actor_weights), op_args(c, "--resume", "--total-steps", "90"))[1],
     "do not match its declared dims"),
    ("op-ckpt-obs-std-zero", OP, lambda c: (c.place_checkpoint(zero_obs_std), op_args(c, "--resume", "--total-steps", "90"))[1], "obs_std"),
    ("op-ckpt-corrupt", OP, lambda c: ((c.run_folder().mkdir(parents=True), (c.run_folder() / "checkpoint.pt").write_bytes(b"junk")),
                                       op_args(c, "--resume"))[1], "corrupt"),
    # --- a run folder that holds a run
    ("op-finished-run-other-settings", OP, lambda c: (c.place_checkpoint(), op_args(c, "--iql-lr", "0.001"))[1], "pass --overwrite"),
    ("op-finished-run-same-settings", OP, lambda c: (c.place_checkpoint(), op_args(c))[1], "already holds a finished run"),
    ("op-resume-other-settings", OP, lambda c: (c.place_checkpoint(), op_args(c, "--resume", "--total-steps", "90", "--iql-expectile", "0.8"))[1],
     "--iql-expectile 0.7 (now 0.8)"),
    ("op-resume-and-overwrite", OP, lambda c: (c.place_checkpoint(), op_args(c, "--resume", "--overwrite"))[1], "pass one of them"),
    # --- names that would leave their folder
    ("op-run-name-traversal", OP, lambda c: op_args(c, "--run-name", "../../x"), "--run-name"),
    ("op-dataset-id-traversal", OP, lambda c: op_args(c, "--dataset-id", "../../evil-v0"), "malformed dataset id"),
    # --- parser errors and other unknown values
    ("op-parser-float-for-int", OP, lambda c: op_args(c, "--total-steps", "1e6"), "--total-steps"),
    ("op-parser-unknown-flag", OP, lambda c: op_args(c, "--totl-steps", "5"), "did you mean --total-steps"),
    ("op-unknown-algo", OP, lambda c: op_args(c, algo="sac"), "unknown --algo"),
    ("op-unknown-env", OP, lambda c: op_args(c, "--env", "hopper-mediocre-v2"), "unknown env"),
    # --- make_dataset.py
    ("md-parser-float-for-int", MD, lambda c: md_args(c, "--size", "1e6"), "--size"),
    ("md-train-steps-unallocatable", MD, lambda c: md_args(c, "--train-steps", HUGE), "--train-steps"),
    ("md-lr-nan", MD, lambda c: md_args(c, "--lr", "nan", "--train-steps", "600", "--learning-starts", "500", "--snapshot-every", "500",
                                        "--snapshot-episodes", "1", "--size", "100", "--num-envs", "2"), "--lr must be a positive"),
    ("md-store-is-file", MD, lambda c: (md_args(c, env="hopper-random-v2"), {"MINARI_DATASETS_PATH": str(c.file("store_file"))}), "Minari store"),
    ("md-store-not-writable", MD, lambda c: (md_args(c, env="hopper-random-v2"), {"MINARI_DATASETS_PATH": str(unwritable_dir(c))}), "Minari store"),
    ("md-out-dir-is-file", MD, lambda c: md_args(c, "--out-dir", str(c.file())), "is a file"),
    ("md-out-dir-not-writable", MD, lambda c: md_args(c, "--out-dir", str(unwritable_dir(c) / "md")), "not writable"),
    ("md-dataset-exists", MD, lambda c: md_args(c, env="hopper-medium-v2"), "already exists"),
    # --- o2o_sac.py, o2o_td3.py, o2o_ppo.py: the rows they share, then their own
    *o2o_cases(SAC, "sac", ["--gamma", "0.98"]),
    *o2o_cases(TD3, "td3", ["--gamma", "0.98"]),
    *o2o_cases(PPO, "ppo", ["--clip-coef", "0.3"]),
    ("sac-lr-nan", SAC, lambda c: o2o_args(c, SAC, "--critic-lr", "nan"), "--critic-lr must be positive"),
    ("td3-lr-nan", TD3, lambda c: o2o_args(c, TD3, "--actor-lr", "nan"), "--actor-lr must be a positive finite number"),
    ("td3-lr-zero", TD3, lambda c: o2o_args(c, TD3, "--critic-lr", "0"), "--critic-lr must be a positive finite number"),
    ("td3-lr-negative", TD3, lambda c: o2o_args(c, TD3, "--lambda-lr=-5e-5", "--budget-scale", "0.5"), "--lambda-lr must be a positive finite number, got -5e-05"),
    ("td3-lr-inf", TD3, lambda c: o2o_args(c, TD3, "--opt-actor-lr", "inf"), "--opt-actor-lr must be a positive finite number"),
    ("sac-ckpt-critic-vs-config", SAC, lambda c: o2o_args(c, SAC, "--no-reevaluate", ckpt=c.damaged_checkpoint(wrong_critic_weights)),
     "critic weights do not match its critic_config"),  # a kept critic (--no-reevaluate) is checked before any phase
    ("td3-ckpt-critic-vs-config", TD3, lambda c: o2o_args(c, TD3, "--no-reevaluate", ckpt=c.damaged_checkpoint(wrong_critic_weights)),
     "critic weights do not match its critic_config"),
    ("ppo-lr-nan", PPO, lambda c: o2o_args(c, PPO, "--actor-lr", "nan"), "--actor-lr must be positive"),
    # --- sizes that cannot be allocated: refused before any phase runs
    ("sac-online-steps-unallocatable", SAC, lambda c: o2o_args(c, SAC, "--online-steps", HUGE), "lower --online-steps"),
    ("sac-buffer-all-unallocatable", SAC, lambda c: o2o_args(c, SAC, "--online-steps", HUGE, "--buffer-mode", "all"), "or use --buffer-mode half"),
    ("sac-batch-unallocatable", SAC, lambda c: o2o_args(c, SAC, "--batch-size", HUGE), "--batch-size"),
    ("td3-online-steps-unallocatable", TD3, lambda c: o2o_args(c, TD3, "--online-steps", HUGE), "lower --online-steps"),
    ("td3-batch-unallocatable", TD3, lambda c: o2o_args(c, TD3, "--batch-size", HUGE), "--batch-size"),
    ("ppo-rollout-unallocatable", PPO, lambda c: o2o_args(c, PPO, "--rollout-size", HUGE, "--online-steps", HUGE), "--rollout-size"),
    ("ppo-batch-unallocatable", PPO, lambda c: o2o_args(c, PPO, "--reevaluate-batch-size", HUGE), "--reevaluate-batch-size"),
]


def snapshot(paths: list[Path]) -> dict[str, bytes | str | None]:
    """Every file's bytes and every folder's presence under `paths`."""
    snap: dict[str, bytes | str | None] = {}
    for root in paths:
        if not root.exists():
            snap[str(root)] = None
        elif root.is_file():
            snap[str(root)] = root.read_bytes()
        else:
            snap[str(root)] = "<dir>"
            for p in sorted(root.rglob("*")):
                snap[str(p)] = p.read_bytes() if p.is_file() else "<dir>"
    return snap


# rows that run as a real interpreter: a parse error, a dataset read (h5py's lazy imports) and a checkpoint load, from
# offline_pretrain, make_dataset and an o2o script; the --help rows run every script as a real interpreter too
REAL_INTERPRETER = {"op-truncated-dataset", "md-parser-float-for-int", "sac-ckpt-obs-std-zero"}


def run_case(script: str, build: Build, ctx: Ctx, script_dir: Path = ROOT, server: ForkServer | None = None,
             ) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """Build the case, run the script (forked from `server`, else as a fresh interpreter), return the process and the
    snapshots before and after."""
    built = build(ctx)
    argv, extra_env = built if isinstance(built, tuple) else (built, {})
    ctx.watch += [ctx.store, ctx.runs]
    before = snapshot(ctx.watch)
    env = {**os.environ, "MINARI_DATASETS_PATH": str(ctx.store), "OMP_NUM_THREADS": "1", **extra_env}
    if server is not None:
        proc = server.run(script_dir / script, argv, env=env, cwd=ctx.tmp, timeout=300)
    else:
        proc = subprocess.run([sys.executable, str(script_dir / script), *argv], capture_output=True, text=True, env=env, cwd=ctx.tmp,
                              timeout=300)
    return proc, before, snapshot(ctx.watch)


@pytest.fixture(scope="module")
def iql_checkpoint(offline_checkpoints) -> Path:
    """The session's tiny IQL checkpoint (TINY_OFFLINE), which the o2o test modules train from too; rows only read or copy it."""
    return offline_checkpoints["iql"]


@pytest.fixture(scope="module")
def o2o_finished(request, tiny_dataset, iql_checkpoint, fork_server, tmp_path_factory) -> Callable[[str], Path]:
    """finished(script): the run folder of a finished tiny run of an o2o script from the IQL checkpoint (O2O_TINY, run
    name r). The runs of the scripts that have rows selected start at once in the fork server, in the background at a
    low priority (they need seconds, mostly the diagnostics), and are waited for on first use, by when the
    offline_pretrain and make_dataset rows have run; one never used is killed at the end."""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tiny_dataset["home"]), "OMP_NUM_THREADS": "1"}
    selected = {getattr(item, "callspec", None) and item.callspec.params.get("script") for item in request.session.items}
    runs = {s: tmp_path_factory.mktemp(f"finished_{s[:-3]}") for s in O2O_DIR if s in selected}
    started = {s: fork_server.start(ROOT / s, ["--env", "hopper-medium-v2", "--checkpoint", str(iql_checkpoint), "--run-dir", str(runs[s]),
                                               "--run-name", "r", "--device", "cpu", *O2O_TINY[s]], env=env, cwd=runs[s], timeout=600,
                                     nice=10)
               for s in runs}
    done: dict[str, Path] = {}
    procs: dict[str, subprocess.CompletedProcess] = {}

    def finished(script: str) -> Path:
        if script not in done:
            if script in started:
                procs[script] = fork_server.wait(started.pop(script))
            proc = procs[script]
            assert proc.returncode == 0, f"the finished {script} run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
            done[script] = runs[script] / O2O_DIR[script] / "hopper-medium-v2" / "r"
            assert (done[script] / "final.pt").is_file() and (done[script] / "online.pt").is_file()
        return done[script]

    yield finished
    for handle in started.values():
        fork_server.cancel(handle)


@pytest.fixture
def ctx(tiny_dataset, iql_checkpoint, o2o_finished, tmp_path) -> Ctx:
    store = tmp_path / "store"
    shutil.copytree(tiny_dataset["home"], store)  # a store of its own: a case may damage it
    (tmp_path / "runs").mkdir()
    return Ctx(tmp=tmp_path, store=store, runs=tmp_path / "runs", iql_checkpoint=iql_checkpoint, finished=o2o_finished)


@pytest.mark.parametrize("case_id, script, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(ctx, fork_server, case_id, script, build, expected):
    proc, before, after = run_case(script, build, ctx, server=None if case_id in REAL_INTERPRETER else fork_server)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert after == before, f"files changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:10]}"


@pytest.mark.parametrize("script", [OP, MD, SAC, TD3, PPO])
def test_help_still_prints(script, tmp_path):
    """parse_cli turns parse errors into one line; --help must still print the full help and exit 0. Run as a real
    interpreter: nothing on stderr, so importing the script prints nothing (which forked rows cannot see)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]
    assert "--seed" in proc.stdout and "--device" in proc.stdout and len(proc.stdout.splitlines()) > 20


def test_real_interpreter_rows_cover_each_kind_of_script():
    """offline_pretrain, make_dataset and an o2o script each have an error row run as a real interpreter."""
    ids = {c[0]: c[1] for c in CASES}
    assert REAL_INTERPRETER <= set(ids), REAL_INTERPRETER - set(ids)
    assert {OP, MD} <= {ids[i] for i in REAL_INTERPRETER} and {SAC, TD3, PPO} & {ids[i] for i in REAL_INTERPRETER}


def test_fork_server_runs_like_an_interpreter(fork_server, tmp_path):
    """The harness itself: argv, environment, cwd, stdout/stderr, exit status, tracebacks and timeouts come through as
    from `python script.py`; the preloaded imports print nothing that forked rows would miss."""
    assert fork_server.import_chatter() == "", fork_server.import_chatter()[-3000:]
    assert fork_server.threads == 1  # forking a threaded process could leave a lock held in the child
    s = tmp_path / "s.py"
    s.write_text("import os, sys\nprint('out', sys.argv[1:], os.environ['X'], os.getcwd(), __name__)\n"
                 "print('err', file=sys.stderr)\nmode = sys.argv[1]\n"
                 "if mode == 'raise': raise ValueError('boom')\n"
                 "if mode == 'exit': sys.exit(3)\nif mode == 'msg': sys.exit('bye')\n"
                 "if mode == 'sleep': import time; time.sleep(60)\n")
    run = lambda *argv, timeout=60: fork_server.run(s, argv, env={"X": "y"}, cwd=tmp_path, timeout=timeout)
    p = run("ok")
    assert (p.returncode, p.stdout, p.stderr) == (0, f"out ['ok'] y {tmp_path} __main__\n", "err\n")
    p = run("raise")
    assert p.returncode == 1 and "Traceback" in p.stderr and p.stderr.rstrip().endswith("ValueError: boom"), p.stderr
    assert p.stderr.splitlines()[2].strip().startswith(f'File "{s}"'), p.stderr  # the traceback starts in the script
    assert run("exit").returncode == 3
    p = run("msg")
    assert (p.returncode, p.stderr) == (1, "err\nbye\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run("sleep", timeout=1)
    assert run("ok").returncode == 0  # the server survives a killed child
    p = fork_server.run(s, ["ok"], env={"X": "y"}, cwd=tmp_path / "missing")  # the harness's own failure is no pass
    assert p.returncode == 125 and "FileNotFoundError" in p.stderr, p.stderr
    slow, fast = (fork_server.start(s, [m], env={"X": "y"}, cwd=tmp_path) for m in ("sleep", "exit"))  # runs overlap
    assert fork_server.wait(fast).returncode == 3
    fork_server.cancel(slow)
