"""Tables and plots of offline-to-online runs: reads every results.json (schema_version 1) under the given run folders.

Writes into --out:
    report.md            per-task table (offline, after alignment, start of online, min over the first tenth, that
                         minus the offline score, final, best: mean and 95% bootstrap CI over seeds), aggregate IQM
                         and mean with 95% stratified-bootstrap CIs (rliable), the probability of improvement of each
                         method over its naive baseline, and the figures; ready to paste into a README
    report.json          the same numbers, machine-readable
    curves_<env>.png     learning curves per task (mean and 95% CI band over seeds): the normalised score and the
                         score minus the run's offline score, the first tenth of online learning shaded
    aggregate.png        IQM and mean with CIs of the final score, the min over the first tenth, and that minus the
                         offline score (the early drop the paper is about)
    poi.png              probability of improvement over naive fine-tuning: final score and early drop

A method is one script, `method` (results.json), offline algo and sweep flag set (the run name without its seed);
its naive baseline is the naive run of the same script, offline algo and flag set. Tasks are the --env datasets.
Only finished runs count; offline_pretrain.py's results are inputs, not rows. A results.json of another schema
version stops the report (exit 2) with its path.

Usage:
    python report.py runs --out runs/report
    python report.py runs/a runs/b --out report --reps 5000 --figure-prefix benchmarks/results/sweep/
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import tyro

O2O_SCRIPTS = ("o2o_sac", "o2o_td3", "o2o_ppo")
SCHEMA_VERSION = 1
REQUIRED = ("script", "method", "env", "seed", "offline_algo", "offline_score", "online_start_score", "min_first_tenth", "final_score",
            "best_score", "online_steps", "curve", "finished")
# per-task columns: (key of the run summary, header)
COLUMNS = (("offline", "offline"), ("aligned", "after alignment"), ("start", "start of online"), ("min_tenth", "min first tenth"),
           ("early_drop", "min first tenth − offline"), ("final", "final"), ("best", "best"))
# aggregate metrics: (key, title)
METRICS = (("final", "final score"), ("min_tenth", "min over the first tenth"), ("early_drop", "min over the first tenth − offline score"))
POI_METRICS = (("final", "final score"), ("early_drop", "min first tenth − offline"))


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run folders to read (every results.json below them)"""
    out: str = "report"
    """output folder"""
    reps: int = 2000
    """bootstrap resamples of every CI (rliable recommends at least 2000)"""
    seed: int = 0
    """seed of the bootstrap"""
    title: str = "Offline-to-online results"
    """heading of report.md"""
    figure_prefix: str = ""
    """prefix of the image links in report.md (e.g. the folder the figures will sit in, relative to the README)"""


@dataclass(frozen=True)
class Run:
    script: str
    method: str
    offline_algo: str
    variant: str  # the sweep's flag-set name (or what else the run name holds besides algo, mode and seed)
    env: str
    seed: int
    offline: float
    aligned: float | None
    start: float
    min_tenth: float
    final: float
    best: float
    online_steps: int
    curve: tuple[tuple[int, float], ...]  # online evaluations: (env step, normalised score), step 0 = start of online
    local_standin: bool
    budget_scale: float
    wall_s: float  # the run's own wall-clock, all phases
    path: str

    @property
    def early_drop(self) -> float:
        return self.min_tenth - self.offline

    @property
    def label(self) -> str:
        return f"{self.script} {self.method} ({self.offline_algo})" + (f" [{self.variant}]" if self.variant else "")

    @property
    def baseline_label(self) -> str:
        return f"{self.script} naive ({self.offline_algo})" + (f" [{self.variant}]" if self.variant else "")


# ------------------------------------------------------------------ errors and the command line (as in sweep.py)
def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr that names the fix, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_cli(cls: type, argv: list[str] | None = None) -> Any:
    """tyro.cli whose parse errors are one line on stderr and exit 2; --help prints as usual."""
    buf, cols = io.StringIO(), os.environ.get("COLUMNS")
    try:
        os.environ["COLUMNS"] = "100000"
        with contextlib.redirect_stderr(buf):
            args = tyro.cli(cls, args=argv)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(buf.getvalue())
            raise
        rows = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip().strip("│╭╮╰╯").strip() for ln in buf.getvalue().splitlines()]
        message = " ".join(r for r in rows[1:] if r and not set(r) <= set("─╭╮╰╯")).split(" For full helptext")[0] or "bad command line"
        fail(f"{message.rstrip('.')}; see {Path(sys.argv[0]).name} --help")
    finally:
        if cols is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = cols
    return args


# ------------------------------------------------------------------ reading
def find_results(run_dirs: tuple[str, ...]) -> list[Path]:
    """Every results.json below the run folders, each once."""
    found: dict[Path, None] = {}
    for d in run_dirs:
        if not Path(d).is_dir():
            fail(f"{d} is not a folder; pass run folders (the --run-dir of the runs)")
        for p in sorted(Path(d).rglob("results.json")):
            found.setdefault(p.resolve())
    if not found:
        fail(f"no results.json under {', '.join(run_dirs)}")
    return list(found)


def variant_of(run_name: str, offline_algo: str, seed: int) -> str:
    """What a run name holds besides offline algo, mode and seed: sweep.py names runs <algo>_<mode>[_<set>]_seed<k>,
    the scripts <algo>_<mode>[_ref-..][_buf-..]_seed<k>, so this is the flag set (or the reference / buffer suffix)."""
    stem = re.sub(rf"_seed{seed}$", "", run_name)
    for prefix in (f"{offline_algo}_", "ckpt_"):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    return stem.partition("_")[2]


def load_run(path: Path) -> Run | None:
    """One o2o run from its results.json (None: an offline_pretrain.py result); exit 2 on another schema version."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read as JSON ({type(e).__name__}); fix or move it")
    version = res.get("schema_version") if isinstance(res, dict) else None
    if version != SCHEMA_VERSION:
        fail(f"{path} has schema_version {version!r}; report.py reads schema_version {SCHEMA_VERSION} only: rerun it with the "
             f"current scripts or move it out of the run folders")
    if res.get("script") == "offline_pretrain":
        return None
    if res.get("script") not in O2O_SCRIPTS:
        fail(f"{path}: unknown script {res.get('script')!r} (expected one of {', '.join(O2O_SCRIPTS)} or offline_pretrain)")
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}, which schema_version 1 requires; rerun it with the current scripts")
    common = {"script": res["script"], "method": res["method"], "offline_algo": res["offline_algo"], "env": res["env"],
              "seed": int(res["seed"]), "variant": variant_of(path.parent.name, res["offline_algo"], int(res["seed"])),
              "online_steps": int(res["online_steps"]), "local_standin": bool(res.get("local_standin")),
              "budget_scale": float(res.get("budget_scale", math.nan)), "wall_s": float((res.get("wall_clock_s") or {}).get("total", 0.0)),
              "path": str(path)}
    if not res["finished"]:  # kept to be listed as left out
        return Run(**common, offline=math.nan, aligned=None, start=math.nan, min_tenth=math.nan, final=math.nan, best=math.nan, curve=())
    online = [(int(p["step"]), float(p["normalized_score"])) for p in res["curve"] if p["phase"] in ("online", "pre_sample") and p["step"] > 0]
    return Run(**common, offline=float(res["offline_score"]), aligned=None if res.get("aligned_score") is None else float(res["aligned_score"]),
               start=float(res["online_start_score"]), min_tenth=float(res["min_first_tenth"]), final=float(res["final_score"]),
               best=float(res["best_score"]), curve=((0, float(res["online_start_score"])), *online))


def load_runs(run_dirs: tuple[str, ...]) -> tuple[list[Run], list[Run]]:
    """(finished o2o runs, unfinished ones); exit 2 when one method has two runs of the same task and seed."""
    runs = [r for p in find_results(run_dirs) if (r := load_run(p)) is not None]
    done = [r for r in runs if not math.isnan(r.final)]
    seen: dict[tuple, str] = {}
    for r in done:
        key = (r.label, r.env, r.seed)
        if key in seen:
            fail(f"two runs of {r.label} on {r.env} with seed {r.seed}: {seen[key]} and {r.path}; pass run folders that hold one")
        seen[key] = r.path
    if not done:
        fail(f"no finished o2o run under {', '.join(run_dirs)} ({len(runs)} unfinished)")
    return done, [r for r in runs if math.isnan(r.final)]


# ------------------------------------------------------------------ statistics
def bootstrap_mean_ci(values: Any, reps: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean over seeds and its 95% percentile-bootstrap CI (resampling seeds with replacement)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def per_task(runs: list[Run], reps: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{env: {method: {column: [mean, lo, hi] or None, "seeds": n}}}."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for env in sorted({r.env for r in runs}):
        out[env] = {}
        for label in sorted({r.label for r in runs if r.env == env}):
            rs = sorted((r for r in runs if r.env == env and r.label == label), key=lambda r: r.seed)
            row: dict[str, Any] = {"seeds": [r.seed for r in rs]}
            for key, _ in COLUMNS:
                vals = [getattr(r, key) for r in rs]
                row[key] = None if any(v is None for v in vals) else list(bootstrap_mean_ci(vals, reps, rng))
            out[env][label] = row
    return out


def score_matrix(runs: list[Run], key: str, envs: list[str]) -> np.ndarray:
    """(runs, tasks) matrix of one method for rliable; tasks with more seeds than the fewest keep their lowest seeds."""
    cols = [[getattr(r, key) for r in sorted((r for r in runs if r.env == env), key=lambda r: r.seed)] for env in envs]
    n = min(len(c) for c in cols)
    return np.array([c[:n] for c in cols], dtype=float).T


def interval_estimates(score_dict: dict[str, Any], func: Callable[..., np.ndarray], reps: int, seed: int) -> dict[str, tuple]:
    """rliable's point estimates and 95% stratified-bootstrap CIs: {key: (points, lows, highs)}."""
    from rliable import library as rly

    out = {}
    for key, scores in score_dict.items():
        np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
        point, ci = rly.get_interval_estimates({key: scores}, func, reps=reps)
        out[key] = (np.atleast_1d(point[key]), ci[key][0], ci[key][1])
    return out


def iqm_and_mean(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores)])


def poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rliable's probability of improvement, P(X > Y) + P(X = Y) / 2 per task (Mann-Whitney U / (n m)) averaged over
    tasks, computed by broadcasting: the same numbers as metrics.probability_of_improvement, ~50x faster inside the
    bootstrap (x: (n, tasks), y: (m, tasks))."""
    gt = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    eq = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return np.array([float(np.mean(gt + eq / 2))])


def aggregates(runs: list[Run], reps: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {method: {"iqm": [pt, lo, hi], "mean": [...], "tasks": [...], "runs_per_task": n}}} over each method's tasks."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, _ in METRICS:
        mats = {}
        for label in sorted({r.label for r in runs}):
            rs = [r for r in runs if r.label == label]
            mats[label] = (sorted({r.env for r in rs}), score_matrix(rs, key, sorted({r.env for r in rs})))
        est = interval_estimates({k: m for k, (_, m) in mats.items()}, iqm_and_mean, reps, seed)
        out[key] = {k: {"iqm": [float(est[k][0][0]), float(est[k][1][0]), float(est[k][2][0])],
                        "mean": [float(est[k][0][1]), float(est[k][1][1]), float(est[k][2][1])],
                        "tasks": envs, "runs_per_task": int(m.shape[0])} for k, (envs, m) in mats.items()}
    return out


def improvements(runs: list[Run], reps: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {method: {"baseline", "p": [pt, lo, hi], "tasks"}}}: P(method > its naive baseline) on their common tasks."""
    labels = sorted({r.label for r in runs})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, _ in POI_METRICS:
        pairs, info = {}, {}
        for label in labels:
            rs = [r for r in runs if r.label == label]
            if rs[0].method == "naive" or rs[0].baseline_label not in labels:
                continue
            base = [r for r in runs if r.label == rs[0].baseline_label]
            envs = sorted({r.env for r in rs} & {r.env for r in base})
            if envs:
                pairs[label] = [score_matrix([r for r in rs if r.env in envs], key, envs), score_matrix([r for r in base if r.env in envs], key, envs)]
                info[label] = {"baseline": rs[0].baseline_label, "tasks": envs}
        est = interval_estimates(pairs, poi, reps, seed)
        out[key] = {k: {**info[k], "p": [float(est[k][0][0]), float(est[k][1][0]), float(est[k][2][0])]} for k in pairs}
    return out


def curve_bands(runs: list[Run], reps: int, seed: int, minus_offline: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, lo, hi) of one method on one task: at each evaluation step, over the seeds that evaluated there."""
    rng = np.random.default_rng(seed)
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for step, score in r.curve:
            by_step.setdefault(step, []).append(score - (r.offline if minus_offline else 0.0))
    steps = sorted(by_step)
    stats = np.array([bootstrap_mean_ci(by_step[s], reps, rng) for s in steps]).reshape(-1, 3)
    return np.array(steps), stats[:, 0], stats[:, 1], stats[:, 2]


# ------------------------------------------------------------------ figures
def plot_curves(runs: list[Run], out: Path, reps: int, seed: int) -> list[Path]:
    """curves_<env>.png: score and score minus offline score against online env steps, one line and band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for env in sorted({r.env for r in runs}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        rs_env = [r for r in runs if r.env == env]
        for label in sorted({r.label for r in rs_env}):
            rs = [r for r in rs_env if r.label == label]
            for ax, minus in zip(axes, (False, True)):
                steps, mean, lo, hi = curve_bands(rs, min(reps, 1000), seed, minus)
                (line,) = ax.plot(steps, mean, label=f"{label} (n={len(rs)})")
                ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
        tenth = max(r.online_steps for r in rs_env) / 10
        for ax, ylabel in zip(axes, ("normalised score", "score − offline score")):
            ax.axvspan(0, tenth, color="grey", alpha=0.1, label="first tenth")
            ax.set_xlabel("online env steps")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[1].axhline(0.0, color="black", lw=0.8)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{env}: mean and 95% bootstrap CI over seeds")
        fig.tight_layout()
        paths.append(out / f"curves_{env}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def interval_panel(ax: Any, labels: list[str], triples: list[list[float]], title: str, xlabel: str) -> None:
    y = np.arange(len(labels))
    pts = np.array([t[0] for t in triples])
    err = np.array([[t[0] - t[1], t[2] - t[0]] for t in triples]).T
    ax.errorbar(pts, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(alpha=0.3)


def plot_aggregates(agg: dict, imp: dict, out: Path) -> list[Path]:
    """aggregate.png (IQM and mean of each metric) and poi.png (probability of improvement over naive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(next(iter(agg.values())))
    fig, axes = plt.subplots(len(METRICS), 2, figsize=(11, 2.2 + 1.1 * len(METRICS) * max(1, len(labels)) / 2), squeeze=False)
    for i, (key, title) in enumerate(METRICS):
        for j, stat in enumerate(("iqm", "mean")):
            interval_panel(axes[i][j], labels, [agg[key][k][stat] for k in labels], f"{stat.upper() if stat == 'iqm' else 'mean'}: {title}",
                           "normalised score" + (" difference" if key == "early_drop" else ""))
    fig.suptitle("95% stratified-bootstrap CIs (rliable)")
    fig.tight_layout()
    paths = [out / "aggregate.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if any(imp[k] for k, _ in POI_METRICS):
        fig, axes = plt.subplots(1, len(POI_METRICS), figsize=(11, 1.5 + 0.5 * max(len(v) for v in imp.values())), squeeze=False)
        for j, (key, title) in enumerate(POI_METRICS):
            names = sorted(imp[key])
            interval_panel(axes[0][j], [f"{n}\nover {imp[key][n]['baseline']}" for n in names], [imp[key][n]["p"] for n in names],
                           f"P(improvement): {title}", "probability")
            axes[0][j].axvline(0.5, color="black", lw=0.8)
            axes[0][j].set_xlim(0, 1)
        fig.tight_layout()
        paths.append(out / "poi.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------ markdown
def cell(t: list[float] | None, digits: int = 1) -> str:
    if t is None or any(math.isnan(v) for v in t):
        return "–"
    return f"{t[0]:.{digits}f} [{t[1]:.{digits}f}, {t[2]:.{digits}f}]"


def markdown(args: Args, runs: list[Run], unfinished: list[Run], tasks: dict, agg: dict, imp: dict, figures: list[Path]) -> str:
    seeds = sorted({r.seed for r in runs})
    scales = sorted({r.budget_scale for r in runs})
    wall = sum(r.wall_s for r in runs)
    lines = [f"## {args.title}", "",
             f"{len(runs)} finished runs ({len({r.label for r in runs})} methods, {len(tasks)} task{'s' * (len(tasks) != 1)}, seeds {', '.join(map(str, seeds))}), "
             f"budget scale {', '.join(f'{x:g}' for x in scales)}; wall-clock of the o2o runs, summed: {wall / 3600:.2f} h. Normalised scores "
             f"(D4RL 0-100 scale). Per task: mean over seeds [95% percentile-bootstrap CI, {args.reps} resamples]. "
             f"\"min first tenth\": the lowest of the score online learning starts from and every evaluation in the first tenth of "
             f"the online steps; \"− offline\": that minus the offline policy's score (the early drop)."]
    if any(r.local_standin for r in runs):
        lines += ["", "Datasets: local stand-ins built by make_dataset.py (not the hosted D4RL/Minari data) for "
                  + ", ".join(sorted({r.env for r in runs if r.local_standin})) + "."]
    if unfinished:
        lines += ["", f"Left out: {len(unfinished)} unfinished runs (" + ", ".join(sorted({Path(r.path).parent.name for r in unfinished})[:10])
                  + (", ..." if len(unfinished) > 10 else "") + ")."]
    lines += ["", "### Per task"]
    for env, rows in tasks.items():
        lines += ["", f"**{env}**", "", "| method | seeds | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
        for label, row in rows.items():
            lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cell(row[k]) for k, _ in COLUMNS) + " |")
    lines += ["", "### Aggregate over tasks", "",
              f"IQM (25% trimmed mean over runs x tasks) and mean, with 95% stratified-bootstrap CIs (rliable, {args.reps} resamples); "
              "a method whose tasks have unequal seed counts uses its lowest seeds on each task.", "",
              "| method | tasks | runs per task | " + " | ".join(f"{t}: IQM | {t}: mean" for _, t in METRICS) + " |",
              "|---" * (3 + 2 * len(METRICS)) + "|"]
    for label in sorted(agg[METRICS[0][0]]):
        a = agg[METRICS[0][0]][label]
        lines.append(f"| {label} | {len(a['tasks'])} | {a['runs_per_task']} | "
                     + " | ".join(f"{cell(agg[k][label]['iqm'])} | {cell(agg[k][label]['mean'])}" for k, _ in METRICS) + " |")
    if any(imp[k] for k, _ in POI_METRICS):
        lines += ["", "### Probability of improvement over naive fine-tuning", "",
                  "P(a run of the method scores higher than a run of its naive baseline on the same task), averaged over their common "
                  f"tasks, with 95% stratified-bootstrap CIs (rliable, {args.reps} resamples).", "",
                  "| method | baseline | tasks | " + " | ".join(t for _, t in POI_METRICS) + " |", "|---" * (3 + len(POI_METRICS)) + "|"]
        for label in sorted(imp[POI_METRICS[0][0]]):
            p = imp[POI_METRICS[0][0]][label]
            lines.append(f"| {label} | {p['baseline']} | {len(p['tasks'])} | " + " | ".join(cell(imp[k][label]["p"], 2) for k, _ in POI_METRICS) + " |")
    lines += ["", "### Figures", ""] + [f"![{f.stem}]({args.figure_prefix}{f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    """Read the runs, write report.md, report.json and the figures into --out; the numbers of report.json."""
    if args.reps < 1:
        fail(f"--reps must be positive, got {args.reps}")
    runs, unfinished = load_runs(args.run_dirs)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out: cannot create {out} ({e.strerror}); pass a folder you can write to")
    tasks = per_task(runs, args.reps, args.seed)
    agg = aggregates(runs, args.reps, args.seed)
    imp = improvements(runs, args.reps, args.seed)
    figures = plot_aggregates(agg, imp, out) + plot_curves(runs, out, args.reps, args.seed)
    result = {"args": asdict(args), "runs": len(runs), "unfinished": [r.path for r in unfinished], "tasks": tasks, "aggregate": agg,
              "improvement": imp, "figures": [str(f) for f in figures]}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(markdown(args, runs, unfinished, tasks, agg, imp, figures))
    print(f"{len(runs)} finished runs ({len(unfinished)} unfinished left out) -> {out / 'report.md'}, {len(figures)} figures in {out}")
    return result


if __name__ == "__main__":
    main(parse_cli(Args))
