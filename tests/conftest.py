"""Shared fixtures: a tiny hopper dataset built by make_dataset.py and tiny offline checkpoints of every method.

Everything lives under pytest's tmp dirs; MINARI_DATASETS_PATH points there, so no test touches ~/.minari.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny networks: threads cost more than they give


def load_script(name: str):
    """Import a top-level script (offline_pretrain, o2o_sac, ...) as a module."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def minari_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dataset(minari_home, tmp_path_factory) -> dict:
    """local/hopper/medium-v0 and medium-replay-v0 from a few hundred SAC steps (seconds)."""
    md = load_script("make_dataset")
    out = tmp_path_factory.mktemp("make_dataset")
    result = md.main(md.Args(env="hopper-medium-v2", levels=("medium", "medium-replay"), train_steps=1500, learning_starts=500,
                             snapshot_every=500, snapshot_episodes=2, medium_fraction=0.0, size=3000, num_envs=4,
                             out_dir=str(out), device="cpu"))
    return {"home": minari_home, "snapshots": Path(result["snapshot_dir"]), "result": result}


@pytest.fixture
def same_random():
    """Inductor draws random numbers with eager's generator, so a compiled update sees the same noise as the eager one."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def float64():
    """Compile-equals-eager comparisons in float64: in float32, Adam's first (sign-like) steps turn last-bit differences
    of reordered reductions into lr-sized ones, which would force a tolerance loose enough to hide real bugs."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


TINY_OFFLINE = ["--total-steps", "60", "--eval-every", "30", "--log-every", "10", "--eval-episodes", "2", "--batch-size", "64",
                "--cql-n-actions", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def offline_checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint of every offline method (and a deterministic BC), keyed by name."""
    import tyro

    op = load_script("offline_pretrain")
    run_dir = tmp_path_factory.mktemp("offline_runs")
    paths = {}
    for name, extra in {"cql": [], "iql": [], "td3_bc": [], "bc": [], "bc_det": ["--bc-family", "deterministic"]}.items():
        algo = "bc" if name == "bc_det" else name
        rd = run_dir / name
        res = op.main(tyro.cli(op.Args, args=["--algo", algo, "--env", "hopper-medium-v2", "--run-dir", str(rd), *TINY_OFFLINE, *extra]))
        paths[name] = Path(res["checkpoint"])
    return paths
