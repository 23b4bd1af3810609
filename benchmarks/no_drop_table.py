"""The no-drop check over seeds: one row per run, read from each run's results.json curve, and whether it holds.

    python benchmarks/no_drop_table.py benchmarks/results/no_drop                 # markdown table
    python benchmarks/no_drop_table.py benchmarks/results/no_drop --plot c.png    # and the curves

Files are named <script>_<mode>_<checkpoint>_s<seed>.json (as benchmarks/o2o_seeds.sh writes them). Columns
(normalised scores): offline; after distillation (when the offline actor was distilled); after alignment; min over
the first tenth = the score at the start of online learning and every online evaluation at step <= online steps / 10;
min online; final. The check of OCR-CFT's claim, with d = offline score:
  distilled >= d - 5, aligned >= d - 5, min over the first tenth >= d - 5, min online >= d / 2, final >= d.
Naive fine-tuning rows get the same columns as the reference they are compared with.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

NAME = re.compile(r"(?P<script>sac|td3|ppo)_(?P<mode>[a-z0-9]+)_(?P<ckpt>[a-z0-9]+)_s(?P<seed>\d+)\.json$")
LABELS = {"o2sac": "O2SAC", "o2td3": "O2TD3", "o2ppo": "O2PPO", "naive": "naive", "o2sacfrozen": "O2SAC, actor frozen in alignment",
          "o2td3frozen": "O2TD3, actor frozen in alignment", "o2sactrain": "O2SAC, actor trained in alignment",
          "o2td3train": "O2TD3, actor trained in alignment"}
PRE_ONLINE = ("offline", "distilled", "aligned", "start_online")


def summary(path: Path) -> dict:
    res = json.loads(path.read_text())
    curve = res["curve"]
    by_phase = {c["phase"]: c["normalized_score"] for c in curve if c["phase"] in PRE_ONLINE}
    online = [c for c in curve if c["phase"] == "online"]
    offline = curve[0]["normalized_score"]
    start = [c for c in curve if c["phase"] in PRE_ONLINE][-1]["normalized_score"]
    horizon = max(c["step"] for c in online) if online else 0
    first = [start] + [c["normalized_score"] for c in online if c["step"] <= horizon / 10]
    s = {"offline": offline, "distilled": by_phase.get("distilled"), "aligned": by_phase.get("aligned"), "start": start,
         "min_first_tenth": min(first), "min_online": min((c["normalized_score"] for c in online), default=None),
         "final": online[-1]["normalized_score"] if online else None, "online_steps": horizon,
         "reevaluation_steps": (res.get("reevaluation") or {}).get("steps")}
    d = offline
    checks = {"distilled": s["distilled"] is None or s["distilled"] >= d - 5, "aligned": s["aligned"] is None or s["aligned"] >= d - 5,
              "first_tenth": s["min_first_tenth"] >= d - 5, "half": s["min_online"] is not None and s["min_online"] >= d / 2,
              "final": s["final"] is not None and s["final"] >= d}
    s["checks"] = checks
    return s


def load(folder: Path) -> list[tuple[dict, dict]]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        m = NAME.match(path.name)
        if m:
            runs.append((m.groupdict(), summary(path)))
    return sorted(runs, key=lambda r: (r[0]["script"], r[0]["ckpt"], r[0]["mode"] == "naive", int(r[0]["seed"])))


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(runs: list[tuple[dict, dict]]) -> str:
    lines = ["| run | checkpoint | seed | offline | distilled | aligned | min first tenth | min online | final | holds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for meta, s in runs:
        failed = [k for k, ok in s["checks"].items() if not ok]
        verdict = "yes" if not failed else "no: " + ", ".join(failed)
        lines.append(f"| {LABELS.get(meta['mode'], meta['mode'])}{' ' + meta['script'].upper() if meta['mode'] == 'naive' else ''} | {meta['ckpt']} | {meta['seed']} | {fmt(s['offline'])} | "
                      f"{fmt(s['distilled'])} | {fmt(s['aligned'])} | {fmt(s['min_first_tenth'])} | {fmt(s['min_online'])} | "
                      f"{fmt(s['final'])} | {verdict} |")
    return "\n".join(lines)


def plot(runs: list[tuple[dict, dict]], folder: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(list)
    for meta, _ in runs:
        panels[(meta["script"], meta["ckpt"])].append(meta)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, ((script, ckpt), metas) in zip(axes[0], sorted(panels.items())):
        seen: set[str] = set()
        for meta in metas:
            curve = json.loads((folder / f"{script}_{meta['mode']}_{ckpt}_s{meta['seed']}.json").read_text())["curve"]
            pre = [c["normalized_score"] for c in curve if c["phase"] in PRE_ONLINE]
            online = [c for c in curve if c["phase"] == "online"]
            xs = [0] * len(pre) + [c["step"] for c in online]
            ys = pre + [c["normalized_score"] for c in online]
            color = "C3" if meta["mode"] == "naive" else "C2" if meta["mode"].endswith("train") else "C0"
            label = None if meta["mode"] in seen else LABELS.get(meta["mode"], meta["mode"])
            seen.add(meta["mode"])
            ax.plot(xs, ys, color=color, alpha=0.7, marker="o", ms=2, label=label)
        ax.set_title(f"o2o_{script}.py from {ckpt}")
        ax.set_xlabel("online env steps (step 0: offline, distilled, aligned)")
        ax.set_ylabel("normalised score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG, one panel per script and checkpoint")
    a = p.parse_args()
    runs = load(a.folder)
    print(table(runs))
    if a.plot:
        plot(runs, a.folder, a.plot)
