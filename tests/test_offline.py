"""offline_pretrain.py: loss pieces on hand-checked tensors, smoke runs of every method, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from conftest import TINY_OFFLINE, load_script, wandb_offline, wandb_offline_run

op = load_script("offline_pretrain")


# ---------------------------------------------------------------- math
def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mu, log_std = torch.randn(5, 3), torch.randn(5, 3).clamp(-2, 1)
    u = torch.randn(5, 3) * 2
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, log_std.exp()), [torch.distributions.TanhTransform()])
    expected = dist.log_prob(torch.tanh(u)).sum(-1)
    got = op.tanh_gaussian_log_prob(mu, log_std, u)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tanh_gaussian_actor_log_prob_of_own_sample():
    torch.manual_seed(0)
    actor = op.TanhGaussianActor(4, 2, (16, 16))
    obs = torch.randn(8, 4)
    a, logp = actor.sample(obs)
    torch.testing.assert_close(actor.log_prob(obs, a), logp, atol=1e-3, rtol=1e-3)
    assert actor.act(obs).abs().max() < 1


def test_td_target_termination_vs_truncation():
    r, next_v = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    # a true termination stops bootstrapping; a time-limit end (terminal = 0) bootstraps
    y = op.td_target(r, torch.tensor([1.0, 0.0]), next_v, 0.9)
    torch.testing.assert_close(y, torch.tensor([1.0, 10.0]))


def test_cql_penalty_hand_computed():
    # one critic, one state, one sample per proposal, |A| = 1
    q_data = torch.tensor([[1.0]])
    q_rand, q_pi, q_next = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]]), torch.tensor([[[0.0]]])
    logp_pi, logp_next = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    terms = [1.0 - math.log(0.5), 0.0 + 1.0, 2.0 - 0.5]
    expected = math.log(sum(math.exp(t) for t in terms)) - 1.0
    got = op.cql_penalty(q_data, q_rand, q_pi, q_next, logp_pi, logp_next, act_dim=1)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # temperature: temp * logsumexp(x / temp)
    got_t = op.cql_penalty(q_data, q_rand, q_pi, q_next, logp_pi, logp_next, act_dim=1, temp=2.0)
    assert got_t.item() == pytest.approx(2.0 * math.log(sum(math.exp(t / 2.0) for t in terms)) - 1.0, abs=1e-5)


def test_expectile_loss_and_iql_weights():
    torch.testing.assert_close(op.expectile_loss(torch.tensor([-2.0, 1.0, 0.0]), 0.7), torch.tensor([0.3 * 4, 0.7 * 1, 0.0]))
    w = op.iql_weights(torch.tensor([0.0, 1.0, 10.0]), beta=3.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), 100.0]))


def test_td3_bc_actor_loss_normalises_q():
    q = torch.tensor([1.0, -3.0])  # mean |Q| = 2 -> lambda = 2.5 / 2
    pi, a = torch.tensor([[0.5], [0.0]]), torch.tensor([[0.0], [0.0]])
    got = op.td3_bc_actor_loss(q, pi, a, alpha=2.5)
    assert got.item() == pytest.approx(-1.25 * -1.0 + 0.125)
    # scaling Q leaves the loss unchanged: that is the point of the normalisation
    assert op.td3_bc_actor_loss(10 * q, pi, a, alpha=2.5).item() == pytest.approx(got.item())


def test_fused_critic_equals_members_one_by_one():
    torch.manual_seed(0)
    critic = op.Critic(3, 2, (8, 8), n=2, layer_norm=True)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    out = critic(obs, act)
    assert out.shape == (2, 5)
    x = torch.cat([obs, act], -1)
    for i in range(2):
        h = x
        for layer in critic.net:
            if isinstance(layer, op.EnsembleLinear):
                h = h @ layer.weight[i] + layer.bias[i]
            elif isinstance(layer, op.EnsembleLayerNorm):
                h = torch.nn.functional.layer_norm(h, h.shape[-1:]) * layer.weight[i] + layer.bias[i]
            else:
                h = layer(h)
        torch.testing.assert_close(out[i], h.squeeze(-1))


def test_orthogonal_init_and_polyak():
    torch.manual_seed(0)
    c = op.orthogonal_init_(op.Critic(4, 0, (8,), n=2))
    w = c.net[0].weight[0]  # (in=4, out=8): rows orthonormal
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)
    assert c.net[0].bias.abs().sum() == 0
    t = op.Critic(4, 0, (8,), n=2)
    before = [p.clone() for p in t.parameters()]
    op.polyak_update(t, c, 0.25)
    for p_t, p_b, p_s in zip(t.parameters(), before, c.parameters()):
        torch.testing.assert_close(p_t, 0.75 * p_b + 0.25 * p_s)


def test_normalized_score():
    assert op.normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    assert op.normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)


def test_replay_buffer_ring_and_sample():
    rb = op.ReplayBuffer(2, 1, capacity=3, device=torch.device("cpu"))
    for i in range(4):
        rb.add(np.full((1, 2), i), np.zeros((1, 1)), np.array([i]), np.zeros((1, 2)), np.array([0.0]))
    assert rb.size == 3 and sorted(rb.data["rewards"].tolist()) == [1.0, 2.0, 3.0]
    assert rb.sample(7)["obs"].shape == (7, 2)


# ---------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("name", ["cql", "iql", "td3_bc", "bc", "bc_det"])
def test_every_method_reaches_evaluation_and_checkpoint(offline_checkpoints, name):
    path = offline_checkpoints[name]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in op.CHECKPOINT_KEYS:
        assert key in ckpt
    assert ckpt["grad_steps"] == 60 and len(ckpt["eval_history"]) == 2
    assert math.isfinite(ckpt["eval_normalized_score"])
    assert ckpt["actor_family"] == {"cql": "tanh_gaussian", "iql": "gaussian", "td3_bc": "deterministic", "bc": "tanh_gaussian", "bc_det": "deterministic"}[name]
    assert (ckpt["critics"] is None) == name.startswith("bc")
    assert list(path.parent.glob("events.out.tfevents.*"))
    if name == "iql":
        assert ckpt["reward_transform"]["scale"] != 1.0


def test_checkpoint_alone_evaluates_to_the_same_score(offline_checkpoints):
    ckpt = op.load_checkpoint(offline_checkpoints["iql"])
    actor = op.actor_from_checkpoint(ckpt)
    ev = op.Evaluator(ckpt["env_spec"], 2, ckpt["args"]["seed"] + 100, ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy(), torch.device("cpu"))
    score = op.normalized_score(ev(actor.act).mean(), ckpt["ref_min_score"], ckpt["ref_max_score"])
    assert score == pytest.approx(ckpt["eval_normalized_score"], abs=1e-6)


def run(tmp_path, *extra, algo="td3_bc"):
    return op.main(tyro.cli(op.Args, args=["--algo", algo, "--env", "hopper-medium-v2", "--run-dir", str(tmp_path), *TINY_OFFLINE, *extra]))


def actor_of(result):
    return torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["actor"]


def test_resume_continues_exactly(tiny_dataset, tmp_path):
    straight = run(tmp_path / "a")
    short = run(tmp_path / "b", "--total-steps", "30")
    folder = Path(short["checkpoint"]).parent
    assert json.loads((folder / "results.json").read_text())["finished"]
    killed = []  # a resumed run: the shorter run's results.json is gone until the longer one finishes
    orig = op.Evaluator.__call__
    op.Evaluator.__call__ = lambda self, act: (killed.append((folder / "results.json").exists()), orig(self, act))[1]
    try:
        resumed = run(tmp_path / "b", "--resume")
    finally:
        op.Evaluator.__call__ = orig
    assert killed == [False]
    saved = json.loads((folder / "results.json").read_text())
    assert saved["schema_version"] == 1 and saved["script"] == "offline_pretrain" and saved["finished"] and saved["grad_steps"] == 60
    assert (saved["algo"], saved["env"], saved["seed"]) == ("td3_bc", "hopper-medium-v2", 0) and set(saved["versions"]) >= {"torch", "minari"}
    assert [h[0] for h in resumed["eval_history"]] == [30, 60]
    assert resumed["eval_history"] == straight["eval_history"]
    for k, v in actor_of(straight).items():
        torch.testing.assert_close(actor_of(resumed)[k], v)


def test_same_seed_same_result(tiny_dataset, tmp_path):
    a, b = run(tmp_path / "a", algo="iql"), run(tmp_path / "b", algo="iql")
    for k, v in actor_of(a).items():
        torch.testing.assert_close(actor_of(b)[k], v, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input -> exit 2, one line, nothing written
def expect_exit2(capsys, fn, *needles):
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_env_and_algo(tiny_dataset, tmp_path, capsys):
    expect_exit2(capsys, lambda: run(tmp_path, "--env", "hopper-mediocre-v2"), "unknown env", "hopper-medium-v2")
    expect_exit2(capsys, lambda: op.main(op.Args(algo="sac", run_dir=str(tmp_path))), "unknown --algo")
    expect_exit2(capsys, lambda: run(tmp_path, "--dataset-id", "no-version"), "malformed dataset id")
    assert not list(tmp_path.iterdir())


def test_nonsensical_step_counts(tiny_dataset, tmp_path, capsys):
    expect_exit2(capsys, lambda: run(tmp_path, "--total-steps", "0"), "--total-steps")
    expect_exit2(capsys, lambda: run(tmp_path, "--eval-every", "-5"), "--eval-every")
    expect_exit2(capsys, lambda: run(tmp_path, "--threads", "0"), "--threads")
    assert not list(tmp_path.iterdir())


def test_threads_flag_sets_torch_threads(tiny_dataset, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(tmp_path, "--threads", "2", "--total-steps", "2", "--eval-every", "2", "--eval-episodes", "1")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_missing_dataset_fails_fast_without_network(tiny_dataset, tmp_path, capsys):
    expect_exit2(capsys, lambda: run(tmp_path, "--env", "walker2d-medium-v2", "--no-download"), "python make_dataset.py --env walker2d-medium-v2")
    t0 = time.time()
    expect_exit2(capsys, lambda: run(tmp_path, "--env", "walker2d-medium-v2"), "make_dataset.py")
    assert time.time() - t0 < 30  # no network here: the probe must not hang
    assert not list(tmp_path.iterdir())


def test_resume_rejects_missing_corrupt_and_foreign_checkpoints(tiny_dataset, offline_checkpoints, tmp_path, capsys):
    expect_exit2(capsys, lambda: run(tmp_path, "--resume"), "no checkpoint")
    ckpt_dir = tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "seed0"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    expect_exit2(capsys, lambda: run(tmp_path, "--resume"), "corrupt")
    (ckpt_dir / "checkpoint.pt").write_bytes(offline_checkpoints["iql"].read_bytes())
    expect_exit2(capsys, lambda: run(tmp_path, "--resume"), "iql")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint.pt"]  # nothing half-written beside it


def test_cli_bad_algo_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    p = subprocess.run([sys.executable, str(ROOT / "offline_pretrain.py"), "--algo", "sac", "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: unknown --algo 'sac'; known: cql, iql, td3_bc, bc"]


# ---------------------------------------------------------------- run folders: resume, extend, overwrite
def ckpt_of(result) -> dict:
    return torch.load(result["checkpoint"], map_location="cpu", weights_only=True)


def actor_lr(ckpt: dict) -> float:
    return float(ckpt["train_state"]["optimizers"]["actor"]["param_groups"][0]["lr"])


def test_resume_with_larger_budget_follows_the_larger_schedule(tiny_dataset, tmp_path):
    """IQL's cosine actor schedule after --resume --total-steps N is that of an uninterrupted run of N steps."""
    straight = run(tmp_path / "a", algo="iql")  # 60 steps
    short = run(tmp_path / "b", "--total-steps", "30", algo="iql")
    at_30 = ckpt_of(short)
    # at the resume point: the learning rate an uninterrupted 60-step schedule has after 30 steps (torch's own
    # CosineAnnealingLR as the reference), not the finished 30-step schedule's 0
    args = tyro.cli(op.Args, args=["--algo", "iql", *op_flags_60()])
    learner = op.IQL(args, at_30["obs_dim"], at_30["act_dim"], torch.device("cpu"))
    op.restore(learner, at_30, args, op.Accel(torch.device("cpu")), tmp_path / "b")
    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=args.iql_lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=60)
    for _ in range(30):
        ref_opt.step()
        ref.step()
    assert learner.opts["actor"].param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9)
    assert learner.opts["actor"].param_groups[0]["lr"] == pytest.approx(args.iql_lr / 2, rel=1e-9)
    # end to end: the resumed run ends where the uninterrupted 60-step run ends (at 0, not climbing back to --iql-lr)
    resumed = run(tmp_path / "b", "--resume", algo="iql")
    assert [h[0] for h in resumed["eval_history"]] == [30, 60]
    assert actor_lr(ckpt_of(resumed)) == pytest.approx(actor_lr(ckpt_of(straight)), abs=1e-12)
    assert actor_lr(ckpt_of(straight)) == pytest.approx(0.0, abs=1e-12)


def op_flags_60() -> list[str]:
    return ["--env", "hopper-medium-v2", *TINY_OFFLINE]  # TINY_OFFLINE: --total-steps 60


def test_unfinished_run_is_not_restarted_silently(tiny_dataset, tmp_path, capsys):
    short = run(tmp_path, "--total-steps", "30")
    ckpt = ckpt_of(short)
    ckpt["args"]["total_steps"] = 60  # as if the 60-step run had been killed after its checkpoint at step 30
    torch.save(ckpt, short["checkpoint"])
    before = (tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "seed0" / "checkpoint.pt").read_bytes()
    expect_exit2(capsys, lambda: run(tmp_path), "unfinished run", "step 30 of 60", "--resume")
    expect_exit2(capsys, lambda: run(tmp_path, "--tau", "0.01"), "unfinished run (step 30 of 60) with other settings", "--tau 0.005 (now 0.01)")
    assert (tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "seed0" / "checkpoint.pt").read_bytes() == before


def test_overwrite_replaces_the_run_and_its_logs(tiny_dataset, tmp_path):
    first = run(tmp_path, "--total-steps", "30")
    folder = Path(first["checkpoint"]).parent
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    second = run(tmp_path, "--overwrite", "--tau", "0.01")
    assert ckpt_of(second)["args"]["tau"] == 0.01 and ckpt_of(second)["grad_steps"] == 60
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # the first run's logs are gone, not mixed in
    assert [h[0] for h in json.loads((folder / "results.json").read_text())["eval_history"]] == [30, 60]


def test_run_name_picks_the_folder(tiny_dataset, tmp_path):
    res = run(tmp_path, "--total-steps", "2", "--eval-every", "2", "--eval-episodes", "1", "--run-name", "lr_sweep.1")
    assert Path(res["checkpoint"]) == tmp_path / "offline" / "td3_bc" / "hopper-medium-v2" / "lr_sweep.1" / "checkpoint.pt"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        op.atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
        op.atomic_save({"x": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    for name in ("c.pt", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_nonfinite_loss_names_only_a_checkpoint_that_exists(tiny_dataset, tmp_path, capsys, monkeypatch):
    calls = {"n": 0, "nan_from": 0}
    real = op.BC.gradient_step

    def poisoned(self, b):
        calls["n"] += 1
        m = real(self, b)
        return {**m, "losses/actor_loss": m["losses/actor_loss"] * float("nan")} if calls["n"] > calls["nan_from"] else m

    monkeypatch.setattr(op.BC, "gradient_step", poisoned)
    err = expect_exit2(capsys, lambda: run(tmp_path / "a", algo="bc"), "non-finite losses/actor_loss at step 10", "no checkpoint was written")
    assert "last good checkpoint" not in err
    assert not list((tmp_path / "a").rglob("checkpoint.pt"))
    calls.update(n=0, nan_from=35)  # NaN after the checkpoint at step 30
    err = expect_exit2(capsys, lambda: run(tmp_path / "b", algo="bc"), "non-finite losses/actor_loss at step 40", "(step 30)")
    path = tmp_path / "b" / "offline" / "bc" / "hopper-medium-v2" / "seed0" / "checkpoint.pt"
    assert f"the last good checkpoint is {path}" in err and path.is_file()
    assert torch.load(path, map_location="cpu", weights_only=True)["grad_steps"] == 30


# ---------------------------------------------------------------- --track (Weights & Biases, CleanRL's convention)
def test_track_without_wandb_fails_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    expect_exit2(capsys, lambda: op.main(tyro.cli(op.Args, args=["--track", "--run-dir", str(tmp_path / "runs")])), "--track needs wandb")
    assert not list(tmp_path.iterdir())


def test_track_mirrors_tensorboard_to_wandb_offline(tiny_dataset, tmp_path, monkeypatch):
    """--track in wandb's offline mode: the run finishes, wandb.finish() closed the wandb run, and the offline wandb run
    next to the run folder holds the tensorboard scalars (synced) and the run's arguments; nothing changes in the run."""
    wandb = pytest.importorskip("wandb")
    wandb_offline(monkeypatch, tmp_path / "wandb_home")
    res = run(tmp_path / "runs", "--track", "--wandb-project-name", "o2o-test")
    out = Path(res["checkpoint"]).parent
    assert json.loads((out / "results.json").read_text())["finished"] and wandb.run is None
    _, history = wandb_offline_run(out)
    for text in ("eval/normalized_score", "losses/qf_loss", "charts/SPS", "td3_bc/hopper-medium-v2/seed0", "td3_bc_alpha"):
        assert text.encode() in history, text
    assert not (out / "wandb").exists()  # wandb's files stay out of the run folder
