"""The constraint during online fine-tuning, read from the tensorboard logs of o2o_sac.py / o2o_td3.py runs.

For each run folder: the evaluation scores, the batch-mean KL to pi_ref (O2SAC; O2TD3: the squared deviation), the
threshold it is held under and the Lagrange multiplier, every logged env step of the online phase. Writes them as
JSON and, with --plot, one figure of three panels (score, deviation against threshold, lambda), one line per run.

    python benchmarks/constraint_trace.py LABEL=RUN_FOLDER [LABEL=RUN_FOLDER ...] --out trace.json [--plot trace.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = {"score": "eval/normalized_score", "deviation": "losses/kl", "threshold": "charts/kl_threshold", "lambda": "losses/lambda"}


def read_run(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(env step, value), ...]} over every event file of the folder; a later file overrides a step (a resume)."""
    series: dict[str, dict[int, float]] = {k: {} for k in TAGS}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        tags = ea.Tags()["scalars"]
        for name, tag in TAGS.items():
            if tag in tags:
                series[name].update({e.step: e.value for e in ea.Scalars(tag)})
    return {k: sorted(v.items()) for k, v in series.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    traces = {}
    for spec in a.runs:
        label, _, folder = spec.partition("=")
        if not folder or not Path(folder).is_dir():
            raise SystemExit(f"expected LABEL=RUN_FOLDER with an existing folder, got {spec!r}")
        traces[label] = read_run(Path(folder))
    Path(a.out).write_text(json.dumps(traces, indent=1) + "\n")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for i, (label, t) in enumerate(traces.items()):
            color = f"C{i}"
            if t["score"]:
                axes[0].plot(*zip(*t["score"]), marker="o", ms=3, color=color, label=label)
            if t["deviation"]:
                axes[1].plot(*zip(*t["deviation"]), color=color, label=f"{label}: KL to pi_ref")
            if t["threshold"]:
                axes[1].plot(*zip(*t["threshold"]), color=color, ls="--", label=f"{label}: threshold")
            if t["lambda"]:
                axes[2].plot(*zip(*t["lambda"]), color=color, label=label)
        for ax, title in zip(axes, ("normalised score (evaluation)", "batch-mean deviation and its threshold", "Lagrange multiplier")):
            ax.set_title(title)
            ax.set_xlabel("online env steps")
            ax.legend(fontsize=7)
        axes[2].set_yscale("log")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)


if __name__ == "__main__":
    main()
