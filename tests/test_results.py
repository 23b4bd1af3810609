"""results.json, schema 1: the summary numbers every o2o script derives from its curve, the method names tables group
by, and the provenance fields. The shared block is byte-identical in the three scripts (test_shared_blocks.py), so it
is tested once here through o2o_sac; each script's own test file checks a real run's results.json against the schema
(conftest.assert_results_schema)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, load_script

o2o = load_script("o2o_sac")


def point(phase: str, step: int, score: float) -> dict:
    return {"phase": phase, "step": step, "normalized_score": score, "return": 10 * score}


def test_curve_summary_one_definition():
    curve = [point("offline", 0, 50.0), point("distilled", 0, 48.0), *(point("align", s, 40.0 + s) for s in (1, 2)),
             point("aligned", 0, 47.0), point("online", 0, 47.0),
             point("online", 10, 45.0), point("online", 100, 30.0),  # inside the first tenth (online_steps 1000): 100 <= 100
             point("online", 101, 10.0), point("online", 500, 80.0), point("online", 1000, 60.0)]
    s = o2o.curve_summary(curve, 47.0, 1000)
    assert s == {"offline_score": 50.0, "distilled_score": 48.0, "aligned_score": 47.0, "online_start_score": 47.0,
                 "min_first_tenth": 30.0, "final_score": 60.0, "best_score": 80.0, "evals_in_first_tenth": 2}
    # the start of online counts: a run that only climbs has min_first_tenth = its start score
    climb = [point("offline", 0, 50.0), point("online", 0, 20.0), point("online", 50, 60.0), point("online", 1000, 90.0)]
    assert o2o.curve_summary(climb, 20.0, 1000)["min_first_tenth"] == 20.0
    # no distillation / alignment: None; no online evaluation yet: final None, best = start
    s = o2o.curve_summary([point("offline", 0, 50.0), point("online", 0, 50.0)], 50.0, 1000)
    assert s["distilled_score"] is None and s["aligned_score"] is None and s["final_score"] is None and s["best_score"] == 50.0
    # PORL's pre-sample stage is online; OPT's online phase starts after its collection (first online entry at step 20,
    # not an evaluation)
    porl = [point("offline", 0, 50.0), point("online", 0, 50.0), point("pre_sample", 5, 3.0), point("online", 100, 70.0)]
    assert o2o.curve_summary(porl, 50.0, 100)["min_first_tenth"] == 3.0
    opt = [point("offline", 0, 50.0), point("online", 20, 50.0), point("online", 21, 40.0), point("online", 40, 55.0)]
    assert o2o.curve_summary(opt, 50.0, 300)["evals_in_first_tenth"] == 1  # 21 <= 30; the start entry is not one


@pytest.mark.parametrize("flags, name", [
    ((True, True, True), "ocr-cft"),
    ((False, False, False), "naive"),
    ((False, True, True), "no-reevaluate"),
    ((True, False, True), "no-align"),
    ((True, True, False), "no-constraint"),
    ((False, False, True), "no-reevaluate+no-align"),
    ((True, None, True), "ocr-cft"),  # PPO: no alignment phase
    ((False, None, False), "naive"),
    ((True, None, False), "no-constraint"),
])
def test_method_name(flags, name):
    assert o2o.method_name(*flags) == name


def test_method_name_porl_opt():
    assert o2o.method_name(True, True, True, scratch=True) == "porl"
    assert o2o.method_name(True, True, True, opt=True) == "opt"


def test_results_record_common_part(tmp_path):
    curve = [point("offline", 0, 50.0), point("online", 0, 50.0), point("online", 5, 40.0), point("online", 50, 70.0)]
    data = {"dataset_ids": ("local/hopper/medium-v0",), "local_standin": True}
    r = o2o.results_record(script="o2o_sac", algo="sac", method="ocr-cft", mode={"x": 1}, env="hopper-medium-v2", data=data, seed=3,
                           offline_algo="iql", offline_checkpoint=tmp_path / "c.pt", curve=curve, online_start_score=50.0, online_steps=50,
                           online_steps_done=50, budget_scale=0.5, wall_clock_s={"reevaluate": 1.5, "online": 2.0}, finished=True,
                           run_dir=tmp_path, evaluation_s=0.7, extra_entry=7)
    assert r["schema_version"] == 1 and r["dataset_ids"] == ["local/hopper/medium-v0"] and r["min_first_tenth"] == 40.0
    assert r["final_score"] == 70.0 and r["wall_clock_s"] == {"reevaluate": 1.5, "online": 2.0, "total": 3.5} and r["extra_entry"] == 7
    assert r["offline_checkpoint"] == str(tmp_path / "c.pt") and r["seed"] == 3 and r["finished"]
    assert r["evaluation_s"] == 0.7 and r["evaluation_share"] == pytest.approx(0.2)  # a part of the total, not a phase of it


def test_provenance(tmp_path):
    v = o2o.software_versions()
    import torch

    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    commit = o2o.git_commit()
    if shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0:
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    # a copy of the script outside any git checkout records no commit
    shutil.copy(ROOT / "o2o_sac.py", tmp_path / "o2o_sac.py")
    out = subprocess.run([sys.executable, "-c", "import o2o_sac; print(o2o_sac.git_commit())"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
