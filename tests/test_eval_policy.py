"""benchmarks/eval_policy.py --sampled: the policy acts on its own samples, clipped to the action box."""

from __future__ import annotations

import torch

from conftest import load_benchmark, load_script

ppo = load_script("o2o_ppo")
ev = load_benchmark("eval_policy")


def test_sampled_actions_follow_the_policy_and_stay_in_the_box():
    torch.manual_seed(0)
    actor = ppo.GaussianActor(11, 3, (64, 64))
    with torch.no_grad():
        actor.log_std.fill_(-2.0)  # std 0.135
        actor.net[-1].bias[0] += 1.5  # the first action's mean near 0.9: its samples reach the box
    obs = torch.randn(20_000, 11)
    act = ev.sampled(actor, 1.0)
    with torch.no_grad():
        mean = actor.act(obs)
        a = act(obs)
    assert a.abs().max() <= 1.0 and (a.abs() == 1.0).any()  # clipped, and the clip is reached
    inside = mean.abs() < 1.0 - 4 * 0.135  # coordinates whose samples the clip (almost) never touches
    z = (a - mean)[inside]
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - torch.tensor(-2.0).exp().item()) < 0.01
