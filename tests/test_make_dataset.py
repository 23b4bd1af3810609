"""make_dataset.py: the datasets it writes, rebuilding from stored behaviour policies, and dataset resolution."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import minari
import numpy as np
import pytest
import tyro
from conftest import load_script

md = load_script("make_dataset")
op = load_script("offline_pretrain")


def test_levels_written_with_metadata(tiny_dataset):
    med = minari.load_dataset("local/hopper/medium-v0")
    meta = med.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(-20.272305) and meta["ref_max_score"] == pytest.approx(3234.3)
    assert "Hopper-v5" in meta["eval_env_spec"]
    assert "Behaviour policy: snapshot_" in meta["description"] and "v5" in meta["description"]
    assert med.total_steps == 3000
    rep = tiny_dataset["result"]["datasets"]["medium-replay"]
    # the replay buffer up to the medium snapshot: exactly that many training steps
    step = int(tiny_dataset["result"]["datasets"]["medium"]["behaviour"].split("step ")[1].split(",")[0])
    assert rep["transitions"] == step


def test_transitions_respect_episode_boundaries(tiny_dataset):
    data = op.load_dataset("hopper-medium-v2", quiet=True)
    n = len(data["rewards"])
    assert data["ends"].sum() == len(data["episode_returns"])
    assert np.all(data["ends"][data["terminals"] == 1] == 1)  # a termination ends its episode
    # within an episode s' of one transition is s of the next; across an end it is a fresh reset
    inside = np.where(data["ends"][:-1] == 0)[0]
    np.testing.assert_array_equal(data["next_observations"][inside], data["observations"][inside + 1])
    assert data["local_standin"] and data["dataset_ids"] == ["local/hopper/medium-v0"]
    assert n == 3000 and data["obs_dim"] == 11 and data["act_dim"] == 3
    # some episodes were cut by the step budget or the time limit rather than terminated: they stay bootstrappable
    assert (data["ends"] - data["terminals"]).sum() >= 1


def test_rebuild_from_stored_policies(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    snaps = sorted(tiny_dataset["snapshots"].glob("snapshot_*.pt"))
    medium = tiny_dataset["snapshots"] / "medium_policy.pt"
    assert medium.exists() and len(snaps) >= 2
    res = md.main(tyro.cli(md.Args, args=["--env", "hopper-medium-v2", "--policy", str(medium), "--size", "500", "--num-envs", "3", "--device", "cpu"]))
    assert res["datasets"]["medium"]["transitions"] == 500 and "train_s" not in res["times"]
    chain = [str(p) for p in snaps if int(p.stem.split("_")[1]) <= int(md.torch.load(medium, weights_only=True)["step"])]
    res = md.main(tyro.cli(md.Args, args=["--env", "hopper-medium-replay-v2", "--policy", *chain, "--device", "cpu"]))
    assert res["datasets"]["medium-replay"]["transitions"] == md.torch.load(medium, weights_only=True)["step"]
    res = md.main(tyro.cli(md.Args, args=["--env", "hopper-random-v2", "--size", "300", "--device", "cpu"]))
    assert minari.load_dataset("local/hopper/random-v0").total_steps == 300


def test_hosted_dataset_wins_over_local_standin(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    eps = md.rollout(md.random_fn("Hopper-v5", 0), "Hopper-v5", 2, 0, max_steps=50)
    spec = md.make_env("Hopper-v5").spec.to_json()
    md.write_dataset("local/hopper/medium-v0", eps, spec, md.D4RL_REF_SCORES["hopper"], "local", overwrite=False)
    assert op.resolve_dataset("hopper-medium-v2", no_download=True) == (["local/hopper/medium-v0"], True)
    md.write_dataset("mujoco/hopper/medium-v0", eps, spec, md.D4RL_REF_SCORES["hopper"], "hosted stand-in", overwrite=False)
    assert op.resolve_dataset("hopper-medium-v2", no_download=True) == (["mujoco/hopper/medium-v0"], False)
    # medium-expert needs both hosted halves; with one missing it falls through to the local stand-in (absent here)
    with pytest.raises(SystemExit):
        op.resolve_dataset("hopper-medium-expert-v2", no_download=True)
    md.write_dataset("mujoco/hopper/expert-v0", eps, spec, md.D4RL_REF_SCORES["hopper"], "hosted stand-in", overwrite=False)
    ids, local = op.resolve_dataset("hopper-medium-expert-v2", no_download=True)
    assert ids == ["mujoco/hopper/medium-v0", "mujoco/hopper/expert-v0"] and not local
    assert len(op.load_dataset("hopper-medium-expert-v2", no_download=True)["rewards"]) == 100


def expect_exit2(capsys, fn, needle):
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_input(tiny_dataset, tmp_path, capsys):
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-medium-v2", levels=("great",))), "unknown level")
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-medium-v2")), "already exists")
    expect_exit2(capsys, lambda: md.main(md.Args(env="cartpole-medium-v2")), "unknown env")
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-random-v2", size=0)), "--size")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-expert-v2", policy=(str(bad),))), "corrupt")
    expect_exit2(capsys, lambda: md.main(md.Args(env="hopper-medium-replay-v2", policy=(str(bad),), overwrite=True)), "snapshot chain")


def _run_until(marker, env, cmd, timeout=300.0):
    """Start make_dataset.py, wait until it reaches the pause hook that creates `marker`, and SIGKILL it there."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"make_dataset.py never reached {marker.name} (rc {proc.poll()}):\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_overwrite_killed_keeps_old_dataset(tiny_dataset, tmp_path, monkeypatch):
    """A kill of `make_dataset.py --overwrite` before or inside the swap never loses the old dataset."""
    store = tmp_path / "store"
    shutil.copytree(tiny_dataset["home"] / "local" / "hopper", store / "local" / "hopper")  # a store of its own (hopper only): the session store stays intact
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    old = minari.load_dataset("local/hopper/medium-v0")
    old_episodes, old_steps = old.total_episodes, old.total_steps
    assert old_steps == 3000

    def check_old():
        ds = minari.load_dataset("local/hopper/medium-v0")
        assert (ds.total_episodes, ds.total_steps) == (old_episodes, old_steps)

    cmd = [sys.executable, str(Path(md.__file__)), "--env", "hopper-medium-v2", "--policy", str(tiny_dataset["snapshots"] / "medium_policy.pt"),
           "--size", "200", "--num-envs", "2", "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--overwrite"]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(store), "OMP_NUM_THREADS": "1"}
    # killed with the new dataset complete, just before the swap
    marker = tmp_path / "before_swap"
    _run_until(marker, {**env, "MAKE_DATASET_PAUSE_BEFORE_SWAP": str(marker)}, cmd)
    check_old()
    assert any(p.name.startswith(".make_dataset-") for p in store.iterdir())  # the killed run's staging folder
    # killed between the two renames: the id is missing for that instant; the next run restores it before judging
    marker = tmp_path / "in_swap"
    _run_until(marker, {**env, "MAKE_DATASET_PAUSE_IN_SWAP": str(marker)}, cmd)
    with pytest.raises(SystemExit) as e:  # no --overwrite: restores the old dataset, then refuses to replace it
        md.main(md.Args(env="hopper-medium-v2", policy=(str(tiny_dataset["snapshots"] / "medium_policy.pt"),), size=200, num_envs=2, device="cpu", out_dir=str(tmp_path / "runs")))
    assert e.value.code == 2
    check_old()
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # stale staging and backup folders gone
    # a normal overwrite then replaces it and leaves nothing behind
    res = md.main(md.Args(env="hopper-medium-v2", policy=(str(tiny_dataset["snapshots"] / "medium_policy.pt"),), size=200, num_envs=2, device="cpu", out_dir=str(tmp_path / "runs"), overwrite=True))
    assert res["datasets"]["medium"]["transitions"] == 200
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a misconfigured folder in the store is a warning of list_local_datasets
        assert sorted(minari.list_local_datasets()) == ["local/hopper/medium-replay-v0", "local/hopper/medium-v0"]
    assert not [p for p in store.rglob(".*")]
    assert "local/hopper" in md.minari_namespace.list_local_namespaces()
