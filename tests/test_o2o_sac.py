"""o2o_sac.py: math on hand-checked tensors, alignment behaviour, smoke runs of every mode, resume, bad inputs, and the
--compile / --cudagraphs / --bf16 updates against the eager reference."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from conftest import PHASE_IDS, assert_results_schema, flat_tensors, load_script, phase_marks, run_o2o, scalars

o2o = load_script("o2o_sac")

TINY = ["--reevaluate-steps", "50", "--align-steps", "50", "--online-steps", "300", "--learning-starts", "100", "--utd", "1",
        "--eval-every", "100", "--eval-episodes", "2", "--headline-eval-episodes", "0", "--batch-size", "64", "--log-every", "50", "--distill-steps", "50",
        "--checkpoint-every", "50", "--pre-sample-steps", "150", "--device", "cpu"]


run = functools.partial(run_o2o, o2o, TINY)  # run(ckpt, run_dir, *extra flags)


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


def test_constraint_threshold_loosens():
    assert o2o.constraint_threshold(0, 0.125, 2.0, 100_000) == 0.125
    assert o2o.constraint_threshold(50_000, 0.125, 2.0, 100_000) == pytest.approx(1.0625)
    assert o2o.constraint_threshold(100_000, 0.125, 2.0, 100_000) == 2.0
    assert o2o.constraint_threshold(300_000, 0.125, 2.0, 100_000) == 2.0


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
    # the official actor gradient clip: hopper medium-expert / expert with --reference interval only
    clip = lambda **kw: o2o.family_values(o2o.Args(**kw))["actor_grad_clip"]  # noqa: E731
    assert clip(env="hopper-medium-expert-v2", reference="interval") == clip(env="hopper-expert-v2", reference="interval") == 0.25
    assert clip(env="hopper-expert-v2", reference="interval", dataset_id="local/hopper/expert-v0") == 0.25
    assert clip(env="hopper-expert-v2") is None and clip(env="hopper-medium-v2", reference="interval") is None
    assert clip(env="walker2d-expert-v2", reference="interval") is None
    assert clip(env="hopper-expert-v2", reference="interval", actor_grad_clip=0.0) is None and clip(env="hopper-medium-v2", actor_grad_clip=1.0) == 1.0
    # --reference-interval: 1 (the official update_n, as O2TD3's), 10 on hopper's expert data (the official code, with the clip)
    interval = lambda **kw: o2o.family_values(o2o.Args(**kw))["reference_interval"]  # noqa: E731
    assert o2o.Args().reference_interval is None and interval(env="hopper-medium-v2") == interval(env="walker2d-expert-v2") == 1
    assert interval(env="hopper-medium-expert-v2") == interval(env="hopper-expert-v2") == 10 and interval(env="hopper-expert-v2", reference_interval=3) == 3


def test_phase_ids_one_table():
    """charts/phase: the one table of the three scripts (the shared block "results"), the one the tests read."""
    assert o2o.PHASE_IDS == PHASE_IDS


# ---------------------------------------------------------------- diagnostics, hand-checked
def test_q_stats():
    # min over the 2 critics: dataset actions [1, 1] (mean 1, std 0), policy modes [2, 0] (mean 1, population std 1)
    st = o2o.q_stats(torch.tensor([[1.0, 3.0], [2.0, 1.0]]), torch.tensor([[4.0, 0.0], [2.0, 2.0]]))
    assert st == {"q_data_mean": 1.0, "q_data_std": 0.0, "q_pi_mean": 1.0, "q_pi_std": 1.0}


def test_policy_critic_agreement():
    q_mode = torch.tensor([1.0, 0.0, 5.0])
    q_samples = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 4.0], [2.0, -2.0, 6.0]])  # rows = samples k, columns = states
    logp0 = torch.tensor([[0.0, 5.0, 0.0], [1.0, 5.0, 1.0], [3.0, 5.0, 2.0]])
    st = o2o.policy_critic_agreement(q_mode, q_samples, logp0)
    # Q(s, mode) >= Q(s, a_k): state 0: 1>=0, 1>=1, not 1>=2; state 1: not 0>=1, 0>=-1, 0>=-2; state 2: 5>=2, 5>=4, not 5>=6
    assert st["mode_preferred"] == pytest.approx(6 / 9)
    # Pearson per state: (0,1,3) vs (0,1,2) = 9 / sqrt(84); a constant log pi0 counts 0; (0,1,2) vs (2,4,6) = 1
    assert st["logp0_q_corr"] == pytest.approx((9 / math.sqrt(84) + 0.0 + 1.0) / 3)
    assert st["logp0_q_corr"] == pytest.approx((float(torch.corrcoef(torch.stack([logp0[:, 0], q_samples[:, 0]]))[0, 1]) + 1.0) / 3)


def test_actor_stats():
    st = o2o.actor_stats(torch.tensor([[0.5, -1.0], [0.995, 0.0]]), torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    assert st == pytest.approx({"entropy": 2.5, "mean_abs_action": 2.495 / 4, "saturation": 0.5})
    assert o2o.actor_stats(torch.tensor([[1.0, -2.0], [1.99, 0.0]]), torch.zeros(1, 2), max_action=2.0)["saturation"] == 0.5


def test_boundary_diagnostics_draw_no_training_randomness():
    torch.manual_seed(0)
    actor, qf = o2o.TanhGaussianActor(3, 2, (16, 16)), o2o.make_critic(3, 2)
    obs, actions = torch.randn(64, 3), torch.rand(64, 2) * 2 - 1
    state = torch.get_rng_state()
    d1 = o2o.boundary_diagnostics(actor, o2o.frozen(actor), qf, obs, actions, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert d1 == o2o.boundary_diagnostics(actor, o2o.frozen(actor), qf, obs, actions, seed=3)  # its own seeded generator
    assert set(d1) == DIAG_KEYS and all(math.isfinite(v) for v in d1.values())
    assert 0.0 <= d1["mode_preferred"] <= 1.0 and -1.0 <= d1["logp0_q_corr"] <= 1.0


def test_early_eval_steps_and_reference_cadence():
    assert o2o.early_eval_steps(100_000, 5) == [2000, 4000, 6000, 8000, 10000]
    assert o2o.early_eval_steps(300, 5) == [6, 12, 18, 24, 30]
    assert o2o.early_eval_steps(30, 5) == [1, 2, 3]  # the first tenth holds only 3 env steps
    assert o2o.early_eval_steps(300, 0) == []
    due = o2o.reference_update_due
    # best: any evaluation that beats the best so far, an extra early one included
    assert due("best", 5.0, 4.0, False, 0, 10) and not due("best", 4.0, 4.0, True, 10, 10)
    # interval: only the scheduled evaluations count, so an early one never copies, whatever the count
    assert due("interval", 0.0, 9.0, True, 20, 10) and not due("interval", 0.0, 9.0, False, 20, 10)
    assert not due("interval", 9.0, 0.0, True, 21, 10) and not due("offline", 9.0, 0.0, True, 10, 10)


DIAG_KEYS = {"q_data_mean", "q_data_std", "q_pi_mean", "q_pi_std", "mode_preferred", "logp0_q_corr", "entropy", "mean_abs_action", "saturation"}


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
    assert mode["critic_init"] == ("scratch" if porl else "offline")
    assert_results_schema(res, "o2o_sac")
    assert res["method"] == {"o2sac_cql": "ocr-cft", "iql_noreeval_interval_all": "no-reevaluate", "td3bc_noalign_offline_part": "no-align",
                             "bcdet_noconstraint_none": "no-constraint", "naive_cql": "naive", "porl_bc": "porl"}[name]
    for f in ("args.json", "results.json", "final.pt", "online.pt"):
        assert (d / f).is_file(), f
    assert (d / "reevaluated.pt").is_file() == mode["reevaluate"]
    assert (d / "aligned.pt").is_file() == mode["align"]
    curve = res["curve"]
    assert curve[0]["step"] == 0 and curve[0]["phase"] == "offline"
    assert [p["phase"] for p in curve if p["step"] == 0][-2:] == (["aligned", "online"] if mode["align"] else [["offline", "distilled"][bool(res["distillation"])], "online"])
    # alignment evaluated every align_steps // 10 steps by default; 5 extra evaluations inside the first tenth online
    assert [p["step"] for p in curve if p["phase"] == "align"] == (list(range(5, 51, 5)) if mode["align"] else [])
    online = [p for p in curve if p["step"] > 0 and p["phase"] != "align"]
    assert [p["step"] for p in online] == [6, 12, 18, 24, 30, 100, 200, 300]
    assert [p["phase"] for p in online] == (["pre_sample"] * 6 + ["online"] * 2 if porl else ["online"] * 8)
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
    assert res["critic"]["from"] == ("checkpoint" if algo in ("iql", "cql") and "--no-reevaluate" in extra else "new")
    # only a kept checkpoint critic keeps the checkpoint's reward transform; new critics learn on raw rewards
    assert res["reward_handling"] == ("checkpoint" if res["critic"]["from"] == "checkpoint" else "raw")
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
    # charts/phase on the env-step axis: every phase before online learning at 0, then online from env step 0 (PORL:
    # its pre-sample stage from 0, its fine-tuning where the stage ends, --pre-sample-steps 150)
    marks = [(0, "offline"), *[(0, "distill")] * bool(res["distillation"]), *[(0, "reevaluate")] * mode["reevaluate"], *[(0, "align")] * mode["align"]]
    assert phase_marks(d) == marks + ([(0, "pre_sample"), (150, "online")] if porl else [(0, "online")])


def test_resume_after_kill_gives_the_same_curve(smoke_runs, offline_checkpoints, tmp_path, capsys):
    """Killed after 250 env steps (online.pt at an episode end before that, after updates began at step 100), resumed:
    the whole curve and every saved tensor equal the uninterrupted run's, so the resume restores every state."""
    full, _ = smoke_runs["o2sac_cql"]
    killed = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k", "--stop-after", "250")
    assert killed["stopped_at"] == 250 and not (Path(killed["run_dir"]) / "final.pt").exists()
    saved_at = torch.load(Path(killed["run_dir"]) / "online.pt", weights_only=True)["o2o"]["run"]["t"]
    assert 100 < saved_at < 250  # learned state to restore
    assert f"stopped after 250 env steps (--stop-after, as if killed); online.pt holds env step {saved_at}:" in capsys.readouterr().out
    resumed = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k")
    assert "online" in resumed["reused_phases"]
    assert phase_marks(resumed["run_dir"]) == phase_marks(smoke_runs["o2sac_cql"][1])  # a resumed run marks no phase again
    assert resumed["curve"] == full["curve"]
    # and the same weights, optimiser states, temperature, multiplier and replay, bit for bit
    ends = [flat_tensors(torch.load(Path(r["run_dir"]) / "final.pt", weights_only=True)) for r in (full, resumed)]
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(v, ends[1][k]) for k, v in ends[0].items())
    # a rerun with the same args and a longer budget continues from the final online state, prefix unchanged
    longer = run(offline_checkpoints["cql"], tmp_path, "--run-name", "k", "--online-steps", "400")
    assert longer["curve"][: len(full["curve"])] == full["curve"] and longer["curve"][-1]["step"] == 400


def test_phase_checkpoints_reused_with_same_args(smoke_runs, offline_checkpoints, tmp_path, capsys):
    _, d = smoke_runs["o2sac_cql"]
    full, _ = smoke_runs["o2sac_cql"]
    copy = tmp_path / "o2o_sac" / "hopper-medium-v2" / "o2sac_cql"
    copy.parent.mkdir(parents=True)
    shutil.copytree(d, copy)
    (copy / "online.pt").unlink()
    res = run(offline_checkpoints["cql"], tmp_path, "--run-name", "o2sac_cql")
    assert set(res["reused_phases"]) == {"reevaluated", "aligned"}
    assert res["curve"] == full["curve"]  # the alignment's evaluations come back from aligned.pt, online is redone the same
    # other alignment args, the folder of a run killed before its first online.pt (a finished run of other settings is
    # refused): the aligned phase is recomputed, the re-evaluation still reused
    unfinish(copy)
    capsys.readouterr()
    res = run(offline_checkpoints["cql"], tmp_path, "--run-name", "o2sac_cql", "--online-steps", "150", "--align-steps", "20")
    assert res["reused_phases"] == ["reevaluated"]
    assert f"NOTICE: {copy / 'aligned.pt'} was made with other arguments; recomputing phase aligned" in capsys.readouterr().out


def unfinish(folder: Path) -> None:
    """The run folder as a run killed before its first online.pt leaves it: phase checkpoints only."""
    for name in ("online.pt", "final.pt", "results.json"):
        (folder / name).unlink(missing_ok=True)


def test_retrained_checkpoint_at_the_same_path_invalidates_saved_phases(smoke_runs, offline_checkpoints, tmp_path):
    """Phases are keyed on the checkpoint's content: the same path and step count with other weights reuses nothing."""
    _, d = smoke_runs["o2sac_cql"]
    ckpt_path = tmp_path / "cql_checkpoint.pt"
    shutil.copy(offline_checkpoints["cql"], ckpt_path)
    short = ["--run-name", "retrained", "--online-steps", "40", "--learning-starts", "20", "--eval-every", "40"]  # phases matter here
    first = run(ckpt_path, tmp_path, *short)
    assert first["reused_phases"] == []
    (tmp_path / "o2o_sac" / "hopper-medium-v2" / "retrained" / "online.pt").unlink()
    assert set(run(ckpt_path, tmp_path, *short)["reused_phases"]) == {"reevaluated", "aligned"}
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # "retrain": other weights, same grad_steps
    ck["actor"] = {k: v + 0.01 for k, v in ck["actor"].items()}
    torch.save(ck, ckpt_path)
    unfinish(tmp_path / "o2o_sac" / "hopper-medium-v2" / "retrained")  # a finished run of another checkpoint is refused
    assert run(ckpt_path, tmp_path, *short)["reused_phases"] == []


def test_run_folder_of_other_settings_refused_then_overwritten(offline_checkpoints, tmp_path, capsys):
    """A finished run of other settings is refused (with --no-resume too), its files untouched; --overwrite deletes its
    outputs, tensorboard events included, before the new run writes anything; a rerun then resumes the new run."""
    ck, d = offline_checkpoints["cql"], tmp_path / "o2o_sac" / "hopper-medium-v2" / "w"
    short = ["--run-name", "w", "--online-steps", "150"]
    run(ck, tmp_path, *short)
    old_events = {p.name for p in d.glob("events.out.tfevents.*")}
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for extra in ([], ["--no-resume"]):
        with pytest.raises(SystemExit) as e:
            run(ck, tmp_path, *short, "--gamma", "0.98", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "finished run with other settings (--gamma 0.99 (now 0.98))" in err and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    res = run(ck, tmp_path, *short, "--gamma", "0.98", "--overwrite")
    assert res["reused_phases"] == [] and res["finished"]
    events = {p.name for p in d.glob("events.out.tfevents.*")}
    assert len(events) == 1 and not events & old_events  # the old logs are gone, not mixed with the new ones
    assert torch.load(d / "final.pt", weights_only=True)["phase_key"]["gamma"] == 0.98
    assert "online" in run(ck, tmp_path, *short, "--gamma", "0.98")["reused_phases"]  # the new run, finished: resumed


def test_default_checkpoint_interval_is_a_tenth_of_a_short_run(offline_checkpoints, tmp_path):
    """Without --checkpoint-every, online.pt comes every online_steps // 10 env steps (at episode ends) of a short run:
    killed at step 200 of 300 it holds part of the online phase (a fixed 5000 would have written none)."""
    i = TINY.index("--checkpoint-every")
    tiny = TINY[:i] + TINY[i + 2:]
    argv = ["--env", "hopper-medium-v2", "--checkpoint", str(offline_checkpoints["cql"]), "--run-dir", str(tmp_path), *tiny, "--run-name", "c"]
    killed = o2o.main(tyro.cli(o2o.Args, args=[*argv, "--stop-after", "200"]))
    online = torch.load(Path(killed["run_dir"]) / "online.pt", weights_only=True)
    assert 30 <= online["o2o"]["run"]["t"] <= 200
    res = o2o.main(tyro.cli(o2o.Args, args=argv))
    assert "online" in res["reused_phases"] and res["budget"]["checkpoint_every"] == 300 // 10
    assert json.loads((Path(killed["run_dir"]) / "results.json").read_text())["budget"]["checkpoint_every"] == 30


# ---------------------------------------------------------------- wiring: what each phase's update receives
# The math above can be right and the phases still wired wrong (the wrong alpha, critic, optimiser, flag or threshold
# reaching an update). These tests run main() and spy on the update functions it calls: they record what an update
# receives before it runs, then compare the update with one computed by hand, or check the state handed between phases.
ALPHA0, EPS0, EPS_END = 0.2, 0.125, 2.0  # FAMILY_DEFAULTS["medium"]
R_STEPS, A_STEPS, ONLINE, STARTS, UTD, CLIP, TIME_LIMIT = 20, 20, 60, 30, 3, 0.25, 12
WIRING = ["--reevaluate-steps", str(R_STEPS), "--align-steps", str(A_STEPS), "--online-steps", str(ONLINE), "--learning-starts", str(STARTS),
          "--utd", str(UTD), "--constraint-horizon", str(ONLINE), "--eval-every", str(ONLINE), "--eval-episodes", "1", "--headline-eval-episodes", "0", "--batch-size", "32",
          "--log-every", "10", "--checkpoint-every", "1000", "--distill-steps", "10", "--device", "cpu"]


def wiring_run(ckpt: Path, run_dir: Path, *extra: str) -> dict:
    return o2o.main(tyro.cli(o2o.Args, args=["--env", "hopper-medium-v2", "--checkpoint", str(ckpt), "--run-dir", str(run_dir), *WIRING, *extra]))


def spy(monkeypatch, name: str, before: Callable[[int, tuple, dict], dict], after: Callable[[int, tuple, dict], dict] | None = None) -> list[dict]:
    """Wrap the script's update `name` (main binds it at call time): each call appends before(i, args, kwargs), taken
    before the update changes anything, plus its metrics and after(i, args, kwargs)."""
    orig, calls = getattr(o2o, name), []

    def wrapper(*args, **kwargs):
        rec = before(len(calls), args, kwargs)
        out = orig(*args, **kwargs)
        rec["out"] = {k: v.detach().clone() for k, v in out.items()}
        if after is not None:
            rec.update(after(len(calls), args, kwargs))
        calls.append(rec)
        return out

    monkeypatch.setattr(o2o, name, wrapper)
    return calls


def flat(module_or_sd) -> torch.Tensor:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, torch.nn.Module) else module_or_sd
    return torch.cat([v.detach().reshape(-1).float() for v in sd.values()]).clone()


def adam_steps(opt: torch.optim.Optimizer) -> set[int]:
    """The step counts of an Adam's parameters (empty for a fresh one)."""
    return {int(st["step"]) for st in opt.state.values()}


def snapshot(args: tuple, kwargs: dict, names: Sequence[str]) -> dict:
    """Deep copies of the positional args named (modules, the batch) and the RNG state, so the update can be redone."""
    out = {n: copy.deepcopy(a) for n, a in zip(names, args) if n}
    return out | {"rng": torch.get_rng_state(), "kwargs": dict(kwargs)}


@pytest.fixture
def short_episodes(monkeypatch) -> list:
    """The script's make_env with a TIME_LIMIT-step time limit, so the tiny runs reach truncations; records the
    (terminated, truncated) and reward of every step of every env it makes (the training env is made last)."""
    orig, envs = o2o.make_env, []

    class Recorder(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.ends: list[tuple[bool, bool]] = []
            self.rewards: list[float] = []

        def step(self, action):
            out = super().step(action)
            self.ends.append((bool(out[2]), bool(out[3])))
            self.rewards.append(float(out[1]))
            return out

    def make_env(spec: str):
        envs.append(Recorder(gym.wrappers.TimeLimit(orig(spec), TIME_LIMIT)))
        return envs[-1]

    monkeypatch.setattr(o2o, "make_env", make_env)
    return envs


@pytest.fixture
def online_adds(monkeypatch) -> list[tuple[float, float]]:
    """(reward, terminal) of every single transition added to a replay buffer (the online env steps)."""
    orig, adds = o2o.ReplayBuffer.add, []

    def add(self, obs, actions, rewards, next_obs, terminals):
        if len(rewards) == 1:
            adds.append((float(torch.as_tensor(rewards).reshape(-1)[0]), float(torch.as_tensor(terminals).reshape(-1)[0])))
        return orig(self, obs, actions, rewards, next_obs, terminals)

    monkeypatch.setattr(o2o.ReplayBuffer, "add", add)
    return adds


def spy_online(monkeypatch) -> tuple[list[dict], list[float]]:
    """Per online update: its flags, the KL threshold it reads, log lam before and after; at the first call also the
    starting state (alpha, critics, target critics, optimiser step counts); the actor's gradient norm at each step."""
    norms: list[float] = []

    def before(i, args, kwargs):
        actor, _, qf, qf_target, log_alpha, log_lam, opts, _, eps_t = args
        rec = {"update_lam": kwargs["update_lam"], "update_actor": kwargs["update_actor"], "eps": eps_t.item(), "log_lam": log_lam.item(),
               "clip": kwargs.get("actor_grad_clip")}
        if i == 0:
            rec |= {"log_alpha": log_alpha.item(), "qf": flat(qf), "qf_target": flat(qf_target), "actor": flat(actor),
                    "steps": {k: adam_steps(o) for k, o in opts.items()}, "actor_opt": id(opts["actor"]),
                    "lambda_lr": float(opts["lambda"].param_groups[0]["lr"])}
            step = opts["actor"].step

            def recording_step(*a, **k):  # the actor's gradient as Adam sees it, after any clipping
                norms.append(torch.cat([p.grad.reshape(-1) for p in actor.parameters() if p.grad is not None]).norm().item())
                return step(*a, **k)

            opts["actor"].step = recording_step
        return rec

    return spy(monkeypatch, "online_update", before, lambda i, args, kwargs: {"log_lam_after": args[5].item()}), norms


def test_wiring_of_every_phase(offline_checkpoints, short_episodes, online_adds, monkeypatch, tmp_path):
    """O2SAC end to end: each phase's update checked against the paper's objectives (re-evaluation, value alignment,
    constrained fine-tuning), and the state handed between phases against the official code."""
    re_calls = spy(monkeypatch, "reevaluate_update", lambda i, args, kw: snapshot(args, kw, ["pi0", "qf", "qf_target", "", "b"]) if i == 0 else {})
    al_calls = spy(monkeypatch, "align_update", lambda i, args, kw: {"target": flat(args[3]), "qf_steps": adam_steps(args[4]),
                   "actor_steps": adam_steps(args[5])} | (snapshot(args, kw, ["pi0", "actor", "qf", "qf_target", "", "", "b"]) if i == 0 else {}))
    on_calls, norms = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints["cql"], tmp_path, "--actor-grad-clip", str(CLIP), "--align-actor", "train")  # the paper's alignment
    d = Path(res["run_dir"])
    assert len(re_calls) == R_STEPS and len(al_calls) == A_STEPS and len(on_calls) == (ONLINE - STARTS) * UTD

    # re-evaluation: y = r + gamma (1 - d) [min_i Qbar_i(s', a') - alpha0 log pi0(a'|s')] with a' SAMPLED from pi0
    s = re_calls[0]
    assert s["kwargs"]["alpha0"] == ALPHA0
    b = s["b"]
    torch.set_rng_state(s["rng"])
    with torch.no_grad():
        next_a, next_logp = s["pi0"].sample(b["next_obs"])
        y = b["rewards"] + 0.99 * (1 - b["terminals"]) * (s["qf_target"](b["next_obs"], next_a).min(0).values - ALPHA0 * next_logp)
        expected = ((s["qf"](b["obs"], b["actions"]) - y) ** 2).mean(-1).sum()
    torch.testing.assert_close(s["out"]["qf_loss"], expected)

    # alignment: targets from re-evaluation's Polyak target critics, frozen for the whole phase; anchor term kept
    re_ck = torch.load(d / "reevaluated.pt", weights_only=True)
    ev_target, ev_qf = flat(re_ck["critics"]["qf_target"]), flat(re_ck["critics"]["qf"])
    assert not torch.equal(ev_target, ev_qf), "the re-evaluation's target critics must be its Polyak averages"
    for c in al_calls:
        torch.testing.assert_close(c["target"], ev_target, rtol=0, atol=0)
    s = al_calls[0]
    obs = s["b"]["obs"]
    torch.set_rng_state(s["rng"])
    with torch.no_grad():
        an, logp_an = s["actor"].sample(obs)
        mu0, log_std0 = s["pi0"](obs)
        a_star = torch.tanh(mu0)
        q_star = s["qf_target"](obs, a_star).min(0).values
        y = torch.minimum(q_star - ALPHA0 * (o2o.tanh_gaussian_log_prob(mu0, log_std0, mu0) - s["pi0"].log_prob(obs, an)),
                          s["qf_target"](obs, an).min(0).values)
        expected = ((s["qf"](obs, a_star) - q_star) ** 2).mean(-1).sum() + ((s["qf"](obs, an) - y) ** 2).mean(-1).sum()
        actor_loss = (ALPHA0 * logp_an - s["qf"](obs, an).min(0).values).mean()
    torch.testing.assert_close(s["out"]["qf_loss"], expected)
    torch.testing.assert_close(s["out"]["actor_loss"], actor_loss)
    assert s["kwargs"]["alpha0"] == ALPHA0

    # optimisers carried as the official code: one critic Adam re-evaluation -> alignment -> online, one actor Adam
    # alignment -> online; the phase checkpoints hold them
    assert (al_calls[0]["qf_steps"], al_calls[0]["actor_steps"]) == ({R_STEPS}, set())
    assert on_calls[0]["steps"]["qf"] == {R_STEPS + A_STEPS} and on_calls[0]["steps"]["actor"] == {A_STEPS}
    assert {int(st["step"]) for st in re_ck["o2o"]["optimizers"]["qf"]["state"].values()} == {R_STEPS}
    al_ck = torch.load(d / "aligned.pt", weights_only=True)
    assert {int(st["step"]) for st in al_ck["o2o"]["optimizers"]["qf"]["state"].values()} == {R_STEPS + A_STEPS}
    assert {int(st["step"]) for st in al_ck["o2o"]["optimizers"]["actor"]["state"].values()} == {A_STEPS}

    # start of online: Qbar <- Q after alignment, alpha starts at alpha0
    torch.testing.assert_close(on_calls[0]["qf_target"], on_calls[0]["qf"], rtol=0, atol=0)
    assert on_calls[0]["log_alpha"] == pytest.approx(math.log(ALPHA0))
    assert res["online_start"] == {"alpha_from": "alpha0", "alpha": pytest.approx(ALPHA0), "qf_target_from": "aligned_critics"}
    assert res["reward_handling"] == "raw" and res["reward_transform"] == {"scale": 1.0, "shift": 0.0}

    # constrained fine-tuning: lam steps once per env step (the first of the utd updates) and only then; every
    # update reads the loosening threshold eps_t of its env step t
    for j, c in enumerate(on_calls):
        t = STARTS + 1 + j // UTD
        assert c["update_lam"] == (j % UTD == 0), j
        assert (c["log_lam_after"] != c["log_lam"]) == c["update_lam"], j
        assert c["eps"] == pytest.approx(o2o.constraint_threshold(t, EPS0, EPS_END, ONLINE), rel=1e-6), j
    assert on_calls[-1]["eps"] > on_calls[0]["eps"] + 0.5
    # --actor-grad-clip reaches the update: the actor's gradient norm never exceeds it, and it did bind
    assert {c["clip"] for c in on_calls} == {CLIP} and len(norms) == len(on_calls)
    assert max(norms) == pytest.approx(CLIP, rel=1e-4) and all(n <= CLIP * (1 + 1e-5) for n in norms)

    # online transitions: one per env step, terminal only at a true termination, never at a time-limit end (the
    # training env is the last one made; the tiny time limit makes truncations happen)
    ends = short_episodes[-1].ends
    assert len(online_adds) == len(ends) == ONLINE
    assert sum(trunc and not term for term, trunc in ends) >= 2, ends
    assert [d for _, d in online_adds] == [float(term) for term, _ in ends]
    assert [r for r, _ in online_adds] == pytest.approx(short_episodes[-1].rewards, rel=1e-6)  # raw rewards for new critics


def test_wiring_of_reused_phases(offline_checkpoints, monkeypatch, tmp_path):
    """A reused reevaluated.pt / aligned.pt continues with its critics, target critics and optimiser states."""
    wiring_run(offline_checkpoints["cql"], tmp_path, "--align-actor", "train", "--run-name", "r")
    d = tmp_path / "o2o_sac" / "hopper-medium-v2" / "r"
    re_target = flat(torch.load(d / "reevaluated.pt", weights_only=True)["critics"]["qf_target"])
    # aligned.pt reused: online starts with both optimisers as alignment left them
    (d / "online.pt").unlink()
    on_calls, _ = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints["cql"], tmp_path, "--align-actor", "train", "--run-name", "r", "--online-steps", str(STARTS + 1))
    assert set(res["reused_phases"]) == {"reevaluated", "aligned"}
    assert on_calls[0]["steps"]["qf"] == {R_STEPS + A_STEPS} and on_calls[0]["steps"]["actor"] == {A_STEPS}
    torch.testing.assert_close(on_calls[0]["qf_target"], on_calls[0]["qf"], rtol=0, atol=0)
    # reevaluated.pt reused, alignment recomputed: from the re-evaluation's target critics and critic Adam
    unfinish(d)
    al_calls = spy(monkeypatch, "align_update", lambda i, args, kw: {"qf_target": flat(args[3]), "qf_steps": adam_steps(args[4])})
    on_calls, _ = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints["cql"], tmp_path, "--align-actor", "train", "--run-name", "r", "--online-steps", str(STARTS + 1), "--align-steps", "5")
    assert res["reused_phases"] == ["reevaluated"] and len(al_calls) == 5
    assert al_calls[0]["qf_steps"] == {R_STEPS}
    for c in al_calls:
        torch.testing.assert_close(c["qf_target"], re_target, rtol=0, atol=0)
    assert on_calls[0]["steps"]["qf"] == {R_STEPS + 5} and on_calls[0]["steps"]["actor"] == {5}


@pytest.mark.parametrize("algo", ["cql", "bc"])
def test_naive_continues_what_the_checkpoint_holds(algo, offline_checkpoints, monkeypatch, tmp_path):
    """--no-reevaluate --no-align --no-constraint: the checkpoint's critics, target critics and learned alpha (CQL);
    a checkpoint without them (BC) gets new critics, a copy as targets and alpha0."""
    ck = torch.load(offline_checkpoints[algo], weights_only=True)
    on_calls, _ = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints[algo], tmp_path, "--no-reevaluate", "--no-align", "--no-constraint", "--online-steps", str(STARTS + 1))
    first = on_calls[0]
    assert not first["update_lam"]
    if algo == "cql":
        ts = ck["train_state"]
        assert not torch.equal(flat(ts["modules"]["qf_target"]), flat(ck["critics"]["qf"])), "the test needs targets that differ from the critics"
        torch.testing.assert_close(first["qf"], flat(ck["critics"]["qf"]), rtol=0, atol=0)
        torch.testing.assert_close(first["qf_target"], flat(ts["modules"]["qf_target"]), rtol=0, atol=0)
        assert first["log_alpha"] == pytest.approx(float(ts["log_alpha"].reshape(-1)[0]))
        assert abs(first["log_alpha"] - math.log(ALPHA0)) > 1e-3, "the test needs a learned alpha that differs from alpha0"
        assert res["online_start"]["alpha_from"] == "checkpoint" and res["online_start"]["qf_target_from"] == "checkpoint"
        assert res["reward_handling"] == "checkpoint" and res["reward_transform"] == ck["reward_transform"]
    else:
        assert ck["critics"] is None
        torch.testing.assert_close(first["qf_target"], first["qf"], rtol=0, atol=0)
        assert first["log_alpha"] == pytest.approx(math.log(ALPHA0))
        assert res["online_start"]["alpha_from"] == "alpha0" and res["online_start"]["qf_target_from"] == "critics_copy"
        assert res["reward_handling"] == "raw"


@pytest.mark.parametrize("extra,handling", [(["--no-reevaluate", "--no-align", "--no-constraint"], "checkpoint"),
                                            (["--reevaluate-steps", "5", "--no-align"], "raw")])
def test_rewards_follow_the_critic(extra, handling, offline_checkpoints, short_episodes, online_adds, tmp_path):
    """IQL's checkpoint scales rewards by 1000 / return range: a run that keeps its critic (naive) keeps that scale,
    a run that learns new critics (re-evaluation) sees raw rewards; results.json says which."""
    ck = torch.load(offline_checkpoints["iql"], weights_only=True)
    scale, shift = (ck["reward_transform"]["scale"], ck["reward_transform"]["shift"]) if handling == "checkpoint" else (1.0, 0.0)
    assert ck["reward_transform"]["scale"] != 1.0
    res = wiring_run(offline_checkpoints["iql"], tmp_path, *extra, "--online-steps", str(STARTS + 1))
    assert res["reward_handling"] == handling and res["reward_transform"] == {"scale": scale, "shift": shift}
    env_rewards = short_episodes[-1].rewards
    assert [r for r, _ in online_adds] == pytest.approx([r * scale + shift for r in env_rewards], rel=1e-5)


# ---------------------------------------------------------------- diagnostics, --align-actor, --budget-scale through main
def test_diagnostics_in_results_and_tensorboard(offline_checkpoints, tmp_path):
    """Default schedules: the actor evaluated every align_steps // 10 alignment steps, 5 extra online evaluations
    inside the first tenth (which --reference interval does not count), the boundary diagnostics finite everywhere."""
    res = wiring_run(offline_checkpoints["cql"], tmp_path)
    d = Path(res["run_dir"])
    saved = json.loads((d / "results.json").read_text())
    diag = saved["diagnostics"]
    align_steps = list(range(A_STEPS // 10, A_STEPS + 1, A_STEPS // 10))
    assert [p["step"] for p in saved["curve"] if p["phase"] == "align"] == align_steps
    assert [s for s, _ in diag["align_scores"]] == align_steps and diag["align_eval_every"] == A_STEPS // 10
    early = [ONLINE * k // 50 for k in range(1, 6)]  # floor(60 / 10 * k / 5) = 1, 2, 3, 4, 6
    assert diag["early_eval_steps"] == early and saved["evals_in_first_tenth"] == 5
    assert [p["step"] for p in saved["curve"] if p["phase"] == "online"] == [0, *early, ONLINE]
    assert diag["states"] == 2048 and diag["samples_per_state"] == o2o.DIAG_SAMPLES
    assert list(diag["boundaries"]) == list(o2o.BOUNDARIES)
    for name, st in diag["boundaries"].items():
        assert set(st) == DIAG_KEYS and all(math.isfinite(v) for v in st.values()), name
    sc = scalars(d)
    assert len(sc["align/normalized_score"]) == len(align_steps)
    for k in DIAG_KEYS:
        assert len(sc[f"diagnostics/{k}"]) == len(o2o.BOUNDARIES), k
    # only the --eval-every evaluation (the last one, at step 60) counts towards --reference interval's cadence
    assert torch.load(d / "online.pt", weights_only=True)["o2o"]["run"]["n_evals"] == 1


@pytest.mark.parametrize("align_actor", ["train", "frozen"])
def test_align_actor(align_actor, offline_checkpoints, monkeypatch, tmp_path):
    """--align-actor frozen: the actor leaves alignment bit-identical to pi0 (train: it moved) and online starts from
    it with the aligned critics; either way the one actor Adam goes on into online (frozen: with no state yet)."""
    al_calls = spy(monkeypatch, "align_update", lambda i, args, kw: {"actor_opt": id(args[5]), "train_actor": kw["train_actor"],
                                                                        "qf_steps": adam_steps(args[4])})
    on_calls, _ = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints["cql"], tmp_path, "--align-actor", align_actor, "--online-steps", str(STARTS + 1),
                     "--align-eval-every", "0", "--early-evals", "0")
    frozen = align_actor == "frozen"
    assert res["mode"]["align_actor"] == align_actor and len(al_calls) == A_STEPS
    assert {c["train_actor"] for c in al_calls} == {not frozen}
    al_ck = torch.load(Path(res["run_dir"]) / "aligned.pt", weights_only=True)
    pi0, aligned = flat(al_ck["o2o"]["pi0"]), flat(al_ck["actor"])
    assert torch.equal(aligned, pi0) == frozen
    torch.testing.assert_close(on_calls[0]["actor"], aligned, rtol=0, atol=0)
    assert on_calls[0]["actor_opt"] == al_calls[0]["actor_opt"]
    assert on_calls[0]["steps"]["actor"] == (set() if frozen else {A_STEPS})
    # the critics align in both modes; the frozen actor keeps the offline score at the start of online
    assert on_calls[0]["steps"]["qf"] == {R_STEPS + A_STEPS}
    if frozen:
        assert res["online_start_score"] == res["offline_score"]


def test_fqe_gap_extrapolates_a_geometric_approach():
    q = [100 * (1 - 0.5 ** k) for k in range(1, 6)]  # heading for 100
    assert o2o.fqe_gap(q[:3]) == pytest.approx(100 - q[2])
    assert o2o.fqe_gap(q) == pytest.approx(100 - q[-1])
    assert o2o.fqe_gap(q[:2]) == math.inf  # too few readings
    assert o2o.fqe_gap([0.0, 10.0, 25.0]) == math.inf  # changes growing: not contracting yet
    assert o2o.fqe_gap([50.0, 51.0, 50.5]) == pytest.approx(0.5)  # wandering around the limit
    assert o2o.fqe_gap([3.0, 3.0, 3.0]) == 0.0
    assert o2o.fqe_converged(q, 0.07) and not o2o.fqe_converged(q, 0.04)  # readings 4 and 5 pass 7% (gap 6.25 against 93.75), not 4%
    assert not o2o.fqe_converged([1.0, 1.0, 1.0, 1.0], 0.0)  # tol 0 = never: the paper's fixed step count


def test_fqe_stop_needs_two_consecutive_passing_readings():
    """halfcheetah-medium's probe: 72.7, 141.1, 148.0 looks converged (gap 0.77 < 1% of 148) where the fast first fit bends
    into a slow growth (162.1 next, 171 after 10k steps); the rule waits for a second passing reading, which the growth denies."""
    hc = [72.7, 141.1, 148.0]
    assert o2o.fqe_gap(hc) <= 0.01 * hc[-1]  # one reading passes ...
    assert not o2o.fqe_converged(hc, 0.01) and not o2o.fqe_converged([*hc, 160.0], 0.01)  # ... the next one does not
    q = [100 * (1 - 0.5 ** k) for k in range(1, 9)]  # gaps 100 * 0.5 ** k against ~100
    assert not o2o.fqe_converged(q[:6], 0.02)  # only reading 6 passes (gap 1.56); reading 5's 3.125 does not
    assert o2o.fqe_converged(q[:7], 0.02)  # readings 6 and 7 pass


@pytest.mark.parametrize("tol", [0.0, 0.5])
def test_reevaluation_stops_once_converged(tol, offline_checkpoints, monkeypatch, tmp_path):
    """The stopping rule reads the re-evaluation's target critics on the fixed probe every REEVAL_CHECK_EVERY steps and
    ends the phase at the first converged reading (tol 0: every --reevaluate-steps); --reevaluate-tau reaches the
    re-evaluation update only, and the steps done go to results.json and reevaluated.pt."""
    monkeypatch.setattr(o2o, "REEVAL_CHECK_EVERY", 4)
    re_calls = spy(monkeypatch, "reevaluate_update", lambda i, args, kw: {"tau": kw["tau"]})
    on_calls = spy(monkeypatch, "online_update", lambda i, args, kw: {"tau": kw["tau"]})
    readings: list[list[float]] = []
    orig_gap = o2o.fqe_gap

    def gap(history):  # the gap passes from the third reading on, whatever the values: the rule ends at the fourth
        readings.append(list(history))
        return 0.0 if len(history) >= 3 else orig_gap(history)

    monkeypatch.setattr(o2o, "fqe_gap", gap)
    probe_values: list[float] = []
    orig_update = o2o.reevaluate_update

    def update(pi0, qf, qf_target, *a, **kw):  # the value the probe must read after this step
        out = orig_update(pi0, qf, qf_target, *a, **kw)
        probe_values.append(float(qf_target(probe_obs[0], probe_obs[1]).mean()) if probe_obs else float("nan"))
        return out

    probe_obs: list = []
    orig_diag = o2o.boundary_diagnostics

    def diag(actor, pi0, qf, obs, actions, **kw):  # the diagnostics' fixed (s, a) pairs are the probe's
        if not probe_obs:
            probe_obs.extend([obs, actions])
        return orig_diag(actor, pi0, qf, obs, actions, **kw)

    monkeypatch.setattr(o2o, "boundary_diagnostics", diag)
    monkeypatch.setattr(o2o, "reevaluate_update", update)
    res = wiring_run(offline_checkpoints["iql"], tmp_path, "--reevaluate-tol", str(tol), "--reevaluate-tau", "0.05", "--align-eval-every", "0")
    steps = 16 if tol else R_STEPS
    assert len(re_calls) == len(probe_values) == steps and {c["tau"] for c in re_calls} == {0.05}
    assert {c["tau"] for c in on_calls} == {0.005}  # online keeps --tau
    info = res["reevaluation"]
    assert (info["steps"], info["cap"], info["converged"], info["tau"], info["tol"]) == (steps, R_STEPS, bool(tol), 0.05, tol)
    assert info["q_probe"] == pytest.approx([probe_values[k - 1] for k in range(4, steps + 1, 4)], rel=1e-6)
    assert torch.load(Path(res["run_dir"]) / "reevaluated.pt", weights_only=True)["grad_steps"] == steps


def episode_count_evaluator(self, act, n_episodes=None):
    """Evaluator.__call__ stand-in whose every return is the number of episodes asked for (the curve's "return")."""
    n = len(self.envs[:n_episodes])
    return np.full(n, float(n))


def test_headline_evaluations_use_more_episodes(offline_checkpoints, monkeypatch, tmp_path):
    """--headline-eval-episodes reaches exactly the evaluations results.json's headline numbers rest on (offline,
    distilled, after alignment, every online evaluation in the first tenth, the last one); the evaluations during
    alignment and the rest of online use --eval-episodes."""
    monkeypatch.setattr(o2o.Evaluator, "__call__", episode_count_evaluator)
    res = wiring_run(offline_checkpoints["iql"], tmp_path, "--headline-eval-episodes", "3", "--align-eval-every", "10", "--early-evals", "2",
                     "--eval-every", "20")
    got = [(p["phase"], p["step"], p["return"]) for p in res["curve"]]
    assert got == [("offline", 0, 3), ("distilled", 0, 3), ("align", 10, 1), ("align", 20, 1), ("aligned", 0, 3), ("online", 0, 3),
                   ("online", 3, 3), ("online", 6, 3), ("online", 20, 1), ("online", 40, 1), ("online", 60, 3)]


def test_evaluator_subset_starts_where_the_full_evaluation_does():
    """An evaluation of the first n episodes replays the first n of a full one (same start seeds, same returns)."""
    env = gym.make("Hopper-v5")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    ev = o2o.Evaluator("Hopper-v5", 3, 7, np.zeros(obs_dim), np.ones(obs_dim), torch.device("cpu"))
    w = torch.linspace(-0.3, 0.3, obs_dim * act_dim).reshape(obs_dim, act_dim)
    act = lambda o: torch.tanh(o @ w)  # noqa: E731
    full, part = ev(act), ev(act, 2)
    ev.close()
    assert len(full) == 3 and len(part) == 2 and np.array_equal(part, full[:2]) and len(set(full.tolist())) == 3


def test_budget_scale_halves_every_budget(offline_checkpoints, monkeypatch, tmp_path):
    """--budget-scale 0.5: every step budget and schedule given or defaulted is halved, the lambda lr doubled."""
    counts = {n: spy(monkeypatch, n, lambda i, args, kw: {}) for n in ("distill_update", "reevaluate_update", "align_update")}
    on_calls, _ = spy_online(monkeypatch)
    res = wiring_run(offline_checkpoints["iql"], tmp_path, "--budget-scale", "0.5", "--align-eval-every", "4", "--early-evals", "0")
    on, starts, horizon = ONLINE // 2, STARTS // 2, ONLINE  # the horizon is not scaled (no --scale-constraint-horizon)
    assert [len(counts[n]) for n in counts] == [10, R_STEPS // 2, A_STEPS // 2]  # distillation is not scaled
    assert len(on_calls) == (on - starts) * UTD
    for j, c in enumerate(on_calls):  # the KL threshold loosens per env step over the given horizon
        assert c["eps"] == pytest.approx(o2o.constraint_threshold(starts + 1 + j // UTD, EPS0, EPS_END, horizon), rel=1e-6), j
    assert on_calls[0]["lambda_lr"] == pytest.approx(5e-5 / 0.5)
    assert [p["step"] for p in res["curve"] if p["phase"] == "align"] == [2, 4, 6, 8, 10]
    assert [p["step"] for p in res["curve"] if p["phase"] == "online"] == [0, on] and res["online_steps_done"] == on
    sc = scalars(Path(res["run_dir"]))
    assert len(sc["reevaluate/qf_loss"]) == 2 and len(sc["losses/qf_loss"]) == 3  # log every 5: steps 5, 10; env steps 20, 25, 30
    assert res["budget_scale"] == 0.5 and res["budget"] == {"reevaluate_steps": R_STEPS // 2, "align_steps": A_STEPS // 2, "online_steps": on,
                             "pre_sample_steps": 2500, "learning_starts": starts, "constraint_horizon": horizon, "eval_every": on,
                             "align_eval_every": 2, "checkpoint_every": 500, "log_every": 5, "stop_after": None,
                             "lambda_lr": pytest.approx(1e-4)}
    # args.json keeps the flags as given
    given = json.loads((Path(res["run_dir"]) / "args.json").read_text())
    assert (given["budget_scale"], given["online_steps"], given["lambda_lr"]) == (0.5, ONLINE, 5e-5)


def test_budget_scale_rounds_and_keeps_zero():
    eff = o2o.resolve_budgets(o2o.Args(budget_scale=0.03, learning_starts=0, align_eval_every=0))
    assert (eff.reevaluate_steps, eff.online_steps, eff.constraint_horizon, eff.eval_every, eff.pre_sample_steps) == (15_000, 3_000, 100_000, 30, 150)
    squeezed = o2o.resolve_budgets(o2o.Args(budget_scale=0.03, scale_constraint_horizon=True))
    assert (squeezed.constraint_horizon, squeezed.online_steps) == (3_000, 3_000)  # the threshold's schedule compressed too
    assert (eff.learning_starts, eff.align_eval_every, eff.stop_after) == (0, 0, None)  # 0 and None are not step counts
    assert eff.lambda_lr == pytest.approx(5e-5 / 0.03)
    assert o2o.resolve_budgets(o2o.Args(budget_scale=1e-6, learning_starts=0)).eval_every == 1  # at least 1
    assert o2o.resolve_budgets(o2o.Args()).align_eval_every == 50_000  # default align_steps // 10
    assert o2o.resolve_budgets(o2o.Args(budget_scale=0.1)).align_eval_every == 5_000  # of the scaled budget


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
    (["--budget-scale", "0"], "--budget-scale must be a positive number"),
    (["--early-evals", "-1"], "must be >= 0"),
    (["--online-steps", "1001", "--learning-starts", "1000", "--budget-scale", "0.0001"], "after --budget-scale 0.0001"),
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


def test_distillation_mode_fit_matches_the_offline_action():
    """--distill-fit mode: the student's mode tanh(mu), the action evaluated, lands on the teacher's action far closer
    than the plain likelihood fit puts it (here a Gaussian teacher whose means sit near the box edge, so its clipped
    samples are skewed), while the student keeps the teacher's spread."""
    torch.manual_seed(0)
    teacher = o2o.GaussianActor(4, 2, (16,))
    with torch.no_grad():
        teacher.net[-1].bias.fill_(1.5)  # tanh(1.5 + ...) ~ 0.9: means near the edge of the action box
        teacher.log_std.fill_(math.log(0.3))
    obs = torch.randn(4096, 4)

    def fit(mode: bool):
        torch.manual_seed(1)
        student = o2o.TanhGaussianActor(4, 2, (32, 32))
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        for _ in range(400):
            o = obs[torch.randint(len(obs), (256,))]
            with torch.no_grad():
                t = o2o.distill_targets(teacher, o, 0.1)
            o2o.distill_update(student, opt, o, t, teacher.act(o) if mode else None)
        with torch.no_grad():
            return (student.act(obs) - teacher.act(obs)).pow(2).mean().item(), student(obs)[1].exp().mean().item()

    (mse_lik, std_lik), (mse_mode, std_mode) = fit(False), fit(True)
    assert mse_mode < 0.2 * mse_lik
    assert std_mode > 0.5 * std_lik


@pytest.mark.parametrize("fit", ["mode", "likelihood"])
def test_distill_fit_reaches_the_update(fit, offline_checkpoints, monkeypatch, tmp_path):
    """The teacher's deterministic action reaches every distillation step with --distill-fit mode, never with
    likelihood, and the distillation error is measured against that action."""
    calls = spy(monkeypatch, "distill_update", lambda i, args, kw: {"n": len(args), "args": [None if a is None else a.clone() for a in args[2:]]})
    res = wiring_run(offline_checkpoints["iql"], tmp_path, "--distill-fit", fit, "--online-steps", str(STARTS + 1), "--no-align",
                     "--early-evals", "0")
    assert len(calls) == 10
    teacher = o2o.actor_from_checkpoint(torch.load(offline_checkpoints["iql"], weights_only=True))
    for c in calls:
        obs, _, mode = c["args"]
        if fit == "mode":
            torch.testing.assert_close(mode, teacher.act(obs))
        else:
            assert mode is None
    assert res["distillation"]["steps"] == 10


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
        # the constrained twin also clips the actor's gradient norm (--reference interval on hopper's expert data)
        fn = functools.partial(o2o.online_update, actor, pi_ref, qf, qf_target, log_alpha, log_lam, opts,
                               target_entropy=-float(ACT), gamma=0.99, tau=0.005, kl_floor=-50.0,
                               actor_grad_clip=0.05 if phase == "online_constrained" else None)
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


def test_track_without_wandb_fails_before_anything(tmp_path, capsys, monkeypatch):
    """--track with wandb not installed: one line on stderr and exit 2, before any dataset, checkpoint or folder is touched."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit) as e:
        o2o.main(tyro.cli(o2o.Args, args=["--track", "--run-dir", str(tmp_path / "runs")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--track needs wandb" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


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
