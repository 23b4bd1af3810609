"""The family lookup (shared block `family`): which row of each o2o script's family table a run takes, and that the
row reaches the values the run uses. --family wins over --env; a --dataset-id run follows --env's family; an --env
that names no D4RL dataset, or an unknown --family, exits 2 naming --family."""

from __future__ import annotations

import pytest
import tyro

import o2o_ppo
import o2o_sac
import o2o_td3

SCRIPTS = [o2o_sac, o2o_td3, o2o_ppo]


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.__name__)
def test_dataset_family(mod, capsys):
    assert mod.dataset_family("hopper-medium-v2", None, None) == ("hopper", "medium")
    assert mod.dataset_family("hopper-medium-v2", None, "walker2d-medium-expert") == ("walker2d", "medium-expert")
    assert mod.dataset_family("hopper-medium-v2", "x/y-v0", None) == ("hopper", "medium")
    assert mod.dataset_family("my-robot", "x/y-v0", "halfcheetah-medium-replay-v2") == ("halfcheetah", "medium-replay")
    assert mod.dataset_family("antmaze-large-diverse-v2", None, None) == ("antmaze", "large-diverse")
    for env, dataset_id, family, words in [("my-robot", "x/y-v0", None, "pass --family"),
                                           ("hopper-medium-v2", None, "hopper-hard", "unknown --family"),
                                           ("hopper-hard-v2", None, None, "unknown env")]:
        with pytest.raises(SystemExit) as e:
            mod.dataset_family(env, dataset_id, family)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_family_reaches_each_scripts_table():
    # O2SAC: hopper medium-expert's row (alpha0 0.5, the interval reference's settings) instead of hopper medium's
    sac = lambda *a: o2o_sac.family_row(tyro.cli(o2o_sac.Args, args=list(a)))[1:]  # noqa: E731
    assert sac("--env", "hopper-medium-v2", "--family", "hopper-medium-expert") == sac("--env", "hopper-medium-expert-v2")
    assert sac("--env", "hopper-medium-v2", "--family", "hopper-medium-expert")[1]["alpha0"] == 0.5
    assert sac("--env", "hopper-medium-v2")[1]["alpha0"] == 0.2
    assert sac("--env", "my-robot", "--dataset-id", "x/y-v0", "--family", "antmaze-umaze")[0] == "umaze"
    # O2TD3: OPT's kappa schedule of medium-replay
    td3 = lambda *a: o2o_td3.family_row(tyro.cli(o2o_td3.Args, args=list(a)))  # noqa: E731
    assert td3("--env", "hopper-medium-v2", "--family", "hopper-medium-replay")[2]["kappa_start"] == 0.1
    assert td3("--env", "hopper-medium-v2")[2]["kappa_start"] == 0.3
    # O2PPO: the row and the environment entry (halfcheetah's return-std reward scaling)
    ppo = lambda *a: o2o_ppo.family_defaults(tyro.cli(o2o_ppo.Args, args=list(a)))  # noqa: E731
    assert ppo("--dataset-id", "x/y-v0", "--family", "halfcheetah-medium")["reward_scaling"] == "return-std"
    assert ppo("--dataset-id", "x/y-v0")["reward_scaling"] == "none"


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.__name__)
def test_dataset_id_run_with_an_unknown_env_needs_family(mod, tmp_path, capsys):
    """Before anything is loaded or written: main stops with exit 2 naming --family."""
    args = tyro.cli(mod.Args, args=["--env", "my-robot", "--dataset-id", "x/y-v0", "--run-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        mod.main(args)
    assert e.value.code == 2 and "--family" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
