"""Markdown table of an o2o comparison run by benchmarks/o2o_reduced.sh, computed from each run's results.json curve.

    python benchmarks/o2o_table.py benchmarks/results/o2o_reduced
    python benchmarks/o2o_table.py AFTER_DIR --before BEFORE_DIR     # "before -> after" in every cell
    python benchmarks/o2o_table.py AFTER_DIR --plot curves.png          # also the curves, one panel per script

Columns (normalised scores): offline; start of online (the last score before online learning: after alignment,
distillation or the offline score); min over the first tenth = the start score and every online evaluation at
step <= online_steps / 10; minimum over all online evaluations; final.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = ["sac_o2sac", "sac_naive", "td3_o2td3", "td3_naive", "td3_opt", "ppo_o2ppo", "ppo_naive"]
LABELS = {"sac_o2sac": "O2SAC", "sac_naive": "naive SAC", "td3_o2td3": "O2TD3", "td3_naive": "naive TD3", "td3_opt": "OPT",
          "ppo_o2ppo": "O2PPO", "ppo_naive": "naive PPO"}


def summary(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    curve = json.loads(path.read_text())["curve"]
    online = [c for c in curve if c["phase"] == "online"]
    pre = [c for c in curve if c["phase"] not in ("online", "opt_collect", "align")]
    if not online:
        return None
    horizon = max(c["step"] for c in online)
    start = pre[-1]["normalized_score"]
    first = [start] + [c["normalized_score"] for c in online if c["step"] <= horizon / 10]
    return {"offline": curve[0]["normalized_score"], "start": start, "min_first_tenth": min(first),
            "min_online": min(c["normalized_score"] for c in online), "final": online[-1]["normalized_score"]}


def table(after: Path, before: Path | None) -> str:
    keys = ["offline", "start", "min_first_tenth", "min_online", "final"]
    lines = ["| run | offline | start of online | min over first tenth | min online | final |", "|---|---|---|---|---|---|"]
    for name in RUNS:
        a = summary(after / f"{name}.json")
        b = summary(before / f"{name}.json") if before else None
        if a is None and b is None:
            continue
        cells = []
        for k in keys:
            av = f"{a[k]:.1f}" if a else "-"
            cells.append(f"{b[k]:.1f} → {av}" if b else av)
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(after: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, script in zip(axes, ("sac", "td3", "ppo")):
        for name in [r for r in RUNS if r.startswith(script)]:
            path = after / f"{name}.json"
            if not path.exists():
                continue
            curve = [c for c in json.loads(path.read_text())["curve"] if c["phase"] != "align"]
            online = [c for c in curve if c["phase"] == "online"]
            start = [c for c in curve if c["phase"] not in ("online", "opt_collect", "align")][-1]
            xs = [0, 0] + [c["step"] for c in online]
            ys = [curve[0]["normalized_score"], start["normalized_score"]] + [c["normalized_score"] for c in online]
            ax.plot(xs, ys, marker="o", ms=3, label=LABELS[name])
        ax.set_title(f"o2o_{script}.py")
        ax.set_xlabel("online env steps (step 0: offline, then start of online)")
        ax.set_ylabel("normalised score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("after", type=Path)
    p.add_argument("--before", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    a = p.parse_args()
    print(table(a.after, a.before))
    if a.plot:
        plot(a.after, a.plot)
