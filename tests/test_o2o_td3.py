"""o2o_td3.py: math unit tests on hand-checked tensors, behaviour tests, smoke runs of every mode, resume, bad inputs,
and the fast paths (--compile, --cudagraphs, --bf16) against the eager reference."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

from conftest import load_script

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


# ---------------------------------------------------------------- behaviour on synthetic data (no env)
def _synthetic_agent(seed: int = 0):
    torch.manual_seed(seed)
    ag = td3.Agent()
    ag.actor0 = td3.DeterministicActor(3, 2, (16, 16)).requires_grad_(False)
    ag.actor = td3.DeterministicActor(3, 2, (16, 16))
    ag.actor.load_state_dict(ag.actor0.state_dict())
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
        a_off = ag.actor0(obs)
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
        td3.align_update(ag, obs[torch.randint(128, (64,))], policy_noise=a.policy_noise, noise_clip=a.noise_clip, beta=a.align_beta,
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
        m = td3.o2td3_update(ag, b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], T(1e-6), True, constraint=True,
                             lagrange_tau=args.lagrange_tau, **td3.td3_constants(args))
    assert ag.log_lam.item() > 0.05
    assert all(torch.isfinite(v).all() for v in m.values())


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
    bal.n_off, bal.cdf = off.size, torch.cat([torch.zeros(off.size), T([1.0])])  # all mass on the online transition
    assert (bal.sample(16)["obs"] == 1e6).all()


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
        "--align-steps", "20", "--online-steps", "40", "--learning-starts", "10", "--eval-every", "20", "--eval-episodes", "1",
        "--log-every", "10", "--checkpoint-every", "20", "--phase-eval-every", "10", "--opt-collect-steps", "20",
        "--opt-pretrain-steps", "10", "--opt-utd", "2", "--kappa-begin", "20", "--kappa-finish", "40", "--ratio-every", "10",
        "--ratio-train-steps", "5"]


def run(tmp_path: Path, ckpt: Path, *extra: str) -> dict:
    return td3.main(tyro.cli(td3.Args, args=[*TINY, "--checkpoint", str(ckpt), "--run-dir", str(tmp_path), *extra]))


def check_outputs(res: dict, phases: list[str], n_online_evals: int = 2) -> None:
    out = Path(res["run_dir"])
    for f in ("args.json", "results.json", "final.pt", "online.pt"):
        assert (out / f).exists(), f
    assert list(out.glob("events.out.tfevents.*"))
    saved = json.loads((out / "results.json").read_text())
    curve = saved["curve"]
    assert curve[0]["step"] == 0 and curve[0]["phase"] == "offline"
    assert [c["phase"] for c in curve if c["step"] == 0] == ["offline", *phases]
    assert [c["step"] for c in curve if c["step"] > 0] == [20 * (i + 1) for i in range(n_online_evals)]
    assert all(math.isfinite(c["normalized_score"]) for c in curve)
    assert saved["final_score"] == curve[-1]["normalized_score"] and saved["local_standin"] is True
    assert saved["dataset_ids"] == ["local/hopper/medium-v0"]
    td3.load_checkpoint(out / "final.pt", env_name="hopper-medium-v2")  # phase/final checkpoints keep the offline format


def scalars(run_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir)
    ea.Reload()
    return {k: [e.value for e in ea.Scalars(k)] for k in ea.Tags()["scalars"]}


def test_default_o2td3_reaches_every_phase(tmp_path, offline_checkpoints):
    res = run(tmp_path, offline_checkpoints["td3_bc"])
    check_outputs(res, ["aligned"])
    out = Path(res["run_dir"])
    assert (out / "reevaluated.pt").exists() and (out / "aligned.pt").exists() and not (out / "distilled.pt").exists()
    assert res["mode"] == "o2td3" and res["distillation"] is None
    s = scalars(res["run_dir"])
    for k in ("losses/reeval_qf_loss", "losses/align_loss", "losses/align_actor_loss", "losses/qf_loss", "losses/actor_loss", "losses/lambda", "charts/kl_threshold", "eval/normalized_score", "charts/SPS"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    # a deterministic TD3+BC actor is copied exactly into pi0
    final = torch.load(out / "final.pt", weights_only=True)
    src = torch.load(offline_checkpoints["td3_bc"], weights_only=True)
    assert all(torch.equal(final["train_state"]["modules"]["actor0"][k], v) for k, v in src["actor"].items())
    assert final["lagrange"] is not None and final["reference_actor"] is not None


@pytest.mark.parametrize("flags, phases, mode", [
    (["--no-reevaluate"], ["aligned"], "o2td3_no_reevaluate"),
    (["--no-align"], [], "o2td3_no_align"),
    (["--no-constraint"], ["aligned"], "o2td3_no_constraint"),
    (["--no-reevaluate", "--no-align", "--no-constraint"], [], "naive"),
])
def test_ablations(tmp_path, offline_checkpoints, flags, phases, mode):
    res = run(tmp_path, offline_checkpoints["td3_bc"], *flags)
    check_outputs(res, phases)
    out = Path(res["run_dir"])
    assert res["mode"] == mode and out.name.startswith(mode)
    assert (out / "reevaluated.pt").exists() == ("--no-reevaluate" not in flags)
    assert (out / "aligned.pt").exists() == ("--no-align" not in flags)
    if "--no-constraint" in flags:
        assert max(scalars(res["run_dir"])["losses/lambda"]) == 0.0


def test_naive_starts_from_offline_critic(tmp_path, offline_checkpoints):
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--no-reevaluate", "--no-align", "--no-constraint", "--online-steps", "20", "--checkpoint-every", "20")
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    assert final["critic_config"] == {"hidden": [256, 256], "layer_norm": False}  # the TD3+BC critic, kept


@pytest.mark.parametrize("flags", [[], ["--opt-balanced-replay"], ["--buffer-mode", "part"]])
def test_opt(tmp_path, offline_checkpoints, flags):
    balanced = "--opt-balanced-replay" in flags
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--opt", *flags)
    check_outputs(res, [])
    out = Path(res["run_dir"])
    assert (out / "opt_pretrained.pt").exists() and not (out / "reevaluated.pt").exists()
    assert [c["phase"] for c in res["curve"]] == ["offline", "opt_collect", "online"]
    s = scalars(res["run_dir"])
    for k in ("losses/opt_meta_loss", "losses/opt_w", "losses/qf_loss", "losses/qf_on_loss", "losses/actor_loss", "charts/kappa"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    assert s["charts/kappa"][-1] == pytest.approx(0.9)
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
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--reference", mode, "--no-reevaluate", "--align-steps", "5")
    check_outputs(res, ["aligned"])
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    ref, actor0 = final["reference_actor"], final["train_state"]["modules"]["actor0"]
    same = all(torch.equal(ref[k], actor0[k]) for k in ref)
    if mode == "offline":
        assert same
    else:  # copied from pi after every evaluation: no longer the offline actor
        assert not same and all(torch.equal(ref[k], final["actor"][k]) for k in ref)


@pytest.mark.parametrize("buffer_mode", ["all", "part", "none"])
def test_buffer_modes(tmp_path, offline_checkpoints, buffer_mode):
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--buffer-mode", buffer_mode, "--no-reevaluate", "--no-align")
    check_outputs(res, [])


@pytest.mark.parametrize("name, family", [("cql", "tanh_gaussian"), ("iql", "gaussian"), ("bc", "tanh_gaussian"), ("bc_det", "deterministic")])
def test_checkpoint_families(tmp_path, offline_checkpoints, name, family):
    res = run(tmp_path, offline_checkpoints[name], "--no-reevaluate", "--align-steps", "5", "--online-steps", "20")
    check_outputs(res, (["distilled"] if family != "deterministic" else []) + ["aligned"], n_online_evals=1)
    assert res["actor_family"] == family
    if family == "deterministic":
        assert res["distillation"] is None
    else:
        d = res["distillation"]
        assert d["from_family"] == family and math.isfinite(d["distill_error"]) and d["distilled_score"] == res["distilled_score"]
        assert (Path(res["run_dir"]) / "distilled.pt").exists()
        assert "losses/distill_error" in scalars(res["run_dir"])


def test_resume_after_kill_and_phase_reuse(tmp_path, offline_checkpoints):
    ck = offline_checkpoints["td3_bc"]
    extra = ["--online-steps", "60", "--eval-every", "10", "--checkpoint-every", "10"]
    full = run(tmp_path, ck, *extra, "--run-name", "full")
    killed = run(tmp_path, ck, *extra, "--run-name", "killed", "--stop-after", "30")
    assert killed["stopped"] and not (Path(killed["run_dir"]) / "final.pt").exists()
    resumed = run(tmp_path, ck, *extra, "--run-name", "killed")
    assert not resumed["stopped"] and resumed["phases"]["aligned"]["reused"]
    assert [c["step"] for c in resumed["curve"]] == [c["step"] for c in full["curve"]]
    prefix = [c for c in full["curve"] if c["step"] <= 30]
    assert resumed["curve"][: len(prefix)] == prefix  # identical up to the kill
    # a longer budget with the same run name continues from the end of the shorter one
    longer = run(tmp_path, ck, *extra[:1], "80", *extra[2:], "--run-name", "killed")
    assert longer["curve"][: len(resumed["curve"])] == resumed["curve"] and longer["curve"][-1]["step"] == 80
    # phase checkpoints reused, online phase recomputed -> the same run (the RNG state is restored with the phase)
    out = Path(full["run_dir"])
    (out / "online.pt").unlink()
    again = run(tmp_path, ck, *extra, "--run-name", "full")
    assert again["phases"]["reevaluated"]["reused"] and again["phases"]["aligned"]["reused"]
    assert again["curve"] == full["curve"]
    fresh = run(tmp_path, ck, *extra, "--run-name", "full", "--no-resume", "--online-steps", "20")
    assert not any(p["reused"] for p in fresh["phases"].values())


def test_non_finite_loss_stops_with_phase_and_step(tmp_path, offline_checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, offline_checkpoints["td3_bc"], "--critic-lr", "1e30", "--no-align")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "re-evaluation" in err


def test_same_seed_same_results(tmp_path, offline_checkpoints):
    a = run(tmp_path, offline_checkpoints["td3_bc"], "--run-name", "a")
    b = run(tmp_path, offline_checkpoints["td3_bc"], "--run-name", "b")
    assert a["curve"] == b["curve"]
    sa, sb = scalars(a["run_dir"]), scalars(b["run_dir"])
    assert sa["losses/qf_loss"] == sb["losses/qf_loss"]


def test_default_checkpoint_convention(tmp_path, offline_checkpoints):
    dest = tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "seed0" / "checkpoint.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(offline_checkpoints["td3_bc"].read_bytes())
    res = td3.main(tyro.cli(td3.Args, args=[*TINY, "--run-dir", str(tmp_path), "--no-reevaluate", "--no-align", "--online-steps", "20"]))
    assert res["offline_checkpoint"] == str(dest)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("extra, message", [
    (["--env", "hopper-mediocre-v2"], "unknown env"),
    (["--reevaluate-steps", "0"], "--no-reevaluate"),
    (["--stop-after", "40"], "--stop-after"),
    (["--checkpoint-every", "30"], "multiple of --eval-every"),
    (["--opt", "--no-align"], "--opt is its own pipeline"),
    (["--opt-balanced-replay"], "belongs to --opt"),
    (["--eps0", "0.5", "--eps-end", "0.1"], "must loosen"),
    (["--learning-starts", "40"], "no update would happen"),
    (["--opt", "--opt-collect-steps", "40"], "--opt-collect-steps"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments_exit_2(tmp_path, offline_checkpoints, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, offline_checkpoints["td3_bc"], *extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o2o_td3").exists()  # nothing written


def test_missing_checkpoint_names_the_command(tmp_path, tiny_dataset, capsys):
    with pytest.raises(SystemExit) as e:
        td3.main(tyro.cli(td3.Args, args=[*TINY, "--run-dir", str(tmp_path), "--seed", "3"]))
    assert e.value.code == 2
    assert f"python offline_pretrain.py --algo td3_bc --env hopper-medium-v2 --run-dir {tmp_path} --seed 3" in capsys.readouterr().err


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
            run(tmp_path, Path(path), *extra)
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
    assert m["losses/distill_loss"].item() < before / 10


# ---------------------------------------------------------------- fast paths: --compile / --cudagraphs / --bf16 = eager math
# As in test_accel.py: the comparison runs in float64 (in float32 Adam's first ~sign(g) steps would turn last-bit
# differences of near-zero gradients into lr-sized ones), and inductor draws eager's random numbers (fallback_random).
OBS, ACT, B = 5, 2, 16
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# phase -> whether its calls carry the delayed-actor flag (every flag value compiles / captures its own graph)
UPDATES = {"distill": False, "reevaluate": False, "align": False, "o2td3": True, "naive": True, "opt_pretrain": False, "opt_finetune": True}


def _batch(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1, "rewards": torch.randn(B, generator=g),
         "next_obs": torch.randn(B, OBS, generator=g), "terminals": (torch.rand(B, generator=g) < 0.2).to(torch.get_default_dtype())}
    return {k: v.to(device) for k, v in b.items()}


def _full_agent(accel) -> td3.Agent:
    """Every network and optimizer any phase uses, small; the same weights for the same seed."""
    torch.manual_seed(0)
    dev = accel.device
    ag = td3.Agent()
    ag.actor0 = td3.DeterministicActor(OBS, ACT, (16, 16)).to(dev).requires_grad_(False)
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


def _phase_update(accel, ag: td3.Agent, phase: str):
    """The phase's Update, bound exactly as main() binds it."""
    a, c = td3.Args(), td3.td3_constants(td3.Args())
    fn = {
        "distill": lambda: functools.partial(td3.distill_update, ag.actor, ag.actor_opt),
        "reevaluate": lambda: functools.partial(td3.reevaluate_update, ag, **c),
        "align": lambda: functools.partial(td3.align_update, ag, policy_noise=a.policy_noise, noise_clip=a.noise_clip, beta=a.align_beta,
                                           max_distance=a.align_max_distance),
        "o2td3": lambda: functools.partial(td3.o2td3_update, ag, constraint=True, lagrange_tau=a.lagrange_tau, **c),
        "naive": lambda: functools.partial(td3.o2td3_update, ag, constraint=False, lagrange_tau=a.lagrange_tau, **c),
        "opt_pretrain": lambda: functools.partial(td3.opt_pretrain_update, ag, inner_lr=0.1, **c),
        "opt_finetune": lambda: functools.partial(td3.opt_finetune_update, ag, **c),
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
        "o2td3": lambda: (*x, scalar(1e-3 * (step + 1)), flag),
        "naive": lambda: (*x, scalar(1e-3 * (step + 1)), flag),
        "opt_pretrain": lambda: (b, _batch(1000 + step, device)),
        "opt_finetune": lambda: (*x, scalar(0.2 + 0.1 * step), flag),
    }[phase]()


def _state(ag: td3.Agent) -> dict[str, torch.Tensor]:
    out = {f"{name}.{pn}": p.detach().clone() for name, m in ag.modules().items() for pn, p in m.named_parameters()}
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


def test_lagrange_state_of_older_checkpoints_loads():
    """log_lam used to be 0-d (now (1,) for compiled Adam): a 0-d multiplier and its 0-d Adam moments still load."""
    old = td3.Agent()
    old.log_lam = torch.nn.Parameter(torch.tensor(0.5))
    old.lam_opt = torch.optim.Adam([old.log_lam], lr=1e-2)
    (old.log_lam * 2.0).backward()
    old.lam_opt.step()
    state = old.state()
    for accel in (td3.Accel(torch.device("cpu")), td3.Accel(torch.device("cpu"), compile=True)):
        new = td3.Agent()
        new.log_lam = torch.nn.Parameter(torch.zeros(1))
        new.lam_opt = accel.adam([new.log_lam], 1e-2)
        new.load(state, accel)
        assert new.log_lam.shape == (1,) and new.log_lam.item() == pytest.approx(old.log_lam.item())
        new.log_lam.grad = torch.ones(1)
        new.lam_opt.step()  # the moments were reshaped to the parameter's shape
        assert new.lam_opt.state[new.log_lam]["exp_avg"].shape == (1,)


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
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--compile", "--no-reevaluate", "--align-steps", "10")
    check_outputs(res, ["aligned"])
    s = scalars(res["run_dir"])
    for k in ("losses/align_loss", "losses/qf_loss", "losses/actor_loss", "losses/lambda", "losses/mse_to_reference"):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    assert max(s["losses/lambda"]) != min(s["losses/lambda"])  # the Lagrange step ran inside the compiled update


@pytest.mark.parametrize("flags", [[], ["--opt"]])
def test_bf16_end_to_end(tmp_path, offline_checkpoints, flags):
    """bf16 autocast through O2TD3 and OPT (the meta-gradient included): finite losses, float32 checkpoints."""
    res = run(tmp_path, offline_checkpoints["td3_bc"], "--bf16", *flags)
    check_outputs(res, [] if flags else ["aligned"])
    s = scalars(res["run_dir"])
    for k in ("losses/qf_loss", "losses/actor_loss") + (("losses/opt_meta_loss",) if flags else ("losses/align_loss",)):
        assert k in s and all(math.isfinite(v) for v in s[k]), k
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in final["actor"].values())
