"""o2o_sac.py: math on hand-checked tensors, alignment behaviour, smoke runs of every mode, resume, bad inputs, and the
--compile / --cudagraphs / --bf16 updates against the eager reference."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_script

o2o = load_script("o2o_sac")

TINY = ["--reevaluate-steps", "50", "--align-steps", "50", "--online-steps", "300", "--learning-starts", "100", "--utd", "1",
        "--eval-every", "100", "--eval-episodes", "2", "--batch-size", "64", "--log-every", "50", "--distill-steps", "50",
        "--checkpoint-every", "50", "--pre-sample-steps", "150", "--device", "cpu"]


def run(ckpt: Path, run_dir: Path, *extra: str) -> dict:
    return o2o.main(tyro.cli(o2o.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(ckpt), "--run-dir", str(run_dir), *TINY, *extra]))


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- pure math, hand-checked
def test_fqe_target_termination_vs_truncation():
    r, d = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])  # second: true termination; a time-limit end has d = 0
    next_q = torch.tensor([[3.0, 5.0], [4.0, 1.0]])  # (n=2, B=2): min over critics = [3, 1]
    y = o2o.fqe_target(r, d, next_q, torch.tensor([0.5, 0.5]), 0.2, 0.9)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * (3.0 - 0.1), 2.0]))
    y_c = o2o.constrained_target(r, d, next_q, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), 0.2, 2.0, 0.9)
    torch.testing.assert_close(y_c, torch.tensor([3.61 - 0.9 * 2.0, 2.0]))


def test_alignment_targets():
    q_star, y = o2o.alignment_targets(torch.tensor([[5.0, 2.0], [4.0, 3.0]]), torch.tensor([[10.0, 0.0], [9.0, 1.0]]),
                                      torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.5]), 0.5)
    torch.testing.assert_close(q_star, torch.tensor([4.0, 2.0]))
    # candidates Q* - alpha0 (lp* - lp0(an)) = [4 - 1, 2 - 0.25]; capped by min Qbar(s, an) = [9, 0]
    torch.testing.assert_close(y, torch.tensor([3.0, 0.0]))


def test_kl_estimate_floor():
    torch.testing.assert_close(o2o.kl_estimate(torch.tensor([0.0, -1.0]), torch.tensor([-2.0, -100.0]), -50.0), torch.tensor([2.0, 49.0]))


def test_kl_threshold_loosens():
    assert o2o.kl_threshold(0, 0.125, 2.0, 100_000) == 0.125
    assert o2o.kl_threshold(50_000, 0.125, 2.0, 100_000) == pytest.approx(1.0625)
    assert o2o.kl_threshold(100_000, 0.125, 2.0, 100_000) == 2.0
    assert o2o.kl_threshold(300_000, 0.125, 2.0, 100_000) == 2.0


def test_lagrange_loss_value_and_sign():
    log_lam = torch.tensor(math.log(2.0), requires_grad=True)
    loss = o2o.lagrange_loss(log_lam, torch.tensor([3.0, 1.0]), 2.0)  # u = [-1, 1]: c = (0.7 * -1 + 0.3 * 1) / 2 = -0.2
    assert loss.item() == pytest.approx(-0.4)
    for kl, rises in ((torch.full((8,), 5.0), True), (torch.full((8,), 0.1), False)):  # violated / satisfied
        p = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([p], lr=1e-2)
        o2o.lagrange_loss(p, kl, 1.0).backward()
        opt.step()
        assert (p.item() > 0) == rises


def test_online_update_raises_lambda_when_constraint_violated():
    torch.manual_seed(0)
    actor, ref = o2o.TanhGaussianActor(3, 2, (16, 16)), o2o.TanhGaussianActor(3, 2, (16, 16))
    with torch.no_grad():
        ref.head.bias.fill_(-3.0)  # narrow reference far from the actor: D is large
    qf = o2o.make_critic(3, 2)
    log_alpha, log_lam = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opts = {"actor": torch.optim.Adam(actor.parameters(), 1e-4), "qf": torch.optim.Adam(qf.parameters(), 1e-4),
            "alpha": torch.optim.Adam([log_alpha], 1e-4), "lambda": torch.optim.Adam([log_lam], 1e-2)}
    b = {"obs": torch.randn(32, 3), "actions": torch.rand(32, 2) * 2 - 1, "rewards": torch.randn(32), "next_obs": torch.randn(32, 3), "terminals": torch.zeros(32)}
    m = o2o.online_update(actor, o2o.frozen(ref), qf, o2o.frozen(qf), log_alpha, log_lam, opts, b, torch.tensor(0.01), True, True,
                          target_entropy=-2.0, gamma=0.99, tau=0.005, kl_floor=-50.0)
    assert m["losses/kl"].item() > 0.01 and log_lam.item() > 0
    assert all(torch.isfinite(v) and v.dim() == 0 for v in m.values())


def test_family_defaults_table_and_overrides():
    a = o2o.family_values(o2o.Args(env="hopper-medium-expert-v2"))
    assert (a["alpha0"], a["eps0"], a["eps_end"]) == (0.5, 0.005, 0.125)
    a = o2o.family_values(o2o.Args(env="walker2d-medium-replay-v2", alpha0=0.3))
    assert (a["alpha0"], a["eps0"], a["eps_end"]) == (0.3, 0.125, 2.0)
    assert o2o.family_values(o2o.Args(env="hopper-medium-v2", reference="interval"))["eps_end"] == 0.5


# ---------------------------------------------------------------- behaviour: alignment makes pi0 (soft-)greedy
def test_alignment_makes_offline_action_preferred(tiny_dataset, offline_checkpoints):
    torch.manual_seed(0)
    data = o2o.load_dataset("hopper-medium-v2", quiet=True)
    ckpt = o2o.load_checkpoint(offline_checkpoints["cql"])
    rb = o2o.ReplayBuffer.from_dataset(data, ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy(), torch.device("cpu"))
    base = o2o.actor_from_checkpoint(ckpt)
    with torch.no_grad():  # a confident offline policy (std ~ 0.14, like a trained actor; the tiny checkpoint is near uniform)
        base.head.bias[data["act_dim"]:] = -2.0
    pi0, actor = o2o.frozen(base), base
    qf = o2o.make_critic(data["obs_dim"], data["act_dim"])
    qf_target = o2o.frozen(qf)
    qf_opt = torch.optim.Adam(qf.parameters(), lr=3e-4)
    for _ in range(100):
        o2o.reevaluate_update(pi0, qf, qf_target, qf_opt, rb.sample(64), alpha0=0.2, gamma=0.99, tau=0.005)
    obs = rb.data["obs"][:512]

    @torch.no_grad()
    def fraction_preferred() -> float:
        a_star = pi0.act(obs)
        q_star = qf(obs, a_star).min(0).values
        a = torch.stack([actor.sample(obs)[0] for _ in range(8)])  # 8 sampled actions per state
        q = torch.stack([qf(obs, ai).min(0).values for ai in a])
        return (q_star >= q).float().mean().item()

    before = fraction_preferred()
    qf_target = o2o.frozen(qf)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=1e-4)
    for _ in range(400):
        m = o2o.align_update(pi0, actor, qf, qf_target, qf_opt, actor_opt, rb.sample(64), alpha0=0.2)
    after = fraction_preferred()
    assert torch.isfinite(m["qf_loss"])
    assert after >= before + 0.2 and after > 0.8, (before, after)


# ---------------------------------------------------------------- smoke runs: every mode, ablation, reference, buffer, family
# Each case combines one value of every axis, so six runs cover them all.
CASES = {
    "o2sac_cql": ("cql", []),
    "iql_noreeval_interval_all": ("iql", ["--no-reevaluate", "--reference", "interval", "--reference-interval", "1", "--buffer-mode", "all"]),
    "td3bc_noalign_offline_part": ("td3_bc", ["--no-align", "--reference", "offline", "--buffer-mode", "part", "--part-trajectories", "3"]),
    "bcdet_noconstraint_none": ("bc_det", ["--no-constraint", "--buffer-mode", "none"]),
    "naive_cql": ("cql", ["--no-reevaluate", "--no-align", "--no-constraint"]),
    "porl_bc": ("bc", ["--critic-init", "scratch"]),
}


@pytest.fixture(scope="module")
def smoke_runs(offline_checkpoints, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out = {}
    for name, (algo, extra) in CASES.items():
        rd = tmp_path_factory.mktemp(name)
        res = run(offline_checkpoints[algo], rd, "--run-name", name, *extra)
        out[name] = (res, Path(res["run_dir"]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_smoke_mode(name, smoke_runs):
    res, d = smoke_runs[name]
    algo, extra = CASES[name]
    mode = res["mode"]
    porl = "scratch" in extra
    assert mode["reevaluate"] == ("--no-reevaluate" not in extra and not porl)
    assert mode["align"] == ("--no-align" not in extra and not porl)
    assert mode["constraint"] == ("--no-constraint" not in extra and not porl)
    for f in ("args.json", "results.json", "final.pt", "online.pt"):
        assert (d / f).is_file(), f
    assert (d / "reevaluated.pt").is_file() == mode["reevaluate"]
    assert (d / "aligned.pt").is_file() == mode["align"]
    curve = res["curve"]
    assert curve[0]["step"] == 0 and curve[0]["phase"] == "offline"
    assert [p["phase"] for p in curve if p["step"] == 0][-1] == ("aligned" if mode["align"] else "start_online")
    online = [p for p in curve if p["step"] > 0]
    assert [p["step"] for p in online] == [100, 200, 300]
    assert [p["phase"] for p in online] == (["pre_sample", "online", "online"] if porl else ["online"] * 3)
    assert all(math.isfinite(p["normalized_score"]) for p in curve)
    assert json.loads((d / "results.json").read_text())["finished"] is True
    # distillation for every non-tanh-Gaussian family, logged with its error and score
    family = torch.load(d / "final.pt", weights_only=True)
    if algo in ("iql", "td3_bc", "bc_det"):
        assert res["distillation"]["from_family"] in ("gaussian", "deterministic")
        assert math.isfinite(res["distillation"]["action_mse"]) and curve[1]["phase"] == "distilled"
    else:
        assert res["distillation"] is None
    # the final checkpoint is a checkpoint of the project format with a tanh-Gaussian actor
    ck = o2o.load_checkpoint(d / "final.pt", env_name="hopper-medium-v2")
    assert ck["actor_family"] == "tanh_gaussian" and family["grad_steps"] == 300
    o2o.actor_from_checkpoint(ck)
    # --no-reevaluate keeps a checkpoint critic when there is one (IQL), else new LayerNorm critics
    assert mode["critic"]["from"] == ("checkpoint" if algo in ("iql", "cql") and "--no-reevaluate" in extra else "new")
    sc = scalars(d)
    for tag in ("losses/qf_loss", "losses/actor_loss", "losses/alpha", "eval/normalized_score", "charts/kl_threshold"):
        assert tag in sc and sc[tag] and all(math.isfinite(v) for v in sc[tag]), tag
    if mode["reevaluate"]:
        assert all(math.isfinite(v) for v in sc["reevaluate/qf_loss"])
    if mode["align"]:
        assert all(math.isfinite(v) for v in sc["align/qf_loss"])
    if mode["constraint"]:
        assert max(sc["losses/lambda"]) > 0 and all(math.isfinite(v) for v in sc["losses/kl"])
    else:
        assert max(sc["losses/lambda"]) == 0.0


def test_resume_after_kill_gives_the_same_curve(smoke_runs, offline_checkpoints, tmp_path):
    """Killed after 170 env steps (online.pt at an episode end before that), resumed: the whole curve equals the
    uninterrupted run's, so the same seed gives the same results and the resume restores every state."""
    full, _ = smoke_runs["o2sac_cql"]
    killed = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k", "--stop-after", "170")
    assert killed["stopped_at"] == 170 and not (Path(killed["run_dir"]) / "final.pt").exists()
    resumed = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k")
    assert "online" in resumed["reused_phases"]
    assert resumed["curve"] == full["curve"]
    # a rerun with the same args and a longer budget continues from the final online state, prefix unchanged
    longer = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k", "--online-steps", "400")
    assert longer["curve"][: len(full["curve"])] == full["curve"] and longer["curve"][-1]["step"] == 400


def test_phase_checkpoints_reused_with_same_args(smoke_runs, offline_checkpoints, tmp_path):
    _, d = smoke_runs["o2sac_cql"]
    full, _ = smoke_runs["o2sac_cql"]
    copy = tmp_path / "o2o_sac" / "hopper-medium-v2" / "o2sac_cql"
    copy.parent.mkdir(parents=True)
    shutil.copytree(d, copy)
    (copy / "online.pt").unlink()
    res = run(offline_checkpoints["cql"], tmp_path, "--run-name", "o2sac_cql", "--online-steps", "150")
    assert set(res["reused_phases"]) == {"reevaluated", "aligned"}
    assert res["curve"][:3] == full["curve"][:3]  # offline, aligned, step 100
    # other alignment args: the aligned phase is recomputed, the re-evaluation still reused
    (copy / "online.pt").unlink()
    res = run(offline_checkpoints["cql"], tmp_path, "--run-name", "o2sac_cql", "--online-steps", "150", "--align-steps", "20")
    assert res["reused_phases"] == ["reevaluated"]


# ---------------------------------------------------------------- bad inputs: exit 2, one line, nothing written
def _fails(capsys, argv: list[str], expect: str, run_dir: Path) -> None:
    with pytest.raises(SystemExit) as e:
        o2o.main(tyro.cli(o2o.Args, args=argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert not (run_dir / "o2o_sac").exists()


def test_missing_checkpoint_names_the_command(tiny_dataset, tmp_path, capsys):
    _fails(capsys, ["--env", "hopper-medium-v2", "--run-dir", str(tmp_path), "--offline-algo", "iql", "--seed", "3"],
           "python offline_pretrain.py --algo iql --env hopper-medium-v2 --seed 3", tmp_path)


def test_checkpoint_of_other_env_or_dims(offline_checkpoints, tmp_path, capsys):
    ck = str(offline_checkpoints["cql"])
    _fails(capsys, ["--env", "hopper-medium-replay-v2", "--checkpoint", ck, "--run-dir", str(tmp_path)], "was trained on hopper-medium-v2", tmp_path)
    bad = torch.load(ck, weights_only=True)
    bad["obs_dim"] = 7
    torch.save(bad, tmp_path / "bad.pt")
    _fails(capsys, ["--env", "hopper-medium-v2", "--checkpoint", str(tmp_path / "bad.pt"), "--run-dir", str(tmp_path)], "obs/act dims 7/3", tmp_path)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    _fails(capsys, ["--env", "hopper-medium-v2", "--checkpoint", str(tmp_path / "junk.pt"), "--run-dir", str(tmp_path)], "corrupt", tmp_path)


@pytest.mark.parametrize("argv,expect", [
    (["--online-steps", "0"], "--online-steps must be positive"),
    (["--reevaluate-steps", "0"], "--reevaluate-steps must be positive, got 0 (or pass --no-reevaluate)"),
    (["--online-steps", "500", "--learning-starts", "500"], "no update would ever run"),
    (["--critic-init", "scratch", "--online-steps", "100", "--pre-sample-steps", "100", "--learning-starts", "10"], "PORL would never fine-tune"),
    (["--eps0", "2", "--eps-end", "1"], "must loosen"),
    (["--utd", "-1"], "--utd must be positive"),
    (["--env", "hopper-nonsense-v2"], "unknown env"),
])
def test_bad_args_exit_2(tmp_path, capsys, argv, expect):
    _fails(capsys, ["--run-dir", str(tmp_path), *argv], expect, tmp_path)


def test_part_buffer_keeps_top_return_trajectories():
    import numpy as np

    data = {"ends": np.array([0, 1, 0, 0, 1, 1], dtype=np.float32), "episode_returns": np.array([5.0, 1.0, 9.0], dtype=np.float32)}
    np.testing.assert_array_equal(o2o.offline_trajectory_indices(data, 2), [0, 1, 5])  # episodes 0 (return 5) and 2 (return 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_cuda(offline_checkpoints, tmp_path):
    res = run(offline_checkpoints["iql"], tmp_path, "--device", "cuda", "--online-steps", "150")
    assert res["curve"][-1]["step"] == 150 and all(math.isfinite(p["normalized_score"]) for p in res["curve"])


def test_distillation_keeps_the_offline_spread():
    """Distilling from the offline actor's samples gives the student the teacher's spread; fitting only the mean
    action (the collapse distill_targets avoids) shrinks it."""
    torch.manual_seed(0)
    teacher = o2o.GaussianActor(4, 2, (16,))
    with torch.no_grad():
        teacher.log_std.fill_(math.log(0.3))
    obs = torch.randn(4096, 4)

    def fit(targets_fn):
        torch.manual_seed(1)
        student = o2o.TanhGaussianActor(4, 2, (32, 32))
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        for _ in range(300):
            o = obs[torch.randint(len(obs), (256,))]
            with torch.no_grad():
                t = targets_fn(o)
            o2o.distill_update(student, opt, o, t)
        return student(obs)[1].exp().mean().item()

    std_samples = fit(lambda o: o2o.distill_targets(teacher, o, 0.1))
    std_mean_only = fit(lambda o: teacher.act(o))
    assert 0.15 < std_samples < 0.6
    assert std_mean_only < 0.5 * std_samples
    det = o2o.DeterministicActor(4, 2, (16,))
    noisy = o2o.distill_targets(det, obs, 0.1)
    assert (noisy - det.act(obs)).std().item() == pytest.approx(0.1, rel=0.1)
    assert noisy.abs().max() < 1


# ---------------------------------------------------------------- --compile / --cudagraphs / --bf16: the same math as eager
# As in test_accel.py: the comparisons run in float64 (in float32, Adam's first steps turn last-bit differences of
# near-zero gradients into lr-sized changes) and with inductor's fallback_random (compiled code draws from eager's
# generator), so any difference between the twins is arithmetic.
OBS, ACT, BATCH, HIDDEN = 5, 2, 16, (32, 32)
# the flags the online loop passes: constrained, lam steps on the first of the utd updates of an env step;
# unconstrained (PORL), the actor is frozen during the pre-sample stage
ONLINE_FLAGS = {"online_constrained": [(True, True), (False, True)], "online_unconstrained": [(False, False), (False, True)]}
PHASES = ["distill", "reevaluate", "align", *ONLINE_FLAGS]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fake_batch(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(BATCH, OBS, generator=g), "actions": torch.rand(BATCH, ACT, generator=g) * 1.8 - 0.9,
         "rewards": torch.randn(BATCH, generator=g), "next_obs": torch.randn(BATCH, OBS, generator=g),
         "terminals": (torch.rand(BATCH, generator=g) < 0.2).to(torch.get_default_dtype())}
    return {k: v.to(device) for k, v in b.items()}


def phase_update(phase: str, accel) -> tuple:
    """One phase's update built as main() builds it, from seed 0 (so twins start equal): the Update, the tensors it
    trains (by name), and inputs(i) -> (args, kwargs) of call i, only per-step tensors and flags."""
    dev = accel.device
    torch.manual_seed(0)
    actor = o2o.TanhGaussianActor(OBS, ACT, HIDDEN).to(dev)
    pi0 = o2o.frozen(o2o.TanhGaussianActor(OBS, ACT, HIDDEN).to(dev))  # also the reference policy: the KL is not 0
    qf = o2o.orthogonal_init_(o2o.Critic(OBS, ACT, HIDDEN, n=2, layer_norm=True)).to(dev)
    qf_target = o2o.frozen(qf)
    trained: dict[str, torch.Tensor] = {}
    for name, m in (("actor", actor), ("qf", qf), ("qf_target", qf_target)):
        trained |= {f"{name}.{k}": p for k, p in m.named_parameters()}

    def batch_only(i: int) -> tuple:
        return (fake_batch(i, dev),), {}

    if phase == "distill":
        fn = functools.partial(o2o.distill_update, actor, accel.adam(actor.parameters(), 3e-4))

        def inputs(i: int) -> tuple:
            b = fake_batch(i, dev)
            return (b["obs"], b["actions"]), {}
    elif phase == "reevaluate":
        fn = functools.partial(o2o.reevaluate_update, pi0, qf, qf_target, accel.adam(qf.parameters(), 3e-4), alpha0=0.2, gamma=0.99, tau=0.005)
        inputs = batch_only
    elif phase == "align":
        fn = functools.partial(o2o.align_update, pi0, actor, qf, qf_target, accel.adam(qf.parameters(), 3e-4), accel.adam(actor.parameters(), 1e-4),
                               alpha0=0.2)
        inputs = batch_only
    else:
        log_alpha = torch.full((1,), math.log(0.2), device=dev, requires_grad=True)
        log_lam = torch.zeros(1, device=dev, requires_grad=True)
        opts = {"actor": accel.adam(actor.parameters(), 1e-4), "qf": accel.adam(qf.parameters(), 3e-4),
                "alpha": accel.adam([log_alpha], 3e-4), "lambda": accel.adam([log_lam], 1e-2)}
        pi_ref = pi0 if phase == "online_constrained" else None
        fn = functools.partial(o2o.online_update, actor, pi_ref, qf, qf_target, log_alpha, log_lam, opts,
                               target_entropy=-float(ACT), gamma=0.99, tau=0.005, kl_floor=-50.0)
        eps_t = accel.scalar(0.0)
        trained |= {"log_alpha": log_alpha, "log_lam": log_lam}

        def inputs(i: int) -> tuple:
            update_lam, update_actor = ONLINE_FLAGS[phase][i % 2]
            eps_t.fill_(0.5 + 0.25 * i)  # the threshold loosens between calls, as kl_threshold does in the loop
            return (fake_batch(i, dev), eps_t), {"update_lam": update_lam, "update_actor": update_actor}
    return accel.update(fn), trained, inputs


def assert_same_updates(phase: str, accel_kwargs: dict, calls: int, device: str = "cpu", atol: float = 1e-9, rtol: float = 1e-7):
    """The eager update and the accelerated one, from equal weights on equal batches and seeds, give equal metrics
    at every call and equal parameters (log_alpha and log_lam included) after the last; returns the accelerated Update
    and its inputs(i)."""
    dev = torch.device(device)
    eager, e_trained, e_inputs = phase_update(phase, o2o.Accel(dev))
    fast, f_trained, f_inputs = phase_update(phase, o2o.Accel(dev, **accel_kwargs))
    for i in range(calls):
        args, kwargs = e_inputs(i)
        torch.manual_seed(100 + i)
        m_e = {k: v.clone() for k, v in eager(*args, **kwargs).items()}
        args, kwargs = f_inputs(i)
        torch.manual_seed(100 + i)
        m_f = {k: v.clone() for k, v in fast(*args, **kwargs).items()}  # read at once: CUDA-graph outputs are overwritten
        assert m_e.keys() == m_f.keys()
        for k in m_e:
            assert m_f[k].dim() == 0, k
            torch.testing.assert_close(m_f[k], m_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{phase} {k} at call {i}: {s}")
    assert e_trained.keys() == f_trained.keys()
    for k, p in e_trained.items():
        torch.testing.assert_close(f_trained[k], p, atol=atol, rtol=rtol, msg=lambda s, k=k: f"{phase} {k} after {calls} calls: {s}")
    return fast, f_inputs


@pytest.mark.parametrize("phase", PHASES)
def test_compiled_update_equals_eager(phase, same_random, float64):
    from torch._dynamo.utils import counters

    counters.clear()
    fast, inputs = assert_same_updates(phase, {"compile": True}, calls=4)  # online: each flag combination twice
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"
    for i in range(4, 6):  # new batches and a new KL threshold: values change, the code must not
        args, kwargs = inputs(i)
        fast(*args, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch or threshold recompiled the update"


@cuda
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("compile", [False, True])
def test_cudagraph_update_equals_eager_gpu(phase, compile, same_random, float64):
    """Warm-up calls, capture and replays together reproduce the eager updates (GPU only)."""
    n_flags = len(ONLINE_FLAGS.get(phase, [()]))
    fast, _ = assert_same_updates(phase, {"cudagraphs": True, "compile": compile}, calls=8 * n_flags, device="cuda", atol=1e-7, rtol=1e-6)
    assert len(fast.graphs) == n_flags, "not every flag combination was captured as a CUDA graph"


def test_cli_cudagraphs_on_cpu_fails_fast(tmp_path, capsys):
    # before any dataset is looked for: this one does not exist, and would fail with another message
    _fails(capsys, ["--run-dir", str(tmp_path), "--device", "cpu", "--cudagraphs", "--dataset-id", "nosuch/none-v0", "--no-download"],
           "--cudagraphs", tmp_path)


def test_compile_smoke(offline_checkpoints, tmp_path):
    """A whole run under --compile (kept to the online phase: each phase's compiled update is checked against eager
    above, and every compile costs seconds)."""
    torch._dynamo.reset()
    res = run(offline_checkpoints["cql"], tmp_path, "--compile", "--no-reevaluate", "--no-align", "--online-steps", "110",
              "--learning-starts", "100", "--eval-every", "110", "--log-every", "5")
    torch._dynamo.reset()
    d = Path(res["run_dir"])
    for f in ("results.json", "final.pt", "online.pt"):
        assert (d / f).is_file(), f
    assert res["finished"] and res["curve"][-1]["step"] == 110 and all(math.isfinite(p["normalized_score"]) for p in res["curve"])
    sc = scalars(d)
    for tag in ("losses/qf_loss", "losses/actor_loss", "losses/lambda", "losses/kl"):
        assert sc.get(tag) and all(math.isfinite(v) for v in sc[tag]), tag


def test_bf16_smoke(offline_checkpoints, tmp_path):
    """Every phase (IQL's Gaussian actor is distilled) under bfloat16 autocast, lam stepped on one of 2 updates."""
    res = run(offline_checkpoints["iql"], tmp_path, "--bf16", "--distill-steps", "4", "--reevaluate-steps", "4", "--align-steps", "4",
              "--online-steps", "110", "--learning-starts", "100", "--utd", "2", "--eval-every", "110", "--log-every", "5")
    d = Path(res["run_dir"])
    for f in ("results.json", "final.pt", "online.pt", "reevaluated.pt", "aligned.pt"):
        assert (d / f).is_file(), f
    assert res["finished"] and res["curve"][-1]["step"] == 110 and all(math.isfinite(p["normalized_score"]) for p in res["curve"])
    assert math.isfinite(res["distillation"]["action_mse"])
    sc = scalars(d)
    for tag in ("distill/loss", "reevaluate/qf_loss", "align/qf_loss", "losses/qf_loss", "losses/actor_loss", "losses/lambda", "losses/kl"):
        assert sc.get(tag) and all(math.isfinite(v) for v in sc[tag]), tag
