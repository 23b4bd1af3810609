"""o2o_ppo.py: hand-checked math (Monte-Carlo returns, GAE, reference advantage, weights), the env pool's same-step
autoreset against plain envs, smoke runs of every mode and offline family, resume, determinism, bad inputs, wiring
(main() run with spies: what re-evaluation, GAE and each PPO update receive, against hand computations), the
phase-boundary diagnostics, --early-evals and --budget-scale (hand-checked statistics, spied update counts), and
--compile / --cudagraphs / --bf16 computing the eager updates' math (see tests/test_accel.py for why float64)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import assert_results_schema, load_script, phase_marks, run_o2o, scalar_steps, scalars, wandb_offline, wandb_offline_run

ppo = load_script("o2o_ppo")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["--rollout-size", "64", "--minibatch-size", "32", "--update-epochs", "2", "--online-steps", "256",
        "--reevaluate-steps", "50", "--distill-steps", "50", "--eval-every", "128", "--eval-episodes", "2", "--headline-eval-episodes", "0",
        "--log-every", "64", "--checkpoint-every", "128", "--device", "cpu"]


run = functools.partial(run_o2o, ppo, TINY)  # run(ckpt, run_dir, *extra flags)


# ---------------------------------------------------------------- pure math
def test_monte_carlo_returns_restart_at_terminal_and_time_limit():
    # three episodes: ends in a termination (t=2), a time limit (t=4), then the dataset's last episode (t=6)
    data = {"rewards": np.array([1, 2, 3, 4, 5, 6, 7], np.float32), "terminals": np.array([0, 0, 1, 0, 0, 0, 0], np.float32),
            "ends": np.array([0, 0, 1, 0, 1, 0, 1], np.float32)}
    g = ppo.monte_carlo_returns(data["rewards"], data["ends"], 0.5)
    # by hand: 3, 2 + .5*3, 1 + .5*3.5 | 5, 4 + .5*5 (no leak from episode 3 across the time limit) | 7, 6 + .5*7
    np.testing.assert_allclose(g, [2.75, 3.5, 3.0, 6.5, 5.0, 9.5, 7.0])
    assert g.dtype == np.float32


def test_monte_carlo_returns_on_a_real_dataset(tiny_dataset):
    data = ppo.load_dataset("hopper-medium-v2", quiet=True)
    g = ppo.monte_carlo_returns(data["rewards"], data["ends"], 0.99)
    ends = data["ends"].astype(bool)
    assert ends.sum() == len(data["episode_returns"])
    np.testing.assert_allclose(g[ends], data["rewards"][ends], rtol=1e-6)  # every episode restarts
    first_len = int(np.argmax(ends)) + 1
    expect = sum(0.99**k * float(r) for k, r in enumerate(data["rewards"][:first_len]))
    assert g[0] == pytest.approx(expect, rel=1e-4)


def test_reevaluation_fits_the_monte_carlo_returns(tiny_dataset, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    data = ppo.load_dataset("hopper-medium-v2", quiet=True)
    mean, std = ppo.obs_stats(data["observations"])
    obs = torch.as_tensor((data["observations"] - mean) / std)
    g = torch.as_tensor(ppo.monte_carlo_returns(data["rewards"] / 3.0, data["ends"], 0.99))
    torch.manual_seed(0)
    vf = ppo.build_value(obs.shape[1])
    fresh_mse = ((vf(obs)[0] - g) ** 2).mean().item()
    args = tyro.cli(ppo.Args, args=["--reevaluate-steps", "300", "--reevaluate-lr", "1e-3", "--log-every", "100"])
    with SummaryWriter(str(tmp_path)) as w:
        info = ppo.reevaluate_value(args, vf, obs, g, w)
    assert info["steps"] == 300 and info["final_loss"] < fresh_mse / 2 and info["explained_variance"] > 0.3
    assert len(scalars(tmp_path)["reevaluate/value_loss"]) == 3


def plain_gae(rewards, values, next_values, terms, truncs, gamma, lam):
    """Per env, written independently with explicit branches."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for i in range(N):
        following = 0.0
        for t in range(T - 1, -1, -1):
            if terms[t][i]:
                delta, following = rewards[t][i] - values[t][i], 0.0  # nothing after a terminal state
            elif truncs[t][i]:
                delta, following = rewards[t][i] + gamma * next_values[t][i] - values[t][i], 0.0  # bootstrap from V(final obs)
            else:
                delta = rewards[t][i] + gamma * next_values[t][i] - values[t][i]
            following = delta + gamma * lam * following
            adv[t][i] = following
    return adv


def test_gae_hand_checked():
    # t0 normal, t1 time limit (V(final obs) = 2), t2 normal, t3 termination; gamma = lambda = 0.5
    r = torch.ones(4, 1)
    v = torch.full((4, 1), 0.5)
    nv = torch.tensor([[0.5], [2.0], [0.5], [3.0]])
    term = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    ends = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    adv, ret = ppo.gae(r, v, nv, term, ends, 0.5, 0.5)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.125, 1.5, 0.875, 0.5]))
    torch.testing.assert_close(ret, adv + v)


def test_gae_against_plain_loop_with_both_kinds_of_ends():
    g = torch.Generator().manual_seed(0)
    T, N = 9, 3
    r, v, nv = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    terms, truncs = torch.zeros(T, N), torch.zeros(T, N)
    terms[2, 0] = terms[6, 1] = terms[8, 2] = 1.0
    truncs[4, 0] = truncs[3, 1] = truncs[5, 2] = 1.0
    adv, ret = ppo.gae(r, v, nv, terms, torch.maximum(terms, truncs), 0.99, 0.95)
    expect = plain_gae(r.tolist(), v.tolist(), nv.tolist(), terms.tolist(), truncs.tolist(), 0.99, 0.95)
    torch.testing.assert_close(adv, torch.tensor(expect))
    # the time limit bootstraps, a termination does not: changing V(final obs) moves only the first
    nv2 = nv.clone()
    nv2[4, 0] += 1.0
    nv2[2, 0] += 1.0
    adv2, _ = ppo.gae(r, v, nv2, terms, torch.maximum(terms, truncs), 0.99, 0.95)
    assert adv2[4, 0] - adv[4, 0] == pytest.approx(0.99)
    assert adv2[2, 0] == adv[2, 0]


def test_reference_advantage_hand_checked_and_per_sample():
    mu, std = torch.zeros(3, 2), torch.ones(3, 2)
    actions = torch.tensor([[0.0, 0.0], [2.0, 0.0], [30.0, 30.0]])
    adv = torch.tensor([[1.0], [3.0], [5.0]])  # std (unbiased) = 2
    a_ref = ppo.reference_advantage(actions, mu, std, adv)
    assert a_ref.shape == (3, 1)  # per sample, like A_hat, never (B, B) (docs/algorithms.md, section 7)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    # |A| = 2: g = 1 at the reference mean, g = 0.5 (1 - 4 + 1) = -1 for z = (2, 0), far away g -> -inf
    expect = [(2 / 2) * (sp(1 + 8) - 8) * 2, (2 / 2) * (sp(-1 + 8) - 8) * 2, -8.0 * 2]
    torch.testing.assert_close(a_ref[:, 0], torch.tensor(expect))
    # one sample's action changes only its own reference advantage
    moved = actions.clone()
    moved[1, 1] = 1.0
    a2 = ppo.reference_advantage(moved, mu, std, adv)
    assert a2[1, 0] != a_ref[1, 0] and torch.equal(a2[[0, 2]], a_ref[[0, 2]])
    # sigma_ref scales z
    torch.testing.assert_close(ppo.reference_advantage(actions * 3, mu, std * 3, adv), a_ref)
    with pytest.raises(ValueError):
        ppo.reference_advantage(actions, mu, std, adv[:, 0])  # a (B,) A_hat is refused


def test_constrained_advantages_and_weight_schedule():
    adv, a_ref = torch.tensor([[1.0], [-2.0]]), torch.tensor([[3.0], [0.5]])
    out = ppo.constrained_advantages(adv, a_ref, 0.5)
    torch.testing.assert_close(out, torch.tensor([[(1 + 1.5) / 1.5], [(-2 + 0.25) / 1.5]]))
    assert out.shape == (2, 1)
    torch.testing.assert_close(ppo.constrained_advantages(adv, a_ref, 0.0), adv)
    with pytest.raises(ValueError):
        ppo.constrained_advantages(adv, a_ref[:, 0], 0.5)  # the reference code's (B,) + (B, 1) -> (B, B) bug
    assert ppo.constraint_weight(0, 1000) == 1.0
    assert ppo.constraint_weight(250, 1000) == 0.75
    assert ppo.constraint_weight(1000, 1000) == 0.0
    assert ppo.constraint_weight(5000, 1000) == 0.0
    assert ppo.linear_lr(3e-5, 0, 4) == 3e-5 and ppo.linear_lr(2e-4, 3, 4) == pytest.approx(5e-5)


def plain_return_std_scaling(offline_r, offline_ends, online_r, online_ends, gamma):
    """PPO's reward scaling written out: R = gamma R + r per env (restarted after an end), population std of every R seen,
    offline ones first; an online reward is divided by the std once its R joined (offline rewards: by the offline std)."""
    seen, R = [], 0.0
    for r, e in zip(offline_r, offline_ends):
        R = gamma * R + float(r)
        seen.append(R)
        R = 0.0 if e else R
    std0 = float(np.std(seen))
    out, R = [], np.zeros(len(online_r[0]))
    for r, e in zip(online_r, online_ends):
        row = []
        for i in range(len(r)):
            R[i] = gamma * R[i] + float(r[i])
            seen.append(R[i])
        std = float(np.std(seen))
        for i in range(len(r)):
            row.append(float(r[i]) / (std + 1e-8))
            R[i] = 0.0 if e[i] else R[i]
        out.append(row)
    return std0, np.array(out)


def test_running_discounted_returns_and_return_std_scaling():
    # R restarts AFTER an end: episodes [1, 2 | 3 | 4, 5], gamma 0.5
    r, ends = np.array([1, 2, 3, 4, 5], np.float32), np.array([0, 1, 1, 0, 1], np.float32)
    np.testing.assert_allclose(ppo.running_discounted_returns(r, ends, 0.5), [1, 2.5, 3, 4, 7])
    rs = ppo.ReturnStd.from_offline(r, ends, 0.5)
    assert rs.std == pytest.approx(np.std([1, 2.5, 3, 4, 7])) and rs.scale == pytest.approx(1 / (rs.std + 1e-8))
    g = np.random.default_rng(0)
    online_r = g.normal(1.0, 2.0, size=(30, 2)).astype(np.float32)
    online_ends = np.zeros((30, 2), np.float32)
    online_ends[[4, 11, 29], 0] = online_ends[[7, 20], 1] = 1.0
    std0, expect = plain_return_std_scaling(r, ends, online_r, online_ends, 0.5)
    assert rs.std == pytest.approx(std0)
    got = np.concatenate([rs(online_r[:13], online_ends[:13]), rs(online_r[13:], online_ends[13:])])  # R carries over rollouts
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    resumed = ppo.ReturnStd(0.5, **rs.state_dict())
    assert resumed.std == rs.std and resumed.state_dict() == rs.state_dict()


def test_rollout_advantages_mix_and_normalise_over_the_whole_rollout():
    g = torch.Generator().manual_seed(0)
    B, n = 64, 3
    adv, actions = 3.0 * torch.randn(B, 1, generator=g), torch.randn(B, n, generator=g)
    mu, std = 0.5 * torch.randn(B, n, generator=g), torch.rand(B, n, generator=g) + 0.3
    out, a_ref = ppo.rollout_advantages(adv, actions, mu, std, 0.25)
    assert out.shape == (B, 1) and a_ref.shape == (B, 1)
    # by hand in float64 over ALL B samples: |std(A_hat)| of the rollout, mixing with w = 0.25, normalisation eps 1e-5
    a, z = adv.double(), (actions.double() - mu.double()) / std.double()
    gsum = 0.5 * (1 - z**2).sum(-1, keepdim=True)
    ref = (2 / n) * (F.softplus(gsum + 4 * n) - 4 * n) * a.std()
    mixed = (a + 0.25 * ref) / 1.25
    torch.testing.assert_close(a_ref.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), (mixed - mixed.mean()) / (mixed.std() + 1e-5), rtol=1e-5, atol=1e-5)
    # not the per-minibatch result: 128-sample statistics are not the rollout's
    part, _ = ppo.rollout_advantages(adv[:16], actions[:16], mu[:16], std[:16], 0.25)
    assert not torch.allclose(part, out[:16], atol=1e-3)
    plain, none = ppo.rollout_advantages(adv, actions, None, None, 0.25)  # no constraint: normalisation only
    assert none is None
    torch.testing.assert_close(plain, (adv - adv.mean()) / (adv.std() + 1e-5))
    torch.testing.assert_close(ppo.normalize_advantages(torch.full((4, 1), 2.0)), torch.zeros(4, 1))  # eps keeps it finite


def test_log_std_cap_in_the_policy_distribution():
    actor = ppo.GaussianActor(3, 2, (8,))
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([0.0, -4.0]))
    obs = torch.randn(5, 3)
    d = ppo.policy_dist(actor, obs, math.log(0.05))
    torch.testing.assert_close(d.stddev, torch.tensor([0.05, math.exp(-4.0)]).expand(5, 2))
    torch.testing.assert_close(d.mean, actor(obs)[0])
    torch.testing.assert_close(ppo.policy_dist(actor, obs, None).stddev, actor.dist(obs).stddev)
    d.log_prob(torch.zeros(5, 2)).sum().backward()
    assert actor.log_std.grad[0] == 0.0 and actor.log_std.grad[1] != 0.0  # above the cap: no gradient


def test_online_update_trains_on_the_advantages_as_given():
    """The update takes the rollout's already-normalised advantages: no second (per-minibatch) normalisation. At ratio 1
    (old_logp = the current log-prob) the clipped surrogate is -mean(A)."""
    torch.manual_seed(0)
    actor, vf = ppo.GaussianActor(4, 2, (8,)), ppo.build_value(4)
    aopt, vopt = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(vf.parameters(), 1e-3)
    obs, actions = torch.randn(8, 4), torch.randn(8, 2)
    adv = torch.linspace(0.5, 2.0, 8)  # mean 1.25: a per-minibatch normalisation would give 0
    with torch.no_grad():
        old_logp = ppo.policy_dist(actor, obs, math.log(0.5)).log_prob(actions).sum(-1)
    m = ppo.online_update(actor, vf, aopt, vopt, obs, actions, old_logp, adv, torch.zeros(8), clip_coef=0.2, ent_coef=0.0,
                          max_grad_norm=0.5, log_std_max=math.log(0.5))
    assert float(m["losses/actor_loss"]) == pytest.approx(-1.25, abs=1e-6) and float(m["losses/approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(m["losses/entropy"]) == pytest.approx(2 * 0.5 * math.log(2 * math.pi * math.e * 0.25), rel=1e-6)


def test_ppo_clip_loss_and_distill_loss():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5]))
    adv = torch.tensor([2.0, 2.0, -2.0])
    loss, kl, clipfrac = ppo.ppo_clip_loss(logp, torch.zeros(3), adv, 0.2)
    # ratio 1.5, A>0 -> clipped 1.2 A; ratio 0.5, A>0 -> 0.5 A (pessimistic); ratio 1.5, A<0 -> 1.5 A
    assert loss.item() == pytest.approx(-(1.2 * 2 + 0.5 * 2 - 1.5 * 2) / 3)
    assert clipfrac.item() == pytest.approx(1.0)
    mean, log_std, target = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.0, math.log(0.5)]]), torch.tensor([[0.3, 0.2]])
    nll = 0.5 * (0.2**2) + 0.5 * math.log(2 * math.pi) + 0.5 * (0.4 / 0.5) ** 2 + math.log(0.5) + 0.5 * math.log(2 * math.pi)
    assert ppo.distill_loss(mean, log_std, target).item() == pytest.approx(nll, rel=1e-5)


def test_update_reference_copies_only_on_a_new_best():
    actor, ref = ppo.GaussianActor(3, 2, (8,)), ppo.GaussianActor(3, 2, (8,))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    assert ppo.update_reference(ref, actor, 10.0, 20.0) == 20.0
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert ppo.update_reference(ref, actor, 30.0, 20.0) == 30.0
    assert all(torch.equal(actor.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_family_defaults_table_and_overrides():
    fd = lambda *a: ppo.family_defaults(tyro.cli(ppo.Args, args=list(a)))  # noqa: E731
    assert fd("--env", "hopper-medium-v2") == {"family_row": "medium", "family_env": "hopper", "update_epochs": 10, "constraint_horizon": 250_000,
                                               "log_std_max": None, "reward_scaling": "none", "eval_episodes": 10}
    cap = math.log(0.05)
    assert fd("--env", "hopper-medium-expert-v2") == {"family_row": "medium-expert", "family_env": "hopper", "update_epochs": 5,
                                                      "constraint_horizon": 500_000, "log_std_max": cap, "reward_scaling": "none",
                                                      "eval_episodes": 10}
    assert fd("--env", "hopper-expert-v2")["log_std_max"] == cap and fd("--env", "walker2d-expert-v2")["log_std_max"] is None
    assert fd("--env", "walker2d-expert-v2")["update_epochs"] == 10
    assert fd("--env", "hopper-expert-v2", "--update-epochs", "7", "--constraint-horizon", "1000")["update_epochs"] == 7
    assert fd("--env", "hopper-expert-v2", "--constraint-horizon", "1000")["constraint_horizon"] == 1000
    assert fd("--env", "hopper-expert-v2", "--log-std-max", "-1")["log_std_max"] == -1.0
    # a --dataset-id run follows the family --env names (here the default hopper-medium-v2) unless --family says otherwise
    assert fd("--dataset-id", "x/y-v0") == fd("--env", "hopper-medium-v2")
    # rewards of V: raw for hopper and walker2d, the running return-std for halfcheetah; the checkpoint's only when asked
    assert [fd("--env", f"{e}-medium-v2")["reward_scaling"] for e in ("hopper", "walker2d", "halfcheetah")] == ["none", "none", "return-std"]
    assert fd("--env", "halfcheetah-medium-v2", "--reward-scaling", "checkpoint")["reward_scaling"] == "checkpoint"
    # --family picks the row (and environment entry) for another dataset, e.g. the tiny hopper-medium one
    assert fd("--env", "hopper-medium-v2", "--family", "hopper-medium-expert") == fd("--env", "hopper-medium-expert-v2")
    assert fd("--dataset-id", "x/y-v0", "--family", "halfcheetah-expert-v2")["reward_scaling"] == "return-std"
    assert ppo.Args().eval_every == 2500  # the reference policy moves at evaluations: the official 2500 steps


def test_early_rollout_ends_hand_checked():
    # the paper's budget: 122 rollouts of 2048; marks 249856 * j / 50 = 4997.12, 9994.24, ... fall back to rollout ends
    assert ppo.early_rollout_ends(249_856, 2048, 5) == [4096, 8192, 14336, 18432, 24576]  # all <= 24985.6: inside the tenth
    assert ppo.early_rollout_ends(1280, 64, 2) == [64, 128]  # marks 64 and 128 are rollout ends
    assert ppo.early_rollout_ends(1280, 64, 4) == [64, 128]  # marks 32 (before the first end), 64, 96 (shares 64's), 128
    assert ppo.early_rollout_ends(256, 64, 5) == []  # one rollout is longer than the first tenth (25.6 steps)
    assert ppo.early_rollout_ends(1280, 64, 0) == []  # --early-evals 0


def test_value_stats_and_actor_stats_hand_checked():
    v = ppo.value_stats(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([2.0, 2.0, 2.0, 2.0]))
    # mean 3; population std sqrt((4 + 1 + 0 + 9) / 4); errors -1, 0, 1, 4
    assert v == pytest.approx({"v_mean": 3.0, "v_std": math.sqrt(3.5), "v_mean_error": 1.0, "v_mean_abs_error": 1.5, "mc_return_mean": 2.0})
    mean = torch.tensor([[0.5, -2.0], [0.995, 0.0]])  # -2 clips to the box edge -1
    log_std = torch.tensor([[math.log(0.5), 0.0], [math.log(0.5), 0.0]])
    a = ppo.actor_stats(mean, log_std, 1.0)
    ent = float(torch.distributions.Normal(torch.zeros(2), torch.tensor([0.5, 1.0])).entropy().sum())
    assert a == pytest.approx({"entropy": ent, "mean_abs_action": (0.5 + 1.0 + 0.995 + 0.0) / 4, "saturation": 2 / 4})
    # the threshold is relative to the action bound: with max_action 2, |a| = 1.99 saturates and 1.0 does not
    b = ppo.actor_stats(torch.tensor([[1.99, -1.0]]), torch.zeros(1, 2), 2.0)
    assert b["saturation"] == 0.5 and b["mean_abs_action"] == pytest.approx((0.995 + 0.5) / 2)


def test_scale_budgets_scales_given_and_defaulted_steps(capsys):
    args = tyro.cli(ppo.Args, args=["--budget-scale", "0.5"])
    s = ppo.scale_budgets(args)
    assert {k: getattr(s, k) for k in ppo.BUDGET_STEPS} == {
        "reevaluate_steps": 500_000, "online_steps": 125_000, "constraint_horizon": 250_000,  # the table's 250k, not scaled
        "eval_every": 1250, "log_every": 1024, "checkpoint_every": 10_240}
    assert s.distill_steps == 5000  # distillation fits the offline actor: not scaled
    assert s.rollout_size == 2048 and s.stop_after is None and args.constraint_horizon is None and args.online_steps == 250_000  # args untouched
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=["--budget-scale", "0.5", "--env", "hopper-expert-v2"])).constraint_horizon == 500_000
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=["--budget-scale", "0.5", "--constraint-horizon", "1001", "--eval-every", "3"])).constraint_horizon == 1001
    squeeze = ["--budget-scale", "0.5", "--scale-constraint-horizon"]  # the schedule compressed too
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=[*squeeze, "--env", "hopper-expert-v2"])).constraint_horizon == 250_000
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=[*squeeze, "--constraint-horizon", "1001", "--eval-every", "3"])).constraint_horizon == 501
    tiny = ppo.scale_budgets(tyro.cli(ppo.Args, args=["--budget-scale", "0.001", "--online-steps", "4_096_000"]))
    assert (tiny.distill_steps, tiny.eval_every, tiny.log_every, tiny.online_steps) == (5000, 3, 2, 4096)  # 2.5 rounds up; >= 1
    one = tyro.cli(ppo.Args, args=[])
    assert {k: getattr(ppo.scale_budgets(one), k) for k in ppo.BUDGET_STEPS} == {**{k: getattr(one, k) for k in ppo.BUDGET_STEPS}, "constraint_horizon": 250_000,
                                                                               "checkpoint_every": 20_480}
    # the default checkpoint interval: at most a tenth of the (scaled) online steps
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=["--online-steps", "4096"])).checkpoint_every == 409
    assert ppo.scale_budgets(tyro.cli(ppo.Args, args=["--online-steps", "4096", "--checkpoint-every", "7"])).checkpoint_every == 7
    with pytest.raises(SystemExit) as e:
        ppo.scale_budgets(tyro.cli(ppo.Args, args=["--budget-scale", "0.005"]))  # 1250 online steps < one rollout of 2048
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "less than one rollout" in err and "--budget-scale" in err and "at least 0.0082)" in err  # 2048 / 250000, rounded up


# ---------------------------------------------------------------- environments and rollouts
def short_spec(max_steps: int) -> str:
    return dataclasses.replace(gym.spec("Hopper-v5"), max_episode_steps=max_steps).to_json()


def test_env_pool_same_step_autoreset_matches_plain_envs():
    spec, n, steps = short_spec(15), 2, 80
    pool = ppo.EnvPool(spec, n, seed=5)
    plain = [ppo.make_env(spec) for _ in range(n)]
    obs = [env.reset(seed=5 + i)[0] for i, env in enumerate(plain)]
    rng = np.random.default_rng(0)
    kinds = {"term": 0, "trunc": 0}
    for _ in range(steps):
        actions = rng.uniform(-1.5, 1.5, size=(n, 3)).astype(np.float32)  # out of bounds: the pool clips
        np.testing.assert_allclose(pool.obs, np.stack(obs), rtol=1e-6)
        succ, rew, term, trunc, _ = pool.step(actions)
        for i, env in enumerate(plain):
            o, r, te, tr, _ = env.step(np.clip(actions[i], -1, 1))
            np.testing.assert_allclose(succ[i], o, rtol=1e-6)  # successor = the final obs at an end
            assert rew[i] == pytest.approx(r) and term[i] == te and trunc[i] == (tr and not te)
            kinds["term"] += te
            kinds["trunc"] += tr and not te
            obs[i] = env.reset()[0] if te or tr else o
    assert kinds["term"] > 0 and kinds["trunc"] > 0  # both kinds of ends were exercised
    pool.close()


def test_collect_rollout_two_envs_successors_and_values():
    torch.manual_seed(0)
    pool = ppo.EnvPool(short_spec(10), 2, seed=1)
    actor, vf = ppo.GaussianActor(11, 3, (16,)), ppo.build_value(11)
    mean, std = torch.zeros(11), torch.ones(11) * 2
    roll, finished = ppo.collect_rollout(pool, actor, vf, 25, mean, std, lambda r, e: 0.5 * r)
    assert roll["obs"].shape == (25, 2, 11) and roll["actions"].shape == (25, 2, 3) and roll["logprobs"].shape == (25, 2)
    ends = roll["ends"].bool()
    assert ends.sum() >= 4 and len(finished) == int(ends.sum())
    for t in range(24):
        for i in range(2):
            same = torch.equal(roll["successors"][t, i], roll["obs"][t + 1, i])
            assert same != bool(ends[t, i])  # the next row continues the episode unless it ended (then: reset obs)
    torch.testing.assert_close(roll["next_values"], vf(roll["successors"])[0])
    assert (roll["ends"] >= roll["terminations"]).all()
    torch.testing.assert_close(roll["rewards"], 0.5 * roll["raw_rewards"])
    pool.close()


# ---------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("family", ["iql", "cql", "bc_det"])
def test_o2ppo_from_every_actor_family(offline_checkpoints, tmp_path, family):
    res = run(offline_checkpoints[family], tmp_path)
    out = tmp_path / "o2o_ppo" / "hopper-medium-v2" / "o2ppo_seed0"
    for f in ("args.json", "results.json", "final.pt", "online.pt", "reevaluated.pt"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["curve"] == res["curve"] and saved["local_standin"] is True and saved["dataset_ids"]
    ckpt = torch.load(offline_checkpoints[family], weights_only=True)
    if family == "iql":  # same family: copied exactly, no distillation
        assert not (out / "distilled.pt").exists() and res["distillation"] is None
        actor = torch.load(out / "reevaluated.pt", weights_only=True)["actor"]
        assert all(torch.equal(actor[k], ckpt["actor"][k]) for k in ckpt["actor"])
        phases = ["offline", "online", "online", "online"]  # the start of online, two evaluations
        assert res["online_start_score"] == res["offline_score"]
    else:
        assert (out / "distilled.pt").exists() and res["distillation"]["teacher_family"] == ckpt["actor_family"]
        assert math.isfinite(res["distillation"]["mse"])
        phases = ["offline", "distilled", "online", "online", "online"]
    assert [e["phase"] for e in res["curve"]] == phases and [e["step"] for e in res["curve"]][-2:] == [128, 256]
    s = scalars(out)
    for tag in ("losses/actor_loss", "losses/value_loss", "losses/ref_advantage", "losses/entropy", "reevaluate/value_loss", "eval/normalized_score"):
        assert s[tag] and all(math.isfinite(x) for x in s[tag]), tag
    assert len(s["losses/actor_loss"]) == 4  # logged after every 64-step rollout
    assert s["charts/constraint_weight"][-1] == pytest.approx(1 - 256 / 250_000)
    # charts/phase on the env-step axis, once per phase (not at every evaluation): all of them start at env step 0
    assert phase_marks(out) == [(0, "offline"), *[(0, "distill")] * (family != "iql"), (0, "reevaluate"), (0, "online")]
    # final.pt is a checkpoint of the common format: loadable and evaluable
    final = ppo.load_checkpoint(out / "final.pt", env_name="hopper-medium-v2", obs_dim=11, act_dim=3)
    assert isinstance(ppo.actor_from_checkpoint(final), ppo.GaussianActor) and "vf" in final["critics"]


@pytest.mark.parametrize("flags,mode", [(["--no-reevaluate", "--no-constraint", "--num-envs", "2"], "naive"),
                                        (["--no-constraint"], "no_constraint"),
                                        (["--no-reevaluate", "--num-envs", "4", "--reference", "offline"], "no_reevaluate")])
def test_ablations(offline_checkpoints, tmp_path, flags, mode):
    res = run(offline_checkpoints["iql"], tmp_path, *flags)
    out = tmp_path / "o2o_ppo" / "hopper-medium-v2" / f"{mode}_seed0"
    assert res["mode"]["name"] == mode and (out / "results.json").exists() and res["online_steps_done"] == 256
    assert_results_schema(res, "o2o_ppo")
    assert res["method"] == {"naive": "naive", "no_constraint": "no-constraint", "no_reevaluate": "no-reevaluate"}[mode]
    assert (out / "reevaluated.pt").exists() == ("--no-reevaluate" not in flags)
    assert (res["reevaluation"] is None) == ("--no-reevaluate" in flags)
    s = scalars(out)
    assert ("losses/ref_advantage" in s) == ("--no-constraint" not in flags)
    assert all(math.isfinite(x) for x in s["losses/value_loss"])
    if "--no-constraint" in flags:
        assert s["charts/constraint_weight"] == [0.0] * 4
    assert phase_marks(out) == [(0, "offline"), *[(0, "reevaluate")] * ("--no-reevaluate" not in flags), (0, "online")]


def test_resume_after_kill_and_longer_budget(offline_checkpoints, tmp_path, capsys):
    ck = offline_checkpoints["iql"]
    out = tmp_path / "o2o_ppo" / "hopper-medium-v2" / "o2ppo_seed0"
    killed = run(ck, tmp_path, "--stop-after", "128")
    assert not killed["finished"] and killed["online_steps_done"] == 128
    assert (out / "online.pt").exists() and not (out / "final.pt").exists()
    assert json.loads((out / "results.json").read_text())["finished"] is False  # a killed run's results say so
    assert "stopped after 128 env steps (--stop-after, as if killed); online.pt holds env step 128:" in capsys.readouterr().out
    resumed = run(ck, tmp_path)
    assert "resuming" in capsys.readouterr().out
    assert resumed["resumed_from"] == 128 and resumed["online_steps_done"] == 256 and resumed["finished"]
    assert resumed["curve"][: len(killed["curve"])] == killed["curve"] and resumed["curve"][-1]["step"] == 256
    longer = run(ck, tmp_path, "--online-steps", "384")
    assert longer["resumed_from"] == 256 and longer["curve"][: len(resumed["curve"])] == resumed["curve"]
    assert [e["step"] for e in longer["curve"]][-1] == 384
    assert phase_marks(out) == [(0, "offline"), (0, "reevaluate"), (0, "online")]  # a resumed run marks no phase again
    # other settings in the same run folder: refused, nothing overwritten
    with pytest.raises(SystemExit) as e:
        run(ck, tmp_path, "--clip-coef", "0.3")
    assert e.value.code == 2 and "--clip-coef 0.2 (now 0.3)" in capsys.readouterr().err


def test_same_seed_same_result_and_phase_reuse(offline_checkpoints, tmp_path, capsys):
    ck = offline_checkpoints["cql"]  # distillation and re-evaluation both run
    a = run(ck, tmp_path / "a")
    b = run(ck, tmp_path / "b")
    assert a["curve"] == b["curve"]
    fa, fb = (torch.load(p / "o2o_ppo/hopper-medium-v2/o2ppo_seed0/final.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(fa["actor"][k], fb["actor"][k]) for k in fa["actor"])
    # a rerun without online.pt reuses distilled.pt and reevaluated.pt and computes the same run
    out = tmp_path / "a/o2o_ppo/hopper-medium-v2/o2ppo_seed0"
    (out / "online.pt").unlink()
    (out / "final.pt").unlink()
    capsys.readouterr()
    c = run(ck, tmp_path / "a")
    printed = capsys.readouterr().out
    assert "reusing" in printed and "distilled.pt" in printed and "reevaluated.pt" in printed
    assert c["curve"] == a["curve"]
    d = run(ck, tmp_path / "a", "--no-resume", "--seed", "1", "--run-name", "other")
    assert d["curve"] != a["curve"]  # another seed: other evaluation starts and another run
    # a saved phase of other settings (here the folder of a run killed before its first online.pt) is recomputed,
    # with a notice; the distillation is still reused
    for name in ("online.pt", "final.pt", "results.json"):
        (out / name).unlink()
    capsys.readouterr()
    run(ck, tmp_path / "a", "--reevaluate-steps", "40")
    printed = capsys.readouterr().out
    assert f"NOTICE: {out / 'reevaluated.pt'} was made with other arguments; recomputing phase reevaluated" in printed
    assert f"reusing {out / 'distilled.pt'}" in printed


def test_retrained_checkpoint_at_the_same_path_invalidates_saved_phases(offline_checkpoints, tmp_path, capsys):
    """Phases are keyed on the checkpoint's content: the same path with other weights (same step count) reuses no
    saved phase, and a finished run of the old checkpoint in the folder is refused until --overwrite."""
    ckpt_path = tmp_path / "cql_checkpoint.pt"
    shutil.copy(offline_checkpoints["cql"], ckpt_path)
    out = tmp_path / "o2o_ppo/hopper-medium-v2/r"
    run(ckpt_path, tmp_path, "--run-name", "r")
    for name in ("online.pt", "final.pt", "results.json"):
        (out / name).unlink()
    capsys.readouterr()
    run(ckpt_path, tmp_path, "--run-name", "r")
    assert f"reusing {out / 'reevaluated.pt'}" in capsys.readouterr().out
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # "retrain": other weights, same grad_steps
    ck["actor"] = {k: v + 0.01 for k, v in ck["actor"].items()}
    torch.save(ck, ckpt_path)
    with pytest.raises(SystemExit) as e:
        run(ckpt_path, tmp_path, "--run-name", "r")
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    for name in ("online.pt", "final.pt", "results.json"):
        (out / name).unlink()
    run(ckpt_path, tmp_path, "--run-name", "r")
    printed = capsys.readouterr().out
    assert "reusing" not in printed and "was made with other arguments; recomputing phase reevaluated" in printed


def test_run_folder_of_other_settings_refused_then_overwritten(offline_checkpoints, tmp_path, capsys):
    """A finished run of other settings is refused (with --no-resume too), its files untouched; --overwrite deletes its
    outputs, tensorboard events included, before the new run writes anything; a rerun then resumes the new run."""
    ck, d = offline_checkpoints["iql"], tmp_path / "o2o_ppo" / "hopper-medium-v2" / "o2ppo_seed0"
    run(ck, tmp_path)
    old_events = {p.name for p in d.glob("events.out.tfevents.*")}
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for extra in ([], ["--no-resume"]):
        with pytest.raises(SystemExit) as e:
            run(ck, tmp_path, "--clip-coef", "0.3", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "finished run with other settings (--clip-coef 0.2 (now 0.3))" in err and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    res = run(ck, tmp_path, "--clip-coef", "0.3", "--overwrite")
    assert res["resumed_from"] is None and res["online_steps_done"] == 256
    events = {p.name for p in d.glob("events.out.tfevents.*")}
    assert len(events) == 1 and not events & old_events  # the old logs are gone, not mixed with the new ones
    assert torch.load(d / "final.pt", weights_only=True)["phase_key"]["clip_coef"] == 0.3
    assert run(ck, tmp_path, "--clip-coef", "0.3")["resumed_from"] == 256  # the new run, finished: resumed


def test_default_checkpoint_interval_is_a_tenth_of_a_short_run(offline_checkpoints, tmp_path, monkeypatch):
    """Without --checkpoint-every, online.pt comes every online_steps // 10 env steps (here 25 of 256: after every
    rollout of 64), not only at the end as a fixed 20480 would; results.json records the interval."""
    saved, save = [], ppo.atomic_save

    def atomic_save(obj, path):
        if Path(path).name == "online.pt":
            saved.append(obj["env_steps"])
        return save(obj, path)

    monkeypatch.setattr(ppo, "atomic_save", atomic_save)
    i = TINY.index("--checkpoint-every")
    res = ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(offline_checkpoints["iql"]), "--run-dir",
                                            str(tmp_path), *TINY[:i], *TINY[i + 2:]]))
    assert saved == [64, 128, 192, 256]
    assert res["budget"]["effective"]["checkpoint_every"] == 256 // 10 and res["budget"]["given"]["checkpoint_every"] is None
    assert json.loads((tmp_path / "o2o_ppo/hopper-medium-v2/o2ppo_seed0/results.json").read_text())["budget"]["effective"]["checkpoint_every"] == 25


# ---------------------------------------------------------------- wiring: what main() hands to the phases and updates
# These tests run main() with spies on the script's functions and check what each phase received against a hand
# computation: they fail when a piece is wired wrongly even if every pure function is right.
FAST = ["--rollout-size", "64", "--minibatch-size", "16", "--update-epochs", "1", "--online-steps", "128", "--reevaluate-steps", "5",
        "--eval-every", "128", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--log-every", "64", "--checkpoint-every", "128", "--device", "cpu"]


def spied_run(monkeypatch, ckpt: Path, run_dir: Path, *extra: str, time_limit: int | None = None) -> tuple[dict, dict]:
    """main() on the tiny hopper-medium dataset, recording what the training envs returned, every rollout, what GAE,
    re-evaluation and each PPO update received (and returned). time_limit: training envs with that max_episode_steps."""
    rec: dict = {"env": [], "rollouts": [], "gae": [], "updates": [], "update_out": [], "reeval_returns": None}
    pool_cls, pool_step = ppo.EnvPool, ppo.EnvPool.step

    def step(self, actions):
        out = pool_step(self, actions)
        rec["env"].append({"rewards": out[1].copy(), "terms": out[2].copy(), "truncs": out[3].copy()})
        return out

    monkeypatch.setattr(pool_cls, "step", step)
    if time_limit is not None:  # only the training envs: evaluation keeps the dataset's spec
        monkeypatch.setattr(ppo, "EnvPool", lambda spec, n, seed: pool_cls(short_spec(time_limit), n, seed))

    def spy(name, record):
        orig = getattr(ppo, name)

        def wrapper(*a, **k):
            out = orig(*a, **k)
            record(a, out)
            return out

        monkeypatch.setattr(ppo, name, wrapper)

    spy("collect_rollout", lambda a, out: rec["rollouts"].append({k: v.clone() for k, v in out[0].items()}))
    spy("gae", lambda a, out: rec["gae"].append([x.clone() for x in a[:5]]))  # rewards, values, next_values, terminations, ends
    spy("reevaluate_value", lambda a, out: rec.__setitem__("reeval_returns", a[3].clone()))
    # run_online binds online_update (a partial) when the online phase starts: obs, actions, old_logp, advantages, returns
    spy("online_update", lambda a, out: (rec["updates"].append([x.detach().clone() for x in a[4:9]]),
                                      rec["update_out"].append({k: v.clone() for k, v in out.items()})))
    res = ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(ckpt), "--run-dir", str(run_dir), *FAST, *extra]))
    return res, rec


def plain_mc(rewards, ends, gamma):
    out, g = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        g = float(rewards[t]) + (0.0 if ends[t] else gamma * g)
        out[t] = g
    return out


def rollout_rows(calls: list, roll_actions: torch.Tensor) -> list[int]:
    """Rollout index of every row the update calls received (matched by their sampled, hence unique, actions)."""
    index = {tuple(a.tolist()): i for i, a in enumerate(roll_actions)}
    rows = [index[tuple(a.tolist())] for call in calls for a in call[1]]
    assert sorted(rows) == list(range(len(roll_actions))), "one epoch's minibatches must cover the rollout once"
    return rows


@pytest.mark.parametrize("flags,mode", [([], "none"), (["--reward-scaling", "checkpoint"], "checkpoint"),
                                        (["--reward-scaling", "return-std"], "return-std")])
def test_value_targets_and_online_rewards_follow_the_reward_handling(offline_checkpoints, tmp_path, monkeypatch, flags, mode):
    """hopper's family default (raw rewards) reaches what V is re-evaluated on and the rewards GAE gets; the IQL
    checkpoint's 1000 / return-range scale only with --reward-scaling checkpoint; return-std divides offline and online
    rewards by one running statistic. V's Monte-Carlo targets restart at every episode end, time limits included."""
    ck = offline_checkpoints["iql"]
    res, rec = spied_run(monkeypatch, ck, tmp_path, *flags)
    data = ppo.load_dataset("hopper-medium-v2", quiet=True)
    ends, terms = data["ends"].astype(bool), data["terminals"].astype(bool)
    assert (ends & ~terms)[:-1].any(), "the fixture dataset must hold a time-limit end before its last transition"
    raw = np.stack([e["rewards"] for e in rec["env"]])
    env_ends = np.stack([np.maximum(e["terms"], e["truncs"]) for e in rec["env"]])
    rt = torch.load(ck, weights_only=True)["reward_transform"]
    if mode == "none":
        offline, online = data["rewards"], raw
    elif mode == "checkpoint":
        assert rt["scale"] != pytest.approx(1.0), "the IQL scale must differ from 1 for this test to say anything"
        offline, online = data["rewards"] * rt["scale"] + rt["shift"], raw * rt["scale"] + rt["shift"]
    else:
        std0, online = plain_return_std_scaling(data["rewards"], data["ends"], raw, env_ends, 0.99)
        offline = data["rewards"] / (std0 + 1e-8)
        assert res["reward_scaling"]["offline_return_std"] == pytest.approx(std0)
    np.testing.assert_allclose(rec["reeval_returns"].numpy(), plain_mc(offline, data["ends"], 0.99), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch.cat([g[0] for g in rec["gae"]]).numpy(), online, rtol=1e-5, atol=1e-6)
    assert res["reward_scaling"]["mode"] == mode and res["reward_scaling"]["from"] == ("family table" if not flags else "--reward-scaling")
    saved = json.loads((tmp_path / "o2o_ppo/hopper-medium-v2/o2ppo_seed0/results.json").read_text())
    assert saved["reward_scaling"]["mode"] == mode


@pytest.mark.parametrize("family", [None, "hopper-medium-expert"])
def test_update_gets_once_per_rollout_advantages_mixed_with_w_t(offline_checkpoints, tmp_path, monkeypatch, family):
    """What each PPO minibatch update receives, against a hand computation over the WHOLE rollout: GAE from the env's
    flags, A_ref of the reference (pi0: --reference offline) with the rollout's std(A_hat), mixed with this rollout's
    w_t = 1 - t / T_end (T_end 512: 0.875, then 0.75), normalised with eps 1e-5. With --family hopper-medium-expert the
    log-std cap log 0.05 applies to acting, to the update's distribution and to the reference."""
    ck = offline_checkpoints["iql"]
    res, rec = spied_run(monkeypatch, ck, tmp_path, "--constraint-horizon", "512", "--reference", "offline", *(["--family", family] if family else []))
    cap = math.log(0.05) if family else None
    assert res["log_std_max"] == cap and res["constraint_horizon"] == 512
    pi0 = ppo.actor_from_checkpoint(torch.load(ck, weights_only=True))
    if cap is not None:
        assert pi0.log_std.max() > cap, "the cap must bind for this test to say anything"
    calls_per_rollout = 64 // 16
    assert len(rec["rollouts"]) == 2 and len(rec["updates"]) == 2 * calls_per_rollout
    for k, roll in enumerate(rec["rollouts"]):
        obs, actions = roll["obs"].reshape(64, -1), roll["actions"].reshape(64, -1)
        env = rec["env"][64 * k : 64 * (k + 1)]
        terms, truncs = [e["terms"].tolist() for e in env], [e["truncs"].tolist() for e in env]
        adv = np.array(plain_gae(roll["rewards"].tolist(), roll["values"].tolist(), roll["next_values"].tolist(), terms, truncs, 0.99, 0.95))
        adv = adv.reshape(64)
        with torch.no_grad():
            mu, log_std = pi0(obs)
        std = log_std.clamp(max=cap).exp() if cap is not None else log_std.exp()
        if k == 0:  # the first rollout acted with pi0, capped
            lp = torch.distributions.Normal(mu, std).log_prob(actions).sum(-1)
            torch.testing.assert_close(roll["logprobs"].reshape(64), lp, rtol=1e-5, atol=1e-4)
        z = ((actions - mu) / std).double().numpy()
        g = 0.5 * (1 - z**2).sum(1)
        n = z.shape[1]
        a_ref = (2 / n) * (np.logaddexp(0.0, g + 4 * n) - 4 * n) * abs(adv.std(ddof=1))
        w = 1 - 64 * (k + 1) / 512
        mixed = (adv + w * a_ref) / (1 + w)
        expect = (mixed - mixed.mean()) / (mixed.std(ddof=1) + 1e-5)
        calls = rec["updates"][calls_per_rollout * k : calls_per_rollout * (k + 1)]
        rows = rollout_rows(calls, actions)
        got_adv = torch.cat([c[3] for c in calls]).double().numpy()
        np.testing.assert_allclose(got_adv, expect[rows], atol=2e-4, err_msg=f"advantages the update got, rollout {k}")
        got_ret = torch.cat([c[4] for c in calls]).double().numpy()  # V's targets: GAE + V, unmixed
        np.testing.assert_allclose(got_ret, (adv + roll["values"].reshape(64).double().numpy())[rows], rtol=1e-5, atol=1e-4)
        # and the update trains on them as given (no second, per-minibatch normalisation): the rollout's first minibatch
        # sees the policy that collected it (ratio 1, KL 0), so its clipped surrogate is -mean(A) of that minibatch
        out = rec["update_out"][calls_per_rollout * k]
        assert abs(float(out["losses/approx_kl"])) < 1e-6
        assert float(out["losses/actor_loss"]) == pytest.approx(-float(calls[0][3].mean()), abs=1e-6)
    # the update's own distribution is capped too: KL 0 above (capped acting, capped ratio) and the entropy of
    # sigma = min(exp(log_std), 0.05)
    first = rec["update_out"][0]
    ent = (0.5 * torch.log(2 * math.pi * math.e * std[0] ** 2)).sum()
    assert float(first["losses/entropy"]) == pytest.approx(float(ent), rel=1e-5)


def test_return_std_statistic_carries_through_a_resume(offline_checkpoints, tmp_path, monkeypatch):
    """The running return-std is part of the online state: online.pt holds it, a resumed run goes on from it."""
    ck = offline_checkpoints["iql"]
    n_offline = len(ppo.load_dataset("hopper-medium-v2", quiet=True)["rewards"])
    out = tmp_path / "o2o_ppo/hopper-medium-v2/o2ppo_seed0"
    killed, _ = spied_run(monkeypatch, ck, tmp_path, "--reward-scaling", "return-std", "--stop-after", "64")
    assert not killed["finished"] and torch.load(out / "online.pt", weights_only=True)["return_std"]["count"] == n_offline + 64
    resumed, rec = spied_run(monkeypatch, ck, tmp_path, "--reward-scaling", "return-std")
    assert resumed["resumed_from"] == 64 and torch.load(out / "online.pt", weights_only=True)["return_std"]["count"] == n_offline + 128
    saved = torch.load(out / "online.pt", weights_only=True)["return_std"]
    std = math.sqrt(saved["m2"] / saved["count"])
    assert resumed["reward_scaling"]["final_return_std"] == pytest.approx(std)
    # the resumed rollout's last reward is divided by that statistic
    assert float(rec["gae"][-1][0][-1, 0]) == pytest.approx(float(rec["env"][-1]["rewards"][0]) / (std + 1e-8), rel=1e-5)


def test_time_limit_ends_bootstrap_in_what_the_update_sees(offline_checkpoints, tmp_path, monkeypatch):
    """Training envs with a 10-step time limit (two of them): GAE gets the env's terminations as terminations (a time
    limit is not one) and every end as a chain cut, and the value targets the update receives bootstrap from V(final obs)
    at time limits (hand GAE with explicit branches)."""
    res, rec = spied_run(monkeypatch, offline_checkpoints["iql"], tmp_path, "--num-envs", "2", "--no-constraint", time_limit=10)
    terms = np.stack([e["terms"] for e in rec["env"]])
    truncs = np.stack([e["truncs"] for e in rec["env"]])
    assert truncs.sum() >= 4 and not (terms * truncs).any(), "time limits must happen, and a step is one kind of end"
    assert len(rec["rollouts"]) == 2
    for k, roll in enumerate(rec["rollouts"]):
        te, tr = terms[32 * k : 32 * (k + 1)], truncs[32 * k : 32 * (k + 1)]
        gae_in = rec["gae"][k]
        np.testing.assert_array_equal(gae_in[3].numpy(), te)  # terminations: the env's, time limits excluded
        np.testing.assert_array_equal(gae_in[4].numpy(), np.maximum(te, tr))  # ends: both kinds
        adv = np.array(plain_gae(roll["rewards"].tolist(), roll["values"].tolist(), roll["next_values"].tolist(), te.tolist(), tr.tolist(), 0.99, 0.95))
        target = (adv + roll["values"].double().numpy()).reshape(64)  # rows (t, env) as main flattens them
        calls = rec["updates"][4 * k : 4 * (k + 1)]
        rows = rollout_rows(calls, roll["actions"].reshape(64, -1))
        np.testing.assert_allclose(torch.cat([c[4] for c in calls]).double().numpy(), target[rows], rtol=1e-5, atol=1e-4)
    assert res["online_steps_done"] == 128


# ---------------------------------------------------------------- diagnostics, early evaluations, --budget-scale
BOUNDARY_KEYS = {"step", "v_mean", "v_std", "v_mean_error", "v_mean_abs_error", "mc_return_mean", "entropy", "mean_abs_action", "saturation"}


def test_headline_evaluations_use_more_episodes(offline_checkpoints, tmp_path, monkeypatch):
    """--headline-eval-episodes reaches exactly the evaluations results.json's headline numbers rest on (offline,
    distilled, every online evaluation in the first tenth, the last one); the rest of online uses --eval-episodes. The
    stand-in's every return is the episode count asked for."""
    def count(self, act, n_episodes=None):
        n = len(self.envs[:n_episodes])
        return np.full(n, float(n))

    monkeypatch.setattr(ppo.Evaluator, "__call__", count)
    res = ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(offline_checkpoints["td3_bc"]), "--run-dir",
                                            str(tmp_path), "--rollout-size", "32", "--minibatch-size", "16", "--update-epochs", "1",
                                            "--online-steps", "640", "--reevaluate-steps", "5", "--distill-steps", "5", "--eval-every", "320",
                                            "--eval-episodes", "1", "--headline-eval-episodes", "3", "--log-every", "320", "--early-evals", "2",
                                            "--device", "cpu"]))
    got = [(p["phase"], p["step"], p["return"]) for p in res["curve"]]
    assert got == [("offline", 0, 3), ("distilled", 0, 3), ("online", 0, 3), ("online", 32, 3), ("online", 64, 3), ("online", 320, 1),
                   ("online", 640, 3)]


def test_diagnostics_and_early_evaluations_in_results(offline_checkpoints, tmp_path, monkeypatch):
    """V and actor statistics at start, after re-evaluation and at the end reach results.json (finite, on the 2048 states of
    the run's seed, against a hand computation at the switch); --early-evals 2 over 640 steps (first tenth: 64) adds
    evaluations at the rollout ends 32 and 64, and every evaluation, the early ones too, may move pi_ref."""
    refs = []
    orig = ppo.update_reference
    monkeypatch.setattr(ppo, "update_reference", lambda ref, actor, score, best: (refs.append(score), orig(ref, actor, score, best))[1])
    ck = offline_checkpoints["iql"]
    res = ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(ck), "--run-dir", str(tmp_path),
                                            "--rollout-size", "32", "--minibatch-size", "16", "--update-epochs", "1", "--online-steps", "640",
                                            "--reevaluate-steps", "20", "--eval-every", "640", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--log-every", "320",
                                            "--checkpoint-every", "640", "--early-evals", "2", "--device", "cpu"]))
    out = tmp_path / "o2o_ppo/hopper-medium-v2/o2ppo_seed0"
    diag = json.loads((out / "results.json").read_text())["diagnostics"]
    assert diag == json.loads(json.dumps(res["diagnostics"]))
    assert [e["step"] for e in res["curve"] if e["phase"] == "online"] == [0, 32, 64, 640]  # 2 early + the last
    assert diag["early_evals"] == {"requested": 2, "steps": [32, 64]} and res["evals_in_first_tenth"] == 2
    assert len(refs) == 3  # every evaluation is offered to update_reference
    for b, step in (("start", 0), ("reevaluated", 0), ("end", 640)):
        assert set(diag[b]) == BOUNDARY_KEYS and diag[b]["step"] == step, b
        assert all(math.isfinite(v) for v in diag[b].values()), b
    assert [e["step"] for e in diag["evaluations"]] == [32, 64, 640] and all(set(e) == BOUNDARY_KEYS for e in diag["evaluations"])
    # by hand at the switch: the re-evaluated V and pi0 on the seed's states, against raw-reward Monte-Carlo returns
    data = ppo.load_dataset("hopper-medium-v2", quiet=True)
    assert diag["states"] == min(2048, len(data["rewards"])) < len(data["rewards"]), "the probe must be a sample for this test"
    idx = np.sort(np.random.default_rng(0).choice(len(data["rewards"]), diag["states"], replace=False))
    saved = torch.load(out / "reevaluated.pt", weights_only=True)
    obs = torch.as_tensor((data["observations"][idx] - saved["obs_mean"].numpy()) / saved["obs_std"].numpy())
    vf = ppo.build_value(obs.shape[1])
    vf.load_state_dict(saved["critics"]["vf"])
    pi0 = ppo.actor_from_checkpoint(torch.load(ck, weights_only=True))
    with torch.no_grad():
        v, mu = vf(obs)[0].double().numpy(), pi0(obs)[0].numpy()
    g = plain_mc(data["rewards"], data["ends"], 0.99)[idx]
    rv = diag["reevaluated"]
    assert rv["v_mean"] == pytest.approx(v.mean(), rel=1e-4) and rv["v_std"] == pytest.approx(v.std(), rel=1e-4)
    assert rv["mc_return_mean"] == pytest.approx(g.mean(), rel=1e-4) and rv["v_mean_error"] == pytest.approx((v - g).mean(), rel=1e-3, abs=1e-3)
    assert rv["mean_abs_action"] == pytest.approx(np.abs(mu).mean(), rel=1e-5)
    assert rv["entropy"] == pytest.approx(float((0.5 * math.log(2 * math.pi * math.e) + pi0.log_std.detach()).sum()), rel=1e-5)
    assert diag["start"]["entropy"] == rv["entropy"] and diag["start"]["v_mean"] != rv["v_mean"]  # same pi0, V re-evaluated
    s = scalars(out)
    for tag in ("diagnostics/v_mean/start", "diagnostics/v_mean/reevaluated", "diagnostics/saturation/end", "diagnostics/entropy"):
        assert s[tag] and all(math.isfinite(x) for x in s[tag]), tag


def test_budget_scale_halves_every_budget(offline_checkpoints, tmp_path, monkeypatch):
    """--budget-scale 0.5 on explicit budgets: 20 distillation and 10 re-evaluation updates, 128 env steps in two rollouts,
    T_end 512 as given (not scaled: w_t 0.875 then 0.75), evaluations, logs and online.pt every 64 / 16 / 64 steps; results.json records them."""
    calls = {"distill": 0, "reeval": 0, "ppo": 0, "env_steps": 0, "online_pt": 0}

    def count(name, key):
        orig = getattr(ppo, name)

        def wrapper(*a, **k):
            calls[key] += 1
            return orig(*a, **k)

        monkeypatch.setattr(ppo, name, wrapper)

    for name, key in (("distill_update", "distill"), ("reevaluate_update", "reeval"), ("online_update", "ppo")):
        count(name, key)
    pool_step, save = ppo.EnvPool.step, ppo.atomic_save

    def step(self, actions):
        calls["env_steps"] += len(actions)
        return pool_step(self, actions)

    def atomic_save(obj, path):
        calls["online_pt"] += Path(path).name == "online.pt"
        return save(obj, path)

    monkeypatch.setattr(ppo.EnvPool, "step", step)
    monkeypatch.setattr(ppo, "atomic_save", atomic_save)
    given = {"reevaluate_steps": 20, "online_steps": 256, "constraint_horizon": 512, "eval_every": 128, "log_every": 32,
             "checkpoint_every": 128}
    flags = [x for k, v in given.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    res = ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(offline_checkpoints["cql"]), "--run-dir",
                                            str(tmp_path), "--rollout-size", "64", "--minibatch-size", "32", "--update-epochs", "1",
                                            "--eval-episodes", "1", "--headline-eval-episodes", "0", "--device", "cpu", "--distill-steps", "40", *flags, "--budget-scale", "0.5"]))
    half = {k: v if k == "constraint_horizon" else v // 2 for k, v in given.items()}
    assert calls == {"distill": 40, "reeval": 10, "ppo": 2 * 2, "env_steps": 128, "online_pt": 2}
    assert res["online_steps_done"] == 128 and res["constraint_horizon"] == 512 and res["distillation"]["steps"] == 40 and res["reevaluation"]["steps"] == 10
    assert [e["step"] for e in res["curve"] if e["phase"] == "online"] == [0, 64, 128]
    out = tmp_path / "o2o_ppo/hopper-medium-v2/o2ppo_seed0"
    s = scalars(out)
    assert s["charts/constraint_weight"] == pytest.approx([1 - 64 / 512, 1 - 128 / 512])
    assert scalar_steps(out)["distill/loss"] == [16, 32, 40]  # 40 steps (not scaled), logged every 16 and at the end
    budget = {"given": given, "effective": half}
    assert res["budget"] == budget and json.loads((out / "results.json").read_text())["budget"] == budget
    args_json = json.loads((out / "args.json").read_text())
    assert args_json["budget_scale"] == 0.5 and {k: args_json[k] for k in half} == half

# ---------------------------------------------------------------- bad inputs
def test_missing_checkpoint_names_the_command(tiny_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--run-dir", str(tmp_path), "--seed", "3", "--offline-algo", "td3_bc"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "python offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --seed 3" in err
    assert not (tmp_path / "o2o_ppo").exists()


@pytest.mark.parametrize("extra,message", [
    (["--env", "hopper-easy-v2"], "unknown env"),
    (["--online-steps", "32"], "less than one rollout"),
    (["--num-envs", "3"], "multiple of --num-envs"),
    (["--minibatch-size", "48"], "multiple of --minibatch-size"),
    (["--reevaluate-steps", "0"], "--no-reevaluate"),
    (["--gamma", "1.5"], "--gamma"),
    (["--family", "hopper-hard"], "unknown --family"),
    (["--env", "hopper-medium-replay-v2"], "was trained on hopper-medium-v2"),
    (["--checkpoint", "CORRUPT"], "corrupt"),
    (["--checkpoint", "MISSING"], "does not exist"),
])
def test_bad_inputs_exit_2(offline_checkpoints, tmp_path, capsys, extra, message):
    ck = str(offline_checkpoints["iql"])
    if "CORRUPT" in extra:
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        extra = ["--checkpoint", str(tmp_path / "bad.pt")]
    if "MISSING" in extra:
        extra = ["--checkpoint", str(tmp_path / "nope.pt")]
    with pytest.raises(SystemExit) as e:
        ppo.main(tyro.cli(ppo.Args, args=["--checkpoint", ck, "--run-dir", str(tmp_path), *TINY, *extra]))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o2o_ppo").exists()  # nothing written


# ---------------------------------------------------------------- --compile / --cudagraphs / --bf16: same math as eager
OBS, ACT, MB = 11, 3, 32
PHASES = ["distill", "reeval", "ppo", "ppo_log_std_cap"]


def phase_update(phase: str, accel, device: torch.device):
    """(Update of `phase` with fresh weights drawn from seed 0, its modules, its optimizers), built as main() builds it."""
    torch.manual_seed(0)
    if phase == "distill":
        student = ppo.GaussianActor(OBS, ACT, (64, 64)).to(device)
        opt = accel.adam(student.net.parameters(), 1e-3)
        return accel.update(functools.partial(ppo.distill_update, student, opt)), {"student": student}, [opt]
    if phase == "reeval":
        vf = ppo.build_value(OBS).to(device)
        opt = accel.adam(vf.parameters(), 1e-3)
        return accel.update(functools.partial(ppo.reevaluate_update, vf, opt)), {"vf": vf}, [opt]
    actor, vf = ppo.GaussianActor(OBS, ACT, (64, 64)).to(device), ppo.build_value(OBS).to(device)
    aopt, vopt = accel.adam(actor.parameters(), 1e-3, eps=1e-5), accel.adam(vf.parameters(), 1e-3, eps=1e-5)
    # the cap binds (log_std starts at 0 > log 0.5): sigma fixed at 0.5, no gradient to log_std
    cap = math.log(0.5) if phase == "ppo_log_std_cap" else None
    update = accel.update(functools.partial(ppo.online_update, actor, vf, aopt, vopt, clip_coef=0.2, ent_coef=0.01,
                                            max_grad_norm=0.5, log_std_max=cap))
    return update, {"actor": actor, "vf": vf}, [aopt, vopt]


def phase_inputs(phase: str, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Minibatch tensors of one call (the default dtype); PPO's advantages are the rollout's, already normalised."""
    g = torch.Generator().manual_seed(step)
    obs = torch.randn(MB, OBS, generator=g)
    if phase == "distill":
        out = (obs, torch.tanh(torch.randn(MB, ACT, generator=g)))
    elif phase == "reeval":
        out = (obs, 3.0 * torch.randn(MB, generator=g))
    else:
        actions = 0.7 * torch.randn(MB, ACT, generator=g)
        # near pi's log-prob at init (mean ~ 0, std 1), so ratios lie on both sides of the clip range
        old_logp = -0.5 * (actions**2).sum(-1) - ACT * 0.5 * math.log(2 * math.pi) + 0.2 * torch.randn(MB, generator=g)
        out = (obs, actions, old_logp, torch.randn(MB, generator=g), torch.randn(MB, generator=g))
    return tuple(x.to(device) for x in out)


def assert_same_updates(phase: str, accel_kwargs: dict, steps: int, device: str = "cpu", atol: float = 1e-9, rtol: float = 1e-7):
    """An eager and an accelerated update with identical initial weights, called on identical minibatches (and the
    same learning-rate schedule, set between calls as main() does): same metrics, same parameters. -> the fast Update."""
    dev = torch.device(device)
    eager_accel, fast_accel = ppo.Accel(dev), ppo.Accel(dev, **accel_kwargs)
    eager, m_eager, opts_eager = phase_update(phase, eager_accel, dev)
    fast, m_fast, opts_fast = phase_update(phase, fast_accel, dev)
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in m_eager.items()}
    for step in range(steps):
        for accel, opts in ((eager_accel, opts_eager), (fast_accel, opts_fast)):
            for opt in opts:
                ppo.set_lr(accel, opt, ppo.linear_lr(1e-3, step, 2 * steps))
        x = phase_inputs(phase, step, dev)
        torch.manual_seed(100 + step)
        out_e = {k: v.clone() for k, v in eager(*x).items()}
        torch.manual_seed(100 + step)
        out_f = {k: v.clone() for k, v in fast(*x).items()}  # cloned at once: a graph's outputs are overwritten by the next call
        assert out_e.keys() == out_f.keys()
        for k in out_e:
            torch.testing.assert_close(out_f[k], out_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{k} at call {step}: {s}")
    for name, m in m_eager.items():
        for (pn, p_e), p_f in zip(m.named_parameters(), m_fast[name].parameters()):
            torch.testing.assert_close(p_f, p_e, atol=atol, rtol=rtol, msg=lambda s, pn=pn: f"{name}.{pn}: {s}")
        assert not all(torch.equal(p, b) for p, b in zip(m.parameters(), before[name])), f"{name} never changed: the comparison says nothing"
    for opt in opts_fast:
        assert torch.is_tensor(opt.param_groups[0]["lr"]) == fast_accel.tensor_lr
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(ppo.linear_lr(1e-3, steps - 1, 2 * steps))
    return fast, opts_fast


@pytest.mark.parametrize("phase", PHASES)
def test_compiled_update_equals_eager(phase, same_random, float64):
    from torch._dynamo.utils import counters

    counters.clear()
    fast, opts = assert_same_updates(phase, {"compile": True}, steps=3)
    if phase.startswith("ppo"):
        assert all(opt.param_groups[0]["eps"] == 1e-5 for opt in opts)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    for step in range(3, 5):  # a new learning rate is a new value, not new code
        for opt in opts:
            ppo.set_lr(fast.accel, opt, 1e-4 * step)
        fast(*phase_inputs(phase, step, torch.device("cpu")))
    assert counters["stats"]["unique_graphs"] == compiled, "a changing learning rate recompiled the update"


@cuda
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("compile", [False, True])
def test_cudagraph_update_equals_eager_gpu(phase, compile, same_random, float64):
    """Warm-up calls, capture and replays together must reproduce the eager updates (GPU only; float64 as on CPU, so
    Adam's sign-like first steps cannot amplify float32 rounding differences of reordered reductions)."""
    fast, _ = assert_same_updates(phase, {"cudagraphs": True, "compile": compile}, steps=8, device="cuda", atol=1e-7, rtol=1e-6)
    assert fast.graphs, "no CUDA graph was captured"


def test_optimizer_state_moves_between_eager_and_compiled_runs():
    """online.pt of an eager run resumes under --compile and back: the tensor learning rate stays the one the compiled
    update reads, eps stays 1e-5, and the schedule writes into it (an eager run gets a plain float again)."""
    net = torch.nn.Linear(3, 2)
    dev = torch.device("cpu")
    eager_accel, fast_accel = ppo.Accel(dev), ppo.Accel(dev, compile=True)
    eager_opt = eager_accel.adam(net.parameters(), 3e-4, eps=1e-5)
    net(torch.randn(4, 3)).sum().backward()
    eager_opt.step()
    fast_opt = fast_accel.adam(net.parameters(), 3e-4, eps=1e-5)
    lr = fast_opt.param_groups[0]["lr"]
    fast_accel.load_optimizer(fast_opt, eager_opt.state_dict())
    ppo.set_lr(fast_accel, fast_opt, 1e-4)
    assert fast_opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-4) and fast_opt.param_groups[0]["eps"] == 1e-5
    back = eager_accel.adam(net.parameters(), 3e-4, eps=1e-5)
    eager_accel.load_optimizer(back, fast_opt.state_dict())
    ppo.set_lr(eager_accel, back, 5e-5)
    assert back.param_groups[0]["lr"] == 5e-5 and not torch.is_tensor(back.param_groups[0]["lr"])


def test_track_mirrors_tensorboard_to_wandb_offline(offline_checkpoints, tmp_path, monkeypatch):
    """--track in wandb's offline mode: the run finishes, wandb.finish() closed the wandb run, and the offline wandb run
    next to the run folder holds the tensorboard scalars (synced) and the run's arguments; the curve is the untracked run's."""
    wandb = pytest.importorskip("wandb")
    wandb_offline(monkeypatch, tmp_path / "wandb_home")
    res = run(offline_checkpoints["iql"], tmp_path / "runs", "--track", "--wandb-project-name", "o2o-test")
    assert res["finished"] and wandb.run is None
    out = Path(res["run_dir"])
    _, history = wandb_offline_run(out)
    for text in ("eval/normalized_score", "losses/actor_loss", "charts/phase", "o2o_ppo/hopper-medium-v2/o2ppo_seed0", "constraint_horizon"):
        assert text.encode() in history, text
    assert not (out / "wandb").exists()  # wandb's files stay out of the run folder
    assert res["curve"] == run(offline_checkpoints["iql"], tmp_path / "plain")["curve"]


def test_track_without_wandb_fails_before_anything(tmp_path, capsys, monkeypatch):
    """--track with wandb not installed: one line on stderr and exit 2, before any dataset, checkpoint or folder is touched."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit) as e:
        ppo.main(tyro.cli(ppo.Args, args=["--track", "--run-dir", str(tmp_path / "runs")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--track needs wandb" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_cudagraphs_on_cpu_fails_before_loading(monkeypatch, tmp_path, capsys):
    def no_loading(*a, **k):
        raise AssertionError("the dataset was touched before the flags were checked")

    monkeypatch.setattr(ppo, "load_dataset", no_loading)
    with pytest.raises(SystemExit) as e:
        ppo.main(tyro.cli(ppo.Args, args=["--env", "hopper-medium-v2", "--device", "cpu", "--cudagraphs", "--run-dir", str(tmp_path)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--cudagraphs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2o_ppo").exists()


@pytest.mark.parametrize("flags,family", [(["--compile", "--no-reevaluate"], "iql"), (["--bf16"], "bc_det")])
def test_speed_flags_end_to_end(offline_checkpoints, tmp_path, flags, family):
    """Whole tiny runs through the accelerated updates: PPO compiled (re-evaluation skipped: the compile test above
    covers it, and every compile costs seconds); distillation, re-evaluation and PPO under bf16 autocast, which runs
    them through the same Update wrapper. Finite losses, every output written, the schedule reaches the optimizer."""
    torch._dynamo.reset()
    try:
        res = run(offline_checkpoints[family], tmp_path, *flags, "--threads", "1")
    finally:
        torch._dynamo.reset()
    out = tmp_path / "o2o_ppo" / "hopper-medium-v2" / f"{res['mode']['name']}_seed0"
    phase_files = ("distilled.pt", "reevaluated.pt") if family == "bc_det" else ()
    for f in ("args.json", "results.json", "final.pt", "online.pt") + phase_files:
        assert (out / f).exists(), f
    assert res["online_steps_done"] == 256 and all(math.isfinite(e["normalized_score"]) for e in res["curve"])
    s = scalars(out)
    phase_tags = ("distill/loss", "reevaluate/value_loss") if family == "bc_det" else ()
    for tag in ("losses/actor_loss", "losses/value_loss", "losses/ref_advantage", "losses/entropy") + phase_tags:
        assert s[tag] and all(math.isfinite(x) for x in s[tag]), tag
    assert s["charts/learning_rate"][-1] < s["charts/learning_rate"][0]
