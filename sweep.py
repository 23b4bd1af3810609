"""Run a grid of offline-to-online experiments on Ray: scripts x modes x envs x seeds (x flag sets).

Every run is one subprocess of an unchanged script of this repo (make_dataset.py, offline_pretrain.py, o2o_sac.py,
o2o_td3.py, o2o_ppo.py), scheduled as a Ray task with declared resources, with its own run folder and log. The grid
expands into jobs with explicit dependencies (`plan`): each o2o run needs the offline run it starts from (once per
env x offline algo x seed), and with --build-datasets each offline run needs the make_dataset.py run of its dataset
when the local Minari store lacks it. A job starts only once what it needs is finished.

Resumable: rerunning the same command skips finished runs (results.json says finished; a dataset is in the store),
resumes killed or unfinished ones through the scripts' own resume, and reruns failed ones only with --retry-failed.
A failed run never stops the others (its dependents are skipped); the sweep ends with a table of done / failed
(with the log path) / incomplete / skipped runs, and exits 1 when a run failed.

Where things go (RUN_DIR = --run-dir):
    RUN_DIR/offline/<algo>/<env>/seed<k>/          offline_pretrain.py (checkpoint.pt, results.json)
    RUN_DIR/<script>/<env>/<algo>_<mode>[_<flag set>]_seed<k>/   o2o runs (results.json, checkpoints)
    RUN_DIR/make_dataset/<env name>/               make_dataset.py (behaviour-policy snapshots)
    <run folder>/sweep.log, <run folder>/sweep.json   the job's output and the sweep's record of its last attempt

Usage:
    python sweep.py --preset paper-mujoco --scale 0.02 --dry-run      # print the commands
    python sweep.py --preset paper-mujoco --scale 0.02                # local Ray instance on this machine
    python sweep.py --preset paper-mujoco --address auto --gpus-per-run 0.25   # join a running Ray cluster
    python sweep.py --scripts o2o_sac o2o_td3:iql --modes ocr-cft naive --envs hopper-medium-v2 --seeds 0 1 \\
        --flag-sets "refbest=" "refoff=--reference offline" --flags "o2o_sac=--utd 5" --build-datasets
    python report.py runs --out runs/report                           # tables and plots of the results
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Protocol

import tyro

HERE = Path(__file__).resolve().parent
O2O_SCRIPTS = ("o2o_sac", "o2o_td3", "o2o_ppo")
SCRIPTS = ("make_dataset", "offline_pretrain", *O2O_SCRIPTS)
OFFLINE_ALGOS = ("cql", "iql", "td3_bc", "bc")
# the paper's pairs: O2SAC from CQL, O2TD3 from TD3+BC, O2PPO from IQL
PAPER_OFFLINE = {"o2o_sac": "cql", "o2o_td3": "td3_bc", "o2o_ppo": "iql"}
# --mode -> the flags that select it; names are the `method` the scripts write to results.json
MODE_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "o2o_sac": {"ocr-cft": (), "naive": ("--no-reevaluate", "--no-align", "--no-constraint"), "porl": ("--critic-init", "scratch"),
                "no-reevaluate": ("--no-reevaluate",), "no-align": ("--no-align",), "no-constraint": ("--no-constraint",)},
    "o2o_td3": {"ocr-cft": (), "naive": ("--no-reevaluate", "--no-align", "--no-constraint"), "opt": ("--opt",),
                "no-reevaluate": ("--no-reevaluate",), "no-align": ("--no-align",), "no-constraint": ("--no-constraint",)},
    "o2o_ppo": {"ocr-cft": (), "naive": ("--no-reevaluate", "--no-constraint"), "no-reevaluate": ("--no-reevaluate",),
                "no-constraint": ("--no-constraint",)},
}
OFFLINE_STEPS = 1_000_000  # offline_pretrain.py's default --total-steps, scaled by --scale
LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
ENV_RE = re.compile(r"([a-z0-9]+)-(" + "|".join(re.escape(lv) for lv in LEVELS) + r")-v\d+")
HOSTED_LEVELS = {"medium": ("medium-v0",), "expert": ("expert-v0",), "medium-expert": ("medium-v0", "expert-v0")}  # as the scripts
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")  # flag-set names: they go into run names
PRESETS: dict[str, dict[str, tuple]] = {
    "paper-mujoco": {"scripts": ("o2o_sac:cql", "o2o_td3:td3_bc", "o2o_ppo:iql"), "modes": ("ocr-cft", "naive"),
                     "envs": tuple(f"{e}-{lv}-v2" for e in ("hopper", "walker2d", "halfcheetah") for lv in ("medium", "medium-replay")),
                     "seeds": (0, 1, 2, 3, 4)},
}


@dataclass
class Args:
    # --- the grid ---
    preset: Literal["paper-mujoco"] | None = None
    """paper-mujoco: O2SAC from CQL, O2TD3 from TD3+BC, O2PPO from IQL, each also naive; hopper, walker2d,
    halfcheetah medium and medium-replay; seeds 0-4. Explicit --scripts/--modes/--envs/--seeds replace its values"""
    scripts: tuple[str, ...] = ()
    """o2o scripts, each SCRIPT or SCRIPT:OFFLINE_ALGO (default offline algo: the paper's pair), e.g. o2o_sac o2o_td3:iql"""
    modes: tuple[str, ...] = ()
    """methods: ocr-cft, naive, porl (o2o_sac), opt (o2o_td3), no-reevaluate, no-align, no-constraint; a mode a script
    does not have is left out for that script (default: ocr-cft naive)"""
    envs: tuple[str, ...] = ()
    """D4RL-style dataset names, e.g. hopper-medium-v2 hopper-medium-replay-v2"""
    seeds: tuple[int, ...] = ()
    """seeds (default: 0)"""
    flag_sets: tuple[str, ...] = ()
    """extra flag sets of the o2o runs, each NAME=FLAGS (another grid dimension; NAME goes into the run name), e.g.
    "refbest=" "refoff=--reference offline\""""
    flags: tuple[str, ...] = ()
    """flags appended to every run of a script, each SCRIPT=FLAGS with SCRIPT one of make_dataset, offline_pretrain,
    o2o_sac, o2o_td3, o2o_ppo, o2o (all three), e.g. "o2o_sac=--utd 5" "offline_pretrain=--eval-episodes 5".
    They are not part of a run's identity: change them between invocations and the scripts refuse a run of other settings"""
    scale: float = 1.0
    """budget scale of every run: offline_pretrain.py --total-steps 1M x F, the o2o scripts' --budget-scale F (which
    also scales their schedules). Datasets are not scaled (they define the task). 1 = the paper"""
    build_datasets: bool = False
    """add make_dataset.py runs for the datasets missing from the local Minari store (MINARI_DATASETS_PATH), before
    the offline runs that need them"""
    run_dir: str = "runs"
    """root of every run folder (on a cluster: a path every node sees)"""
    # --- execution ---
    address: str | None = None
    """join an existing Ray cluster: auto, or HOST:PORT of its head node. Default: start a local Ray instance"""
    num_cpus: int | None = None
    """local instance only: CPUs Ray may use (default: all of this machine)"""
    num_gpus: int | None = None
    """local instance only: GPUs Ray may use (default: all of this machine)"""
    cpus_per_run: float = 1.0
    """CPUs each run declares to Ray; each script gets --threads max(1, floor(this))"""
    gpus_per_run: float = 0.0
    """GPUs each run declares (fractional: 0.25 lets four runs share one GPU); 0 = the runs use --device cpu"""
    retry_failed: bool = False
    """rerun runs whose last attempt failed (killed and unfinished runs are always resumed)"""
    dry_run: bool = False
    """print the jobs, their state and their commands; run nothing"""
    python: str = sys.executable
    """interpreter of the runs (on a cluster: a path that exists on every node)"""


@dataclass(frozen=True)
class Grid:
    pairs: tuple[tuple[str, str], ...]  # (o2o script, offline algo)
    modes: tuple[str, ...]
    envs: tuple[str, ...]
    seeds: tuple[int, ...]
    flag_sets: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)  # (name, flags); "" = the unnamed single set
    scale: float = 1.0
    script_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (script, flags) appended to its runs
    threads: int = 1
    cpu_only: bool = True  # pass --device cpu (no GPU declared to Ray)
    build_datasets: bool = False


@dataclass(frozen=True)
class Job:
    id: str
    kind: Literal["dataset", "offline", "o2o"]
    script: str  # file name beside this one
    flags: tuple[str, ...]
    folder: str  # the run folder: results.json (offline, o2o), sweep.log, sweep.json
    needs: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()  # dataset jobs: the Minari ids they build


@dataclass(frozen=True)
class Outcome:
    status: Literal["done", "failed", "incomplete", "skipped"]
    detail: str = ""
    ran: bool = False  # run by this invocation
    wall_s: float | None = None


# ------------------------------------------------------------------ errors and the command line
def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr that names the fix, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def one_line_parse_error(box: str, prog: str) -> str:
    """The message of tyro's error box (its first section) on one line (as the scripts do)."""
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip().strip("│╭╮╰╯").strip() for line in box.splitlines()]
    sections: list[list[str]] = [[]]
    for row in rows[1:]:
        if row and set(row) <= set("─"):
            sections.append([])
        elif row:
            sections[-1].append(row)
    message = " ".join(sections[0]) or " ".join(r for r in rows if r and not set(r) <= set("─╭╮╰╯")) or "bad command line"
    return f"{message.rstrip('.')}; see {prog} --help"


def parse_cli(cls: type, argv: list[str] | None = None) -> Any:
    """tyro.cli whose parse errors are one line on stderr and exit 2; --help prints as usual."""
    buf, cols = io.StringIO(), os.environ.get("COLUMNS")
    try:
        os.environ["COLUMNS"] = "100000"  # no wrapping inside the error box
        with contextlib.redirect_stderr(buf):
            args = tyro.cli(cls, args=argv)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(buf.getvalue())
            raise
        fail(one_line_parse_error(buf.getvalue(), Path(sys.argv[0]).name))
    finally:
        if cols is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = cols
    return args


def split_named(items: tuple[str, ...], what: str) -> list[tuple[str, tuple[str, ...]]]:
    """["name=--a 1 --b", ...] -> [("name", ("--a", "1", "--b")), ...]."""
    out = []
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep:
            fail(f"{what} {item!r} is not NAME=FLAGS (e.g. \"refoff=--reference offline\")")
        try:
            out.append((name.strip(), tuple(shlex.split(flags))))
        except ValueError as e:
            fail(f"{what} {item!r}: {e}")
    return out


def make_grid(args: Args) -> Grid:
    """The grid the arguments describe (a preset's values where no explicit ones are given); exit 2 on bad input."""
    preset = PRESETS[args.preset] if args.preset else {}
    scripts = args.scripts or preset.get("scripts", ())
    envs, seeds = args.envs or preset.get("envs", ()), args.seeds or preset.get("seeds", (0,))
    modes = args.modes or preset.get("modes", ("ocr-cft", "naive"))
    if not scripts or not envs:
        fail("nothing to run: give --preset paper-mujoco, or --scripts and --envs")
    pairs = []
    for s in scripts:
        script, _, algo = s.partition(":")
        if script not in O2O_SCRIPTS:
            fail(f"--scripts: unknown script {script!r}; choose from {', '.join(O2O_SCRIPTS)}")
        algo = algo or PAPER_OFFLINE[script]
        if algo not in OFFLINE_ALGOS:
            fail(f"--scripts {s}: unknown offline algo {algo!r}; choose from {', '.join(OFFLINE_ALGOS)}")
        pairs.append((script, algo))
    for m in modes:
        if not any(m in MODE_FLAGS[s] for s, _ in pairs):
            known = sorted({k for s, _ in pairs for k in MODE_FLAGS[s]})
            fail(f"--modes: {m!r} is not a mode of {', '.join(s for s, _ in pairs)}; choose from {', '.join(known)}")
    for e in envs:
        if not ENV_RE.fullmatch(e):
            fail(f"--envs: {e!r} is not a D4RL-style name such as hopper-medium-v2 (levels: {', '.join(LEVELS)})")
    if any(s < 0 for s in seeds):
        fail("--seeds must be non-negative")
    flag_sets = split_named(args.flag_sets, "--flag-sets") or [("", ())]
    if args.flag_sets and not all(NAME_RE.fullmatch(n) for n, _ in flag_sets):
        fail("--flag-sets names may hold only letters, digits, '.' and '-', starting with a letter or digit")
    script_flags = split_named(args.flags, "--flags")
    for name, _ in script_flags:
        if name not in (*SCRIPTS, "o2o"):
            fail(f"--flags {name!r}: name a script ({', '.join(SCRIPTS)}) or o2o (all three o2o scripts)")
    if not (math.isfinite(args.scale) and args.scale > 0):
        fail(f"--scale must be a positive number, got {args.scale}")
    if not args.cpus_per_run > 0 or not args.gpus_per_run >= 0:
        fail("--cpus-per-run must be positive and --gpus-per-run non-negative")
    if args.address is not None and (args.num_cpus is not None or args.num_gpus is not None):
        fail("--num-cpus / --num-gpus size a local Ray instance; an existing cluster (--address) has its own")
    for what, items in (("--scripts", scripts), ("--modes", modes), ("--envs", envs), ("--seeds", seeds), ("--flag-sets", [n for n, _ in flag_sets])):
        if len(set(items)) != len(items):
            fail(f"{what} lists a value twice")
    return Grid(pairs=tuple(dict.fromkeys(pairs)), modes=tuple(modes), envs=tuple(envs), seeds=tuple(seeds), flag_sets=tuple(flag_sets),
                scale=args.scale, script_flags=tuple(script_flags), threads=max(1, math.floor(args.cpus_per_run)),
                cpu_only=args.gpus_per_run == 0, build_datasets=args.build_datasets)


# ------------------------------------------------------------------ the job graph (pure)
def dataset_store() -> Path:
    """The local Minari store, as minari finds it."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def dataset_exists(dataset_id: str) -> bool:
    """A dataset is in the store when its data folder is (what minari.load_dataset reads)."""
    return (dataset_store() / dataset_id / "data").exists()


def dataset_available(env: str, exists: Callable[[str], bool]) -> bool:
    """What the scripts would load for --env without downloading: the hosted Minari ids, or the local stand-in."""
    name, level = ENV_RE.fullmatch(env).groups()  # type: ignore[union-attr]
    hosted = [f"mujoco/{name}/{v}" for v in HOSTED_LEVELS.get(level, ())]
    return bool(hosted) and all(exists(i) for i in hosted) or exists(f"local/{name}/{level}-v0")


def extra_flags(grid: Grid, script: str) -> tuple[str, ...]:
    """--flags given for this script (and for all o2o scripts), in the order given."""
    return tuple(f for name, flags in grid.script_flags if name == script or (name == "o2o" and script in O2O_SCRIPTS) for f in flags)


def plan(grid: Grid, run_dir: Path, exists: Callable[[str], bool] = dataset_exists) -> list[Job]:
    """The grid as jobs in dependency order: dataset builds (with build_datasets, for missing datasets), offline runs
    (once per env x offline algo x seed), o2o runs. `exists` says whether a Minari id is in the store."""
    device = ("--device", "cpu") if grid.cpu_only else ()
    jobs: dict[str, Job] = {}
    dataset_job: dict[str, str] = {}  # env -> id of the job that builds its dataset
    if grid.build_datasets:
        missing: dict[str, list[str]] = {}
        for env in grid.envs:
            if not dataset_available(env, exists):
                name, level = ENV_RE.fullmatch(env).groups()  # type: ignore[union-attr]
                missing.setdefault(name, []).append(level)
        for name, levels in missing.items():
            job = Job(id=f"make_dataset/{name}", kind="dataset", script="make_dataset.py",
                      flags=("--env", f"{name}-{levels[0]}-v2", "--levels", *levels, "--out-dir", str(run_dir / "make_dataset"), *device,
                             *extra_flags(grid, "make_dataset")),
                      folder=str(run_dir / "make_dataset" / name), datasets=tuple(f"local/{name}/{lv}-v0" for lv in levels))
            jobs[job.id] = job
            dataset_job.update({f"{name}-{lv}-v2": job.id for lv in levels})
    steps = max(1, round(OFFLINE_STEPS * grid.scale))
    for env in grid.envs:
        for algo in dict.fromkeys(a for _, a in grid.pairs):
            for seed in grid.seeds:
                job = Job(id=f"offline/{algo}/{env}/seed{seed}", kind="offline", script="offline_pretrain.py",
                          flags=("--algo", algo, "--env", env, "--seed", str(seed), "--run-dir", str(run_dir), "--total-steps", str(steps),
                                 "--threads", str(grid.threads), *device, *extra_flags(grid, "offline_pretrain")),
                          folder=str(run_dir / "offline" / algo / env / f"seed{seed}"), needs=tuple(filter(None, [dataset_job.get(env)])))
                jobs[job.id] = job
    for script, algo in grid.pairs:
        for mode in (m for m in grid.modes if m in MODE_FLAGS[script]):
            for fs_name, fs_flags in grid.flag_sets:
                for env in grid.envs:
                    for seed in grid.seeds:
                        name = "_".join(filter(None, [algo, mode, fs_name, f"seed{seed}"]))
                        job = Job(id=f"{script}/{env}/{name}", kind="o2o", script=f"{script}.py",
                                  flags=("--env", env, "--seed", str(seed), "--offline-algo", algo, "--run-dir", str(run_dir), "--run-name", name,
                                         "--budget-scale", repr(grid.scale), "--threads", str(grid.threads), *device, *MODE_FLAGS[script][mode],
                                         *fs_flags, *extra_flags(grid, script)),
                                  folder=str(run_dir / script / env / name), needs=(f"offline/{algo}/{env}/seed{seed}",))
                        jobs[job.id] = job
    return list(jobs.values())


def skipped_modes(grid: Grid) -> list[str]:
    """'script: mode' pairs of the grid that a script does not have (left out by plan)."""
    return [f"{s}: {m}" for s, _ in grid.pairs for m in grid.modes if m not in MODE_FLAGS[s]]


# ------------------------------------------------------------------ the state of a job on disk
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(job: Job, exists: Callable[[str], bool] = dataset_exists) -> bool:
    """Finished: its datasets are in the store, or its results.json says finished."""
    if job.kind == "dataset":
        return all(exists(i) for i in job.datasets)
    res = read_json(Path(job.folder) / "results.json")
    return bool(res and res.get("finished") is True)


def last_attempt(job: Job) -> dict | None:
    """The sweep's record of the job's last attempt (sweep.json in its run folder)."""
    return read_json(Path(job.folder) / "sweep.json")


def log_path(job: Job) -> Path:
    return Path(job.folder) / "sweep.log"


def launch_flags(job: Job) -> tuple[str, ...]:
    """Flags that depend on the folder at launch: an offline run whose folder holds a checkpoint continues it."""
    if job.kind == "offline" and (Path(job.folder) / "checkpoint.pt").exists():
        return ("--resume",)
    return ()


def command(job: Job, python: str) -> list[str]:
    return [python, str(HERE / job.script), *job.flags, *launch_flags(job)]


def job_env(threads: int) -> dict[str, str]:
    """Environment variables a run gets on top of its worker's (Ray sets CUDA_VISIBLE_DEVICES for GPU tasks)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if os.environ.get("MINARI_DATASETS_PATH"):
        env["MINARI_DATASETS_PATH"] = str(Path(os.environ["MINARI_DATASETS_PATH"]).absolute())
    return env


def triage(job: Job, retry_failed: bool, exists: Callable[[str], bool] = dataset_exists) -> Outcome | None:
    """What a job needs before the sweep starts: an outcome (nothing to run) or None (run it)."""
    if is_done(job, exists):
        return Outcome("skipped", "finished earlier")
    last = last_attempt(job)
    if last and last.get("status") == "failed" and not retry_failed:
        return Outcome("failed", f"earlier attempt failed (exit {last.get('returncode')}), not retried without --retry-failed; log {log_path(job)}")
    return None


def last_line(path: Path) -> str:
    """The last line a run wrote to its log (the scripts' one-line error on a bad input), not the sweep's own."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip() and not ln.startswith("=== ")]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def classify(job: Job, result: dict, exists: Callable[[str], bool] = dataset_exists) -> Outcome:
    """The outcome of one attempt from its exit status and what it left on disk."""
    rc, wall = result.get("returncode"), result.get("wall_s")
    if rc == 0 and is_done(job, exists):
        return Outcome("done", "", True, wall)
    if rc is None or rc < 0:  # a signal (killed, OOM, preempted) or a lost worker: the next invocation resumes it
        why = f"killed by signal {-rc}" if rc is not None else f"worker lost ({result.get('error', '?')})"
        return Outcome("incomplete", f"{why}; rerun to resume; log {log_path(job)}", True, wall)
    if rc == 0:
        return Outcome("incomplete", f"exited before finishing; rerun to resume; log {log_path(job)}", True, wall)
    return Outcome("failed", f"exit {rc}: {last_line(log_path(job))}; log {log_path(job)}", True, wall)


def record(job: Job, outcome: Outcome, result: dict, cmd: list[str]) -> None:
    """sweep.json: the status of the job's last attempt, read by the next invocation (failed runs need --retry-failed)."""
    status = {"status": outcome.status, "returncode": result.get("returncode"), "wall_s": result.get("wall_s"),
              "command": cmd, "log": str(log_path(job)), "ended": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(job.folder) / "sweep.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------ running one job (inside a Ray task)
# The run dies with the process that started it (PR_SET_PDEATHSIG, Linux), so a killed sweep or Ray worker never
# leaves a script running that a rerun would collide with; then the unchanged script replaces this interpreter.
DEATH_PRELUDE = ("import ctypes, os, signal, sys\n"
                 "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                 "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
                 "os.execvp(sys.argv[2], sys.argv[2:])\n")


def execute(cmd: list[str], log: str, env: dict[str, str], cwd: str) -> dict:
    """Run one command with its output appended to `log`; {"returncode", "wall_s"}. Cancelled: the run is stopped."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    full = [cmd[0], "-c", DEATH_PRELUDE, str(os.getpid()), *cmd] if sys.platform.startswith("linux") else cmd
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}: {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, **env})
        try:
            rc = proc.wait()
        except BaseException:  # cancelled: stop the run, which keeps its checkpoints for a resume
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        f.write(f"=== exit {rc} after {time.time() - t0:.0f} s\n")
    return {"returncode": rc, "wall_s": time.time() - t0}


class Executor(Protocol):
    def submit(self, cmd: list[str], log: str, env: dict[str, str]) -> Any: ...
    def wait(self, handles: list[Any]) -> tuple[Any, dict]: ...
    def cancel(self, handles: list[Any]) -> None: ...


class RayExecutor:
    """Jobs as Ray tasks with declared resources: a local instance, or an existing cluster (--address)."""

    def __init__(self, args: Args):
        import ray

        self.ray, self.started = ray, False
        if not ray.is_initialized():
            try:
                ray.init(**ray_init_kwargs(args))
            except (ConnectionError, RuntimeError, ValueError) as e:
                fail(f"cannot {'join the Ray cluster at ' + args.address if args.address else 'start a local Ray instance'}: "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                     + ("; start one with `ray start --head` (see README)" if args.address else ""))
            self.started = True
        have = ray.cluster_resources()
        if args.cpus_per_run > have.get("CPU", 0) or args.gpus_per_run > have.get("GPU", 0):
            self.close()
            fail(f"a run declares {args.cpus_per_run} CPU and {args.gpus_per_run} GPU but the Ray cluster has "
                 f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU in all; lower --cpus-per-run / --gpus-per-run")
        if __name__ != "__main__":  # imported (tests, notebooks): ship this module's code by value, workers may not import it
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.task = ray.remote(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run, max_retries=0)(execute)

    def submit(self, cmd: list[str], log: str, env: dict[str, str]) -> Any:
        return self.task.remote(cmd, log, env, str(HERE))

    def wait(self, handles: list[Any]) -> tuple[Any, dict]:
        (ref,), _ = self.ray.wait(handles, num_returns=1)
        try:
            return ref, self.ray.get(ref)
        except Exception as e:  # the worker died (node lost, OOM-killed): the run is resumable
            return ref, {"returncode": None, "error": type(e).__name__}

    def cancel(self, handles: list[Any]) -> None:
        for ref in handles:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def ray_init_kwargs(args: Args) -> dict:
    """ray.init arguments: join --address, else a local instance (no dashboard)."""
    if args.address:
        return {"address": args.address, "log_to_driver": False}
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if args.num_cpus is not None:
        kw["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        kw["num_gpus"] = args.num_gpus
    return kw


# ------------------------------------------------------------------ the scheduler
def dependency_state(job: Job, outcomes: dict[str, Outcome], jobs: dict[str, Job], exists: Callable[[str], bool]) -> tuple[str, str]:
    """("ready" | "wait" | "blocked", reason): ready once everything it needs is finished (on disk), blocked when a
    need has ended without finishing."""
    for need in job.needs:
        if need not in outcomes:
            return "wait", ""
        if not is_done(jobs[need], exists):
            return "blocked", f"needs {need}, which is {outcomes[need].status}"
    return "ready", ""


def schedule(jobs: list[Job], executor: Executor, python: str, threads: int, retry_failed: bool = False,
             exists: Callable[[str], bool] = dataset_exists, outcomes: dict[str, Outcome] | None = None,
             progress: Callable[[str], None] = print) -> dict[str, Outcome]:
    """Run every job once what it needs is finished; a failure only skips the jobs that need it. `outcomes`: the
    triage (jobs that will not run)."""
    by_id = {j.id: j for j in jobs}
    outcomes = dict(outcomes) if outcomes is not None else {j.id: o for j in jobs if (o := triage(j, retry_failed, exists))}
    waiting = [j for j in jobs if j.id not in outcomes]
    running: dict[Any, tuple[Job, list[str]]] = {}
    total, ended, env = len(waiting), 0, job_env(threads)
    try:
        while waiting or running:
            changed = True
            while changed:  # submit what is ready, skip what can no longer run (and, transitively, what needs it)
                changed = False
                for job in list(waiting):
                    state, why = dependency_state(job, outcomes, by_id, exists)
                    if state == "blocked":
                        outcomes[job.id], changed = Outcome("skipped", why), True
                        waiting.remove(job)
                        ended += 1
                        progress(f"[{ended}/{total}] skipped    {job.id}: {why}")
                    elif state == "ready":
                        cmd = command(job, python)
                        Path(job.folder).mkdir(parents=True, exist_ok=True)
                        running[executor.submit(cmd, str(log_path(job)), env)] = (job, cmd)
                        waiting.remove(job)
            if not running:
                break
            handle, result = executor.wait(list(running))
            job, cmd = running.pop(handle)
            outcome = classify(job, result, exists)
            record(job, outcome, result, cmd)
            outcomes[job.id] = outcome
            ended += 1
            progress(f"[{ended}/{total}] {outcome.status:<10} {job.id} ({outcome.wall_s or 0:.0f} s)"
                     f"{': ' + outcome.detail if outcome.detail else ''}  | running {len(running)}, waiting {len(waiting)}")
    except BaseException:
        executor.cancel(list(running))
        raise
    for job in waiting:  # a dependency cycle cannot arise from plan(); kept for safety
        outcomes[job.id] = Outcome("skipped", "needs a job that never ran")
    return outcomes


# ------------------------------------------------------------------ output
def table(jobs: list[Job], outcomes: dict[str, Outcome]) -> str:
    """The end-of-sweep table: one row per job, failed first, then incomplete, done, skipped; then the counts."""
    order = {"failed": 0, "incomplete": 1, "done": 2, "skipped": 3}
    rows = sorted(((outcomes[j.id], j) for j in jobs if j.id in outcomes), key=lambda r: order[r[0].status])
    width = max((len(j.id) for _, j in rows), default=3)
    lines = [f"{'status':<10}  {'run':<{width}}  detail", f"{'-' * 10}  {'-' * width}  ------"]
    for o, j in rows:
        detail = o.detail or (f"{o.wall_s:.0f} s, {j.folder}" if o.wall_s is not None else j.folder)
        lines.append(f"{o.status:<10}  {j.id:<{width}}  {detail}")
    counts = {s: sum(o.status == s for o in outcomes.values()) for s in order}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (ran {sum(o.ran for o in outcomes.values())} now)")
    return "\n".join(lines)


def dry_run(jobs: list[Job], python: str, retry_failed: bool) -> None:
    """Each job, what the sweep would do with it and its command."""
    for job in jobs:
        o = triage(job, retry_failed)
        state = f"{o.status}: {o.detail}" if o else "run" + (f" after {', '.join(job.needs)}" if job.needs else "")
        print(f"# {job.id} [{state}]\n{shlex.join(command(job, python))}")


def main(args: Args) -> dict[str, Outcome]:
    """Plan the grid, run what is not finished on Ray, print the table; the outcome of every job."""
    grid = make_grid(args)
    run_dir = Path(args.run_dir).absolute()
    jobs = plan(grid, run_dir)
    for pair in skipped_modes(grid):
        print(f"note: left out {pair} (no such mode)")
    if not grid.build_datasets:
        missing = [e for e in grid.envs if not dataset_available(e, dataset_exists)]
        if missing:
            print(f"note: no dataset in {dataset_store()} for {', '.join(missing)}: the runs will download the hosted data "
                  f"or fail; --build-datasets builds them with make_dataset.py")
    if args.dry_run:
        dry_run(jobs, args.python, args.retry_failed)
        return {}
    outcomes = {j.id: o for j in jobs if (o := triage(j, args.retry_failed))}
    todo = len(jobs) - len(outcomes)
    print(f"{len(jobs)} runs: {todo} to run, {len(jobs) - todo} finished or failed earlier; run folder {run_dir}")
    if todo:
        executor = RayExecutor(args)
        try:
            res = ray_resources(executor)
            print(f"Ray: {res}; each run declares {args.cpus_per_run:g} CPU, {args.gpus_per_run:g} GPU")
            outcomes = schedule(jobs, executor, args.python, grid.threads, args.retry_failed, outcomes=outcomes)
        except KeyboardInterrupt:
            print("interrupted: the runs were stopped; rerun the same command to resume them", file=sys.stderr)
            raise SystemExit(130)
        finally:
            executor.close()
    print(table(jobs, outcomes))
    return outcomes


def ray_resources(executor: RayExecutor) -> str:
    have = executor.ray.cluster_resources()
    return f"{have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU in {len(executor.ray.nodes())} node(s)"


if __name__ == "__main__":
    result = main(parse_cli(Args))
    sys.exit(1 if any(o.status == "failed" for o in result.values()) else 0)
