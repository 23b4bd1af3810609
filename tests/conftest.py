"""Shared fixtures: a tiny hopper dataset built by make_dataset.py and tiny offline checkpoints of every method.

Everything lives under pytest's tmp dirs; MINARI_DATASETS_PATH points there, so no test touches ~/.minari.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

# one thread per process, subprocesses included (scripts, Ray workers, compile workers inherit it): the networks are
# tiny, and on a 2-core machine two 2-thread processes slow each other down many times over
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny networks: threads cost more than they give


def load_script(name: str):
    """Import a top-level script (offline_pretrain, o2o_sac, ...) as a module."""
    return importlib.import_module(name)


def load_benchmark(name: str):
    """Import a script of benchmarks/ (eval_policy, policy_sensitivity, ...) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def minari_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dataset(minari_home, tmp_path_factory) -> dict:
    """local/hopper/medium-v0 and medium-replay-v0 from a few hundred SAC steps (seconds)."""
    md = load_script("make_dataset")
    out = tmp_path_factory.mktemp("make_dataset")
    result = md.main(md.Args(env="hopper-medium-v2", levels=("medium", "medium-replay"), train_steps=1500, learning_starts=500,
                             snapshot_every=500, snapshot_episodes=2, medium_fraction=0.0, size=3000, num_envs=4,
                             out_dir=str(out), device="cpu"))
    return {"home": minari_home, "snapshots": Path(result["snapshot_dir"]), "result": result}


@pytest.fixture
def same_random():
    """Inductor draws random numbers with eager's generator, so a compiled update sees the same noise as the eager one."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def float64():
    """Compile-equals-eager comparisons in float64: in float32, Adam's first (sign-like) steps turn last-bit differences
    of reordered reductions into lr-sized ones, which would force a tolerance loose enough to hide real bugs."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


TINY_OFFLINE = ["--total-steps", "60", "--eval-every", "30", "--log-every", "10", "--eval-episodes", "2", "--batch-size", "64",
                "--cql-n-actions", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def offline_checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint of every offline method (and a deterministic BC), keyed by name."""
    import tyro

    op = load_script("offline_pretrain")
    run_dir = tmp_path_factory.mktemp("offline_runs")
    paths = {}
    for name, extra in {"cql": [], "iql": [], "td3_bc": [], "bc": [], "bc_det": ["--bc-family", "deterministic"]}.items():
        algo = "bc" if name == "bc_det" else name
        rd = run_dir / name
        res = op.main(tyro.cli(op.Args, args=["--algo", algo, "--env", "hopper-medium-v2", "--run-dir", str(rd), *TINY_OFFLINE, *extra]))
        paths[name] = Path(res["checkpoint"])
    return paths


def run_o2o(module, tiny: Sequence[str], ckpt: Path, run_dir: Path, *extra: str) -> dict:
    """module.main (an o2o script, from load_script) on the tiny hopper dataset from the checkpoint `ckpt` into
    `run_dir`, with the script's tiny flags `tiny`, then `extra` (last: they win)."""
    import tyro

    return module.main(tyro.cli(module.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(ckpt), "--run-dir", str(run_dir),
                                                    *tiny, *extra]))


def _scalar_events(run_dir: Path | str) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # every point, none sampled away
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def scalars(run_dir: Path | str) -> dict[str, list[float]]:
    """Every tensorboard scalar of the run folder: tag -> its values in logged order."""
    return {tag: [e.value for e in ev] for tag, ev in _scalar_events(run_dir).items()}


def flat_tensors(tree, prefix: str = "") -> dict:
    """Every tensor of a nested dict / list (a checkpoint), keyed by its path: two checkpoints are the same run when
    these match key for key and tensor for tensor."""
    import torch

    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = {prefix: tree} if torch.is_tensor(tree) else {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}/{k}"))
    return out


def scalar_steps(run_dir: Path | str) -> dict[str, list[int]]:
    """Every tensorboard scalar of the run folder: tag -> the steps it was logged at, in logged order."""
    return {tag: [e.step for e in ev] for tag, ev in _scalar_events(run_dir).items()}


# the value of tensorboard's charts/phase for each phase: one table for the three o2o scripts (their PHASE_IDS)
PHASE_IDS = {"offline": 0, "distill": 1, "reevaluate": 2, "align": 3, "opt_collect": 4, "opt_pretrain": 5, "pre_sample": 6, "online": 7}


def phase_marks(run_dir: Path | str) -> list[tuple[int, str]]:
    """charts/phase as (env step, phase name) pairs in logged order."""
    names = {v: k for k, v in PHASE_IDS.items()}
    return [(e.step, names[int(e.value)]) for e in _scalar_events(run_dir)["charts/phase"]]


def wandb_offline(monkeypatch, home: Path) -> None:
    """Weights & Biases in offline mode, every file of its own under `home` (nothing leaves the machine)."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_offline_run(out: Path) -> tuple[Path, bytes]:
    """The one offline wandb run of the run folder `out` (in <parent>/wandb/, see start_tracking) and its history file."""
    runs = list((out.parent / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0], next(runs[0].glob("run-*.wandb")).read_bytes()


# results.json, schema_version 1: the keys every o2o script writes, with their types (README, "results.json")
RESULTS_KEYS = {
    "schema_version": int, "script": str, "algo": str, "method": str, "mode": dict, "env": str, "dataset_ids": list, "local_standin": bool,
    "seed": int, "offline_algo": str, "offline_checkpoint": str, "offline_score": float, "distilled_score": (float, type(None)),
    "aligned_score": (float, type(None)), "online_start_score": float, "min_first_tenth": float, "final_score": (float, type(None)),
    "best_score": float, "evals_in_first_tenth": int, "online_steps": int, "online_steps_done": int, "budget_scale": float, "curve": list,
    "wall_clock_s": dict, "evaluation_s": float, "evaluation_share": (float, type(None)), "finished": bool, "versions": dict, "git_commit": (str, type(None)), "run_dir": str,
}


def assert_results_schema(res: dict, script: str) -> None:
    """`res` (and the results.json in its run folder) follow schema 1, and its summary numbers follow from its curve."""
    import json

    saved = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    for r in (res, saved):
        for k, t in RESULTS_KEYS.items():
            assert isinstance(r[k], t), (k, type(r[k]))
        assert r["schema_version"] == 1 and r["script"] == script
        assert set(r["versions"]) == {"python", "torch", "gymnasium", "mujoco", "minari", "numpy"}
        assert r["wall_clock_s"]["total"] == pytest.approx(sum(v for k, v in r["wall_clock_s"].items() if k != "total"))
        curve = r["curve"]
        assert all(set(p) == {"phase", "step", "normalized_score", "return"} for p in curve)
        assert curve[0]["phase"] == "offline" and curve[0]["normalized_score"] == r["offline_score"]
        online = [p for p in curve if p["phase"] in ("online", "pre_sample")]
        assert online[0]["normalized_score"] == r["online_start_score"]  # the first online entry: where online starts
        tenth = [p["normalized_score"] for p in online[1:] if p["step"] <= r["online_steps"] / 10]
        assert r["min_first_tenth"] == min([r["online_start_score"], *tenth]) and r["evals_in_first_tenth"] == len(tenth)
        if r["finished"]:
            assert r["final_score"] == online[-1]["normalized_score"] and r["online_steps_done"] == r["online_steps"]
    assert json.loads(json.dumps(res)) == saved


# --- fork server: run a top-level script as `python script.py ...` would, minus the interpreter start and imports
# The server is a plain interpreter (no pytest) that imports the heavy modules once; each run forks a child that
# sets argv, environment, cwd and fds 1-2, executes the script as __main__ and exits as the interpreter would
# (SystemExit's code; an uncaught exception prints its traceback through sys.excepthook and gives status 1).
# What it cannot see: output printed while those modules are first imported, which the server prints (once) instead;
# keep a few real-interpreter runs next to forked ones.

_FORK_SERVER_SRC = r'''
import atexit, builtins, hashlib, importlib, importlib.machinery, os, pickle, signal, sys, threading, time, traceback, types, weakref

reply = os.fdopen(os.dup(1), "wb")                  # replies go here; fd 1 itself is the server's chatter
requests = os.fdopen(os.dup(0), "rb")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(2, 1)

for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except ImportError:  # only a head start: a run that needs it imports it itself
        pass
import dataclasses, io, torch, tyro
torch.set_num_threads(1)


@dataclasses.dataclass
class _Warm:
    x: int = 0


# what the scripts import lazily on their first tyro.cli, torch.load and torch.optim (torch._dynamo, seconds)
tyro.cli(_Warm, args=[])
_buf = io.BytesIO()
torch.save({"x": torch.zeros(1)}, _buf)
_buf.seek(0)
torch.load(_buf, weights_only=True)
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
del _Warm, _buf
# torch's operator libraries are torn down by weakref finalizers at exit (~0.1 s a process); a forked child skips
# those of the server's imports (they print nothing), and runs every finalizer and atexit handler its script adds
for f in list(weakref.finalize._registry):
    if getattr(f.peek() and f.peek()[1], "__module__", "").startswith("torch"):
        f.atexit = False
sys.stdout.flush(); sys.stderr.flush()
compiled = {}  # (path, sha1 of the source) -> code: the scripts are compiled once, not per run
pickle.dump(("ready", os.getpid(), threading.active_count()), reply); reply.flush()


def exit_status(code):
    """What the interpreter makes of SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def run_as_main(script, code):
    """What `python script` does with the script: a fresh __main__ module, sys.path[0] its folder."""
    if code is None:  # did not compile in the server: compile here, so the error is the child's, as the interpreter's
        with open(script, "rb") as fh:
            code = compile(fh.read(), script, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=script, __cached__=None, __package__=None, __spec__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", script))
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def child(script, code, argv, env, cwd, out_path, err_path, nice):
    rc = 1
    try:
        os.setpgid(0, 0)
        if nice:
            os.nice(nice)
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [script, *argv]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            run_as_main(script, code)
            rc = 0
        except SystemExit as e:
            rc = exit_status(e.code)
        except BaseException:
            t, v, tb = sys.exc_info()
            while tb is not None and tb.tb_frame.f_code in (child.__code__, run_as_main.__code__):
                tb = tb.tb_next  # the traceback starts in the script, as the interpreter's does
            sys.excepthook(t, v.with_traceback(tb), tb)
            rc = 1
        threading._shutdown()                       # as the interpreter does at exit: join non-daemon threads,
        atexit._run_exitfuncs()                     # then run atexit handlers
    except BaseException:                           # the harness itself failed: say so on the child's stderr
        traceback.print_exc()
        rc = 125
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def code_of(script):
    try:
        with open(script, "rb") as fh:
            source = fh.read()
        key = (script, hashlib.sha1(source).hexdigest())
        if key not in compiled:
            compiled[key] = compile(source, script, "exec", dont_inherit=True)
        return compiled[key]
    except BaseException:
        return None


def wait(pid, deadline):
    """Wait for the child; past the deadline kill its process group. The group is killed before the child is reaped
    (so its id cannot have been reused), which also ends anything the child left running."""
    nap, timed_out = 0.001, False
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(nap)
        nap = min(nap * 2, 0.02)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), timed_out


running = {}  # pid -> deadline of the children started and not yet waited for
while True:
    try:
        req = pickle.load(requests)
    except EOFError:
        break
    if req[0] == "start":
        script, argv, env, cwd, out_path, err_path, timeout, nice = req[1:]
        code = code_of(script)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(script, code, argv, env, cwd, out_path, err_path, nice)
        running[pid] = time.monotonic() + timeout
        pickle.dump(pid, reply); reply.flush()
    elif req[0] in ("wait", "cancel"):
        pid = req[1]
        deadline = running.pop(pid)
        pickle.dump(wait(pid, deadline if req[0] == "wait" else 0), reply); reply.flush()
for pid in running:  # the client left without waiting: end those runs
    wait(pid, 0)
reply.flush(); sys.stderr.flush()
os._exit(0)  # skip the interpreter's teardown of torch (seconds)
'''

# what the top-level scripts import at module level, and what most runs import later (Minari's HDF5 storage, MuJoCo)
FORK_SERVER_PRELOAD = ("numpy", "torch", "torch.nn", "torch.nn.functional", "torch.func", "torch.utils.tensorboard", "gymnasium",
                       "gymnasium.envs.registration", "minari", "minari.namespace", "minari.data_collector", "tyro", "tqdm", "h5py",
                       "mujoco", "typeguard", "minari.dataset._storages.hdf5_storage", "PIL.Image")


class ForkServer:
    """run(script, argv, env=..., cwd=..., timeout=...) -> subprocess.CompletedProcess (text), like
    subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, ...) but from a forked, preloaded
    interpreter (start/wait: the same in two steps, so that runs can overlap). A run past its timeout is killed (with
    its process group) and raises subprocess.TimeoutExpired."""

    def __init__(self, workdir: Path, preload: tuple[str, ...] = FORK_SERVER_PRELOAD):
        import subprocess

        self.workdir, self.n = Path(workdir), 0
        self.log = self.workdir / "server_stderr.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER_SRC, ",".join(preload)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.workdir)
        import pickle

        try:
            tag, self.pid, self.threads = pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"fork server did not start:\n{self.log.read_text()[-3000:]}") from None
        assert tag == "ready"

    def import_chatter(self) -> str:
        """What the server printed while importing the preloaded modules (a real run would print it too)."""
        return self.log.read_text()

    def run(self, script, argv, env: dict[str, str], cwd, timeout: float = 300):
        return self.wait(self.start(script, argv, env=env, cwd=cwd, timeout=timeout))

    def _call(self, req):
        import pickle

        if self.proc.poll() is not None:
            raise RuntimeError(f"fork server is gone (status {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        pickle.dump(req, self.proc.stdin)
        self.proc.stdin.flush()
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"fork server died:\n{self.log.read_text()[-3000:]}") from None

    def start(self, script, argv, env: dict[str, str], cwd, timeout: float = 300, nice: int = 0) -> tuple:
        """Start a run and return at once; wait(handle) for its result. Runs started together run in parallel; `nice`
        lowers a background run's priority, so that it takes the CPU the foreground leaves."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        cmd = [sys.executable, str(script), *map(str, argv)]
        pid = self._call(("start", str(script), [str(a) for a in argv], dict(env), str(cwd), str(out), str(err), float(timeout), int(nice)))
        return pid, cmd, out, err, timeout

    def wait(self, handle: tuple):
        import locale
        import subprocess

        pid, cmd, out, err, timeout = handle
        rc, timed_out = self._call(("wait", pid))
        enc = locale.getpreferredencoding(False)
        text = [(p.read_bytes() if p.exists() else b"").decode(enc).replace("\r\n", "\n").replace("\r", "\n") for p in (out, err)]
        for p in (out, err):
            p.unlink(missing_ok=True)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=text[0], stderr=text[1])
        return subprocess.CompletedProcess(cmd, rc, stdout=text[0], stderr=text[1])

    def cancel(self, handle: tuple) -> None:
        """Kill a started run (and its process group) and forget it."""
        self._call(("cancel", handle[0]))
        for p in handle[2:4]:
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    """A ForkServer for this module's script runs, started once."""
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.close()
