"""Where does an O2SAC actor differ from pi0? A probe for the late online collapse seen at small budgets.

Reads an o2o_sac.py run folder: pi0 from its aligned.pt (or reevaluated.pt), the actor from final.pt (or online.pt).
Prints, as JSON: KL(actor || pi0) of the two tanh-Gaussians (closed form of the pre-tanh Gaussians, which tanh maps
one-to-one) and the mean |difference| of their modes tanh(mu), on every 50th dataset state and on 500 start states of
the evaluation env (reset seeds 0..499); and the length of 5 deterministic episodes of each actor (reset seeds
100..104).

    python benchmarks/collapse_probe.py RUN_FOLDER [--out FILE.json]

Needs the run's dataset in the Minari store (MINARI_DATASETS_PATH) and imports o2o_sac.py from the repository root.
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


def gaussian_kl(mu1: torch.Tensor, ls1: torch.Tensor, mu2: torch.Tensor, ls2: torch.Tensor) -> torch.Tensor:
    v1, v2 = (2 * ls1).exp(), (2 * ls2).exp()
    return (ls2 - ls1 + (v1 + (mu1 - mu2) ** 2) / (2 * v2) - 0.5).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    load = lambda name: torch.load(a.run / name, weights_only=False, map_location="cpu")  # noqa: E731
    final = load("final.pt") if (a.run / "final.pt").exists() else load("online.pt")
    phase = load("aligned.pt") if (a.run / "aligned.pt").exists() else load("reevaluated.pt")

    def actor(state: dict) -> o2o_sac.TanhGaussianActor:
        net = o2o_sac.TanhGaussianActor(final["obs_dim"], final["act_dim"], tuple(final["actor_config"]["hidden"]))
        net.load_state_dict(state)
        return net.eval()

    pi, pi0 = actor(final["actor"]), actor(phase["o2o"]["pi0"])
    mean, std = final["obs_mean"].numpy(), final["obs_std"].numpy()
    data = o2o_sac.load_dataset(final["env_name"], final.get("dataset_id"), quiet=True)
    env = o2o_sac.make_env(final["env_spec"])
    starts = np.stack([env.reset(seed=i)[0] for i in range(500)])
    out: dict = {"run": str(a.run), "actor_score": final.get("eval_normalized_score")}
    with torch.no_grad():
        for name, states in (("dataset_states", data["observations"][::50]), ("start_states", starts)):
            x = torch.tensor((states - mean) / std, dtype=torch.float32)
            (mu1, ls1), (mu0, ls0) = pi(x), pi0(x)
            kl = gaussian_kl(mu1, ls1, mu0, ls0)
            out[name] = {"n": len(x), "kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                         "mode_abs_diff_mean": float((torch.tanh(mu1) - torch.tanh(mu0)).abs().mean())}
        for name, net in (("actor", pi), ("pi0", pi0)):
            lengths = []
            for ep in range(5):
                obs, _ = env.reset(seed=100 + ep)
                for t in range(1000):
                    mu, _ = net(torch.tensor((obs - mean) / std, dtype=torch.float32)[None])
                    obs, _, term, trunc, _ = env.step(torch.tanh(mu)[0].numpy())
                    if term or trunc:
                        break
                lengths.append(t + 1)
            out[f"{name}_episode_lengths"] = lengths
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
