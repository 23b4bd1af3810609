"""Markdown tables (as in the README) from the benchmark JSON files in benchmarks/results/.

    python benchmarks/tables.py              # every device found
    python benchmarks/tables.py --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def speed_table(device: str) -> str:
    """Grad steps/s per phase and mode, with the speed-up over eager in brackets."""
    rows, modes = [], []
    off = RESULTS / f"bench_offline_{device}.json"
    if off.exists():
        r = json.loads(off.read_text())
        for algo in next(iter(r["steps_per_s"].values())):
            rows.append(("offline_pretrain", algo, {m: v[algo] for m, v in r["steps_per_s"].items() if algo in v}))
    for script in ("sac", "td3", "ppo"):
        p = RESULTS / f"bench_o2o_{script}_{device}.json"
        if not p.exists() or "modes" not in json.loads(p.read_text()):
            continue
        r = json.loads(p.read_text())
        for phase in next(iter(r["modes"].values())):
            rows.append((f"o2o_{script}", phase, {m: v[phase]["steps_per_s"] for m, v in r["modes"].items()}))
    for _, _, by_mode in rows:
        modes += [m for m in by_mode if m not in modes]
    if not rows:
        return ""
    lines = ["| script | phase | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for script, phase, by_mode in rows:
        eager = by_mode.get("eager")
        cells = []
        for m in modes:
            v = by_mode.get(m)
            cells.append("" if v is None else f"{v:.1f}" if m == "eager" or not eager else f"{v:.1f} ({v / eager:.2f}x)")
        lines.append(f"| {script} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_table(device: str) -> str:
    lines = []
    for p in sorted(RESULTS.glob(f"protocol_o2o_sac_{device}*.json")):
        r = json.loads(p.read_text())
        lines += [f"{p.name} (scale {r['scale']}, {r['device_name']}):", "", "| mode | total | phases | peak GPU memory |", "|---|---|---|---|"]
        for mode, m in r["modes"].items():
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in m["phases_s"].items())
            mem = "" if m["peak_gpu_memory_gib"] is None else f"{m['peak_gpu_memory_gib']:.2f} GiB"
            lines.append(f"| {mode} | {m['wall_clock_s'] / 60:.1f} min | {phases} | {mem} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", nargs="+", default=["cpu", "cuda"])
    a = p.parse_args()
    for dev in a.device:
        for t in (speed_table(dev), protocol_table(dev)):
            if t:
                print(f"## {dev}\n\n{t}\n")


if __name__ == "__main__":
    main()
