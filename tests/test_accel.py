"""--compile / --cudagraphs / --bf16: the same math as the eager reference (the shared Accel block, offline_pretrain.py).

The compiled update must equal the eager one to a tight tolerance. The comparison runs in float64: in float32, Adam's
first steps (about lr * sign(g)) turn last-bit rounding differences in near-zero gradients into lr-sized weight
changes, which would force a loose tolerance that could hide real bugs. Inductor normally draws random numbers with
its own generator; `fallback_random` makes it use eager's, so both runs see the same noise and any difference
is arithmetic. CUDA-graph tests need a GPU and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import tyro

from conftest import load_script

op = load_script("offline_pretrain")
OBS, ACT, B = 11, 3, 32
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(B, OBS, generator=g), "actions": torch.rand(B, ACT, generator=g) * 2 - 1, "rewards": torch.randn(B, generator=g),
         "next_obs": torch.randn(B, OBS, generator=g), "terminals": (torch.rand(B, generator=g) < 0.1).to(torch.get_default_dtype())}
    return {k: v.to(device) for k, v in b.items()}


def twin_learners(algo: str, accel_kwargs: dict, device: str = "cpu", **args_kwargs):
    """An eager learner and an accelerated one with identical weights and optimizer settings."""
    args = op.Args(algo=algo, total_steps=100, cql_n_actions=2, **args_kwargs)
    dev = torch.device(device)
    torch.manual_seed(0)
    eager = op.LEARNERS[algo](args, OBS, ACT, dev, op.Accel(dev))
    torch.manual_seed(0)
    fast = op.LEARNERS[algo](args, OBS, ACT, dev, op.Accel(dev, **accel_kwargs))
    for k, m in eager.modules().items():
        fast.modules()[k].load_state_dict(m.state_dict())
    return eager, fast


def assert_same_run(eager, fast, steps: int, device: str = "cpu", atol: float = 1e-9, rtol: float = 1e-7):
    for step in range(steps):
        b = batch(step, device)
        torch.manual_seed(100 + step)
        m_e = {k: v.clone() for k, v in eager.update(b, step).items()}
        torch.manual_seed(100 + step)
        m_f = {k: v.clone() for k, v in fast.update(b, step).items()}
        assert m_e.keys() == m_f.keys()
        for k in m_e:
            torch.testing.assert_close(m_f[k], m_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"{k} at step {step}: {s}")
    for name, m in eager.modules().items():
        for (pn, p_e), p_f in zip(m.named_parameters(), fast.modules()[name].parameters()):
            torch.testing.assert_close(p_f, p_e, atol=atol, rtol=rtol, msg=lambda s, pn=pn: f"{name}.{pn}: {s}")


@pytest.mark.parametrize("algo,extra", [("cql", {}), ("iql", {}), ("td3_bc", {}), ("bc", {}), ("bc", {"bc_family": "deterministic"})])
def test_compiled_update_equals_eager(algo, extra, same_random, float64):
    from torch._dynamo.utils import counters

    eager, fast = twin_learners(algo, {"compile": True}, **extra)
    # three steps cover TD3+BC's critic+actor and critic-only graphs; IQL's cosine schedule moves the lr every step
    assert_same_run(eager, fast, steps=3)
    if algo == "iql":
        assert torch.is_tensor(fast.opts["actor"].param_groups[0]["lr"])
        assert float(fast.opts["actor"].param_groups[0]["lr"]) == pytest.approx(eager.opts["actor"].param_groups[0]["lr"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for step in range(3, 7):  # new batches, a new learning rate (IQL): values change, the code must not
        fast.update(batch(step), step)
    assert counters["stats"]["unique_graphs"] == graphs, "a later step recompiled the update"


def test_bf16_autocast_changes_arithmetic_not_dtypes():
    dev = torch.device("cpu")
    torch.manual_seed(0)
    critic = op.Critic(OBS, ACT, (64, 64), n=2, layer_norm=True)
    b = batch(0)
    ref = critic(b["obs"], b["actions"])
    half = op.Accel(dev, bf16=True).update(lambda obs, act: {"q": critic(obs, act)})(b["obs"], b["actions"])["q"]
    assert half.dtype == torch.float32  # network outputs come back as float32, so every loss is float32
    assert not torch.equal(half, ref)  # the matmuls really ran in bfloat16 ...
    torch.testing.assert_close(half, ref, atol=0.05, rtol=0.05)  # ... to bfloat16 precision


def test_bf16_learner_trains_with_float32_parameters():
    eager, fast = twin_learners("td3_bc", {"bf16": True})
    w0 = torch.cat([p.detach().flatten() for p in eager.actor.parameters()])
    for step in range(4):  # same batches and noise for both: only the arithmetic differs
        torch.manual_seed(step)
        eager.update(batch(step), step)
        torch.manual_seed(step)
        m = fast.update(batch(step), step)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in m.values())
    assert all(p.dtype == torch.float32 for p in fast.actor.parameters())
    d_e = torch.cat([p.detach().flatten() for p in eager.actor.parameters()]) - w0
    d_f = torch.cat([p.detach().flatten() for p in fast.actor.parameters()]) - w0
    assert not torch.equal(d_f, d_e)  # bf16 really changed the updates ...
    assert torch.nn.functional.cosine_similarity(d_f, d_e, dim=0) > 0.9  # ... by rounding, not by a different algorithm


def test_cudagraphs_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit) as e:
        op.Accel(torch.device("cpu"), cudagraphs=True)
    assert e.value.code == 2


def test_cli_cudagraphs_on_cpu_fails_fast(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # before any dataset is looked for: this dataset does not exist
        op.main(tyro.cli(op.Args, args=["--env", "hopper-nosuch-v2", "--device", "cpu", "--cudagraphs", "--run-dir", str(tmp_path)]))
    assert e.value.code == 2
    assert "--cudagraphs" in capsys.readouterr().err


def test_load_optimizer_keeps_tensor_lr_and_flags():
    dev = torch.device("cpu")
    net = torch.nn.Linear(3, 2)
    plain = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    plain.step()
    accel = op.Accel(dev, compile=True)
    opt = accel.adam(net.parameters(), 3e-4)
    lr = opt.param_groups[0]["lr"]
    accel.load_optimizer(opt, plain.state_dict())
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-3)
    assert opt.state[next(iter(net.parameters()))]["step"].item() == 1
    back = op.Accel(dev).adam(net.parameters(), 3e-4)  # an eager resume of a compiled run gets a float back
    op.Accel(dev).load_optimizer(back, opt.state_dict())
    assert not torch.is_tensor(back.param_groups[0]["lr"]) and back.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_compile_never_falls_back_to_eager_silently():
    op.Accel(torch.device("cpu"), compile=True)
    assert torch._dynamo.config.recompile_limit >= 64 and torch._dynamo.config.fail_on_recompile_limit_hit


@cuda
@pytest.mark.parametrize("algo", ["cql", "iql", "td3_bc", "bc"])
@pytest.mark.parametrize("compile", [False, True])
def test_cudagraph_update_equals_eager_gpu(algo, compile, same_random):
    """Warm-up calls, capture and replays together must reproduce the eager updates (GPU only)."""
    eager, fast = twin_learners(algo, {"cudagraphs": True, "compile": compile}, device="cuda")
    assert_same_run(eager, fast, steps=8, device="cuda", atol=1e-4, rtol=1e-3)
    assert fast.step_fn.graphs, "no CUDA graph was captured"


def test_offline_run_with_compile_and_bf16(tiny_dataset, tmp_path):
    from conftest import TINY_OFFLINE

    res = op.main(tyro.cli(op.Args, args=["--algo", "bc", "--env", "hopper-medium-v2", "--run-dir", str(tmp_path), *TINY_OFFLINE, "--compile", "--bf16"]))
    ckpt = op.load_checkpoint(res["checkpoint"])
    assert ckpt["grad_steps"] == 60 and ckpt["args"]["compile"] and ckpt["args"]["bf16"]
    assert all(p.dtype == torch.float32 for p in ckpt["actor"].values())
    assert len(res["eval_history"]) == 2
