"""AntMaze in the three o2o scripts: the family values of the official OCR-CFT AntMaze configs (O2SAC: one critic of 5
layers, raw states, rewards 10 r - 5, alpha0 / lambda0 by maze; O2TD3: critics without LayerNorm, rewards r - 1; O2PPO:
raw rewards, 100 evaluation episodes) reach the networks, the losses and the evaluators, MuJoCo keeps its values, and
each script runs end to end on a tiny random-action stand-in (make_dataset.py) from tiny offline checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
import tyro
from conftest import assert_results_schema, load_script

op = load_script("offline_pretrain")
md = load_script("make_dataset")
sac = load_script("o2o_sac")
td3 = load_script("o2o_td3")
ppo = load_script("o2o_ppo")

ENV = "antmaze-umaze-v2"
OFFLINE_TINY = ["--total-steps", "20", "--eval-every", "20", "--log-every", "10", "--eval-episodes", "1", "--batch-size", "32",
                "--cql-n-actions", "2", "--device", "cpu"]
# one evaluation episode (up to 700 ant steps) each; no evaluations inside alignment or early online
SAC_TINY = ["--reevaluate-steps", "20", "--align-steps", "20", "--align-eval-every", "0", "--online-steps", "60", "--learning-starts", "20",
            "--utd", "1", "--eval-every", "60", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--early-evals", "0", "--batch-size", "32", "--log-every", "20",
            "--checkpoint-every", "20", "--device", "cpu"]
TD3_TINY = ["--batch-size", "32", "--reevaluate-steps", "20", "--align-steps", "20", "--align-eval-every", "0", "--online-steps", "40",
            "--learning-starts", "10", "--eval-every", "40", "--eval-episodes", "1", "--headline-eval-episodes", "0", "--early-evals", "0", "--log-every", "10",
            "--checkpoint-every", "20", "--device", "cpu"]
PPO_TINY = ["--rollout-size", "32", "--minibatch-size", "16", "--update-epochs", "1", "--online-steps", "32", "--reevaluate-steps", "20",
            "--eval-every", "32", "--early-evals", "0", "--log-every", "32", "--checkpoint-every", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def antmaze(minari_home, tmp_path_factory) -> dict:
    """local/antmaze/umaze-v0 (a few hundred random-action steps; test_antmaze.py's larger one when it is already there) and
    tiny CQL, TD3+BC and IQL checkpoints on it, the official pairings of O2SAC, O2TD3 and O2PPO."""
    if not (minari.storage.get_dataset_path("local/antmaze/umaze-v0") / "data").exists():
        md.main(md.Args(env=ENV, random_steps=400, episode_steps=100, seed=0))
    runs = tmp_path_factory.mktemp("antmaze_offline")
    ckpts = {}
    for algo in ("cql", "td3_bc", "iql"):
        res = op.main(tyro.cli(op.Args, args=["--algo", algo, "--env", ENV, "--run-dir", str(runs), *OFFLINE_TINY]))
        ckpts[algo] = Path(res["checkpoint"])
    return ckpts


def run(module, tiny: list[str], ckpt: Path, run_dir: Path, *extra: str) -> dict:
    return module.main(tyro.cli(module.Args, args=["--env", ENV, "--checkpoint", str(ckpt), "--run-dir", str(run_dir), *tiny, *extra]))


def n_linear(critic_state: dict) -> tuple[int, int, bool]:
    """(critics in the ensemble, Linear layers, any LayerNorm) of a saved Critic."""
    weights = [v for k, v in critic_state.items() if k.endswith("weight")]
    linear = [w for w in weights if w.shape[1] > 1]  # EnsembleLinear: (n, in, out); EnsembleLayerNorm: (n, 1, features)
    return linear[0].shape[0], len(linear), len(linear) < len(weights)


# ---------------------------------------------------------------- the family tables
def test_o2sac_family_values():
    um = sac.resolve_budgets(sac.Args(env=ENV))
    assert (um.n_critics, um.critic_layers, um.normalize_states, um.reward) == (1, 5, False, "10,-5")
    assert (um.align_steps, um.online_steps, um.learning_starts, um.eval_every, um.eval_episodes, um.lambda_init) == \
        (1_000_000, 200_000, 5_000, 5_000, 100, 1.0)
    f = sac.family_values(um)
    assert (f["family"], f["alpha0"], f["eps0"], f["eps_end"], f["actor_grad_clip"]) == ("antmaze", 0.2, 0.125, 2.0, None)
    assert sac.family_values(sac.Args(env="antmaze-umaze-diverse-v2"))["alpha0"] == 0.2
    for maze in ("medium-play", "medium-diverse", "large-play", "large-diverse"):
        a = sac.with_family(sac.Args(env=f"antmaze-{maze}-v2"))
        assert (sac.family_values(a)["alpha0"], a.lambda_init, a.n_critics, a.critic_layers) == (0.5, 2.0, 1, 5)
    # explicit flags win; a --dataset-id run keeps the family of --env
    a = sac.with_family(sac.Args(env="antmaze-large-play-v2", lambda_init=3.0, n_critics=2, alpha0=0.1))
    assert (a.lambda_init, a.n_critics, sac.family_values(a)["alpha0"]) == (3.0, 2, 0.1)
    assert sac.with_family(sac.Args(env=ENV, dataset_id="local/antmaze/umaze-v0")).critic_layers == 5
    # MuJoCo: the values that were the flags' defaults before the table
    mj = sac.resolve_budgets(sac.Args(env="hopper-medium-v2"))
    assert (mj.n_critics, mj.critic_layers, mj.normalize_states, mj.reward, mj.align_steps, mj.online_steps, mj.learning_starts,
            mj.eval_every, mj.eval_episodes, mj.lambda_init) == (2, 3, True, "1,0", 500_000, 100_000, 1_000, 1_000, 10, 1.0)


def test_o2sac_critic_shape_and_single_critic_losses():
    qf = sac.make_critic(31, 8, 1, 5)
    assert n_linear(qf.state_dict())[:2] == (1, 6)  # one critic, 5 hidden layers + the output layer
    mj = sac.make_critic(11, 3)
    assert n_linear(mj.state_dict())[:2] == (2, 4)  # MuJoCo: twin critics of 3 hidden layers
    torch.manual_seed(0)
    obs, act = torch.randn(16, 31), torch.rand(16, 8) * 2 - 1
    q = qf(obs, act)
    assert q.shape == (1, 16) and torch.equal(q.min(0).values, q[0])  # the min over critics is the single critic's value


def test_o2td3_family_values_and_critic():
    a = td3.with_budget_scale(td3.with_mode_defaults(td3.Args(env=ENV)))
    assert (a.critic_layer_norm, a.normalize_states, a.reward, a.align_steps, a.online_steps, a.eval_every, a.eval_episodes) == \
        (False, True, "1,-1", 1_000_000, 200_000, 5_000, 100)
    d = td3.resolve_defaults(a)
    assert (d["explore_noise"], d["eps0"], d["eps_end"]) == (0.1, 0.0025, 0.04)  # the official umaze values
    assert td3.with_mode_defaults(td3.Args(env="antmaze-large-diverse-v2")).align_steps == 1_000_000  # the umaze values everywhere
    assert td3.reward_handling(a, {"reward_transform": {"scale": 1.0, "shift": 0.0}, "algo": "td3_bc"}, True)["qf"] == \
        {"scale": 1.0, "shift": -1.0, "source": "family (1,-1)"}
    assert not n_linear(td3.new_critic(31, 8, a.critic_layer_norm).state_dict())[2]
    mj = td3.with_budget_scale(td3.with_mode_defaults(td3.Args(env="hopper-medium-v2")))
    assert (mj.critic_layer_norm, mj.normalize_states, mj.reward, mj.align_steps, mj.online_steps, mj.eval_every, mj.eval_episodes) == \
        (True, True, "1,0", 500_000, 100_000, 1_000, 10)
    assert td3.with_mode_defaults(td3.Args(env="hopper-medium-v2", opt=True)).online_steps == 300_000
    assert td3.reward_handling(mj, {"reward_transform": {"scale": 1.0, "shift": 0.0}, "algo": "td3_bc"}, True)["qf"]["source"] == "raw"
    assert n_linear(td3.new_critic(11, 3).state_dict())[2]


def test_o2ppo_family_values():
    a = ppo.with_family(ppo.Args(env=ENV))
    d = ppo.family_defaults(a)
    assert (a.eval_episodes, a.online_steps, d["reward_scaling"], d["family_row"], d["constraint_horizon"]) == (100, 250_000, "none", "antmaze", 250_000)
    assert ppo.family_defaults(ppo.Args(env="hopper-medium-v2", family="antmaze-large-play"))["eval_episodes"] == 100
    assert ppo.with_family(ppo.Args(env="hopper-medium-v2")).eval_episodes == 10  # MuJoCo unchanged
    assert ppo.family_defaults(ppo.Args(env="halfcheetah-medium-v2"))["reward_scaling"] == "return-std"


# ---------------------------------------------------------------- end to end on the stand-in
def test_o2sac_end_to_end_and_resume(antmaze, tmp_path, monkeypatch):
    seen = []
    orig = sac.online_update

    def spy(actor, actor_ref, qf, qf_target, log_alpha, log_lam, *a, **k):
        if not seen:
            seen.append((qf.net[0].weight.shape[0], log_alpha.item(), log_lam.item()))
        return orig(actor, actor_ref, qf, qf_target, log_alpha, log_lam, *a, **k)

    monkeypatch.setattr(sac, "online_update", spy)
    res = run(sac, SAC_TINY, antmaze["cql"], tmp_path / "straight")
    assert_results_schema(res, "o2o_sac")
    assert res["finished"] and [p["step"] for p in res["curve"] if p["phase"] == "online"] == [0, 60]
    assert all(p["normalized_score"] in (0.0, 100.0) for p in res["curve"])  # one episode: success rate 0 or 1
    assert res["critic"] == {"hidden": [256] * 5, "layer_norm": True, "from": "new", "n": 1}
    assert res["reward_transform"] == {"scale": 10.0, "shift": -5.0} and res["family_defaults"]["alpha0"] == 0.2
    assert res["online_start"]["alpha"] == pytest.approx(0.2)
    assert seen[0][0] == 1 and seen[0][1] == pytest.approx(math.log(0.2)) and seen[0][2] == pytest.approx(0.0)  # lambda0 1
    assert 0 < res["evaluation_s"] and 0 < res["evaluation_share"] < 1
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    assert n_linear(final["critics"]["qf"])[:2] == (1, 6) and not final["obs_mean"].any()  # raw states (CQL's on AntMaze)
    assert set(final["o2o"]["reward_transform"].values()) == {10.0, -5.0}
    online = torch.load(Path(res["run_dir"]) / "online.pt", weights_only=True)["o2o"]["online_rb"]
    assert set(online["rewards"].unique().tolist()) <= {-5.0, 5.0}  # online rewards: 10 r - 5 too

    # killed inside the first 700-step episode (online.pt waits for an episode end): the rerun reuses the saved phases
    stopped = run(sac, SAC_TINY, antmaze["cql"], tmp_path / "resumed", "--stop-after", "40")
    assert stopped["stopped_at"] == 40
    resumed = run(sac, SAC_TINY, antmaze["cql"], tmp_path / "resumed")
    assert_results_schema(resumed, "o2o_sac")
    assert resumed["curve"] == res["curve"] and resumed["reused_phases"] == ["reevaluated", "aligned"]


def test_o2sac_raw_states_need_an_unnormalised_actor(antmaze, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(sac, SAC_TINY, antmaze["iql"], tmp_path)
    assert e.value.code == 2 and "--normalize-states" in capsys.readouterr().err


def test_o2td3_end_to_end_and_resume(antmaze, tmp_path, capsys):
    res = run(td3, TD3_TINY, antmaze["td3_bc"], tmp_path / "straight")
    assert_results_schema(res, "o2o_td3")
    assert res["finished"] and [p["step"] for p in res["curve"] if p["phase"] == "online"] == [0, 40]
    assert res["reward_handling"]["qf"] == {"scale": 1.0, "shift": -1.0, "source": "family (1,-1)"}
    final = torch.load(Path(res["run_dir"]) / "final.pt", weights_only=True)
    assert final["critic_config"]["layer_norm"] is False and not n_linear(final["critics"]["qf"])[2]
    assert final["obs_std"].ne(1).any()  # TD3+BC's normalised states
    args = json.loads((Path(res["run_dir"]) / "args.json").read_text())
    assert (args["critic_layer_norm"], args["normalize_states"], args["reward"]) == (False, True, "1,-1")
    # killed inside the first 700-step episode (online.pt waits for an episode end): the rerun reuses the saved phases
    # and is the same run
    run(td3, TD3_TINY, antmaze["td3_bc"], tmp_path / "resumed", "--stop-after", "20")
    capsys.readouterr()
    resumed = run(td3, TD3_TINY, antmaze["td3_bc"], tmp_path / "resumed")
    assert "online.pt (pass --no-resume" not in capsys.readouterr().out
    assert_results_schema(resumed, "o2o_td3")
    assert resumed["phases"]["reevaluated"]["reused"] and resumed["phases"]["aligned"]["reused"]
    assert resumed["curve"] == res["curve"]


def test_o2ppo_end_to_end_raw_rewards_and_100_episodes(antmaze, tmp_path, monkeypatch):
    """The default evaluation has 100 episodes (an evaluator that only counts them, 100 real ones would take minutes);
    V learns from the raw 0/1 rewards."""
    sizes, asked = [], []

    class CountingEvaluator:
        def __init__(self, env_spec, n_episodes, *a):
            sizes.append(n_episodes)
            self.n, self.seconds = n_episodes, 0.0

        def __call__(self, act, n_episodes=None):  # None: all of them (a headline evaluation)
            asked.append(self.n if n_episodes is None else n_episodes)
            return np.zeros(asked[-1])

        def close(self):
            pass

    monkeypatch.setattr(ppo, "Evaluator", CountingEvaluator)
    res = run(ppo, PPO_TINY, antmaze["iql"], tmp_path)
    assert_results_schema(res, "o2o_ppo")
    assert sizes == [100] and set(asked) == {100} and len(asked) == 2 and res["finished"]  # the offline and the last evaluation and [p["step"] for p in res["curve"] if p["phase"] == "online"] == [0, 32]
    assert res["reward_scaling"]["mode"] == "none" and res["reward_transform"] == {"scale": 1.0, "shift": 0.0} and res["family_row"] == "antmaze"
