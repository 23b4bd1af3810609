"""Deterministic scores of saved policies over many episodes: the noise floor of the no-drop check.

A run's own evaluations use --eval-episodes (5 in the reduced runs) from start states fixed by its seed, so the same
offline policy scores 43-56 depending on the seed on hopper-medium. This evaluates, over N episodes from the same
start states for every file (reset seeds 1000 .. 1000+N-1), the actor of each checkpoint given (an offline
checkpoint, or an o2o script's aligned.pt / online.pt / final.pt) and, where the file holds it, the o2o run's pi0
(the offline actor as the o2o script took it over: O2SAC's distilled tanh-Gaussian).

    python benchmarks/eval_policy.py --env hopper-medium-v2 --episodes 50 FILE [FILE ...] --out scores.json

With --sampled, each policy is also scored acting on its own samples (the actions online training explores with,
clipped to the box; torch seed 0 for every policy): the objective PPO improves, next to the deterministic score the
no-drop check reads.

Prints one line per policy (mean normalised score +- standard error, median) and writes them as JSON. Needs the
dataset in the Minari store (MINARI_DATASETS_PATH) for its reference scores and env; imports o2o_sac.py from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import o2o_sac  # noqa: E402


def actor_of(saved: dict, state: dict) -> torch.nn.Module:
    hidden = saved["actor_config"]["hidden"]
    actor = o2o_sac.build_actor(saved["actor_family"], saved["obs_dim"], saved["act_dim"], hidden, saved.get("max_action", 1.0))
    actor.load_state_dict(state)
    return actor.eval()


def sampled(actor: torch.nn.Module, max_action: float):
    """The policy acting on its own samples, clipped to the action box (as the o2o scripts' training envs get them)."""
    return lambda obs: actor.sample(obs)[0].clamp(-max_action, max_action)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--env", default="hopper-medium-v2")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sampled", action="store_true", help="also score each policy on sampled actions")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = o2o_sac.load_dataset(a.env, quiet=True)
    results = []
    for path in a.files:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        policies = [("actor", actor_of(saved, saved["actor"]))]
        if isinstance(saved.get("o2o"), dict) and "pi0" in saved["o2o"]:
            pi0 = o2o_sac.TanhGaussianActor(saved["obs_dim"], saved["act_dim"], tuple(o2o_sac.ACTOR_HIDDEN))
            pi0.load_state_dict(saved["o2o"]["pi0"])
            policies.append(("pi0", pi0.eval()))
        ev = o2o_sac.Evaluator(data["env_spec"], a.episodes, 1000, saved["obs_mean"].numpy(), saved["obs_std"].numpy(), torch.device("cpu"))
        runs = [(name, actor.act) for name, actor in policies]
        if a.sampled:
            runs += [(f"{name} sampled", sampled(actor, saved.get("max_action", 1.0))) for name, actor in policies]
        for name, act in runs:
            torch.manual_seed(0)
            scores = o2o_sac.normalized_score(ev(act), data["ref_min_score"], data["ref_max_score"])
            row = {"file": str(path), "policy": name, "episodes": a.episodes, "mean": float(scores.mean()),
                   "stderr": float(scores.std(ddof=1) / np.sqrt(len(scores))), "median": float(np.median(scores))}
            results.append(row)
            print(f"{path} {name}: {row['mean']:.1f} +- {row['stderr']:.1f} (median {row['median']:.1f})", flush=True)
        ev.close()
    a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
