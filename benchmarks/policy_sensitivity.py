"""How much does a small change of an offline actor cost its deterministic score? Random parameter perturbations
against the changes online learning made.

The no-drop check compares the offline policy's deterministic score with the scores right after online learning
starts. Whether a drop there says something about the algorithm depends on how sensitive that score is to any small
change of the actor. This takes the actor of an offline checkpoint and evaluates, over the same N start states:

  - the actor itself;
  - `--draws` copies per size s in `--sizes`, every weight and bias of the mean network plus s * N(0, 1) (the log-std
    untouched: it does not enter a deterministic evaluation);
  - the actors of the o2o files given with `--compare` (online.pt / final.pt of a run from that checkpoint), e.g. after
    one PPO update (`--stop-after 2048`).

For each it reports the RMS change of the deterministic action against the checkpoint's actor over every 50th dataset
state and the mean normalised score. Random perturbations say what a change of that size costs when it carries no
information; an online update of the same size that costs more is worse than random.

    python benchmarks/policy_sensitivity.py --env hopper-medium-v2 --checkpoint CKPT --sizes 1e-4 3e-4 1e-3 \
        --draws 10 --episodes 50 --compare run/online.pt --out sensitivity.json

Start states: reset seeds --eval-seed .. --eval-seed + N - 1 (default 100: those of an o2o run of --seed 0). Needs the
dataset in the Minari store (MINARI_DATASETS_PATH) for its reference scores, env and states; imports o2o_ppo.py from
the repository root.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import o2o_ppo  # noqa: E402
from eval_policy import actor_of  # noqa: E402  (the actor of a checkpoint or an o2o file, any family)


def perturbed(actor: torch.nn.Module, size: float, seed: int) -> torch.nn.Module:
    """A copy whose mean network's parameters are shifted by size * N(0, 1) (one generator per draw)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(actor)
    with torch.no_grad():
        for p in out.net.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="hopper-medium-v2")
    p.add_argument("--checkpoint", type=Path, required=True, help="offline checkpoint whose actor is perturbed")
    p.add_argument("--sizes", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--eval-seed", type=int, default=100)
    p.add_argument("--compare", type=Path, nargs="*", default=[])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = o2o_ppo.load_dataset(a.env, quiet=True)
    saved = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    base = actor_of(saved, saved["actor"])
    states = torch.as_tensor((data["observations"][::50] - saved["obs_mean"].numpy()) / saved["obs_std"].numpy(), dtype=torch.float32)
    ev = o2o_ppo.Evaluator(data["env_spec"], a.episodes, a.eval_seed, saved["obs_mean"].numpy(), saved["obs_std"].numpy(), torch.device("cpu"))
    with torch.no_grad():
        base_actions = base.act(states)

    def measure(kind: str, actor: torch.nn.Module, **extra) -> dict:
        with torch.no_grad():
            rms = float((actor.act(states) - base_actions).pow(2).mean().sqrt())
        scores = o2o_ppo.normalized_score(ev(actor.act), data["ref_min_score"], data["ref_max_score"])
        row = {"kind": kind, **extra, "action_rms_change": rms, "score": float(scores.mean()),
               "stderr": float(scores.std(ddof=1) / np.sqrt(len(scores)))}
        print(f"{kind} {extra}: action RMS change {rms:.4f}, score {row['score']:.1f} +- {row['stderr']:.1f}", flush=True)
        return row

    rows = [measure("checkpoint", base)]
    for size in a.sizes:
        for k in range(a.draws):
            rows.append(measure("random", perturbed(base, size, k), size=size, draw=k))
    for path in a.compare:
        other = torch.load(path, map_location="cpu", weights_only=False)
        # in its own family: an O2TD3 file holds a deterministic actor, whatever the offline checkpoint's family
        rows.append(measure("compare", actor_of(other, other["actor"]), file=str(path), env_steps=other.get("env_steps")))
    ev.close()
    summary = []
    for size in a.sizes:
        r = [x for x in rows if x["kind"] == "random" and x["size"] == size]
        s = np.array([x["score"] for x in r])
        summary.append({"size": size, "action_rms_change": float(np.mean([x["action_rms_change"] for x in r])), "mean_score": float(s.mean()),
                        "min_score": float(s.min()), "max_score": float(s.max()), "draws": len(r)})
        print(f"size {size:g}: action RMS change {summary[-1]['action_rms_change']:.4f}, score mean {s.mean():.1f}, min {s.min():.1f}, "
              f"max {s.max():.1f} (checkpoint {rows[0]['score']:.1f})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"env": a.env, "checkpoint": str(a.checkpoint), "episodes": a.episodes, "eval_seed": a.eval_seed,
                                 "rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
