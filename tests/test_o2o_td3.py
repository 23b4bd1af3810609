"""o2o_td3.py: math unit tests on hand-checked tensors, behaviour tests, smoke runs of every mode, resume, bad inputs,
and the fast paths (--compile, --cudagraphs, --bf16) against the eager reference."""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro

from conftest import assert_results_schema, flat_tensors, load_script, phase_marks, run_o2o, scalar_steps, scalars

td3 = load_script("o2o_td3")

T = torch.tensor


# ---------------------------------------------------------------- pure math
def test_smoothed_action_clips_noise_then_action():
    a = td3.smoothed_action(T([[0.9, -0.2]]), T([[0.7, -0.1]]), noise_clip=0.5)
    assert torch.allclose(a, T([[1.0, -0.3]]))


def test_fqe_target_min_over_critics_and_termination_only():
    y = td3.fqe_target(T([1.0, 2.0]), T([0.0, 1.0]), T([[3.0, 5.0], [4.0, 1.0]]), gamma=0.99)
    assert torch.allclose(y, T([1.0 + 0.99 * 3.0, 2.0]))  # the terminal sample does not bootstrap


@pytest.mark.parametrize("q_star, expected_star", [(-2.0, -2.0 * 1.01), (4.0, 4.0 / 1.01)])
def test_alignment_targets_both_signs(q_star, expected_star):
    # ||at - a_off|| / sqrt(4) = 0.2 / 2 = 0.1 -> 1 + beta delta^2 = 1.01; y* <= Q* in both sign cases
    at, a_off = T([[0.2, 0.0, 0.0, 0.0]]), torch.zeros(1, 4)
    q_bar = T([[100.0], [-30.0]])  # critic 1 above y*, critic 2 below: y_i = min(y*, Qbar_i)
    y = td3.alignment_targets(T([q_star]), q_bar, at, a_off, beta=1.0, max_distance=0.2)
    assert y.shape == (2, 1)
    assert y[0, 0].item() == pytest.approx(expected_star) and expected_star < q_star
    assert y[1, 0].item() == pytest.approx(-30.0)


def test_alignment_distance_is_capped():
    at, a_off = torch.ones(1, 4), torch.zeros(1, 4)  # distance 1 -> capped at 0.2 -> 1.04
    y = td3.alignment_targets(T([-1.0]), T([[0.0], [0.0]]), at, a_off, beta=1.0, max_distance=0.2)
    assert torch.allclose(y, T([[-1.04], [-1.04]]))


def test_mse_to_reference_is_one_scalar_per_batch():
    m = td3.mse_to_reference(T([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert m.shape == () and m.item() == pytest.approx(0.25)


def test_constrained_td_target():
    y = td3.constrained_td_target(T([1.0, 1.0]), T([0.0, 1.0]), T([[2.0, 2.0], [3.0, 3.0]]), lam=0.5, m_next=T(0.4), gamma=0.9)
    assert torch.allclose(y, T([1.0 + 0.9 * (2.0 - 0.2), 1.0]))


def test_lagrange_loss_values_and_sign():
    log_lam = torch.tensor(math.log(2.0), requires_grad=True)
    # u = 0.1 - [0.5, 0.0] = [-0.4, 0.1]; w = [0.7, 0.3]; c = (-0.28 + 0.03) / 2 = -0.125
    loss = td3.lagrange_loss(log_lam, T([[0.5, 0.0]]), threshold=0.1, tau=0.7)
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()
    assert log_lam.grad.item() < 0  # violations dominate: gradient descent raises lambda
    log_lam.grad = None
    td3.lagrange_loss(log_lam, torch.zeros(1, 2), threshold=0.1).backward()
    assert log_lam.grad.item() > 0  # all satisfied: lambda falls


def test_constraint_threshold_loosens_linearly_then_stays():
    assert td3.constraint_threshold(0, 0.0025, 0.04, 100_000) == pytest.approx(0.0025)
    assert td3.constraint_threshold(50_000, 0.0025, 0.04, 100_000) == pytest.approx(0.02125)
    assert td3.constraint_threshold(250_000, 0.0025, 0.04, 100_000) == pytest.approx(0.04)


def test_constrained_actor_loss():
    # -mean(q)/mean|q| = -(-1)/3 ; lam * mse = 2 * 0.25
    loss = td3.constrained_actor_loss(T([2.0, -4.0]), T([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2), lam=2.0)
    assert loss.item() == pytest.approx(1.0 / 3.0 + 0.5)


def test_kappa_schedule():
    k = lambda t: td3.kappa_schedule(t, 0.3, 0.9, 25_000, 150_000)  # noqa: E731
    assert k(0) == pytest.approx(0.3) and k(25_000) == pytest.approx(0.3)
    assert k(87_500) == pytest.approx(0.6)
    assert k(150_000) == pytest.approx(0.9) and k(300_000) == pytest.approx(0.9)


def test_opt_actor_loss():
    assert td3.opt_actor_loss(T([1.0, 3.0]), T([5.0, 7.0]), kappa=0.25).item() == pytest.approx(-(0.75 * 2.0 + 0.25 * 6.0))


def _tiny_meta_problem():
    torch.manual_seed(0)
    qf = td3.orthogonal_init_(td3.Critic(2, 1, (3,), n=2, layer_norm=True)).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in qf.named_parameters()}
    g = torch.Generator().manual_seed(1)
    off = (torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64))
    on = (torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64), 3.0 + torch.randn(4, generator=g, dtype=torch.float64))
    return qf, params, off, on


def test_opt_meta_loss_gradient_matches_finite_differences():
    qf, params, off, on = _tiny_meta_problem()
    lr = 0.2  # large inner step: the second-order term is far from negligible
    loss, l_off, l_on, w = td3.opt_meta_loss(qf, params, off, on, lr)
    assert w.item() == pytest.approx(min(l_off.item(), l_on.item()) / l_on.item())
    assert l_on.item() > l_off.item() and w.item() < 1.0  # the online targets sit far away on this problem
    loss.backward()
    analytic = torch.cat([p.grad.flatten() for p in params.values()])
    w0 = w.item()

    def f(flat: torch.Tensor) -> float:  # L_off(psi) + w0 L_on(psi - lr grad L_off(psi)), w held at its value
        ps, i = {}, 0
        for k, v in params.items():
            ps[k] = flat[i:i + v.numel()].view_as(v).detach().clone().requires_grad_(True)
            i += v.numel()
        lo = td3.td_loss(torch.func.functional_call(qf, ps, (off[0], off[1])), off[2])
        grads = torch.autograd.grad(lo, list(ps.values()))
        inner = {k: ps[k] - lr * gk for k, gk in zip(ps, grads)}
        return (lo + w0 * td3.td_loss(torch.func.functional_call(qf, inner, (on[0], on[1])), on[2])).item()

    flat = torch.cat([p.detach().flatten() for p in params.values()])
    h, fd = 1e-6, torch.zeros_like(flat)
    for j in range(len(flat)):
        e = torch.zeros_like(flat)
        e[j] = h
        fd[j] = (f(flat + e) - f(flat - e)) / (2 * h)
    assert torch.allclose(analytic, fd, rtol=1e-4, atol=1e-6)
    # without the differentiable inner step (first-order approximation) the gradient is measurably different
    qf2, params2, off2, on2 = _tiny_meta_problem()
    lo = td3.td_loss(torch.func.functional_call(qf2, params2, (off2[0], off2[1])), off2[2])
    grads = torch.autograd.grad(lo, list(params2.values()), retain_graph=True)  # no create_graph: first order
    inner = {k: params2[k] - lr * gk for k, gk in zip(params2, grads)}
    lon = td3.td_loss(torch.func.functional_call(qf2, inner, (on2[0], on2[1])), on2[2])
    (lo + w0 * lon).backward()
    first_order = torch.cat([p.grad.flatten() for p in params2.values()])
    assert (first_order - fd).abs().max() > 1e-3


def test_family_defaults_table_and_overrides():
    A = td3.Args
    d = td3.resolve_defaults(A(env="hopper-medium-v2"))
    assert (d["explore_noise"], d["eps0"], d["eps_end"], d["kappa_start"]) == (0.1, 0.0025, 0.04, 0.3)
    assert td3.resolve_defaults(A(env="walker2d-medium-replay-v2"))["kappa_start"] == 0.1
    d = td3.resolve_defaults(A(env="hopper-medium-expert-v2"))
    assert (d["explore_noise"], d["eps0"], d["eps_end"]) == (0.05, 2.5e-5, 6.25e-4)
    assert td3.resolve_defaults(A(env="hopper-medium-v2", reference="interval"))["eps_end"] == pytest.approx(0.01)
    d = td3.resolve_defaults(A(env="hopper-medium-v2", explore_noise=0.3, kappa_start=0.5, eps_end=0.1, reference="interval"))
    assert (d["explore_noise"], d["kappa_start"], d["eps_end"]) == (0.3, 0.5, 0.1)  # explicit flags win
    # --reference-interval: 1 (the official update_n, as O2SAC's), 10 where the official code copies every 10 evaluations
    assert A().reference_interval is None and td3.resolve_defaults(A(env="hopper-medium-v2"))["reference_interval"] == 1
    envs = ("hopper-medium-expert-v2", "hopper-expert-v2", "walker2d-expert-v2", "walker2d-medium-expert-v2", "halfcheetah-expert-v2")
    assert [td3.resolve_defaults(A(env=e))["reference_interval"] for e in envs] == [10, 10, 10, 1, 1]
    assert td3.resolve_defaults(A(env="hopper-expert-v2", reference_interval=3))["reference_interval"] == 3
    # OPT: kappa 0.3 -> 0.9 (medium), 1.0 -> 1.0 on random data; the end value is reached at 150k and then stays
    assert td3.resolve_defaults(A(env="hopper-medium-v2"))["kappa_end"] == 0.9
    d = td3.resolve_defaults(A(env="hopper-random-v2", opt=True))
    assert (d["kappa_start"], d["kappa_end"]) == (1.0, 1.0)
    a = A(env="hopper-medium-v2", opt=True)
    d = td3.resolve_defaults(a)
    k = lambda t: td3.kappa_schedule(t, d["kappa_start"], d["kappa_end"], a.kappa_begin, a.kappa_finish)  # noqa: E731
    assert k(149_999) < 0.9 and k(150_000) == pytest.approx(0.9) and k(300_000) == pytest.approx(0.9)


def test_online_budget_is_the_modes_default():
    A = td3.Args
    assert A().online_steps is None and A(opt=True).online_steps is None  # Args is never mutated
    assert td3.with_mode_defaults(A()).online_steps == 100_000
    assert td3.with_mode_defaults(A(opt=True)).online_steps == 300_000  # OPT paper: 300k online env steps
    assert td3.with_mode_defaults(A(opt=True, online_steps=1234)).online_steps == 1234  # an explicit flag wins


def test_density_ratio_loss_and_balanced_priority():
    # w = 1 everywhere (no shift between the datasets): -log(2/2) - log(2/2) = 0; larger online w lowers the loss
    assert td3.density_ratio_loss(torch.ones(3), torch.ones(3)).item() == pytest.approx(0.0, abs=1e-6)
    assert td3.density_ratio_loss(torch.ones(3), 3 * torch.ones(3)).item() == pytest.approx(-math.log(1.5))
    # T = 5: (w / 2)^(1/5) with the offline batch at w = 2; clipped to [1e-3, 1e3]
    p = td3.balanced_priority(T([0.0, 64.0, 2e20, 2.0]), T([2.0, 2.0]), temperature=5.0)
    assert torch.allclose(p, T([1e-3, 2.0, 1e3, 1.0]), rtol=1e-5)
    # normalised by the MEAN of w_off^(1/T), not by (mean w_off)^(1/T): 0.5 (1 + 32^(1/5)) = 1.5
    assert td3.balanced_priority(T([243.0]), T([1.0, 32.0]), temperature=5.0).item() == pytest.approx(3.0 / 1.5, rel=1e-5)


def test_early_eval_steps():
    assert td3.early_eval_steps(100, 5) == [2, 4, 6, 8, 10]  # floor(100 / 10 * k / 5)
    assert td3.early_eval_steps(40, 5) == [1, 2, 3, 4]  # floor(0.8) -> at least 1; floor(1.6) = 1 counted once
    assert [25 + s for s in td3.early_eval_steps(100, 2)] == [30, 35]  # OPT: counted from the end of the collection
    assert td3.early_eval_steps(100_000, 0) == []


def test_fqe_gap_extrapolates_a_geometric_approach():
    q = [100 * (1 - 0.5 ** k) for k in range(1, 6)]  # heading for 100
    assert td3.fqe_gap(q[:3]) == pytest.approx(100 - q[2])
    assert td3.fqe_gap(q) == pytest.approx(100 - q[-1])
    assert td3.fqe_gap(q[:2]) == math.inf  # too few readings
    assert td3.fqe_gap([0.0, 10.0, 25.0]) == math.inf  # changes growing: not contracting yet
    assert td3.fqe_gap([50.0, 51.0, 50.5]) == pytest.approx(0.5)  # wandering around the limit
    assert td3.fqe_gap([3.0, 3.0, 3.0]) == 0.0
    assert td3.fqe_converged(q, 0.07) and not td3.fqe_converged(q, 0.04)  # readings 4 and 5 pass 7% (gap 6.25 against 93.75), not 4%
    assert not td3.fqe_converged([1.0, 1.0, 1.0, 1.0], 0.0)  # tol 0 = never: the paper's fixed step count
    hc = [72.7, 141.1, 148.0]  # halfcheetah-medium: the fast first fit bending into a slow growth (on to 171)
    assert td3.fqe_gap(hc) <= 0.01 * hc[-1] and not td3.fqe_converged(hc, 0.01) and not td3.fqe_converged([*hc, 160.0], 0.01)
    assert not td3.fqe_converged(q[:4], 0.07)  # reading 4 passes 7%, reading 3 (gap 12.5) does not


def test_q_stats_min_over_critics():
    s = td3.q_stats(T([[1.0, 5.0, 3.0], [2.0, 4.0, 0.0]]))  # min over critics: [1, 4, 0]
    assert s["mean"] == pytest.approx(5.0 / 3.0)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 5 / 3) ** 2 + (4 - 5 / 3) ** 2 + (0 - 5 / 3) ** 2) / 3))  # population std


def test_policy_critic_agreement():
    # 3 samples (rows) of 3 states (columns); squared distances to pi0 grow down the rows
    q_mode = T([5.0, 10.0, 1.0])
    q_samples = T([[4.0, 9.0, 1.0], [5.0, 8.0, 1.0], [6.0, 7.0, 1.0]])
    sq_dist = T([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.4, 0.3]])
    r = td3.policy_critic_agreement(q_mode, q_samples, sq_dist)
    # state 0: 5 >= 4, 5 >= 5, 5 < 6 -> 2/3; states 1 and 2 (ties count as agreement): 3/3
    assert r["agreement"] == pytest.approx(8 / 9) and r["agreement_all"] == pytest.approx(2 / 3)
    # state 0: Q rises with the distance -> corr(-d, Q) = -1; state 1: Q falls with it; state 2 (Q constant) has none
    r1 = np.corrcoef([-0.1, -0.2, -0.4], [9.0, 8.0, 7.0])[0, 1]
    assert r1 > 0.9
    assert r["dist_q_corr"] == pytest.approx((-1.0 + r1) / 2, rel=1e-5)
    assert math.isnan(td3.policy_critic_agreement(T([0.0]), T([[1.0], [1.0]]), T([[0.1], [0.2]]))["dist_q_corr"])


def test_actor_stats():
    a = T([[0.5, -1.0], [0.995, 0.0]])
    assert td3.actor_stats(a) == pytest.approx({"mean_abs_action": (0.5 + 1.0 + 0.995) / 4, "saturation": 0.5})
    assert td3.actor_stats(2 * a, max_action=2.0) == pytest.approx({"mean_abs_action": (0.5 + 1.0 + 0.995) / 2, "saturation": 0.5})


def test_budget_scale_resolution():
    A = td3.Args
    given = A(budget_scale=0.03)
    a = td3.with_budget_scale(td3.with_mode_defaults(given))
    assert given.online_steps is None and given.align_eval_every is None and given.reevaluate_steps == 500_000  # never mutated
    assert (a.distill_steps, a.reevaluate_steps, a.align_steps, a.online_steps, a.learning_starts) == (20_000, 15_000, 15_000, 3_000, 30)  # distillation not scaled
    assert (a.constraint_horizon, a.eval_every, a.checkpoint_every, a.log_every, a.align_eval_every) == (100_000, 30, 300, 30, 1_500)
    assert td3.with_budget_scale(td3.with_mode_defaults(A(budget_scale=0.03, scale_constraint_horizon=True))).constraint_horizon == 3_000
    assert a.lambda_lr == pytest.approx(5e-5 / 0.03) and a.stop_after is None
    o = td3.with_budget_scale(td3.with_mode_defaults(A(opt=True, budget_scale=0.03)))
    assert (o.online_steps, o.opt_collect_steps, o.opt_pretrain_steps, o.kappa_begin, o.kappa_finish) == (9_000, 750, 1_500, 750, 4_500)
    # F = 1: the paper's protocol, only --align-eval-every (align_steps // 10) and --checkpoint-every resolved
    one = td3.with_budget_scale(td3.with_mode_defaults(A()))
    assert one == td3.dataclasses.replace(td3.with_mode_defaults(A()), align_eval_every=50_000, checkpoint_every=10_000)
    # the default checkpoint interval: at most a tenth of the online steps, whatever --eval-every is
    assert td3.with_budget_scale(A(online_steps=40, eval_every=3_000)).checkpoint_every == 4
    # explicit flags are scaled too; rounding keeps counts >= 1, 0 stays 0; the checkpoint interval keeps its ratio
    e = td3.with_budget_scale(A(online_steps=1000, align_eval_every=7, learning_starts=0, eval_every=3, checkpoint_every=9,
                                 stop_after=500, align_steps=100, budget_scale=0.1))
    assert (e.online_steps, e.align_eval_every, e.learning_starts, e.eval_every, e.checkpoint_every, e.stop_after) == (100, 1, 0, 1, 3, 50)
    assert td3.with_budget_scale(A(align_steps=5, align_eval_every=None)).align_eval_every == 1
    assert td3.with_budget_scale(A(align_eval_every=0, budget_scale=0.5)).align_eval_every == 0
    assert (a.reevaluate_tau, a.reevaluate_tol) == (0.05, 0.01)  # not step counts: never scaled


# ---------------------------------------------------------------- behaviour on synthetic data (no env)
def _align(ag, obs, **kw):
    """align_update with the networks of `ag` (a namespace holding them under the script's names)."""
    return td3.align_update(ag.pi0, ag.actor, ag.qf, ag.qf_target, ag.qf_opt, ag.actor_opt, obs, **kw)


def _online(ag, *inputs, **kw):
    return td3.online_update(ag.actor, ag.actor_target, ag.actor_ref, ag.qf, ag.qf_target, ag.qf_opt, ag.actor_opt, ag.log_lam, ag.lam_opt,
                             *inputs, **kw)


def _pretrain(ag, *inputs, **kw):
    return td3.opt_pretrain_update(ag.actor, ag.qf_on, ag.qf_on_target, ag.qf_on_opt, *inputs, **kw)


def _finetune(ag, *inputs, **kw):
    return td3.opt_finetune_update(ag.actor, ag.actor_target, ag.qf, ag.qf_target, ag.qf_on, ag.qf_on_target, ag.qf_opt, ag.qf_on_opt,
                                   ag.actor_opt, *inputs, **kw)


def _synthetic_agent(seed: int = 0):
    torch.manual_seed(seed)
    ag = SimpleNamespace()
    ag.pi0 = td3.DeterministicActor(3, 2, (16, 16)).requires_grad_(False)
    ag.actor = td3.DeterministicActor(3, 2, (16, 16))
    ag.actor.load_state_dict(ag.pi0.state_dict())
    ag.actor_target = td3.DeterministicActor(3, 2, (16, 16))
    ag.actor_target.load_state_dict(ag.actor.state_dict())
    ag.qf = td3.orthogonal_init_(td3.Critic(3, 2, (32, 32), n=2, layer_norm=True))
    ag.qf_target = td3.Critic(3, 2, (32, 32), n=2, layer_norm=True)
    ag.qf_target.load_state_dict(ag.qf.state_dict())
    ag.qf_opt = torch.optim.Adam(ag.qf.parameters(), lr=3e-3)
    ag.actor_opt = torch.optim.Adam(ag.actor.parameters(), lr=1e-4)
    return ag


def _prefers_offline_action(ag, obs):
    """Fraction of states where min_i Q_i(s, a_off) >= min_i Q_i(s, a) for a smoothed perturbation a of a_off."""
    torch.manual_seed(1)
    with torch.no_grad():
        a_off = ag.pi0(obs)
        perturbed = td3.smoothed_action(a_off, 0.2 * torch.randn_like(a_off), 0.5)
        return (ag.qf(obs, a_off).min(0).values >= ag.qf(obs, perturbed).min(0).values).float().mean().item()


def test_alignment_makes_critic_prefer_offline_action():
    ag = _synthetic_agent()
    obs = torch.randn(128, 3)
    opt = torch.optim.Adam(ag.qf.parameters(), lr=3e-3)
    for _ in range(200):  # a "re-evaluated" critic that prefers another action: Q = 50 + 10 sum(a)
        o, a = obs[torch.randint(128, (64,))], torch.rand(64, 2) * 2 - 1
        loss = td3.td_loss(ag.qf(o, a), 50 + 10 * a.sum(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ag.qf_target.load_state_dict(ag.qf.state_dict())
    before = _prefers_offline_action(ag, obs)
    a = td3.Args()
    for _ in range(200):
        _align(ag, obs[torch.randint(128, (64,))], policy_noise=a.policy_noise, noise_clip=a.noise_clip, beta=a.align_beta,
               max_distance=a.align_max_distance)
    after = _prefers_offline_action(ag, obs)
    assert before < 0.75 and after > 0.9


def test_lagrange_multiplier_rises_when_constraint_violated():
    ag = _synthetic_agent()
    ag.actor_ref = td3.DeterministicActor(3, 2, (16, 16)).requires_grad_(False)  # a different reference: large deviation
    ag.log_lam = torch.nn.Parameter(torch.zeros(1))
    ag.lam_opt = torch.optim.Adam([ag.log_lam], lr=1e-2)
    b = {"obs": torch.randn(32, 3), "actions": torch.rand(32, 2) * 2 - 1, "rewards": torch.randn(32), "next_obs": torch.randn(32, 3), "terminals": torch.zeros(32)}
    args = td3.Args()
    for _ in range(10):
        m = _online(ag, b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], T(1e-6), True, constraint=True,
                    lagrange_tau=args.lagrange_tau, **td3.td3_constants(args))
    assert ag.log_lam.item() > 0.05
    assert all(torch.isfinite(v).all() for v in m.values())


def _distinct_actors(ag):
    """pi, its target, pi0 and pi_ref all different, so a test sees which one an update reads."""
    for i, name in enumerate(("actor", "actor_target", "actor_ref")):
        torch.manual_seed(10 + i)
        setattr(ag, name, td3.DeterministicActor(3, 2, (16, 16)))
    ag.actor_ref.requires_grad_(False)
    ag.actor_opt = torch.optim.Adam(ag.actor.parameters(), lr=1e-4)
    ag.log_lam = torch.nn.Parameter(torch.full((1,), math.log(50.0)))  # a large lambda: M' weighs in the target
    ag.lam_opt = torch.optim.Adam([ag.log_lam], lr=1e-2)
    return ag


def _batch3(n: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, 3, generator=g), "actions": torch.rand(n, 2, generator=g) * 2 - 1, "rewards": torch.randn(n, generator=g),
            "next_obs": 3 * torch.randn(n, 3, generator=g), "terminals": (torch.rand(n, generator=g) < 0.2).float()}


def test_o2td3_critic_target_penalises_current_vs_reference_actor():
    """One critic update against a hand-computed one: y = r + g (1-d) [min Qbar(s', a') - lam M'], a' from the TARGET
    actor (smoothed), M' = mean (pi(s') - pi_ref(s'))^2 from the CURRENT and REFERENCE actors."""
    ag = _distinct_actors(_synthetic_agent())
    b, args = _batch3(), td3.Args()
    with torch.no_grad():
        lam = ag.log_lam.exp().item()
        torch.manual_seed(7)
        next_a = td3.smoothed_action(ag.actor_target(b["next_obs"]), torch.randn(32, 2) * args.policy_noise, args.noise_clip)
        m_next = ((ag.actor(b["next_obs"]) - ag.actor_ref(b["next_obs"])) ** 2).mean()
        y = b["rewards"] + args.gamma * (1 - b["terminals"]) * (ag.qf_target(b["next_obs"], next_a).min(0).values - lam * m_next)
        expected = ((ag.qf(b["obs"], b["actions"]) - y) ** 2).mean(-1).sum().item()
        for other in (ag.actor_target, ag.pi0):  # the penalty must tell these apart from pi
            assert abs(((other(b["next_obs"]) - ag.actor_ref(b["next_obs"])) ** 2).mean() - m_next) > 1e-3
    torch.manual_seed(7)
    m = _online(ag, b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], T(0.01), False, constraint=True,
                lagrange_tau=args.lagrange_tau, **td3.td3_constants(args))
    assert m["losses/qf_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_o2td3_lambda_and_actor_step_only_with_the_delayed_update():
    ag = _distinct_actors(_synthetic_agent())
    b, args = _batch3(), td3.Args()
    lam0, actor0 = ag.log_lam.detach().clone(), [p.detach().clone() for p in ag.actor.parameters()]
    _online(ag, *b.values(), T(1e-6), False, constraint=True, lagrange_tau=args.lagrange_tau, **td3.td3_constants(args))
    assert torch.equal(ag.log_lam, lam0) and all(torch.equal(p, q) for p, q in zip(ag.actor.parameters(), actor0))
    _online(ag, *b.values(), T(1e-6), True, constraint=True, lagrange_tau=args.lagrange_tau, **td3.td3_constants(args))
    assert ag.log_lam.item() > lam0.item()  # violated: lambda rises, on the delayed step only


def test_align_update_matches_hand_computed_loss_and_keeps_targets():
    """Both terms of the alignment loss (distance-shrunk targets at the perturbed action AND the anchor at a_off) against a
    hand computation; the target critics are not touched by the update."""
    ag = _distinct_actors(_synthetic_agent())
    obs, args = torch.randn(32, 3), td3.Args()
    target_before = [p.detach().clone() for p in ag.qf_target.parameters()]
    with torch.no_grad():
        a_off, pi = ag.pi0(obs), ag.actor(obs)
        torch.manual_seed(3)
        at = td3.smoothed_action(pi, torch.randn(32, 2) * args.policy_noise, args.noise_clip)
        q_star = ag.qf_target(obs, a_off).min(0).values
        delta = ((at - a_off).norm(dim=-1) / math.sqrt(2)).clamp(max=args.align_max_distance)
        y_star = torch.where(q_star < 0, q_star * (1 + delta**2), q_star / (1 + delta**2))
        y = torch.minimum(y_star, ag.qf_target(obs, at))
        shrunk = ((ag.qf(obs, at) - y) ** 2).mean(-1).sum()
        anchor = ((ag.qf(obs, a_off) - q_star) ** 2).mean(-1).sum()
        assert anchor.item() > 1e-3 * shrunk.item()  # the anchor term is not negligible here
    torch.manual_seed(3)
    m = _align(ag, obs, policy_noise=args.policy_noise, noise_clip=args.noise_clip, beta=args.align_beta,
               max_distance=args.align_max_distance)
    assert m["align/qf_loss"].item() == pytest.approx((shrunk + anchor).item(), rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(ag.qf_target.parameters(), target_before))


def _agent_with_qf_on():
    """The synthetic agent plus OPT's new critic Q_on (its target a copy) and its Adam."""
    ag = _distinct_actors(_synthetic_agent())
    ag.qf_on = td3.orthogonal_init_(td3.Critic(3, 2, (32, 32), n=2, layer_norm=True))
    ag.qf_on_target = td3.Critic(3, 2, (32, 32), n=2, layer_norm=True)
    ag.qf_on_target.load_state_dict(ag.qf_on.state_dict())
    ag.qf_on_opt = torch.optim.Adam(ag.qf_on.parameters(), lr=1e-3)
    return ag


def test_opt_finetune_q_off_sees_the_checkpoint_transform_q_on_raw():
    ag = _agent_with_qf_on()
    b, args = _batch3(), td3.Args()
    with torch.no_grad():
        torch.manual_seed(4)
        next_a = td3.smoothed_action(ag.actor_target(b["next_obs"]), torch.randn(32, 2) * args.policy_noise, args.noise_clip)
        boot = args.gamma * (1 - b["terminals"])
        y_off = 7.0 * b["rewards"] - 3.0 + boot * ag.qf_target(b["next_obs"], next_a).min(0).values
        y_on = b["rewards"] + boot * ag.qf_on_target(b["next_obs"], next_a).min(0).values
        l_off = ((ag.qf(b["obs"], b["actions"]) - y_off) ** 2).mean(-1).sum().item()
        l_on = ((ag.qf_on(b["obs"], b["actions"]) - y_on) ** 2).mean(-1).sum().item()
    torch.manual_seed(4)
    m = _finetune(ag, *b.values(), T(0.5), False, off_reward_scale=7.0, off_reward_shift=-3.0, **td3.td3_constants(args))
    assert m["losses/qf_loss"].item() == pytest.approx(l_off, rel=1e-5)
    assert m["losses/qf_on_loss"].item() == pytest.approx(l_on, rel=1e-5)


def test_opt_pretrain_targets_move_only_when_asked():
    ag = _agent_with_qf_on()
    const = dict(inner_lr=3e-4, **td3.td3_constants(td3.Args()))
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    before = flat(ag.qf_on_target)
    _pretrain(ag, _batch3(seed=1), _batch3(seed=2), False, **const)
    assert torch.equal(flat(ag.qf_on_target), before) and not torch.equal(flat(ag.qf_on), before)
    _pretrain(ag, _batch3(seed=1), _batch3(seed=2), True, **const)
    assert not torch.equal(flat(ag.qf_on_target), before)


def _offline_buffer(obs: torch.Tensor) -> "td3.ReplayBuffer":
    n, obs_dim = obs.shape
    rb = td3.ReplayBuffer(obs_dim, 2, n, torch.device("cpu"))
    rb.add(obs, torch.zeros(n, 2), torch.zeros(n), obs, torch.zeros(n))
    return rb


def _balanced_replay(n_off: int, capacity: int, obs_dim: int = 3):
    off = _offline_buffer(torch.randn(n_off, obs_dim))
    data = {"obs_dim": obs_dim, "act_dim": 2}
    return td3.OnlineReplay(off, data, "half", capacity, 5, True, torch.device("cpu"))


def test_balanced_replay_samples_new_transitions_at_once():
    """After priorities were set by earlier updates, 500 new transitions arrive: they must be drawn right away (they
    enter with the largest stored priority), in about their share of the total priority mass."""
    torch.manual_seed(0)
    replay = _balanced_replay(3000, 1500)
    add = lambda n, v: replay.add(torch.full((n, 3), v), torch.zeros(n, 2), torch.zeros(n), torch.full((n, 3), v), torch.zeros(n))  # noqa: E731
    add(1000, 0.5)
    replay.set_priorities(torch.arange(4000), torch.rand(4000) * 3 + 0.01)  # refreshed by density-ratio updates
    pmax = replay.priority[:4000].max().item()
    add(500, 1e6)
    assert replay.priority[4000:4500].eq(pmax).all()
    b = replay.sample(20_000)
    newest = (b["obs"][:, 0] == 1e6).float().mean().item()
    share = 500 * pmax / replay.priority[:4500].sum().item()
    assert newest > 0.8 * share and (b["idx"][b["obs"][:, 0] == 1e6] >= 4000).all()


def test_balanced_replay_update_sets_priorities_and_trains_the_ratio():
    """Through the update: the RL batch's priorities become clip(w^(1/5) / mean_offline(w^(1/5)), 1e-3, 1e3), computed
    with the ratio network before its step; the network takes one step per update."""

    class Ratio(torch.nn.Module):  # w(s, a) = relu(k s_0): known values
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.ones(()))

        def forward(self, obs, act):
            return torch.relu(self.k * obs[:, 0])

    replay = _balanced_replay(64, 16)
    replay.offline.data["obs"][:, 0] = 2.0  # every offline transition has w = 2
    online_s0 = T([-1.0, 64.0, 2e20, 2.0])
    obs = torch.zeros(4, 3)
    obs[:, 0] = online_s0
    replay.add(obs, torch.zeros(4, 2), torch.zeros(4), obs, torch.zeros(4))
    ratio = Ratio()
    opt = torch.optim.SGD(ratio.parameters(), lr=1e-3)
    batch = {"obs": obs, "actions": torch.zeros(4, 2), "idx": 64 + torch.arange(4)}
    m = td3.balanced_replay_update(ratio, opt, replay, batch, temperature=5.0)
    assert torch.allclose(replay.priority[64:68], T([1e-3, 2.0, 1e3, 1.0]), rtol=1e-5)
    assert torch.equal(replay.priority[:64], torch.ones(64))  # offline priorities untouched: not in the batch
    assert ratio.k.item() != 1.0 and math.isfinite(m["losses/ratio_loss"].item())


def test_replay_modes(tiny_dataset):
    data = td3.load_dataset("hopper-medium-v2", quiet=True)
    off = td3.ReplayBuffer.from_dataset(data, *td3.obs_stats(data["observations"]), torch.device("cpu"))
    n = len(data["rewards"])
    assert td3.OnlineReplay(off, data, "all", 10, 5, False, torch.device("cpu")).prefill == n
    part = td3.OnlineReplay(off, data, "part", 10, 2, False, torch.device("cpu"))
    lengths = np.diff(np.concatenate([[0], np.flatnonzero(data["ends"]) + 1]))
    assert part.prefill == lengths[np.argsort(-data["episode_returns"], kind="stable")[:2]].sum()
    marker = torch.full((1, data["obs_dim"]), 1e6)
    part.add(marker, torch.zeros(1, data["act_dim"]), T([0.0]), marker, T([0.0]))
    assert (part.sample_online(8)["obs"] == 1e6).all() and part.n_online == 1  # OPT's B_on never sees the prefix
    half = td3.OnlineReplay(off, data, "half", 10, 5, False, torch.device("cpu"))
    half.add(marker, torch.zeros(1, data["act_dim"]), T([0.0]), marker, T([0.0]))
    b = half.sample(8)
    assert (b["obs"][:4] == 1e6).all() and (b["obs"][4:] != 1e6).all()  # first half online, second half offline
    assert half.state()["obs"].shape == (1, data["obs_dim"])
    bal = td3.OnlineReplay(off, data, "half", 10, 5, True, torch.device("cpu"))
    bal.add(marker, torch.zeros(1, data["act_dim"]), T([0.0]), marker, T([0.0]))
    bal.priority[: off.size] = 0.0  # all mass on the online transition
    b = bal.sample(16)
    assert (b["obs"] == 1e6).all() and (b["idx"] == off.size).all()  # idx: offline first, then online


def test_env_runner_stores_executed_noisy_action(tiny_dataset):
    data = td3.load_dataset("hopper-medium-v2", quiet=True)
    mean, std = td3.obs_stats(data["observations"])
    runner = td3.EnvRunner(data["env_spec"], 0, mean, std, {"scale": 1.0, "shift": 0.0}, torch.device("cpu"))
    actor = td3.DeterministicActor(data["obs_dim"], data["act_dim"])
    (o, a, r, o2, d), _ = runner.step(actor, 0.5)
    with torch.no_grad():
        clean = actor(o)
    assert not torch.allclose(a, clean) and a.abs().max() <= 1.0
    (o, a, r, o2, d), _ = runner.step(actor, 0.0)
    with torch.no_grad():
        assert torch.allclose(a, actor(o))
    runner.close()


# ---------------------------------------------------------------- smoke runs
TINY = ["--env", "hopper-medium-v2", "--device", "cpu", "--batch-size", "32", "--distill-steps", "20", "--reevaluate-steps", "20",
        "--align-steps", "20", "--online-steps", "40", "--learning-starts", "10", "--eval-every", "20", "--eval-episodes", "1", "--headline-eval-episodes", "0",
        "--log-every", "10", "--checkpoint-every", "20", "--opt-collect-steps", "20",
        "--opt-pretrain-steps", "10", "--opt-utd", "2", "--kappa-begin", "20", "--kappa-finish", "40",
        "--align-eval-every", "0", "--early-evals", "0"]  # evaluations inside alignment and early online: tested on their own


run = functools.partial(run_o2o, td3, TINY)  # run(ckpt, run_dir, *extra flags)


def test_headline_evaluations_use_more_episodes(offline_checkpoints, monkeypatch, tmp_path):
    """--headline-eval-episodes reaches exactly the evaluations results.json's headline numbers rest on (offline,
    distilled, after alignment, every online evaluation in the first tenth, the last one); the evaluations during
    alignment and the rest of online use --eval-episodes. The stand-in's every return is the episode count asked for."""
    def count(self, act, n_episodes=None):
        n = len(self.envs[:n_episodes])
        return np.full(n, float(n))

    monkeypatch.setattr(td3.Evaluator, "__call__", count)
    res = run(offline_checkpoints["iql"], tmp_path, "--headline-eval-episodes", "3", "--align-eval-every", "10", "--early-evals", "2",
              "--no-copy-mean-net")
    got = [(p["phase"], p["step"], p["return"]) for p in res["curve"]]
    # the last alignment point is the after-alignment (headline) evaluation of the same actor, not a second one
    assert got == [("offline", 0, 3), ("distilled", 0, 3), ("align", 10, 1), ("align", 20, 3), ("aligned", 0, 3), ("online", 0, 3),
                   ("online", 2, 3), ("online", 4, 3), ("online", 20, 1), ("online", 40, 3)]


def check_outputs(res: dict, phases: list[str], n_online_evals: int = 2) -> None:
    out = Path(res["run_dir"])
    for f in ("args.json", "results.json", "final.pt", "online.pt"):
        assert (out / f).exists(), f
    assert list(out.glob("events.out.tfevents.*"))
    saved = json.loads((out / "results.json").read_text())
    curve = saved["curve"]
    assert curve[0]["step"] == 0 and curve[0]["phase"] == "offline"
    start = next(i for i, c in enumerate(curve) if c["phase"] == "online")  # where online starts: the last score, not an evaluation
    assert curve[start]["normalized_score"] == curve[start - 1]["normalized_score"] == saved["online_start_score"]
    rest = curve[:start] + curve[start + 1:]
    assert [c["phase"] for c in rest if c["step"] == 0] == ["offline", *phases]
    assert [c["step"] for c in rest if c["step"] > 0] == [20 * (i + 1) for i in range(n_online_evals)]
    assert all(math.isfinite(c["normalized_score"]) for c in curve)
    assert saved["final_score"] == curve[-1]["normalized_score"] and saved["local_standin"] is True
    assert saved["dataset_ids"] == ["local/hopper/medium-v0"]
    td3.load_checkpoint(out / "final.pt", env_name="hopper-medium-v2")  # phase/final checkpoints keep the offline format


def test_default_o2td3_reaches_every_phase(tmp_path, offline_checkpoints):
    res = run(offline_checkpoints["td3_bc"], tmp_path)
    check_outputs(res, ["aligned"])
    out = Path(res["run_dir"])
    assert (out / "reevaluated.pt").exists() and (out / "aligned.pt").exists() and not (out / "distilled.pt").exists()
    assert res["mode"]["name"] == "o2td3" and res["distillation"] is None
    assert_results_schema(res, "o2o_td3")
    assert res["method"] == "ocr-cft" and res["aligned_score"] is not None and res["distilled_score"] is None
    s = scalars(res["run_dir"])
    for k in ("reevaluate/qf_loss", "align/qf_loss", "align/actor_loss", "losses/qf_loss", "losses/actor_loss", "losses/lambda", "charts/kl_threshold", "eval/normalized_score", "charts/SPS"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    # charts/phase on the env-step axis: the phases before online learning at 0, online from env step 0
    assert phase_marks(out) == [(0, "offline"), (0, "reevaluate"), (0, "align"), (0, "online")]
    # a deterministic TD3+BC actor is copied exactly into pi0
    final = torch.load(out / "final.pt", weights_only=True)
    src = torch.load(offline_checkpoints["td3_bc"], weights_only=True)
    assert all(torch.equal(final["train_state"]["modules"]["pi0"][k], v) for k, v in src["actor"].items())
    assert final["lagrange"] is not None and final["reference_actor"] is not None


@pytest.mark.parametrize("flags, phases, mode", [
    (["--no-reevaluate"], ["aligned"], "o2td3_no_reevaluate"),
    (["--no-align"], [], "o2td3_no_align"),
    (["--no-constraint"], ["aligned"], "o2td3_no_constraint"),
    (["--no-reevaluate", "--no-align", "--no-constraint"], [], "naive"),
])
def test_ablations(tmp_path, offline_checkpoints, flags, phases, mode):
    res = run(offline_checkpoints["td3_bc"], tmp_path, *flags)
    check_outputs(res, phases)
    out = Path(res["run_dir"])
    assert res["mode"]["name"] == mode and out.name.startswith(mode)
    assert (out / "reevaluated.pt").exists() == ("--no-reevaluate" not in flags)
    assert (out / "aligned.pt").exists() == ("--no-align" not in flags)
    assert (res["reevaluation"] is None) == ("--no-reevaluate" in flags)
    if res["reevaluation"] is not None:  # 20 steps < REEVAL_CHECK_EVERY: no probe reading, the cap ends the phase
        assert {k: res["reevaluation"][k] for k in ("steps", "converged", "q_probe")} == {"steps": 20, "converged": False, "q_probe": []}
    if "--no-constraint" in flags:
        assert max(scalars(res["run_dir"])["losses/lambda"]) == 0.0


@pytest.mark.parametrize("critic_init", ["offline", "scratch"])
def test_naive_starts_from_offline_critic(tmp_path, offline_checkpoints, critic_init):
    """--critic-init offline (default): naive fine-tuning keeps the TD3+BC critic and its reward transform; scratch: a new
    LayerNorm critic on raw rewards."""
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--no-reevaluate", "--no-align", "--no-constraint", "--online-steps", "20",
              "--checkpoint-every", "20", "--critic-init", critic_init)
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    kept = critic_init == "offline"
    assert final["critic_config"] == {"hidden": [256, 256], "layer_norm": not kept}  # the TD3+BC critic has no LayerNorm
    assert res["mode"]["critic_init"] == critic_init and res["reward_handling"]["qf"]["source"] == ("checkpoint (td3_bc)" if kept else "raw")


@pytest.mark.parametrize("flags", [[], ["--opt-balanced-replay"], ["--buffer-mode", "part"]])
def test_opt(tmp_path, offline_checkpoints, flags):
    balanced = "--opt-balanced-replay" in flags
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--opt", *flags)
    check_outputs(res, [])
    out = Path(res["run_dir"])
    assert (out / "opt_pretrained.pt").exists() and not (out / "reevaluated.pt").exists()
    assert [c["phase"] for c in res["curve"]] == ["offline", "opt_collect", "online", "online"]  # online: its start, then an evaluation
    s = scalars(res["run_dir"])
    for k in ("opt_pretrain/meta_loss", "opt_pretrain/w", "losses/qf_loss", "losses/qf_on_loss", "losses/actor_loss", "charts/kappa"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    assert s["charts/kappa"][-1] == pytest.approx(0.9)
    # collection from env step 0; pre-training and fine-tuning where the collection ends (--opt-collect-steps 20)
    assert phase_marks(out) == [(0, "offline"), (0, "opt_collect"), (20, "opt_pretrain"), (20, "online")]
    if balanced:
        assert "losses/ratio_loss" in s
    final = torch.load(out / "final.pt", weights_only=True)
    assert set(final["critics"]) == {"qf", "qf_on"}
    online = torch.load(out / "online.pt", weights_only=True)  # collection and fine-tuning transitions are all kept
    assert len(online["train_state"]["replay"]["rewards"]) == 40
    src = torch.load(offline_checkpoints["td3_bc"], weights_only=True)  # Q_off started from the offline critic
    pre = torch.load(out / "opt_pretrained.pt", weights_only=True)["train_state"]["modules"]["qf"]
    assert all(torch.equal(pre[k], v) for k, v in src["critics"]["qf"].items())


@pytest.mark.parametrize("mode", ["interval", "offline"])
def test_reference_modes(tmp_path, offline_checkpoints, mode):
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--reference", mode, "--no-reevaluate", "--align-steps", "5")
    check_outputs(res, ["aligned"])
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    ref, pi0 = final["reference_actor"], final["train_state"]["modules"]["pi0"]
    same = all(torch.equal(ref[k], pi0[k]) for k in ref)
    if mode == "offline":
        assert same
    else:  # copied from pi after every evaluation: no longer the offline actor
        assert not same and all(torch.equal(ref[k], final["actor"][k]) for k in ref)


@pytest.mark.parametrize("buffer_mode", ["all", "part", "none"])
def test_buffer_modes(tmp_path, offline_checkpoints, buffer_mode):
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--buffer-mode", buffer_mode, "--no-reevaluate", "--no-align")
    check_outputs(res, [])


@pytest.mark.parametrize("name, family", [("cql", "tanh_gaussian"), ("iql", "gaussian"), ("bc", "tanh_gaussian"), ("bc_det", "deterministic")])
def test_checkpoint_families(tmp_path, offline_checkpoints, name, family):
    copy = ["--no-copy-mean-net"] if name == "iql" else []  # the distillation path of a Gaussian (its copy: the next test)
    res = run(offline_checkpoints[name], tmp_path, "--no-reevaluate", "--align-steps", "5", "--online-steps", "20", *copy)
    check_outputs(res, (["distilled"] if family != "deterministic" else []) + ["aligned"], n_online_evals=1)
    assert res["offline_actor_family"] == family
    assert res["pi0_from"] == ("copied" if family == "deterministic" else "distilled")
    if family == "deterministic":
        assert res["distillation"] is None
    else:
        d = res["distillation"]
        assert d["from_family"] == family and math.isfinite(d["distill_error"]) and d["distilled_score"] == res["distilled_score"]
        assert (Path(res["run_dir"]) / "distilled.pt").exists()
        assert "distill/action_mse" in scalars(res["run_dir"])
    distill = [(0, "distill")] if family != "deterministic" else []
    assert phase_marks(res["run_dir"]) == [(0, "offline"), *distill, (0, "align"), (0, "online")]


def test_iql_mean_network_is_copied_not_distilled(tmp_path, offline_checkpoints, monkeypatch):
    """An IQL Gaussian of the online actor's layer sizes hands its mean network to pi0 and the online actor exactly:
    nothing is distilled, pi0 acts as the offline mean on every state, and alignment and online learning start from it."""
    calls = _count_calls(monkeypatch, ("distill_update", "align_update"))
    res = run(offline_checkpoints["iql"], tmp_path, "--no-reevaluate", "--align-steps", "5", "--online-steps", "20")
    check_outputs(res, ["aligned"], n_online_evals=1)
    out = Path(res["run_dir"])
    assert calls["distill_update"] == [] and len(calls["align_update"]) == 5
    assert res["pi0_from"] == "mean_network_copied"
    assert res["distillation"] is None and not (out / "distilled.pt").exists() and "distill/action_mse" not in scalars(out)
    assert phase_marks(out) == [(0, "offline"), (0, "align"), (0, "online")]
    teacher = td3.actor_from_checkpoint(td3.load_checkpoint(offline_checkpoints["iql"], env_name="hopper-medium-v2"))
    pi0 = td3.DeterministicActor(teacher.net[0].in_features, teacher.net[-1].out_features, td3.ACTOR_HIDDEN)
    pi0.load_state_dict(torch.load(out / "final.pt", weights_only=True)["train_state"]["modules"]["pi0"])
    obs = torch.randn(512, teacher.net[0].in_features) * 3
    with torch.no_grad():
        assert torch.equal(pi0(obs), teacher.act(obs))
    # the aligned score is the offline one (alignment holds the actor at pi0): the copy acts exactly as the teacher
    assert res["aligned_score"] == res["offline_score"]
    # other layer sizes cannot be copied: distilled
    small = td3.GaussianActor(11, 3, (64, 64))
    assert td3.mean_net_copy(small, {"actor_config": {"hidden": [64, 64]}, "obs_dim": 11, "act_dim": 3, "max_action": 1.0}) is None
    assert td3.mean_net_copy(td3.DeterministicActor(11, 3, td3.ACTOR_HIDDEN), {"actor_config": {"hidden": [256, 256]}}) is None


def test_resume_after_kill_and_phase_reuse(tmp_path, offline_checkpoints, capsys):
    ck = offline_checkpoints["td3_bc"]
    extra = ["--online-steps", "120", "--eval-every", "20", "--checkpoint-every", "10"]  # training episodes: ~40-50 env steps
    full = run(ck, tmp_path, *extra, "--run-name", "full")
    killed = run(ck, tmp_path, *extra, "--run-name", "killed", "--stop-after", "110")
    assert not killed["finished"] and not (Path(killed["run_dir"]) / "final.pt").exists()
    online = torch.load(Path(killed["run_dir"]) / "online.pt", weights_only=True)
    at = online["train_state"]["loop"]["global_step"]  # the last episode end at least 10 env steps after the previous one
    assert 50 <= at < 110 and online["train_state"]["loop"]["env_rng"] is not None
    assert f"stopped after 110 env steps (--stop-after, as if killed); online.pt holds env step {at}:" in capsys.readouterr().out
    # stopped before the first online.pt (due at an episode end): it says a rerun starts online learning again
    early = run(ck, tmp_path, *extra, "--run-name", "early", "--stop-after", "5", "--no-reevaluate", "--no-align")  # no phases to compute
    assert not (Path(early["run_dir"]) / "online.pt").exists() and not early["finished"]
    assert "stopped after 5 env steps (--stop-after, as if killed); no online.pt was written yet" in capsys.readouterr().out
    # the multiplier resumes where it was, not at --lambda-init: a copy of the killed run, resumed with nothing left to do
    shutil.copytree(killed["run_dir"], tmp_path / "copy" / Path(killed["run_dir"]).relative_to(tmp_path))
    done = run(ck, tmp_path / "copy", *extra[:1], str(at), *extra[2:], "--run-name", "killed")
    saved = online["lagrange"]["log_lambda"]
    assert done["finished"] and saved.item() != 0.0
    assert torch.equal(torch.load(Path(done["run_dir"]) / "final.pt", weights_only=True)["lagrange"]["log_lambda"], saved)
    resumed = run(ck, tmp_path, *extra, "--run-name", "killed")
    assert resumed["finished"] and resumed["phases"]["aligned"]["reused"]
    assert phase_marks(resumed["run_dir"]) == phase_marks(full["run_dir"])  # a resumed run marks no phase again
    assert resumed["curve"] == full["curve"]
    # the resumed run is the uninterrupted one: every network, optimiser state, the multiplier and the online buffer
    ends = [flat_tensors(torch.load(Path(r["run_dir"]) / "final.pt", weights_only=True)) for r in (full, resumed)]
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(v, ends[1][k]) for k, v in ends[0].items())
    # a longer budget with the same run name continues from the end of the shorter one
    longer = run(ck, tmp_path, *extra[:1], "140", *extra[2:], "--run-name", "killed")
    assert longer["curve"][: len(resumed["curve"])] == resumed["curve"] and longer["curve"][-1]["step"] == 140
    # phase checkpoints reused, online phase recomputed -> the same run (the RNG state is restored with the phase)
    out = Path(full["run_dir"])
    (out / "online.pt").unlink()
    again = run(ck, tmp_path, *extra, "--run-name", "full")
    assert again["phases"]["reevaluated"]["reused"] and again["phases"]["aligned"]["reused"]
    assert again["curve"] == full["curve"]
    fresh = run(ck, tmp_path, *extra, "--run-name", "full", "--no-resume", "--online-steps", "20")
    assert not any(p["reused"] for p in fresh["phases"].values())


def unfinish(folder: Path) -> None:
    """The run folder as a run killed before its first online.pt leaves it: phase checkpoints only."""
    for name in ("online.pt", "final.pt", "results.json"):
        (folder / name).unlink(missing_ok=True)


def test_retrained_checkpoint_at_the_same_path_invalidates_saved_phases(tmp_path, offline_checkpoints):
    """Phases are keyed on the checkpoint's content: the same path and step count with other weights reuses nothing."""
    ck = tmp_path / "td3_bc_checkpoint.pt"
    shutil.copy(offline_checkpoints["td3_bc"], ck)
    extra = ["--online-steps", "20", "--run-name", "retrained"]
    first = run(ck, tmp_path, *extra)
    (Path(first["run_dir"]) / "online.pt").unlink()
    again = run(ck, tmp_path, *extra)
    assert again["phases"]["reevaluated"]["reused"] and again["phases"]["aligned"]["reused"]
    c = torch.load(ck, map_location="cpu", weights_only=True)  # "retrain": other weights, same grad_steps
    c["actor"] = {k: v + 0.01 for k, v in c["actor"].items()}
    torch.save(c, ck)
    unfinish(Path(first["run_dir"]))  # a finished run of another checkpoint is refused
    retrained = run(ck, tmp_path, *extra)
    assert not any(p["reused"] for p in retrained["phases"].values())


def test_run_folder_of_other_settings_refused_then_overwritten(tmp_path, offline_checkpoints, capsys):
    """A finished run of other settings is refused (with --no-resume too), its files untouched; --overwrite deletes its
    outputs, tensorboard events included, before the new run writes anything; a rerun then resumes the new run."""
    ck = offline_checkpoints["td3_bc"]
    first = run(ck, tmp_path, "--run-name", "w")
    d = Path(first["run_dir"])
    old_events = {p.name for p in d.glob("events.out.tfevents.*")}
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for extra in ([], ["--no-resume"]):
        with pytest.raises(SystemExit) as e:
            run(ck, tmp_path, "--run-name", "w", "--gamma", "0.98", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "finished run with other settings (--gamma 0.99 (now 0.98))" in err and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    res = run(ck, tmp_path, "--run-name", "w", "--gamma", "0.98", "--overwrite")
    assert not any(p["reused"] for p in res["phases"].values()) and res["finished"]
    events = {p.name for p in d.glob("events.out.tfevents.*")}
    assert len(events) == 1 and not events & old_events  # the old logs are gone, not mixed with the new ones
    assert torch.load(d / "final.pt", weights_only=True)["phase_key"]["gamma"] == 0.98
    capsys.readouterr()
    run(ck, tmp_path, "--run-name", "w", "--gamma", "0.98")  # the new run, finished: resumed
    assert "resuming the online phase at env step 40" in capsys.readouterr().out
    # where the folder lies is no setting: moved under another --run-dir, it resumes as well
    shutil.copytree(d, tmp_path / "moved" / d.relative_to(tmp_path))
    run(ck, tmp_path / "moved", "--run-name", "w", "--gamma", "0.98")
    assert "resuming the online phase at env step 40" in capsys.readouterr().out


def test_unfinished_run_of_other_settings_needs_no_resume(tmp_path, offline_checkpoints, capsys):
    """online.pt of other settings: refused before any phase runs, never resumed or recomputed silently; --no-resume
    starts the run afresh (every phase recomputed)."""
    ck = offline_checkpoints["td3_bc"]
    killed = run(ck, tmp_path, "--run-name", "k", "--online-steps", "80", "--stop-after", "60")  # online.pt at the episode end ~44
    d = Path(killed["run_dir"])
    with pytest.raises(SystemExit) as e:
        run(ck, tmp_path, "--run-name", "k", "--online-steps", "80", "--explore-noise", "0.2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unfinished run with other settings (--explore-noise None (now 0.2))" in err and "--no-resume" in err
    assert 20 <= torch.load(d / "online.pt", weights_only=True)["train_state"]["loop"]["global_step"] < 60
    res = run(ck, tmp_path, "--run-name", "k", "--explore-noise", "0.2", "--no-resume")
    assert res["finished"] and not any(p["reused"] for p in res["phases"].values())


def test_default_checkpoint_interval_and_any_eval_every(tmp_path, offline_checkpoints):
    """Without --checkpoint-every, online.pt comes at the first episode end every online_steps // 10 env steps (here 8
    of 80), whatever --eval-every is: --eval-every 3000 runs (it used to stop with '--checkpoint-every 10000 must be a
    multiple of --eval-every 3000'); killed at step 70 the run resumes from its last episode end (training episodes
    here last about 40-50 env steps)."""
    i = TINY.index("--checkpoint-every")
    tiny = TINY[:i] + TINY[i + 2:]
    argv = [*tiny, "--checkpoint", str(offline_checkpoints["td3_bc"]), "--run-dir", str(tmp_path), "--eval-every", "3000", "--run-name", "c",
            "--online-steps", "80"]
    killed = td3.main(tyro.cli(td3.Args, args=[*argv, "--stop-after", "70"]))
    assert not killed["finished"] and killed["effective_budgets"]["checkpoint_every"] == 8
    out = Path(killed["run_dir"])
    loop = torch.load(out / "online.pt", weights_only=True)["train_state"]["loop"]
    assert 8 <= loop["global_step"] < 70 and loop["env_rng"] is not None
    res = td3.main(tyro.cli(td3.Args, args=argv))
    assert res["finished"] and json.loads((out / "results.json").read_text())["effective_budgets"]["checkpoint_every"] == 8
    # an explicit interval needs no relation to --eval-every either
    assert run(offline_checkpoints["td3_bc"], tmp_path, "--checkpoint-every", "30", "--run-name", "e")["finished"]


def test_non_finite_loss_stops_with_phase_and_step(tmp_path, offline_checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        run(offline_checkpoints["td3_bc"], tmp_path, "--critic-lr", "1e30", "--no-align")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "re-evaluation" in err


def test_same_seed_same_results(tmp_path, offline_checkpoints):
    a = run(offline_checkpoints["td3_bc"], tmp_path, "--run-name", "a")
    b = run(offline_checkpoints["td3_bc"], tmp_path, "--run-name", "b")
    assert a["curve"] == b["curve"]
    sa, sb = scalars(a["run_dir"]), scalars(b["run_dir"])
    assert sa["losses/qf_loss"] == sb["losses/qf_loss"]


def test_default_checkpoint_convention(tmp_path, offline_checkpoints):
    dest = tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "seed0" / "checkpoint.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(offline_checkpoints["td3_bc"].read_bytes())
    res = td3.main(tyro.cli(td3.Args, args=[*TINY, "--run-dir", str(tmp_path), "--no-reevaluate", "--no-align", "--online-steps", "20"]))
    assert res["offline_checkpoint"] == str(dest)


# ---------------------------------------------------------------- wiring through main: spies on what the phases hand over
SCALE, SHIFT = 7.0, -3.0  # a reward transform no critic learned from scratch may see


@pytest.fixture(scope="module")
def scaled_checkpoint(offline_checkpoints, tmp_path_factory) -> Path:
    """The TD3+BC checkpoint with a non-identity reward transform (TD3+BC's own is the identity)."""
    ck = torch.load(offline_checkpoints["td3_bc"], weights_only=True)
    ck["reward_transform"] = {"scale": SCALE, "shift": SHIFT}
    path = tmp_path_factory.mktemp("scaled") / "checkpoint.pt"
    torch.save(ck, path)
    return path


class _Recorded(__import__("gymnasium").Wrapper):
    """Records (reward, terminated, truncated) of every step."""

    def __init__(self, env):
        super().__init__(env)
        self.log: list[tuple[float, bool, bool]] = []

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.log.append((float(r), bool(term), bool(trunc)))
        return obs, r, term, trunc, info


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _trace(tmp_path: Path, ckpt: Path, *flags: str) -> dict:
    """Run main with spies on every update function, on what the online buffer receives, and with environments whose
    time limit is 10 steps (so online episodes end by truncation); returns what they saw and the run's outputs."""
    import gymnasium as gym

    rec: dict = {"envs": [], "stored": [], "reeval": [], "align_targets": [], "o2td3": [], "pretrain": [], "finetune": [], "balanced": 0}
    with pytest.MonkeyPatch.context() as mp:
        make_env = td3.make_env

        def short_env(spec):
            env = _Recorded(gym.wrappers.TimeLimit(make_env(spec), max_episode_steps=10))
            rec["envs"].append(env)
            return env

        mp.setattr(td3, "make_env", short_env)
        add = td3.OnlineReplay.add

        def spy_add(self, obs, actions, rewards, next_obs, terminals):
            rec["stored"].append((rewards.clone(), terminals.clone()))
            return add(self, obs, actions, rewards, next_obs, terminals)

        mp.setattr(td3.OnlineReplay, "add", spy_add)
        reeval, align, o2td3 = td3.reevaluate_update, td3.align_update, td3.online_update
        pretrain, finetune, balanced = td3.opt_pretrain_update, td3.opt_finetune_update, td3.balanced_replay_update

        def spy_reeval(pi0, qf, qf_target, qf_opt, obs, actions, rewards, *rest, **kw):
            rec["reeval"].append(rewards.clone())
            return reeval(pi0, qf, qf_target, qf_opt, obs, actions, rewards, *rest, **kw)

        def spy_align(pi0, actor, qf, qf_target, qf_opt, actor_opt, obs, **kw):
            rec["align_targets"].append(_flat(qf_target))
            return align(pi0, actor, qf, qf_target, qf_opt, actor_opt, obs, **kw)

        def spy_o2td3(*nets_and_inputs, **kw):
            log_lam, (rewards, threshold, update_actor) = nets_and_inputs[7], (nets_and_inputs[i] for i in (11, 14, 15))
            lam = log_lam.item()
            out = o2td3(*nets_and_inputs, **kw)
            rec["o2td3"].append({"flag": update_actor, "threshold": threshold.item(), "lam_before": lam, "lam_after": log_lam.item(),
                                 "rewards": rewards.clone()})
            return out

        def spy_pretrain(actor, qf_on, qf_on_target, qf_on_opt, off, on, update_targets=True, **kw):
            before = _flat(qf_on_target)
            out = pretrain(actor, qf_on, qf_on_target, qf_on_opt, off, on, update_targets, **kw)
            rec["pretrain"].append({"flag": update_targets, "moved": not torch.equal(before, _flat(qf_on_target)),
                                    "off_rewards": off["rewards"].clone(), "on_rewards": on["rewards"].clone()})
            return out

        def spy_finetune(*nets_and_inputs, **kw):
            rec["finetune"].append({"rewards": nets_and_inputs[11].clone(), "kw": kw})
            return finetune(*nets_and_inputs, **kw)

        def spy_balanced(*a, **kw):
            rec["balanced"] += 1
            rec["temperature"] = kw["temperature"]
            return balanced(*a, **kw)

        for name, fn in (("reevaluate_update", spy_reeval), ("align_update", spy_align), ("online_update", spy_o2td3),
                         ("opt_pretrain_update", spy_pretrain), ("opt_finetune_update", spy_finetune), ("balanced_replay_update", spy_balanced)):
            mp.setattr(td3, name, fn)
        rec["res"] = run(ckpt, tmp_path, *flags)
    out = Path(rec["res"]["run_dir"])
    for name in ("final", "online", "reevaluated", "aligned", "opt_pretrained"):
        if (out / f"{name}.pt").exists():
            rec[name] = torch.load(out / f"{name}.pt", weights_only=True)
    rec["results"] = json.loads((out / "results.json").read_text())
    rec["train_env"] = rec["envs"][-1]  # created after the evaluation envs
    return rec


O2TD3_TRACE = ["--utd", "2", "--constraint-horizon", "30", "--run-name", "trace", "--align-actor", "train"]  # 31 env steps with updates, 2 each; the paper's alignment


@pytest.fixture(scope="module")
def o2td3_trace(scaled_checkpoint, tmp_path_factory) -> dict:
    return _trace(tmp_path_factory.mktemp("o2td3_trace"), scaled_checkpoint, *O2TD3_TRACE)


@pytest.fixture(scope="module")
def naive_trace(scaled_checkpoint, tmp_path_factory) -> dict:
    return _trace(tmp_path_factory.mktemp("naive_trace"), scaled_checkpoint, "--no-reevaluate", "--no-align", "--no-constraint")


@pytest.fixture(scope="module")
def opt_trace(scaled_checkpoint, tmp_path_factory) -> dict:
    return _trace(tmp_path_factory.mktemp("opt_trace"), scaled_checkpoint, "--opt", "--opt-balanced-replay")


def _raw_rewards() -> torch.Tensor:
    return torch.as_tensor(td3.load_dataset("hopper-medium-v2", quiet=True)["rewards"])


def _assert_online_storage(rec: dict, scale: float, shift: float) -> None:
    """Every env step of the training env was stored once: its reward through (scale, shift), terminal = termination
    only; the 10-step time limit was reached, and those ends are stored with terminal 0."""
    log = rec["train_env"].log
    rewards = torch.cat([r.float().flatten() for r, _ in rec["stored"]])
    terminals = torch.cat([d.float().flatten() for _, d in rec["stored"]])
    assert len(log) == len(rewards)
    torch.testing.assert_close(rewards, torch.tensor([r * scale + shift for r, _, _ in log], dtype=torch.float32))
    assert terminals.tolist() == [float(term) for _, term, _ in log]
    truncated = [i for i, (_, term, trunc) in enumerate(log) if trunc and not term]
    assert truncated and all(terminals[i] == 0.0 for i in truncated)


def test_o2td3_critics_learn_from_raw_rewards(o2td3_trace):
    """Re-evaluation, alignment and fine-tuning learn a NEW critic: raw rewards everywhere, never the checkpoint's."""
    raw = _raw_rewards()
    assert rec_all_in(o2td3_trace["reeval"], raw)
    _assert_online_storage(o2td3_trace, 1.0, 0.0)
    online = torch.tensor([r for r, _, _ in o2td3_trace["train_env"].log], dtype=torch.float32)
    assert rec_all_in([c["rewards"] for c in o2td3_trace["o2td3"]], torch.cat([raw, online]))
    h = o2td3_trace["results"]["reward_handling"]
    assert h == {"qf": {"scale": 1.0, "shift": 0.0, "source": "raw"}}
    assert o2td3_trace["final"]["reward_transform"] == {"scale": 1.0, "shift": 0.0}


def rec_all_in(batches: list, values: torch.Tensor) -> bool:
    return bool(batches) and all(torch.isin(b, values).all() for b in batches)


def test_naive_keeps_the_checkpoints_reward_transform(naive_trace):
    _assert_online_storage(naive_trace, SCALE, SHIFT)
    raw = _raw_rewards()
    offline_half = [c["rewards"][16:] for c in naive_trace["o2td3"]]  # --buffer-mode half: the second half is offline
    assert rec_all_in(offline_half, raw * SCALE + SHIFT) and not any(torch.isin(b, raw).all() for b in offline_half)
    assert naive_trace["results"]["reward_handling"]["qf"]["source"].startswith("checkpoint")
    assert naive_trace["final"]["reward_transform"] == {"scale": SCALE, "shift": SHIFT}


def test_alignment_targets_frozen_for_the_whole_phase(o2td3_trace):
    targets = o2td3_trace["align_targets"]
    assert len(targets) == 20 and all(torch.equal(t, targets[0]) for t in targets)
    # the targets the alignment reads are the re-evaluation's Polyak targets
    assert torch.equal(targets[0], torch.cat([v.flatten() for v in o2td3_trace["reevaluated"]["train_state"]["modules"]["qf_target"].values()]))


def test_o2td3_lambda_cadence_and_loosening_threshold(o2td3_trace):
    calls, a = o2td3_trace["o2td3"], td3.Args()
    d = td3.resolve_defaults(a)
    steps = [t for t in range(10, 41) for _ in range(2)]  # --learning-starts 10, --online-steps 40, --utd 2
    assert len(calls) == len(steps)
    assert [c["flag"] for c in calls] == [n % a.policy_freq == 0 for n in range(1, len(calls) + 1)]
    assert all((c["lam_after"] != c["lam_before"]) == c["flag"] for c in calls)  # lambda moves with the delayed step only
    expected = [td3.constraint_threshold(t, d["eps0"], d["eps_end"], 30) for t in steps]
    assert [c["threshold"] for c in calls] == pytest.approx(expected, rel=1e-6)
    assert expected[-1] == d["eps_end"] > expected[0] > d["eps0"]


def _adam_steps(ckpt: dict) -> dict[str, int]:
    return {k: int(float(o["state"][0]["step"])) for k, o in ckpt["train_state"]["optimizers"].items() if o["state"]}


def test_optimisers_carry_over_phases_and_phase_reuse(o2td3_trace, scaled_checkpoint, capsys):
    """One critic Adam from re-evaluation through alignment into fine-tuning, one actor Adam from alignment on; a rerun
    that reuses the phase checkpoints continues with their optimiser state."""
    n_updates, n_actor = 62, 31
    assert _adam_steps(o2td3_trace["reevaluated"])["qf_opt"] == 20
    assert _adam_steps(o2td3_trace["aligned"])["qf_opt"] == 40 and _adam_steps(o2td3_trace["aligned"])["actor_opt"] == 20
    final = _adam_steps(o2td3_trace["final"])
    assert (final["qf_opt"], final["actor_opt"], final["lam_opt"]) == (40 + n_updates, 20 + n_actor, n_actor)
    out = Path(o2td3_trace["res"]["run_dir"])
    (out / "online.pt").unlink()
    again = run(scaled_checkpoint, out.parents[2], *O2TD3_TRACE)
    assert again["phases"]["reevaluated"]["reused"] and again["phases"]["aligned"]["reused"]
    assert _adam_steps(torch.load(out / "final.pt", weights_only=True)) == final
    # re-evaluation reused, alignment recomputed (other --align-steps, in the folder of a run killed before its first
    # online.pt: a finished run of other settings is refused): the critic Adam continues from reevaluated.pt
    unfinish(out)
    capsys.readouterr()
    again = run(scaled_checkpoint, out.parents[2], *O2TD3_TRACE, "--align-steps", "10")
    assert again["phases"]["reevaluated"]["reused"] and not again["phases"]["aligned"]["reused"]
    assert f"NOTICE: {out / 'aligned.pt'} was made with other arguments; recomputing phase aligned" in capsys.readouterr().out
    steps = _adam_steps(torch.load(out / "final.pt", weights_only=True))
    assert (steps["qf_opt"], steps["actor_opt"]) == (30 + n_updates, 10 + n_actor)


def test_reused_phases_keep_this_runs_lambda_init(o2td3_trace, scaled_checkpoint, tmp_path):
    """--lambda-init is in no phase key: a run reusing another's re-evaluation and alignment starts its multiplier at
    its own --lambda-init, not at the one saved with the phases."""
    src = Path(o2td3_trace["res"]["run_dir"])
    dst = tmp_path / src.relative_to(src.parents[2])
    dst.mkdir(parents=True)
    for name in ("reevaluated", "aligned"):  # as the trace run saved them (a test above recomputes its aligned.pt)
        torch.save(o2td3_trace[name], dst / f"{name}.pt")
    again = _trace(tmp_path, scaled_checkpoint, *O2TD3_TRACE, "--lambda-init", "5")
    assert again["res"]["phases"]["reevaluated"]["reused"] and again["res"]["phases"]["aligned"]["reused"]
    assert o2td3_trace["o2td3"][0]["lam_before"] == pytest.approx(0.0)
    assert again["o2td3"][0]["lam_before"] == pytest.approx(math.log(5.0))


def test_opt_rewards_per_critic_and_pretrain_target_cadence(opt_trace):
    raw = _raw_rewards()
    pre = opt_trace["pretrain"]
    assert [c["flag"] for c in pre] == [n % 2 == 0 for n in range(1, 11)]  # targets every second step
    assert [c["moved"] for c in pre] == [c["flag"] for c in pre]
    assert rec_all_in([c["off_rewards"] for c in pre], raw)  # Q_on: raw rewards
    _assert_online_storage(opt_trace, 1.0, 0.0)
    ft = opt_trace["finetune"]
    assert len(ft) == 40 and all(c["kw"]["off_reward_scale"] == SCALE and c["kw"]["off_reward_shift"] == SHIFT for c in ft)
    assert opt_trace["results"]["reward_handling"]["qf_on"]["source"] == "raw"
    assert opt_trace["results"]["reward_handling"]["qf"]["scale"] == SCALE


def test_opt_balanced_replay_every_update(opt_trace):
    assert opt_trace["balanced"] == 40 and opt_trace["temperature"] == 5.0  # one density-ratio step per gradient update (20 env steps, UTD 2)
    assert _adam_steps(opt_trace["final"])["ratio_opt"] == 40
    prio = opt_trace["online"]["train_state"]["replay"]["priority"]
    assert len(prio) == 3000 + 40 and not torch.equal(prio, torch.ones_like(prio))  # refreshed, checkpointed for a resume


def test_opt_default_budget_through_main(tmp_path, offline_checkpoints, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def stop(run_, *rest):
        seen["online_steps"] = run_.args.online_steps
        raise Stop

    monkeypatch.setattr(td3, "run_opt", stop)
    monkeypatch.setattr(td3, "run_online", stop)
    tiny = [x for i, x in enumerate(TINY) if "--online-steps" not in TINY[max(i - 1, 0): i + 1]]
    for flags, budget in ((["--opt"], 300_000), (["--no-reevaluate", "--no-align"], 100_000)):
        with pytest.raises(Stop):
            td3.main(tyro.cli(td3.Args, args=[*tiny, "--checkpoint", str(offline_checkpoints["td3_bc"]), "--run-dir", str(tmp_path), *flags]))
        assert seen["online_steps"] == budget


# ---------------------------------------------------------------- diagnostics, --align-actor, --budget-scale through main
Q_KEYS = ("q_data_mean", "q_data_std", "q_pi_mean", "q_pi_std", "mean_abs_action", "saturation")
AGREEMENT_KEYS = ("agreement", "agreement_all", "dist_q_corr")


def _assert_diagnostics(diag: dict, boundaries: dict[str, tuple[str, ...]]) -> None:
    assert set(diag) == set(boundaries)
    for b, keys in boundaries.items():
        assert set(diag[b]) == set(keys), b
        assert all(math.isfinite(v) for v in diag[b].values()), (b, diag[b])
        assert 0.0 <= diag[b]["saturation"] <= 1.0 and diag[b]["mean_abs_action"] <= 1.0
        if "agreement" in keys:
            assert 0.0 <= diag[b]["agreement_all"] <= diag[b]["agreement"] <= 1.0 and -1.0 <= diag[b]["dist_q_corr"] <= 1.0


def test_diagnostics_align_and_early_evaluations_through_main(tmp_path, offline_checkpoints):
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--align-eval-every", "5", "--early-evals", "5", "--online-steps", "100")
    saved = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    _assert_diagnostics(saved["diagnostics"], {"start": Q_KEYS, "reevaluated": Q_KEYS + AGREEMENT_KEYS,
                                               "aligned": Q_KEYS + AGREEMENT_KEYS, "end": Q_KEYS})
    assert saved["diagnostics"]["start"]["mean_abs_action"] == saved["diagnostics"]["reevaluated"]["mean_abs_action"]  # pi0 both times
    curve = saved["curve"]
    align = [c for c in curve if c["phase"] == "align"]
    assert [c["step"] for c in align] == [5, 10, 15, 20]  # every 5 of 20 alignment steps; the last is the aligned actor
    assert align[-1]["normalized_score"] == saved["aligned_score"]
    online = [c["step"] for c in curve if c["phase"] == "online"]
    assert online == [0, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100]  # 0: the start of online  # 5 early evaluations in the first tenth, then --eval-every 20
    assert saved["min_first_tenth"] == min(c["normalized_score"] for c in curve if c["phase"] == "online" and c["step"] <= 10)
    steps = scalar_steps(res["run_dir"])
    assert steps["align/normalized_score"] == [5, 10, 15, 20]
    assert steps["diagnostics/q_data_mean"] == [0, 1, 2, 4] and steps["diagnostics/agreement"] == [1, 2]  # BOUNDARIES index
    # OPT: Q_off and Q_on at its boundaries; early evaluations counted from the end of the collection (20 of 40 steps)
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--opt", "--early-evals", "2")
    q_on = tuple(k.replace("q_", "q_on_") for k in Q_KEYS[:4])
    _assert_diagnostics(res["diagnostics"], {b: Q_KEYS + q_on for b in ("start", "opt_pretrained", "end")})
    assert [c["step"] for c in res["curve"] if c["phase"] == "online"] == [20, 21, 22, 40]  # online starts after the collection


def test_align_actor_frozen_keeps_pi0(tmp_path, offline_checkpoints):
    states = {}
    for mode in ("frozen", "train"):
        res = run(offline_checkpoints["td3_bc"], tmp_path, "--align-actor", mode, "--online-steps", "20", "--run-name", mode)
        assert res["mode"]["align_actor"] == mode
        out = Path(res["run_dir"])
        aligned = torch.load(out / "aligned.pt", weights_only=True)["train_state"]
        reevaluated = torch.load(out / "reevaluated.pt", weights_only=True)["train_state"]
        m = aligned["modules"]
        states[mode] = {
            "actor_is_pi0": all(torch.equal(m["actor"][k], v) for k, v in m["pi0"].items()),
            "target_is_pi0": all(torch.equal(m["actor_target"][k], v) for k, v in m["pi0"].items()),
            "critic_moved": any(not torch.equal(m["qf"][k], v) for k, v in reevaluated["modules"]["qf"].items()),
            "actor_adam": bool(aligned["optimizers"]["actor_opt"]["state"]),
        }
        diag = res["diagnostics"]
        assert (diag["aligned"]["mean_abs_action"] == diag["reevaluated"]["mean_abs_action"]) == (mode == "frozen")
    assert states["frozen"] == {"actor_is_pi0": True, "target_is_pi0": True, "critic_moved": True, "actor_adam": False}
    assert states["train"] == {"actor_is_pi0": False, "target_is_pi0": False, "critic_moved": True, "actor_adam": True}
    # an aligned.pt of one mode is never reused by the other
    a = td3.with_budget_scale(td3.with_mode_defaults(td3.Args()))
    assert td3.phase_key(a, "aligned", "s", {}) != td3.phase_key(td3.dataclasses.replace(a, align_actor="train"), "aligned", "s", {})


@pytest.mark.parametrize("tol", [0.0, 0.5])
def test_reevaluation_stops_once_converged(tmp_path, offline_checkpoints, monkeypatch, tol):
    """The stopping rule reads the re-evaluation's target critics on the diagnostics' fixed (s, a) pairs every
    REEVAL_CHECK_EVERY steps and ends the phase at the first converged reading (tol 0: every --reevaluate-steps);
    --reevaluate-tau (default 0.05) reaches the re-evaluation update only, and the steps done go to results.json,
    reevaluated.pt and the tensorboard steps of re-evaluation and alignment."""
    monkeypatch.setattr(td3, "REEVAL_CHECK_EVERY", 4)
    orig_gap = td3.fqe_gap
    monkeypatch.setattr(td3, "fqe_gap", lambda history: 0.0 if len(history) >= 3 else orig_gap(history))  # passes from reading 3: ends at 4
    pairs: list = []  # the diagnostics' fixed dataset (s, a): the probe's
    batch = td3.diagnostic_batch

    def spy_batch(*a, **kw):
        pairs[:] = batch(*a, **kw)
        return tuple(pairs)

    re_tau, probe_values, on_tau = [], [], []
    reeval, o2td3 = td3.reevaluate_update, td3.online_update

    def spy_reeval(pi0, qf, qf_target, *a, **kw):  # records the value the probe must read after this step
        out = reeval(pi0, qf, qf_target, *a, **kw)
        re_tau.append(kw["tau"])
        with torch.no_grad():
            probe_values.append(float(qf_target(*pairs).mean()))  # both target critics, every probe state
        return out

    def spy_o2td3(*a, **kw):
        on_tau.append(kw["tau"])
        return o2td3(*a, **kw)

    for name, fn in (("diagnostic_batch", spy_batch), ("reevaluate_update", spy_reeval), ("online_update", spy_o2td3)):
        monkeypatch.setattr(td3, name, fn)
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--reevaluate-tol", str(tol))  # TINY: --reevaluate-steps 20
    steps, a = 16 if tol else 20, td3.Args()
    assert len(re_tau) == steps and set(re_tau) == {a.reevaluate_tau} == {0.05}
    assert on_tau and set(on_tau) == {a.tau} == {0.005}  # fine-tuning keeps --tau
    out = Path(res["run_dir"])
    info = json.loads((out / "results.json").read_text())["reevaluation"]
    assert info == res["reevaluation"]
    assert (info["steps"], info["cap"], info["converged"], info["tau"], info["tol"], info["check_every"]) == (steps, 20, bool(tol), 0.05, tol, 4)
    assert info["q_probe"] == pytest.approx([probe_values[k - 1] for k in range(4, steps + 1, 4)], rel=1e-6)
    saved = torch.load(out / "reevaluated.pt", weights_only=True)["train_state"]
    assert saved["reevaluation"] == info and _adam_steps({"train_state": saved})["qf_opt"] == steps
    sc = scalar_steps(res["run_dir"])
    assert sc["reevaluate/q_probe"] == list(range(4, steps + 1, 4)) and sc["reevaluate/gap_estimate"] == list(range(12, steps + 1, 4))
    assert sc["reevaluate/qf_loss"] == [10, steps]  # --log-every 10, then the last step done
    assert sc["align/qf_loss"] == [steps + 10, steps + 20]  # alignment continues the re-evaluation's x-axis
    if tol:  # a rerun reuses the phase and reports how it ended; another --reevaluate-tau or --reevaluate-tol recomputes it
        (out / "online.pt").unlink()
        again = run(offline_checkpoints["td3_bc"], tmp_path, "--reevaluate-tol", str(tol))
        assert again["phases"]["reevaluated"]["reused"] and again["reevaluation"] == info
        k = td3.phase_key(a, "reevaluated", "s", {})
        assert k != td3.phase_key(td3.dataclasses.replace(a, reevaluate_tau=0.005), "reevaluated", "s", {})
        assert k != td3.phase_key(td3.dataclasses.replace(a, reevaluate_tol=0.0), "reevaluated", "s", {})


def _count_calls(mp, names: tuple[str, ...]) -> dict[str, list]:
    calls: dict[str, list] = {n: [] for n in names}
    for n in names:
        fn = getattr(td3, n)

        def spy(*args, _fn=fn, _n=n, **kw):
            tensors = [x.item() for x in args[1:] if torch.is_tensor(x) and x.dim() == 0]  # a threshold or kappa
            calls[_n].append(tensors)
            return _fn(*args, **kw)

        mp.setattr(td3, n, spy)
    return calls


BUDGETS_X2 = ["--distill-steps", "40", "--reevaluate-steps", "40", "--align-steps", "40", "--online-steps", "80", "--learning-starts", "20",
              "--eval-every", "40", "--checkpoint-every", "40", "--log-every", "20", "--align-eval-every", "20", "--constraint-horizon", "60",
              "--opt-collect-steps", "40", "--opt-pretrain-steps", "20", "--kappa-begin", "40", "--kappa-finish", "80"]


def test_budget_scale_halves_every_budget_through_main(tmp_path, offline_checkpoints, monkeypatch):
    """TINY's budgets doubled, run at --budget-scale 0.5: the TINY run's update counts, schedules and intervals."""
    calls = _count_calls(monkeypatch, ("distill_update", "reevaluate_update", "align_update", "online_update"))
    res = run(offline_checkpoints["iql"], tmp_path, *BUDGETS_X2, "--budget-scale", "0.5", "--no-copy-mean-net")  # iql, distilled
    assert [len(calls[n]) for n in ("distill_update", "reevaluate_update", "align_update")] == [40, 20, 20]  # distillation not scaled
    d = td3.resolve_defaults(td3.Args())
    online_steps = range(10, 41)  # --learning-starts 10 of --online-steps 40, UTD 1
    assert [c[0] for c in calls["online_update"]] == pytest.approx([td3.constraint_threshold(t, d["eps0"], d["eps_end"], 60) for t in online_steps],
                                                                  rel=1e-6)  # the threshold horizon stays 60 env steps (not scaled)
    assert [c["step"] for c in res["curve"] if c["phase"] == "online"] == [0, 20, 40]
    assert [c["step"] for c in res["curve"] if c["phase"] == "align"] == [10, 20]
    steps = scalar_steps(res["run_dir"])
    assert steps["charts/kl_threshold"] == [0, 10, 20, 30, 40] and steps["reevaluate/qf_loss"] == [10, 20]  # --log-every 10
    out = Path(res["run_dir"])
    assert torch.load(out / "online.pt", weights_only=True)["train_state"]["loop"]["global_step"] == 40
    final = torch.load(out / "final.pt", weights_only=True)
    assert final["train_state"]["optimizers"]["lam_opt"]["param_groups"][0]["lr"] == pytest.approx(5e-5 / 0.5)  # reach of log lambda kept
    saved = json.loads((out / "results.json").read_text())
    assert saved["budget_scale"] == 0.5
    eff = saved["effective_budgets"]
    assert "distill_steps" not in eff  # distillation fits the offline actor: not scaled
    assert {k: eff[k] for k in ("reevaluate_steps", "align_steps", "online_steps", "learning_starts", "constraint_horizon",
                                "eval_every", "checkpoint_every", "log_every", "align_eval_every")} == {
        "reevaluate_steps": 20, "align_steps": 20, "online_steps": 40, "learning_starts": 10, "constraint_horizon": 60,
        "eval_every": 20, "checkpoint_every": 20, "log_every": 10, "align_eval_every": 10}
    assert eff["lambda_lr"] == pytest.approx(1e-4) and eff["stop_after"] is None
    given = json.loads((out / "args.json").read_text())["args_given"]
    assert given["online_steps"] == 80 and given["budget_scale"] == 0.5


def test_budget_scale_scales_opt_and_its_kappa_schedule(tmp_path, offline_checkpoints, monkeypatch):
    calls = _count_calls(monkeypatch, ("opt_pretrain_update", "opt_finetune_update"))
    res = run(offline_checkpoints["td3_bc"], tmp_path, *BUDGETS_X2, "--opt", "--budget-scale", "0.5")
    assert len(calls["opt_pretrain_update"]) == 10
    d = td3.resolve_defaults(td3.Args(opt=True))
    expected = [td3.kappa_schedule(t, d["kappa_start"], d["kappa_end"], 20, 40) for t in range(21, 41) for _ in range(2)]  # --opt-utd 2
    assert [c[0] for c in calls["opt_finetune_update"]] == pytest.approx(expected, rel=1e-6)
    assert expected[0] > d["kappa_start"] and expected[-1] == pytest.approx(d["kappa_end"])
    online = torch.load(Path(res["run_dir"]) / "online.pt", weights_only=True)
    assert len(online["train_state"]["replay"]["rewards"]) == 40  # 20 collected + 20 fine-tuning env steps
    eff = res["effective_budgets"]
    assert (eff["opt_collect_steps"], eff["opt_pretrain_steps"], eff["kappa_begin"], eff["kappa_finish"]) == (20, 10, 20, 40)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("extra, message", [
    (["--env", "hopper-mediocre-v2"], "unknown env"),
    (["--reevaluate-steps", "0"], "--no-reevaluate"),
    (["--stop-after", "40"], "--stop-after"),
    (["--opt", "--no-align"], "--opt is its own pipeline"),
    (["--opt-balanced-replay"], "belongs to --opt"),
    (["--eps0", "0.5", "--eps-end", "0.1"], "must loosen"),
    (["--learning-starts", "40"], "no update would happen"),
    (["--opt", "--opt-collect-steps", "40"], "--opt-collect-steps"),
    (["--threads", "0"], "--threads"),
    (["--budget-scale", "0"], "--budget-scale"),
    (["--align-eval-every", "-1"], "--align-eval-every"),
    (["--early-evals", "-1"], "--early-evals"),
    (["--reevaluate-tau", "0"], "--reevaluate-tau"),
    (["--reevaluate-tau", "1.5"], "--reevaluate-tau"),
    (["--reevaluate-tol", "-0.1"], "--reevaluate-tol"),
    (["--reevaluate-tol", "nan"], "--reevaluate-tol"),
])
def test_bad_arguments_exit_2(tmp_path, offline_checkpoints, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run(offline_checkpoints["td3_bc"], tmp_path, *extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o2o_td3").exists()  # nothing written


def test_missing_checkpoint_names_the_command(tmp_path, tiny_dataset, capsys):
    with pytest.raises(SystemExit) as e:
        td3.main(tyro.cli(td3.Args, args=[*TINY, "--run-dir", str(tmp_path), "--seed", "3"]))
    assert e.value.code == 2
    assert f"python offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --seed 3 --run-dir {tmp_path}" in capsys.readouterr().err


def test_bad_checkpoints_exit_2(tmp_path, offline_checkpoints, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        ([str(offline_checkpoints["bc"]), "--opt"], "has none"),  # OPT needs a critic
        ([str(corrupt)], "corrupt"),
        ([str(offline_checkpoints["td3_bc"]), "--env", "hopper-medium-replay-v2"], "trained on hopper-medium-v2"),
    ]
    for (path, *extra), message in cases:
        with pytest.raises(SystemExit) as e:
            run(Path(path), tmp_path, *extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o2o_td3").exists()


def test_env_runner_termination_vs_truncation(tiny_dataset):
    data = td3.load_dataset("hopper-medium-v2", quiet=True)
    mean, std = td3.obs_stats(data["observations"])
    cpu = torch.device("cpu")
    # Hopper with wild actions falls over: a true termination, stored as d = 1
    runner = td3.EnvRunner(data["env_spec"], 0, mean, std, {"scale": 2.0, "shift": 1.0}, cpu)
    actor = td3.DeterministicActor(data["obs_dim"], data["act_dim"])
    for _ in range(1000):
        (o, a, r, o2, d), finished = runner.step(actor, 1.0)
        if finished is not None:
            break
    assert finished is not None and d.item() == 1.0 and runner.ep_len == 0
    runner.close()
    # Pendulum only ever truncates (time limit 200): bootstrapped, stored as d = 0, then a fresh episode
    runner = td3.EnvRunner("Pendulum-v1", 0, np.zeros(3, np.float32), np.ones(3, np.float32), {"scale": 1.0, "shift": 0.0}, cpu)
    actor = td3.DeterministicActor(3, 1)
    ds = []
    for _ in range(200):
        (o, a, r, o2, d), finished = runner.step(actor, 0.1)
        ds.append(d.item())
    assert finished is not None and max(ds) == 0.0 and runner.ep_len == 0
    runner.close()


def test_distillation_regresses_the_mean_action():
    torch.manual_seed(0)
    teacher = td3.GaussianActor(3, 2, (16, 16))
    student = td3.DeterministicActor(3, 2, (32, 32))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    obs = torch.randn(256, 3)
    with torch.no_grad():
        target = teacher.act(obs)
        before = td3.distillation_loss(student(obs), target).item()
    for _ in range(300):
        m = td3.distill_update(student, opt, obs, target)
    assert m["distill/loss"].item() < before / 10


# ---------------------------------------------------------------- fast paths: --compile / --cudagraphs / --bf16 = eager math
# As in test_accel.py: the comparison runs in float64 (in float32 Adam's first ~sign(g) steps would turn last-bit
# differences of near-zero gradients into lr-sized ones), and inductor draws eager's random numbers (fallback_random).
OBS, ACT, B = 5, 2, 16
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# phase -> whether its calls carry the delayed-actor flag (every flag value compiles / captures its own graph)
UPDATES = {"distill": False, "reevaluate": False, "align": False, "align_frozen": False, "o2td3": True, "naive": True, "opt_pretrain": True, "opt_finetune": True}


def _batch(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1, "rewards": torch.randn(B, generator=g),
         "next_obs": torch.randn(B, OBS, generator=g), "terminals": (torch.rand(B, generator=g) < 0.2).to(torch.get_default_dtype())}
    return {k: v.to(device) for k, v in b.items()}


def _full_agent(accel) -> SimpleNamespace:
    """Every network and optimizer any phase uses, small; the same weights for the same seed."""
    torch.manual_seed(0)
    dev = accel.device
    ag = SimpleNamespace()
    ag.pi0 = td3.DeterministicActor(OBS, ACT, (16, 16)).to(dev).requires_grad_(False)
    ag.actor = td3.DeterministicActor(OBS, ACT, (16, 16)).to(dev)
    ag.actor_target = td3.DeterministicActor(OBS, ACT, (16, 16)).to(dev)
    ag.actor_target.load_state_dict(ag.actor.state_dict())
    ag.actor_ref = td3.DeterministicActor(OBS, ACT, (16, 16)).to(dev).requires_grad_(False)  # far from pi: the constraint binds
    for name in ("qf", "qf_on"):
        qf = td3.orthogonal_init_(td3.Critic(OBS, ACT, (32, 32), n=2, layer_norm=True)).to(dev)
        target = td3.Critic(OBS, ACT, (32, 32), n=2, layer_norm=True).to(dev)
        target.load_state_dict(qf.state_dict())
        setattr(ag, name, qf)
        setattr(ag, f"{name}_target", target)
    ag.qf_opt = accel.adam(ag.qf.parameters(), 3e-3)
    ag.qf_on_opt = accel.adam(ag.qf_on.parameters(), 3e-3)
    ag.actor_opt = accel.adam(ag.actor.parameters(), 1e-3)
    ag.log_lam = torch.nn.Parameter(torch.zeros(1, device=dev))
    ag.lam_opt = accel.adam([ag.log_lam], 1e-2)
    return ag


def _phase_update(accel, ag: SimpleNamespace, phase: str):
    """The phase's Update, bound exactly as main() binds it."""
    a, c = td3.Args(), td3.td3_constants(td3.Args())
    fn = {
        "distill": lambda: functools.partial(td3.distill_update, ag.actor, ag.actor_opt),
        "reevaluate": lambda: functools.partial(td3.reevaluate_update, ag.pi0, ag.qf, ag.qf_target, ag.qf_opt, **{**c, "tau": a.reevaluate_tau}),
        "align": lambda: functools.partial(_align, ag, policy_noise=a.policy_noise, noise_clip=a.noise_clip, beta=a.align_beta,
                                           max_distance=a.align_max_distance),
        "align_frozen": lambda: functools.partial(_align, ag, policy_noise=a.policy_noise, noise_clip=a.noise_clip,
                                                  beta=a.align_beta, max_distance=a.align_max_distance, train_actor=False),
        "o2td3": lambda: functools.partial(_online, ag, constraint=True, lagrange_tau=a.lagrange_tau, **c),
        "naive": lambda: functools.partial(_online, ag, constraint=False, lagrange_tau=a.lagrange_tau, **c),
        "opt_pretrain": lambda: functools.partial(_pretrain, ag, inner_lr=0.1, **c),
        "opt_finetune": lambda: functools.partial(_finetune, ag, off_reward_scale=2.0, off_reward_shift=-1.0, **c),
    }[phase]()
    return accel.update(fn)


def _phase_inputs(phase: str, step: int, device: str = "cpu") -> tuple:
    """Per-step inputs as the loops pass them: tensors (a changing threshold / kappa as 0-d tensors) and the actor flag."""
    b = _batch(step, device)
    x = (b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"])
    flag = step % 2 == 1
    scalar = lambda v: torch.tensor(v, device=device)  # noqa: E731
    return {
        "distill": lambda: (b["obs"], b["actions"]),
        "reevaluate": lambda: x,
        "align": lambda: (b["obs"],),
        "align_frozen": lambda: (b["obs"],),
        "o2td3": lambda: (*x, scalar(1e-3 * (step + 1)), flag),
        "naive": lambda: (*x, scalar(1e-3 * (step + 1)), flag),
        "opt_pretrain": lambda: (b, _batch(1000 + step, device), flag),  # flag: Polyak targets this step
        "opt_finetune": lambda: (*x, scalar(0.2 + 0.1 * step), flag),
    }[phase]()


def _state(ag: SimpleNamespace) -> dict[str, torch.Tensor]:
    modules = {name: m for name, m in vars(ag).items() if isinstance(m, torch.nn.Module)}
    out = {f"{name}.{pn}": p.detach().clone() for name, m in modules.items() for pn, p in m.named_parameters()}
    out["log_lam"] = ag.log_lam.detach().clone()
    return out


def _assert_same_updates(phase: str, fast_kwargs: dict, steps: int, device: str = "cpu", atol: float = 1e-9, rtol: float = 1e-7):
    dev = torch.device(device)
    eager_accel, fast_accel = td3.Accel(dev), td3.Accel(dev, **fast_kwargs)
    eager, fast = _full_agent(eager_accel), _full_agent(fast_accel)
    before = _state(eager)
    for k, v in _state(fast).items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    eager_step, fast_step = _phase_update(eager_accel, eager, phase), _phase_update(fast_accel, fast, phase)
    for step in range(steps):
        inputs = _phase_inputs(phase, step, device)
        torch.manual_seed(100 + step)
        m_e = {k: v.clone() for k, v in eager_step(*inputs).items()}  # cloned at once: graph outputs are overwritten
        torch.manual_seed(100 + step)
        m_f = {k: v.clone() for k, v in fast_step(*inputs).items()}
        assert m_e.keys() == m_f.keys()
        for k in m_e:
            assert m_e[k].shape == ()  # Run.flush stacks them
            torch.testing.assert_close(m_f[k], m_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{phase}: {k} at step {step}: {s}")
    after_e, after_f = _state(eager), _state(fast)
    for k in after_e:
        torch.testing.assert_close(after_f[k], after_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{phase}: {k}: {s}")
    assert any(not torch.equal(after_e[k], before[k]) for k in before), f"{phase} changed no parameter"
    if phase == "o2td3":
        assert not torch.equal(after_e["log_lam"], before["log_lam"])  # the Lagrange step is part of the compared update
    return fast_step


@pytest.mark.parametrize("phase", list(UPDATES))
def test_compiled_update_equals_eager(phase, same_random, float64):
    """Every phase's update, compiled, reproduces the eager reference (4 calls: both flag values twice where flagged)."""
    fast_step = _assert_same_updates(phase, {"compile": True}, steps=4 if UPDATES[phase] else 2)
    if phase == "o2td3":  # a threshold that changes every step is a tensor value, never a recompile
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        for step in range(4, 8):
            fast_step(*_phase_inputs(phase, step))
        assert counters["stats"]["unique_graphs"] == graphs, "a changing threshold recompiled the update"


@cuda
@pytest.mark.parametrize("phase", list(UPDATES))
@pytest.mark.parametrize("compile", [False, True])
def test_cudagraph_update_equals_eager_gpu(phase, compile, same_random, float64):
    """Warm-up calls, capture and replays together reproduce the eager updates (GPU only)."""
    fast_step = _assert_same_updates(phase, {"cudagraphs": True, "compile": compile}, steps=10, device="cuda", atol=1e-7, rtol=1e-6)
    assert fast_step.graphs, "no CUDA graph was captured"


def test_track_without_wandb_fails_before_anything(tmp_path, capsys, monkeypatch):
    """--track with wandb not installed: one line on stderr and exit 2, before any dataset, checkpoint or folder is touched."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit) as e:
        td3.main(tyro.cli(td3.Args, args=["--track", "--run-dir", str(tmp_path / "runs")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--track needs wandb" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_cudagraphs_on_cpu_fails_fast(tmp_path, capsys, monkeypatch):
    def untouchable(*args, **kwargs):
        raise AssertionError("a dataset or checkpoint was loaded before the flags were checked")

    monkeypatch.setattr(td3, "load_dataset", untouchable)
    monkeypatch.setattr(td3, "load_checkpoint", untouchable)
    with pytest.raises(SystemExit) as e:  # the checkpoint does not exist either: the flag check comes first
        td3.main(tyro.cli(td3.Args, args=[*TINY, "--cudagraphs", "--checkpoint", str(tmp_path / "none.pt"), "--run-dir", str(tmp_path)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--cudagraphs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2o_td3").exists()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_end_to_end(tmp_path, offline_checkpoints, fresh_dynamo):
    """The O2TD3 path with its updates compiled: alignment and constrained online (critic-only and actor steps).
    Re-evaluation is skipped only to save a cold compile (~20 s); its update is compared with eager above."""
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--compile", "--no-reevaluate", "--align-steps", "10")
    check_outputs(res, ["aligned"])
    s = scalars(res["run_dir"])
    for k in ("align/qf_loss", "losses/qf_loss", "losses/actor_loss", "losses/lambda", "losses/mse_to_reference"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    assert max(s["losses/lambda"]) != min(s["losses/lambda"])  # the Lagrange step ran inside the compiled update


@pytest.mark.parametrize("flags", [[], ["--opt"]])
def test_bf16_end_to_end(tmp_path, offline_checkpoints, flags):
    """bf16 autocast through O2TD3 and OPT (the meta-gradient included): finite losses, float32 checkpoints."""
    res = run(offline_checkpoints["td3_bc"], tmp_path, "--bf16", *flags)
    check_outputs(res, [] if flags else ["aligned"])
    s = scalars(res["run_dir"])
    for k in ("losses/qf_loss", "losses/actor_loss") + (("opt_pretrain/meta_loss",) if flags else ("align/qf_loss",)):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in final["actor"].values())
