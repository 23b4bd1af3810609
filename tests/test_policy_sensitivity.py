"""benchmarks/policy_sensitivity.py: the perturbation it measures is the one it says (a copy, the mean network only,
noise of the given size, one draw per seed)."""

from __future__ import annotations

import torch

from conftest import load_benchmark, load_script

ppo = load_script("o2o_ppo")
sens = load_benchmark("policy_sensitivity")


def test_perturbed_copy_shifts_only_the_mean_network_by_the_given_size():
    torch.manual_seed(0)
    actor = ppo.GaussianActor(11, 3, (256, 256))
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    out = sens.perturbed(actor, 1e-2, seed=3)
    for k, v in actor.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    assert torch.equal(out.log_std, actor.log_std)  # the log-std does not enter a deterministic evaluation
    deltas = torch.cat([(p - q).flatten() for p, q in zip(out.net.parameters(), actor.net.parameters())])
    assert (deltas != 0).float().mean() > 0.99  # every weight and bias moved
    assert abs(deltas.std().item() - 1e-2) < 5e-4 and abs(deltas.mean().item()) < 5e-4
    again = sens.perturbed(actor, 1e-2, seed=3)
    other = sens.perturbed(actor, 1e-2, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(again.net.parameters(), out.net.parameters()))  # one draw per seed
    assert not all(torch.equal(p, q) for p, q in zip(other.net.parameters(), out.net.parameters()))
    zero = sens.perturbed(actor, 0.0, seed=3)
    obs = torch.randn(64, 11)
    assert torch.equal(zero.act(obs), actor.act(obs))
