"""report.py on synthetic results.json files: per-task means and CIs, IQM and mean with stratified-bootstrap CIs,
probability of improvement, curve bands, checked against hand-computed values and an independent numpy bootstrap;
figures written; other schema versions refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, load_script

report = load_script("report")

OFFLINE = 30.0
# final scores: (method, env) -> per seed 0..3. ocr-cft pooled: -50 10 20 30 | 40 50 60 100 -> IQM 35, mean 32.5
FINAL = {("ocr-cft", "hopper-medium-v2"): [10.0, 20.0, 30.0, 100.0], ("ocr-cft", "walker2d-medium-v2"): [40.0, 50.0, 60.0, -50.0],
         ("naive", "hopper-medium-v2"): [5.0, 6.0, 7.0, 8.0], ("naive", "walker2d-medium-v2"): [1.0, 2.0, 3.0, 4.0]}
# min over the first tenth: ocr-cft stays near the offline 30, naive drops to 10 (hopper) / 20 (walker2d) on every seed
MIN_TENTH = {("ocr-cft", "hopper-medium-v2"): [28.0, 29.0, 30.0, 25.0], ("ocr-cft", "walker2d-medium-v2"): [26.0, 30.0, 27.0, 29.0],
             ("naive", "hopper-medium-v2"): [10.0] * 4, ("naive", "walker2d-medium-v2"): [20.0] * 4}
LABEL = {"ocr-cft": "o2o_sac ocr-cft (cql)", "naive": "o2o_sac naive (cql)"}


def result(method: str, env: str, seed: int, final: float, min_tenth: float, **over) -> dict:
    online = [{"phase": "online", "step": s, "normalized_score": v, "return": 0.0}
              for s, v in ((100, min_tenth), (500, (min_tenth + final) / 2), (1000, final))]
    res = {"schema_version": 1, "script": "o2o_sac", "algo": "sac", "method": method, "mode": {}, "env": env, "dataset_ids": ["x"],
           "local_standin": True, "seed": seed, "offline_algo": "cql", "offline_checkpoint": "c.pt", "offline_score": OFFLINE,
           "distilled_score": None, "aligned_score": OFFLINE + 1 if method == "ocr-cft" else None, "online_start_score": OFFLINE + 1 if method == "ocr-cft" else OFFLINE,
           "min_first_tenth": min_tenth, "final_score": final, "best_score": max(final, OFFLINE), "online_steps": 1000, "online_steps_done": 1000,
           "budget_scale": 0.01, "curve": [{"phase": "offline", "step": 0, "normalized_score": OFFLINE, "return": 0.0}, *online],
           "wall_clock_s": {"online": 10.0, "total": 10.0}, "finished": True, "versions": {}, "git_commit": None, "run_dir": "x"}
    res.update(over)
    return res


def write(path: Path, res: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(res))
    return path / "results.json"


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for (method, env), finals in FINAL.items():
        for seed, (final, mt) in enumerate(zip(finals, MIN_TENTH[(method, env)])):
            write(root / "o2o_sac" / env / f"cql_{method}_seed{seed}", result(method, env, seed, final, mt))
    # an offline_pretrain.py result (an input, not a row) and an unfinished run (left out)
    write(root / "offline" / "cql" / "hopper-medium-v2" / "seed0", {"schema_version": 1, "script": "offline_pretrain", "finished": True})
    write(root / "o2o_sac" / "hopper-medium-v2" / "cql_ocr-cft_seed9", result("ocr-cft", "hopper-medium-v2", 9, 0.0, 0.0, finished=False, final_score=None))
    return root


def stratified_bootstrap(mat: np.ndarray, stat: str, reps: int, seed: int) -> tuple[float, float]:
    """Reference: resample the runs of every task (column) independently, with replacement; 95% percentile interval
    of the IQM or the mean of the pooled resample."""
    rng = np.random.default_rng(seed)
    n, m = mat.shape
    pooled = mat[rng.integers(0, n, size=(reps, n, m)), np.arange(m)].reshape(reps, n * m)
    stats = iqm_rows(pooled) if stat == "iqm" else pooled.mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def iqm_rows(rows: np.ndarray) -> np.ndarray:
    """Interquartile mean of each row by hand: drop its lowest and highest quarter (row lengths divisible by 4)."""
    v = np.sort(rows, axis=1)
    q = v.shape[1] // 4
    return v[:, q:v.shape[1] - q].mean(axis=1)


def iqm(mat: np.ndarray) -> float:
    return float(iqm_rows(mat.reshape(1, -1))[0])


def matrix(table: dict, method: str) -> np.ndarray:
    return np.array([table[(method, "hopper-medium-v2")], table[(method, "walker2d-medium-v2")]]).T


def test_report_numbers_against_hand_computed_values(runs, tmp_path):
    out = tmp_path / "report"
    res = report.main(report.Args(run_dirs=(str(runs),), out=str(out), reps=2000, seed=1))
    assert res["runs"] == 16 and len(res["unfinished"]) == 1
    ocr, naive = LABEL["ocr-cft"], LABEL["naive"]

    # per task: mean over seeds; CI of n = 4 against the reference bootstrap, and hand-derived ones
    cellv = res["tasks"]["hopper-medium-v2"][ocr]
    assert cellv["final"][0] == pytest.approx(40.0) and cellv["offline"] == [OFFLINE] * 3 and cellv["aligned"][0] == OFFLINE + 1
    ref = np.percentile(np.array(FINAL[("ocr-cft", "hopper-medium-v2")])[np.random.default_rng(7).integers(0, 4, (40000, 4))].mean(1), [2.5, 97.5])
    assert cellv["final"][1:] == pytest.approx(list(ref), abs=2.0)
    assert cellv["early_drop"][0] == pytest.approx(28.0 - OFFLINE)
    assert res["tasks"]["hopper-medium-v2"][naive]["aligned"] is None  # naive has no alignment phase
    assert res["tasks"]["hopper-medium-v2"][naive]["early_drop"] == [-20.0, -20.0, -20.0]  # equal seeds: the CI is the point

    # aggregate IQM and mean (rliable): points by hand, CIs against the reference stratified bootstrap
    x = matrix(FINAL, "ocr-cft")
    assert iqm(x) == 35.0 and x.mean() == 32.5  # the hand computation itself (sorted: -50 10 | 20 30 40 50 | 60 100)
    agg = res["aggregate"]["final"][ocr]
    assert agg["iqm"][0] == pytest.approx(35.0) and agg["mean"][0] == pytest.approx(32.5)
    assert agg["tasks"] == ["hopper-medium-v2", "walker2d-medium-v2"] and agg["runs_per_task"] == 4
    assert agg["iqm"][1:] == pytest.approx(list(stratified_bootstrap(x, "iqm", 20000, 3)), abs=3.0)
    assert agg["mean"][1:] == pytest.approx(list(stratified_bootstrap(x, "mean", 20000, 3)), abs=2.0)
    assert agg["iqm"][1] < 35.0 < agg["iqm"][2] and agg["iqm"][2] - agg["iqm"][1] > 10  # a real interval, not a point
    early = res["aggregate"]["early_drop"]
    e = matrix(MIN_TENTH, "ocr-cft") - OFFLINE  # pooled: -2 -1 0 -5 | -4 0 -3 -1 -> sorted -5 -4 | -3 -2 -1 -1 | 0 0
    assert early[ocr]["iqm"][0] == pytest.approx(iqm(e)) == pytest.approx(-1.75) and early[ocr]["mean"][0] == pytest.approx(e.mean())
    assert early[ocr]["iqm"][1:] == pytest.approx(list(stratified_bootstrap(e, "iqm", 20000, 3)), abs=0.3)
    assert early[naive]["iqm"] == pytest.approx([-15.0] * 3) and early[naive]["mean"] == pytest.approx([-15.0] * 3)
    assert res["aggregate"]["min_tenth"][naive]["iqm"] == pytest.approx([15.0] * 3)

    # probability of improvement over naive: hopper 16/16 pairs, walker2d 12/16 (the -50 seed loses) -> 0.875
    poi = res["improvement"]["final"][ocr]
    assert poi["baseline"] == naive and poi["p"][0] == pytest.approx(0.875) and poi["p"][1] <= 0.875 <= poi["p"][2]
    assert 0.5 <= poi["p"][1] and poi["p"][2] == pytest.approx(1.0)
    assert res["improvement"]["early_drop"][ocr]["p"] == pytest.approx([1.0, 1.0, 1.0])  # every ocr-cft run drops less
    assert naive not in res["improvement"]["final"]

    # files: the markdown with every table, the figures (also for the early drop)
    md = (out / "report.md").read_text()
    assert "| o2o_sac ocr-cft (cql) | 4 | 30.0 [30.0, 30.0] | 31.0 [31.0, 31.0] |" in md
    assert "min first tenth − offline" in md and "35.0 [" in md and "0.88 [" in md and "Left out: 1 unfinished" in md
    assert "local stand-ins" in md and "budget scale 0.01" in md
    for name in ("aggregate.png", "poi.png", "curves_hopper-medium-v2.png", "curves_walker2d-medium-v2.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md
    assert json.loads((out / "report.json").read_text())["aggregate"]["final"][ocr]["iqm"] == agg["iqm"]


def test_fast_probability_of_improvement_is_rliables():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for n, m in ((3, 5), (5, 5), (4, 2)):
        x, y = rng.integers(0, 4, size=(n, 3)).astype(float), rng.integers(0, 4, size=(m, 3)).astype(float)  # ties too
        assert report.poi(x, y)[0] == pytest.approx(metrics.probability_of_improvement(x, y))
    assert report.poi(x, x)[0] == 0.5


def test_curve_bands_by_hand():
    mk = lambda seed, curve, off: report.Run("o2o_sac", "naive", "cql", "", "e", seed, off, None, curve[0][1], 0.0, 0.0, 0.0, 100,  # noqa: E731
                                            tuple(curve), False, 1.0, 0.0, "p")
    runs = [mk(0, [(0, 10.0), (50, 20.0), (100, 30.0)], 10.0), mk(1, [(0, 14.0), (50, 24.0), (100, 40.0)], 12.0), mk(2, [(0, 12.0), (100, 35.0)], 14.0)]
    steps, mean, lo, hi = report.curve_bands(runs, 2000, 0, minus_offline=False)
    assert list(steps) == [0, 50, 100] and mean == pytest.approx([12.0, 22.0, 35.0])
    assert lo == pytest.approx([10.0, 20.0, 30.0]) and hi == pytest.approx([14.0, 24.0, 40.0])  # n <= 3: the CI is [min, max]
    steps, mean, _, _ = report.curve_bands(runs, 2000, 0, minus_offline=True)
    assert mean == pytest.approx([0.0, 11.0, 23.0])  # (0, 2, -2), (10, 12), (20, 28, 21)


def test_unequal_seed_counts_use_the_lowest_seeds_of_each_task():
    mk = lambda env, seed, final: report.Run("o2o_sac", "naive", "cql", "", env, seed, 0.0, None, 0.0, 0.0, final, 0.0, 100, (),  # noqa: E731
                                             False, 1.0, 0.0, "p")
    runs = [mk("a", 2, 30.0), mk("a", 0, 10.0), mk("a", 1, 20.0), mk("b", 1, 50.0), mk("b", 0, 40.0)]
    mat = report.score_matrix(runs, "final", ["a", "b"])
    assert mat.tolist() == [[10.0, 40.0], [20.0, 50.0]]  # (runs, tasks): seeds 0 and 1 of each task


def test_variants_are_methods_with_their_own_baseline(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for method, final in (("ocr-cft", 50.0), ("naive", 10.0)):
            write(root / "o2o_sac" / "hopper-medium-v2" / f"cql_{method}_refoff_seed{seed}", result(method, "hopper-medium-v2", seed, final + seed, 20.0))
        write(root / "o2o_sac" / "hopper-medium-v2" / f"cql_ocr-cft_seed{seed}", result("ocr-cft", "hopper-medium-v2", seed, 5.0, 20.0))
    res = report.main(report.Args(run_dirs=(str(root),), out=str(tmp_path / "r"), reps=200))
    assert set(res["aggregate"]["final"]) == {"o2o_sac ocr-cft (cql)", "o2o_sac ocr-cft (cql) [refoff]", "o2o_sac naive (cql) [refoff]"}
    assert res["improvement"]["final"] == {"o2o_sac ocr-cft (cql) [refoff]": {"baseline": "o2o_sac naive (cql) [refoff]", "tasks": ["hopper-medium-v2"],
                                                                             "p": [1.0, 1.0, 1.0]}}
    assert report.variant_of("td3_bc_naive_refoff_seed3", "td3_bc", 3) == "refoff"
    assert report.variant_of("cql_o2sac_ref-offline_buf-all_seed0", "cql", 0) == "ref-offline_buf-all"
    assert report.variant_of("ckpt_naive_seed0", "iql", 0) == ""


@pytest.mark.parametrize("content, words", [
    ({"schema_version": 2, "script": "o2o_sac"}, "schema_version 2"),
    ({"script": "o2o_sac", "final": 3}, "schema_version None"),  # an older results.json without the key
    ({"schema_version": 1, "script": "o2o_sac", "finished": True}, "lacks"),
])
def test_other_schemas_are_refused_with_the_file_named(runs, tmp_path, content, words):
    bad = write(runs / "old" / "run", content)
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(runs), "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and not (tmp_path / "r").exists()
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and words in err, err


def test_two_runs_of_one_seed_are_refused(runs, capsys):
    write(runs / "copy" / "o2o_sac" / "hopper-medium-v2" / "cql_naive_seed0", result("naive", "hopper-medium-v2", 0, 1.0, 1.0))
    with pytest.raises(SystemExit) as e:
        report.load_runs((str(runs),))
    assert e.value.code == 2 and "two runs of o2o_sac naive (cql) on hopper-medium-v2 with seed 0" in capsys.readouterr().err
