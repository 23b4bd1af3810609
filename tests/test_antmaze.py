"""AntMaze data and offline pre-training: name resolution, observation flattening (dataset = online env = evaluator),
D4RL's success-rate protocol, the family values and reward transforms, the CQL knobs AntMaze needs (Lagrange, max-target
backup, clipped penalty), and offline_pretrain.py end to end on a tiny random-action stand-in built by make_dataset.py."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
import tyro
from conftest import load_script

op = load_script("offline_pretrain")
md = load_script("make_dataset")

NAMES = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
TINY = ["--total-steps", "30", "--eval-every", "15", "--log-every", "5", "--eval-episodes", "1", "--batch-size", "32",
        "--cql-n-actions", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def antmaze(minari_home) -> dict:
    """local/antmaze/umaze-v0: 1200 random-action steps in 150-step episodes, every other one with its goal by the start."""
    result = md.main(md.Args(env="antmaze-umaze-v2", random_steps=1200, episode_steps=150, seed=0))
    return {"result": result["datasets"]["umaze"], "data": op.load_dataset("antmaze-umaze-v2", quiet=True)}


def expect_exit2(capsys, fn, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def run(run_dir: Path, algo: str, *extra: str) -> dict:
    return op.main(tyro.cli(op.Args, args=["--algo", algo, "--env", "antmaze-umaze-v2", "--run-dir", str(run_dir), *TINY, *extra]))


# ---------------------------------------------------------------- names
def test_names_resolve_to_the_minari_ids_and_envs():
    for name in NAMES:
        assert op.parse_env_name(f"antmaze-{name}-v2") == ("antmaze", name)
        assert op.ANTMAZE_DATASETS[name][0] == f"D4RL/antmaze/{name}-v1"
    envs = {n: e for n, (_, e) in op.ANTMAZE_DATASETS.items()}
    assert envs == {"umaze": "AntMaze_UMaze-v4", "umaze-diverse": "AntMaze_UMaze-v4", "medium-play": "AntMaze_Medium-v4",
                    "medium-diverse": "AntMaze_Medium_Diverse_GR-v4", "large-play": "AntMaze_Large-v4",
                    "large-diverse": "AntMaze_Large_Diverse_GR-v4"}
    assert op.parse_env_name("hopper-medium-v2") == ("hopper", "medium")  # MuJoCo names unchanged


def test_unknown_antmaze_name_lists_the_known_ones(capsys):
    expect_exit2(capsys, lambda: op.parse_env_name("antmaze-huge-play-v2"), "unknown env", "antmaze-umaze-v2", "antmaze-large-diverse-v2",
                 "hopper-medium-v2")


def test_resolution_order_and_fail_fast_without_network(antmaze, tmp_path, monkeypatch, capsys):
    assert op.resolve_dataset("antmaze-umaze-v2") == (["local/antmaze/umaze-v0"], True)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))  # an empty store, no network
    monkeypatch.setattr(op, "_network_reachable", lambda *a, **k: False)
    t0 = time.time()
    expect_exit2(capsys, lambda: op.resolve_dataset("antmaze-medium-play-v2"), "D4RL/antmaze/medium-play-v1", "local/antmaze/medium-play-v0",
                 "minari download D4RL/antmaze/medium-play-v1", "python make_dataset.py --env antmaze-medium-play-v2 --random-steps")
    expect_exit2(capsys, lambda: op.resolve_dataset("antmaze-umaze-v2", "D4RL/antmaze/umaze-v1"), "network is unreachable")
    expect_exit2(capsys, lambda: op.resolve_dataset("antmaze-umaze-v2", no_download=True), "minari download D4RL/antmaze/umaze-v1")
    assert time.time() - t0 < 5
    (tmp_path / "D4RL" / "antmaze" / "umaze-v1" / "data").mkdir(parents=True)  # the hosted id in the store comes first
    (tmp_path / "local" / "antmaze" / "umaze-v0" / "data").mkdir(parents=True)
    assert op.resolve_dataset("antmaze-umaze-v2") == (["D4RL/antmaze/umaze-v1"], False)


def test_make_dataset_antmaze_needs_random_steps(minari_home, capsys):
    expect_exit2(capsys, lambda: md.main(md.Args(env="antmaze-large-play-v2")), "--random-steps", "minari download D4RL/antmaze/large-play-v1")
    expect_exit2(capsys, lambda: md.main(md.Args(env="antmaze-umaze-v2", random_steps=0)), "--random-steps must be positive")
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-random-v2", random_steps=10)), "AntMaze")


# ---------------------------------------------------------------- the stand-in and the flattening
def test_standin_has_the_hosted_layout_and_reaches_the_goal(antmaze):
    ds = minari.load_dataset("local/antmaze/umaze-v0")
    assert set(ds.observation_space.spaces) == {"observation", "achieved_goal", "desired_goal"}
    assert ds.observation_space["observation"].shape == (27,) and ds.action_space.shape == (8,)
    meta = ds.storage.metadata
    spec, eval_spec = (json.loads(meta[k]) if isinstance(meta[k], str) else meta[k] for k in ("env_spec", "eval_env_spec"))
    assert spec["id"] == eval_spec["id"] == "AntMaze_UMaze-v4" and spec["max_episode_steps"] == 700
    assert spec["kwargs"]["continuing_task"] and not spec["kwargs"]["reset_target"] and spec["kwargs"]["maze_map"] == op.ANTMAZE_UMAZE_MAP
    assert eval_spec["kwargs"]["maze_map"] == op.ANTMAZE_EVAL_MAPS["umaze"]  # what Minari's generation script records
    eps = list(ds.iterate_episodes())
    assert sum(len(e.rewards) for e in eps) == 1200 and all(len(e.rewards) <= 150 for e in eps)
    assert not any(e.terminations.any() for e in eps) and all(e.truncations[-1] for e in eps)  # a continuing task: time limits only
    assert set(np.unique(np.concatenate([e.rewards for e in eps]))) == {0.0, 1.0}  # sparse
    assert antmaze["result"]["episodes_reaching_goal"] >= 1


def test_flattening_is_the_same_in_dataset_env_and_evaluator(antmaze):
    data = antmaze["data"]
    ep = next(minari.load_dataset("local/antmaze/umaze-v0").iterate_episodes())
    o = ep.observations
    expected = np.concatenate([o["achieved_goal"], o["observation"], o["desired_goal"]], axis=-1)  # the documented order
    assert data["obs_dim"] == 31 and data["act_dim"] == 8
    np.testing.assert_array_equal(data["observations"][: len(ep.rewards)], expected[:-1].astype(np.float32))
    np.testing.assert_array_equal(data["next_observations"][: len(ep.rewards)], expected[1:].astype(np.float32))

    flat, raw = op.make_env(data["env_spec"]), op.make_env(data["env_spec"], flatten=False)
    assert flat.observation_space.shape == (31,)
    f0, r0 = flat.reset(seed=3)[0], raw.reset(seed=3)[0]
    np.testing.assert_array_equal(f0, op.flatten_obs(r0))
    np.testing.assert_array_equal(f0[:2], r0["achieved_goal"]), np.testing.assert_array_equal(f0[2:29], r0["observation"])
    np.testing.assert_array_equal(f0[29:], r0["desired_goal"])
    a = np.linspace(-1, 1, 8).astype(np.float32)
    np.testing.assert_array_equal(flat.step(a)[0], op.flatten_obs(raw.step(a)[0]))

    seen = []
    ev = op.Evaluator(data["env_spec"], 1, 3, np.zeros(31, np.float32), np.ones(31, np.float32), torch.device("cpu"))
    orig_step = ev.envs[0].step  # one step is enough: the episode ends after the first action
    ev.envs[0].step = lambda act: (*orig_step(act)[:3], True, {})
    ev(lambda obs: (seen.append(obs.clone()), torch.zeros(len(obs), 8))[1])
    np.testing.assert_array_equal(seen[0][0].numpy(), f0.astype(np.float32))


# ---------------------------------------------------------------- D4RL's evaluation protocol
def test_evaluation_env_terminates_at_the_goal_and_scores_success_rate(antmaze):
    data = antmaze["data"]
    assert (data["ref_min_score"], data["ref_max_score"]) == (0.0, 1.0)
    spec = json.loads(data["env_spec"])
    assert spec["max_episode_steps"] == 700 and spec["kwargs"]["maze_map"] == op.ANTMAZE_UMAZE_MAP  # the data's maze, not Minari's mirror
    assert spec["kwargs"]["continuing_task"] is False and spec["kwargs"]["reset_target"] is False
    env = op.make_env(data["env_spec"])
    obs, _ = env.reset(seed=0)
    assert np.linalg.norm(obs[:2] - obs[29:]) > 4  # start r and goal g are a maze apart
    env.unwrapped.goal = obs[:2].copy()  # put the goal at the ant: the next step reaches it
    _, r, term, trunc, info = env.step(np.zeros(8, np.float32))
    assert (r, term, trunc, info["success"]) == (1.0, True, False, True)

    ev = op.Evaluator(data["env_spec"], 3, 0, np.zeros(31, np.float32), np.ones(31, np.float32), torch.device("cpu"))
    for env in ev.envs[:2]:  # two of three episodes succeed at their first step, the third runs out its 700 steps
        maze, orig = env.unwrapped, env.unwrapped.reset

        def reset(*, seed=None, options=None, _maze=maze, _orig=orig):
            o, i = _orig(seed=seed, options=options)
            _maze.goal = o["achieved_goal"].copy()
            return {**o, "desired_goal": _maze.goal.copy()}, i

        maze.reset = reset
    returns = ev(lambda o: torch.zeros(len(o), 8))
    np.testing.assert_array_equal(returns, [1.0, 1.0, 0.0])
    assert op.normalized_score(returns.mean(), data["ref_min_score"], data["ref_max_score"]) == pytest.approx(100 * 2 / 3)


def test_eval_spec_keeps_medium_and_large_mazes():
    for size in ("medium", "large"):
        spec = {"id": "AntMaze_Medium-v4", "entry_point": "gymnasium_robotics.envs.maze.ant_maze_v4:AntMazeEnv", "max_episode_steps": 1000,
                "kwargs": {"maze_map": op.ANTMAZE_EVAL_MAPS[size], "continuing_task": True, "reset_target": False}}
        out = json.loads(op.antmaze_eval_spec(json.dumps(spec)))
        assert out["kwargs"] == {"maze_map": op.ANTMAZE_EVAL_MAPS[size], "continuing_task": False, "reset_target": False}
        assert out["max_episode_steps"] == 1000
    assert op.is_antmaze_spec(json.dumps(spec)) and not op.is_antmaze_spec("Hopper-v5")


# ---------------------------------------------------------------- family values and reward transforms
def test_family_table_holds_the_official_antmaze_values():
    am, mj = op.FAMILY_DEFAULTS["antmaze"], op.FAMILY_DEFAULTS["mujoco"]
    assert (am["cql_alpha"], am["cql_lagrange"], am["cql_max_target_backup"], am["cql_clip_diff_min"], am["cql_actor_lr"], am["cql_critic_layers"]) == \
        (5.0, True, True, -200.0, 1e-4, 5)
    assert op.Args().cql_target_action_gap == 0.8
    assert (am["iql_beta"], am["iql_expectile"]) == (10.0, 0.9)
    assert am["normalize_states"]["cql"] is False and am["reward"] == {"cql": "10,-5", "iql": "1,-1", "td3_bc": "1,-1", "bc": "1,0"}
    # MuJoCo keeps the values that were the flags' defaults before the table
    assert (mj["cql_alpha"], mj["cql_lagrange"], mj["cql_max_target_backup"], mj["cql_clip_diff_min"], mj["cql_actor_lr"], mj["cql_critic_layers"]) == \
        (10.0, False, False, float("-inf"), 3e-5, 3)
    assert (mj["iql_beta"], mj["iql_expectile"], mj["reward"]["iql"]) == (3.0, 0.7, "return-range") and all(mj["normalize_states"].values())
    filled = op.family_filled({**vars(op.Args(algo="cql")), "cql_alpha": 7.0}, "antmaze")
    assert filled["cql_alpha"] == 7.0 and filled["cql_lagrange"] is True and filled["reward"] == "10,-5"  # explicit flags win


def test_reward_transforms(antmaze, capsys):
    data = antmaze["data"]
    assert op.dataset_family(data) == "antmaze"
    want = {"cql": (10.0, -5.0), "iql": (1.0, -1.0), "td3_bc": (1.0, -1.0)}
    for algo, (scale, shift) in want.items():
        args = op.Args(**op.family_filled(vars(op.Args(algo=algo)), "antmaze"))
        rt = op.reward_transform_for(args, data)
        assert (rt["scale"], rt["shift"]) == (scale, shift)
        rb = op.ReplayBuffer.from_dataset(data, np.zeros(31, np.float32), np.ones(31, np.float32), torch.device("cpu"), rt["scale"], rt["shift"])
        assert set(rb.data["rewards"].unique().tolist()) == {shift, scale + shift}  # sparse 0 / 1 -> shift / scale + shift
    mujoco_iql = op.Args(**op.family_filled(vars(op.Args(algo="iql")), "mujoco"))
    r = data["episode_returns"]
    assert op.reward_transform_for(mujoco_iql, data)["scale"] == pytest.approx(1000.0 / (r.max() - r.min()))
    expect_exit2(capsys, lambda: op.parse_reward("10"), "SCALE,SHIFT")


# ---------------------------------------------------------------- CQL knobs
def test_cql_penalty_clip_from_below():
    q_data = torch.tensor([[0.0, 300.0]])  # (n=1, B=2)
    zeros = torch.zeros(1, 2, 1)
    lp = torch.zeros(2, 1)
    lse = torch.logsumexp(torch.tensor([0.0 - math.log(0.5), 0.0, 0.0]), 0).item()
    free = op.cql_penalty(q_data, zeros, zeros, zeros, lp, lp, act_dim=1)
    clipped = op.cql_penalty(q_data, zeros, zeros, zeros, lp, lp, act_dim=1, clip_diff_min=-200.0)
    assert free.item() == pytest.approx((lse + lse - 300.0) / 2)
    assert clipped.item() == pytest.approx((lse - 200.0) / 2)


def test_cql_lagrange_losses():
    log_ap = torch.zeros(1, requires_grad=True)  # alpha' = 1
    penalty = torch.tensor([2.0, 0.0], requires_grad=True)  # one critic above the gap, one below
    term, ap_loss, ap = op.cql_lagrange_losses(penalty, log_ap, cql_alpha=5.0, target_gap=0.8)
    assert term.item() == pytest.approx(5.0 * (2.0 - 0.8) + 5.0 * (0.0 - 0.8)) and ap.item() == 1.0
    assert ap_loss.item() == pytest.approx(-5.0 * ((2.0 - 0.8) + (0.0 - 0.8)) / 2)
    (term + ap_loss).backward()
    torch.testing.assert_close(penalty.grad, torch.tensor([5.0, 5.0]))  # the critics see alpha' cql_alpha, alpha' held fixed
    assert log_ap.grad.item() == pytest.approx(-5.0 * 0.2)  # mean penalty 1.0 > gap 0.8: the loss falls as alpha' grows
    big = op.cql_lagrange_losses(torch.zeros(2), torch.full((1,), 50.0), 1.0, 0.0)[2]
    assert big.item() == 1e6  # alpha' is clamped


def test_max_target_backup():
    q = torch.tensor([[[1.0, 5.0, 3.0]], [[2.0, 4.0, 9.0]]])  # (n=2, B=1, N=3)
    assert op.max_target_backup(q).tolist() == [4.0]  # min over critics [1, 4, 3], then max over actions


def test_cql_learner_follows_the_flags(antmaze):
    args = op.Args(**op.family_filled(vars(op.Args(algo="cql", batch_size=8, cql_n_actions=3)), "antmaze"))
    learner = op.CQL(args, 31, 8, torch.device("cpu"))
    assert sum(isinstance(m, op.EnsembleLinear) for m in learner.qf.modules()) == 6  # 5 hidden layers + output
    assert "alpha_prime" in learner.opts and learner.log_alpha_prime.item() == 1.0
    b = {"obs": torch.randn(8, 31), "actions": torch.rand(8, 8) * 2 - 1, "rewards": torch.full((8,), -5.0), "next_obs": torch.randn(8, 31),
         "terminals": torch.zeros(8)}
    m = learner.update(b, 0)
    assert "losses/alpha_prime" in m and all(torch.isfinite(v).all() for v in m.values())
    assert learner.log_alpha_prime.item() != 1.0  # alpha' learns
    plain = op.CQL(op.Args(**op.family_filled(vars(op.Args(algo="cql")), "mujoco")), 31, 8, torch.device("cpu"))
    assert not hasattr(plain, "log_alpha_prime") and set(plain.opts) == {"actor", "qf", "alpha"}


# ---------------------------------------------------------------- offline_pretrain.py end to end
def test_offline_pretrain_end_to_end_and_resume(antmaze, tmp_path):
    results = {algo: run(tmp_path / "straight", algo) for algo in ("cql", "iql", "td3_bc")}
    for algo, res in results.items():
        assert [h[0] for h in res["eval_history"]] == [15, 30] and res["family"] == "antmaze"
        assert all(h[2] in (0.0, 100.0) for h in res["eval_history"])  # one episode: success rate 0 or 1
        ckpt = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
        assert ckpt["obs_dim"] == 31 and (ckpt["ref_min_score"], ckpt["ref_max_score"]) == (0.0, 1.0)
        assert json.loads(ckpt["env_spec"])["kwargs"]["continuing_task"] is False
        want = {"cql": (10.0, -5.0), "iql": (1.0, -1.0), "td3_bc": (1.0, -1.0)}[algo]
        assert (ckpt["reward_transform"]["scale"], ckpt["reward_transform"]["shift"]) == want
        assert ckpt["args"]["env"] == "antmaze-umaze-v2" and ckpt["args"][{"cql": "cql_alpha", "iql": "iql_beta", "td3_bc": "td3_bc_alpha"}[algo]] == \
            {"cql": 5.0, "iql": 10.0, "td3_bc": 2.5}[algo]
        if algo == "cql":  # no state normalisation, 5 critic layers, alpha' kept for --resume
            assert not ckpt["obs_mean"].any() and (ckpt["obs_std"] == 1).all() and ckpt["critic_config"]["hidden"] == [256] * 5
            assert ckpt["train_state"]["log_alpha_prime"].shape == (1,)
        else:
            assert ckpt["obs_std"].ne(1).any()

    short = run(tmp_path / "resumed", "cql", "--total-steps", "15")
    assert [h[0] for h in short["eval_history"]] == [15]
    resumed = run(tmp_path / "resumed", "cql", "--resume")
    assert resumed["eval_history"] == results["cql"]["eval_history"]
    a = torch.load(results["cql"]["checkpoint"], weights_only=True)["train_state"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["train_state"]
    for k in a["modules"]:
        for p in a["modules"][k]:
            torch.testing.assert_close(b["modules"][k][p], a["modules"][k][p], rtol=0, atol=0)
    torch.testing.assert_close(b["log_alpha_prime"], a["log_alpha_prime"], rtol=0, atol=0)
