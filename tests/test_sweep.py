"""sweep.py: the job graph of a grid (pure), the scheduler with a scripted executor (no Ray), a run dying with its
parent, the command line, and a tiny real sweep on a local Ray instance (offline + o2o runs on the fixture dataset,
a failing run, a stopped run resumed, a rerun that skips everything, --retry-failed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_OFFLINE, load_script

sweep = load_script("sweep")
report = load_script("report")

# o2o_sac writes online.pt at episode ends: 400 env steps hold a few episodes of the fixture's weak policies
TINY_SAC = ["--reevaluate-steps", "20", "--align-steps", "10", "--online-steps", "500", "--learning-starts", "10", "--utd", "1",
            "--eval-every", "250", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--early-evals", "1", "--align-eval-every", "0", "--batch-size", "32",
            "--log-every", "100", "--checkpoint-every", "10", "--distill-steps", "20"]


def grid(**kw) -> "sweep.Grid":
    return sweep.make_grid(sweep.Args(**kw))


def by_id(jobs: list) -> dict:
    return {j.id: j for j in jobs}


# ------------------------------------------------------------------ the job graph
def test_paper_preset_graph(tmp_path):
    jobs = sweep.plan(grid(preset="paper-mujoco", scale=0.02), tmp_path, exists=lambda i: True)
    offline = [j for j in jobs if j.kind == "offline"]
    o2o = [j for j in jobs if j.kind == "o2o"]
    # 3 offline algos x 6 datasets x 5 seeds, each once; 3 scripts x 2 modes x 6 datasets x 5 seeds
    assert len(offline) == 90 and len(o2o) == 180 and len(jobs) == 270 and len(by_id(jobs)) == 270
    ids = by_id(jobs)
    seen: set[str] = set()
    for j in jobs:  # dependency order, and every need is a job of the plan
        assert all(n in seen for n in j.needs)
        seen.add(j.id)
    pair = {"o2o_sac": "cql", "o2o_td3": "td3_bc", "o2o_ppo": "iql"}
    for j in o2o:
        script = j.script.removesuffix(".py")
        env, seed = j.flags[j.flags.index("--env") + 1], j.flags[j.flags.index("--seed") + 1]
        assert j.needs == (f"offline/{pair[script]}/{env}/seed{seed}",)
        need = ids[j.needs[0]]
        assert need.flags[need.flags.index("--algo") + 1] == pair[script] and need.flags[need.flags.index("--seed") + 1] == seed
        assert j.flags[j.flags.index("--budget-scale") + 1] == "0.02" and "--threads" in j.flags
        name = j.flags[j.flags.index("--run-name") + 1]
        assert j.folder == str(tmp_path / script / env / name)
        naive = name.split("_")[-2] == "naive"
        assert ("--no-reevaluate" in j.flags) == naive and ("--no-constraint" in j.flags) == naive
        assert ("--no-align" in j.flags) == (naive and script != "o2o_ppo")  # O2PPO has no alignment phase
    for j in offline:
        assert j.flags[j.flags.index("--total-steps") + 1] == "20000" and j.needs == ()
        assert j.folder == str(tmp_path / "offline" / j.id.split("/", 1)[1])
    assert not any(j.kind == "dataset" for j in jobs)


def test_build_datasets_adds_missing_datasets_only(tmp_path):
    have = {"local/hopper/medium-v0", "mujoco/halfcheetah/medium-v0"}
    g = grid(scripts=("o2o_td3",), modes=("ocr-cft",), seeds=(0,), build_datasets=True,
             envs=("hopper-medium-v2", "hopper-medium-replay-v2", "walker2d-medium-v2", "walker2d-medium-replay-v2", "halfcheetah-medium-v2"))
    jobs = by_id(sweep.plan(g, tmp_path, exists=lambda i: i in have))
    assert [i for i in jobs if i.startswith("make_dataset")] == ["make_dataset/hopper", "make_dataset/walker2d"]
    assert jobs["make_dataset/hopper"].datasets == ("local/hopper/medium-replay-v0",)
    assert jobs["make_dataset/walker2d"].datasets == ("local/walker2d/medium-v0", "local/walker2d/medium-replay-v0")
    w = jobs["make_dataset/walker2d"].flags
    assert w[w.index("--levels") + 1: w.index("--levels") + 3] == ("medium", "medium-replay")
    assert jobs["offline/td3_bc/hopper-medium-v2/seed0"].needs == ()  # in the store
    assert jobs["offline/td3_bc/hopper-medium-replay-v2/seed0"].needs == ("make_dataset/hopper",)
    assert jobs["offline/td3_bc/walker2d-medium-v2/seed0"].needs == ("make_dataset/walker2d",)
    assert jobs["offline/td3_bc/halfcheetah-medium-v2/seed0"].needs == ()  # the hosted dataset is there
    assert jobs["o2o_td3/walker2d-medium-v2/td3_bc_ocr-cft_seed0"].needs == ("offline/td3_bc/walker2d-medium-v2/seed0",)
    g_off = grid(scripts=("o2o_td3",), envs=("walker2d-medium-v2",))
    assert not any(j.kind == "dataset" for j in sweep.plan(g_off, tmp_path, exists=lambda i: False))


def test_flag_sets_pairs_modes_and_script_flags(tmp_path):
    g = grid(scripts=("o2o_sac:iql", "o2o_ppo"), modes=("ocr-cft", "porl"), envs=("hopper-medium-v2",), seeds=(3,),
             flag_sets=("refbest=", "refoff=--reference offline"), flags=("o2o=--eval-episodes 2", "o2o_sac=--utd 5",
                                                                         "offline_pretrain=--total-steps 7"), scale=0.5)
    jobs = by_id(sweep.plan(g, tmp_path, exists=lambda i: True))
    assert set(jobs) == {"offline/iql/hopper-medium-v2/seed3", "o2o_sac/hopper-medium-v2/iql_ocr-cft_refbest_seed3",
                         "o2o_sac/hopper-medium-v2/iql_ocr-cft_refoff_seed3", "o2o_sac/hopper-medium-v2/iql_porl_refbest_seed3",
                         "o2o_sac/hopper-medium-v2/iql_porl_refoff_seed3", "o2o_ppo/hopper-medium-v2/iql_ocr-cft_refbest_seed3",
                         "o2o_ppo/hopper-medium-v2/iql_ocr-cft_refoff_seed3"}  # porl is O2SAC's only; one offline run for both
    assert sweep.skipped_modes(g) == ["o2o_ppo: porl"]
    f = jobs["o2o_sac/hopper-medium-v2/iql_porl_refoff_seed3"].flags
    # flags given last override the sweep's own (the scripts' parsers keep the last value)
    assert f[-8:] == ("--critic-init", "scratch", "--reference", "offline", "--eval-episodes", "2", "--utd", "5")
    assert "--utd" not in jobs["o2o_ppo/hopper-medium-v2/iql_ocr-cft_refoff_seed3"].flags
    off = jobs["offline/iql/hopper-medium-v2/seed3"].flags
    assert off[-2:] == ("--total-steps", "7") and off[off.index("--total-steps") + 1] == "500000"
    assert jobs["o2o_sac/hopper-medium-v2/iql_ocr-cft_refbest_seed3"].flags[-4:] == ("--eval-episodes", "2", "--utd", "5")


@pytest.mark.parametrize("kw, message", [
    ({}, "nothing to run"),
    ({"scripts": ("o2o_foo",), "envs": ("hopper-medium-v2",)}, "unknown script"),
    ({"scripts": ("o2o_sac:sac",), "envs": ("hopper-medium-v2",)}, "unknown offline algo"),
    ({"scripts": ("o2o_ppo",), "modes": ("porl",), "envs": ("hopper-medium-v2",)}, "not a mode"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-v2",)}, "D4RL-style"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "flag_sets": ("--reference offline",)}, "NAME=FLAGS"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "flag_sets": ("a_b=",)}, "names may hold"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "flags": ("sac=--utd 5",)}, "name a script"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "scale": 0.0}, "--scale"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "seeds": (0, 0)}, "twice"),
    ({"scripts": ("o2o_sac",), "envs": ("hopper-medium-v2",), "address": "auto", "num_cpus": 2}, "local Ray instance"),
])
def test_bad_grid_exits_2(kw, message, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.make_grid(sweep.Args(**kw))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_offline_run_with_a_checkpoint_is_resumed(tmp_path):
    jobs = by_id(sweep.plan(grid(scripts=("o2o_ppo",), envs=("hopper-medium-v2",)), tmp_path, exists=lambda i: True))
    off, o2o = jobs["offline/iql/hopper-medium-v2/seed0"], jobs["o2o_ppo/hopper-medium-v2/iql_naive_seed0"]
    assert "--resume" not in sweep.command(off, "python")
    Path(off.folder).mkdir(parents=True)
    (Path(off.folder) / "checkpoint.pt").write_bytes(b"x")  # killed mid-way: a checkpoint, no finished results.json
    assert sweep.command(off, "python")[-1] == "--resume"
    assert "--resume" not in sweep.command(o2o, "python")  # the o2o scripts resume on their own


def test_ray_init_local_by_default_or_join_a_cluster():
    assert sweep.ray_init_kwargs(sweep.Args(num_cpus=2)) == {"include_dashboard": False, "log_to_driver": False, "num_cpus": 2}
    assert sweep.ray_init_kwargs(sweep.Args(address="auto"))["address"] == "auto"
    assert "address" not in sweep.ray_init_kwargs(sweep.Args())


# ------------------------------------------------------------------ the scheduler, with a scripted executor
class Scripted:
    """Runs nothing: plays each job's part from `script` (ok / fail / kill / stop) in submission order, and records
    whether a job was submitted before what it needs had finished."""

    def __init__(self, jobs: list, script: dict[str, str]):
        self.jobs = by_id(jobs)
        self.by_folder = {j.folder: j for j in jobs}
        self.script, self.queue, self.submitted, self.early = script, [], [], []

    def submit(self, cmd, log, env):
        job = self.by_folder[str(Path(log).parent)]
        self.early += [(job.id, n) for n in job.needs if not sweep.is_done(self.jobs[n])]
        self.submitted.append(job.id)
        self.queue.append(job.id)
        return job.id

    def wait(self, handles):
        jid = next(h for h in self.queue if h in handles)
        self.queue.remove(jid)
        job, part = self.jobs[jid], self.script.get(jid, "ok")
        folder = Path(job.folder)
        with open(folder / "sweep.log", "a") as f:
            f.write("=== attempt\n" + ("error: something is wrong with this run\n" if part == "fail" else "") + "=== exit\n")
        if part in ("ok", "stop"):
            (folder / "results.json").write_text(json.dumps({"schema_version": 1, "finished": part == "ok"}))
        return jid, {"returncode": {"ok": 0, "stop": 0, "fail": 2, "kill": -9}[part], "wall_s": 0.0}

    def cancel(self, handles):
        pass


def two_env_jobs(tmp_path) -> list:
    g = grid(scripts=("o2o_sac",), modes=("ocr-cft", "naive"), envs=("hopper-medium-v2", "walker2d-medium-v2"), seeds=(0,))
    return sweep.plan(g, tmp_path, exists=lambda i: True)


def run(jobs, script, **kw):
    ex = Scripted(jobs, script)
    out = sweep.schedule(jobs, ex, "python", 1, progress=lambda line: None, **kw)
    return out, ex


def test_schedule_waits_for_needs_and_a_failure_only_skips_its_dependents(tmp_path):
    jobs = two_env_jobs(tmp_path)
    out, ex = run(jobs, {"offline/cql/walker2d-medium-v2/seed0": "fail"})
    assert ex.early == []  # nothing started before what it needs had finished
    assert len(ex.submitted) == 4  # both offline runs, then hopper's two o2o runs
    assert out["offline/cql/walker2d-medium-v2/seed0"].status == "failed"
    assert "error: something is wrong with this run" in out["offline/cql/walker2d-medium-v2/seed0"].detail
    assert "sweep.log" in out["offline/cql/walker2d-medium-v2/seed0"].detail
    for name in ("cql_ocr-cft_seed0", "cql_naive_seed0"):
        assert out[f"o2o_sac/hopper-medium-v2/{name}"].status == "done"
        skipped = out[f"o2o_sac/walker2d-medium-v2/{name}"]
        assert skipped.status == "skipped" and "offline/cql/walker2d-medium-v2/seed0" in skipped.detail and "failed" in skipped.detail
    table = sweep.table(jobs, out)
    assert "1 failed" in table and "3 done" in table and "2 skipped" in table and str(Path(jobs[1].folder) / "sweep.log") in table


def test_rerun_skips_finished_resumes_killed_and_retries_failed_only_when_asked(tmp_path):
    jobs = two_env_jobs(tmp_path)
    killed, stopped = "o2o_sac/hopper-medium-v2/cql_ocr-cft_seed0", "o2o_sac/hopper-medium-v2/cql_naive_seed0"
    out, _ = run(jobs, {"offline/cql/walker2d-medium-v2/seed0": "fail", killed: "kill", stopped: "stop"})
    assert out[killed].status == out[stopped].status == "incomplete" and "rerun to resume" in out[killed].detail
    out, ex = run(jobs, {"offline/cql/walker2d-medium-v2/seed0": "fail"})  # the same sweep again
    assert sorted(ex.submitted) == sorted([killed, stopped])  # killed and stopped runs go again, nothing else
    assert out["offline/cql/hopper-medium-v2/seed0"] == sweep.Outcome("skipped", "finished earlier")
    failed = out["offline/cql/walker2d-medium-v2/seed0"]
    assert failed.status == "failed" and not failed.ran and "--retry-failed" in failed.detail
    assert out["o2o_sac/walker2d-medium-v2/cql_naive_seed0"].status == "skipped"
    out, ex = run(jobs, {}, retry_failed=True)
    assert ex.submitted == ["offline/cql/walker2d-medium-v2/seed0", "o2o_sac/walker2d-medium-v2/cql_ocr-cft_seed0",
                            "o2o_sac/walker2d-medium-v2/cql_naive_seed0"]
    assert all(o.status in ("done", "skipped") for o in out.values())
    _, ex = run(jobs, {})
    assert ex.submitted == []


def test_execute_reports_a_kill_and_the_run_dies_with_its_parent(tmp_path):
    log = tmp_path / "a" / "sweep.log"
    res = sweep.execute([sys.executable, "-c", "import os, signal; print('hi', flush=True); os.kill(os.getpid(), signal.SIGKILL)"],
                        str(log), {"X": "1"}, str(tmp_path))
    assert res["returncode"] == -signal.SIGKILL and "hi" in log.read_text()
    job = sweep.Job(id="x", kind="o2o", script="o2o_sac.py", flags=(), folder=str(log.parent))
    assert sweep.classify(job, res).status == "incomplete"
    assert sweep.classify(job, {"returncode": 2}).status == "failed"
    # a sweep process killed outright (SIGKILL, no cleanup) takes its run with it: no orphan keeps writing a run folder
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import sweep
        sweep.execute([sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"],
                      {str(tmp_path / 'b.log')!r}, {{}}, {str(tmp_path)!r})""")])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{child}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_dry_run_prints_the_commands(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "store")}
    p = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "--preset", "paper-mujoco", "--scale", "0.02", "--run-dir", str(tmp_path),
                        "--dry-run", "--build-datasets"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    heads = [ln for ln in p.stdout.splitlines() if ln.startswith("# ")]
    cmds = [ln for ln in p.stdout.splitlines() if ln.startswith(sys.executable)]
    assert len(heads) == len(cmds) == 3 + 270  # make_dataset for hopper, walker2d, halfcheetah; then the grid
    assert sum("make_dataset.py --env hopper-medium-v2 --levels medium medium-replay" in c for c in cmds) == 1
    assert sum("o2o_ppo.py" in c and "--budget-scale 0.02" in c and "--no-reevaluate --no-constraint" in c for c in cmds) == 30
    assert not (tmp_path / "offline").exists()  # a dry run writes nothing
    bad = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "--scale", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ a tiny real sweep on a local Ray instance
@pytest.fixture(scope="module")
def local_ray(tiny_dataset):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and text in (p / "cmdline").read_bytes().decode(errors="replace") and alive(int(p.name)):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def test_tiny_sweep_on_ray(local_ray, tmp_path, capsys):
    run_dir = tmp_path / "runs"

    def invoke(*extra: str, sac: list[str] = TINY_SAC, **kw) -> dict:
        args = sweep.Args(scripts=("o2o_sac",), modes=("ocr-cft",), envs=("hopper-medium-v2", "walker2d-medium-v2"), seeds=(0, 1),
                          run_dir=str(run_dir), flags=("offline_pretrain=" + " ".join(TINY_OFFLINE), "o2o_sac=" + " ".join([*sac, *extra])),
                          **kw)
        return sweep.main(args)

    # 1) hopper: 2 offline runs, then 2 o2o runs that stop after 400 of 500 online steps (as if killed); walker2d has no
    # dataset in the fixture store: its offline runs fail and their o2o runs are skipped, the others go on
    out = invoke("--stop-after", "400")
    printed = capsys.readouterr().out
    hopper = [f"o2o_sac/hopper-medium-v2/cql_ocr-cft_seed{s}" for s in (0, 1)]
    for s in (0, 1):
        assert out[f"offline/cql/hopper-medium-v2/seed{s}"].status == "done"
        assert out[f"offline/cql/walker2d-medium-v2/seed{s}"].status == "failed"
        assert "no dataset for walker2d-medium-v2" in out[f"offline/cql/walker2d-medium-v2/seed{s}"].detail  # the script's reason
        assert out[f"o2o_sac/walker2d-medium-v2/cql_ocr-cft_seed{s}"].status == "skipped"
        assert out[hopper[s]].status == "incomplete"
    assert printed.count("] ") >= 8 and "2 failed" in printed  # a progress line per run, then the table
    for h in hopper:
        res = json.loads((run_dir / h / "results.json").read_text())
        assert res["finished"] is False and res["online_steps_done"] < 500 and (run_dir / h / "online.pt").exists()
    # 2) the same sweep: offline runs skipped, the stopped runs resume where they stopped, failed runs not retried
    out = invoke()
    for h in hopper:
        assert out[h].status == "done" and out[h].ran
        log = (run_dir / h / "sweep.log").read_text()
        assert log.count("\n=== 20") == 2 and "resuming online fine-tuning" in log
        res = json.loads((run_dir / h / "results.json").read_text())
        assert res["finished"] is True and res["online_steps_done"] == res["online_steps"] == 500
    for s in (0, 1):
        assert out[f"offline/cql/hopper-medium-v2/seed{s}"].status == "skipped"
        assert out[f"offline/cql/walker2d-medium-v2/seed{s}"].status == "failed" and not out[f"offline/cql/walker2d-medium-v2/seed{s}"].ran
        assert (run_dir / "offline/cql/walker2d-medium-v2" / f"seed{s}" / "sweep.log").read_text().count("\n=== 20") == 1
    # 3) again: nothing runs
    out = invoke()
    assert not any(o.ran for o in out.values())
    assert {o.status for k, o in out.items() if "hopper" in k} == {"skipped"}
    # 4) --retry-failed runs the failed ones again (they fail again: still no dataset)
    out = invoke(retry_failed=True)
    assert sorted(k for k, o in out.items() if o.ran) == [f"offline/cql/walker2d-medium-v2/seed{s}" for s in (0, 1)]
    assert processes_mentioning(str(run_dir)) == []  # no run left behind
    # 5) the report reads what the scripts wrote
    rep = report.main(report.Args(run_dirs=(str(run_dir),), out=str(tmp_path / "report"), reps=200))
    assert rep["runs"] == 2 and rep["aggregate"]["final"]["o2o_sac ocr-cft (cql)"]["tasks"] == ["hopper-medium-v2"]
    assert (tmp_path / "report" / "curves_hopper-medium-v2.png").exists()
