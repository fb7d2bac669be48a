"""GossipOptimizer in one process: two own loops on threads, gossiping over real TCP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import GossipError, GossipOptimizer
from trainer.config import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loop(
    opt: GossipOptimizer,
    model: nn.Module,
    target: torch.Tensor,
    steps: int,
    barrier: threading.Barrier,
    enough: Callable[[], bool],
) -> None:
    """Step in lockstep with the other loop until both took ``steps`` and ``enough()`` holds.

    Lockstep keeps the two peers symmetric whatever the scheduler does, so where they meet
    depends on the averaging, not on which thread the machine happened to favour.
    """
    gen = torch.Generator().manual_seed(int(target.sum()))
    while True:
        x = torch.randn(16, 4, generator=gen)
        loss = ((model(x) - x @ target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        barrier.wait(60)
        done = opt.step_count >= steps and enough()
        barrier.wait(60)  # both read the same counters before either steps on
        if done:
            break
    opt.report(loss=loss.item())


def test_two_own_loops_average_and_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = [nn.Linear(4, 2), nn.Linear(4, 2)]
    models[1].load_state_dict(models[0].state_dict())
    # Each peer fits its own linear map; averaging pulls both towards the mean map.
    targets = [torch.ones(4, 2), -torch.ones(4, 2)]
    first = GossipOptimizer(
        models[0], torch.optim.SGD(models[0].parameters(), lr=0.05), index=0, num_peers=2,
        run_dir=str(tmp_path / "a"), period=5, linger=0.5, state={"n": 1},
        evaluate=lambda m: {"norm": float(m.weight.norm())},
    )  # fmt: skip
    second = GossipOptimizer(
        models[1], torch.optim.SGD(models[1].parameters(), lr=0.05), index=1, num_peers=2,
        run_dir=str(tmp_path / "b"), period=5, linger=0.5, join=[first.peer.node.addr],
    )  # fmt: skip
    assert first.resumed_step == 0 and first.state == {"n": 1}
    barrier = threading.Barrier(2)
    opts = (first, second)
    decided: dict[int, bool] = {}
    lock = threading.Lock()

    def enough() -> bool:
        # Both loops ask between the same two barriers; the first answer is the answer.
        with lock:
            step = first.step_count
            exchanged = min(o.peer.exchanger.exchanges for o in opts)
            return decided.setdefault(step, exchanged >= 10 or step >= 50_000)

    threads = [
        threading.Thread(target=_loop, args=(opt, m, t, 300, barrier, enough))
        for opt, m, t in zip(opts, models, targets, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    results = [first.close(), second.close()]
    for r in results:
        assert r["status"] == "finished" and r["steps"] >= 300 and r["exchanges"] >= 10, r
    assert results[0]["steps"] == results[1]["steps"]
    assert list(results[0]["metrics"]) == ["norm", "loss"]  # evaluate() first: the headline
    # Alone each would fit its own map (weights near +1 / -1); together they meet near 0.
    assert models[0].weight.abs().mean() < 0.5 and models[1].weight.abs().mean() < 0.5
    assert torch.allclose(models[0].weight, models[1].weight, atol=0.05)
    saved = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    assert set(saved) == {"weight", "bias"}
    with pytest.raises(GossipError, match="after close"):
        first.step()


def test_gossip_failures_and_bad_settings_raise_clearly(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(GossipError, match=f"127.0.0.1:{(port := _free_port())}"):
        GossipOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            join=[f"127.0.0.1:{port}"], join_timeout=1.0, run_dir=str(tmp_path),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="unknown setting.*listn"):
        GossipOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), listn="x")


CRASHES_ONCE = """
import torch
from torch import nn
from trainer import GossipOptimizer

torch.manual_seed(0)
model = nn.Linear(4, 2)
opt = GossipOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), state={"lives": 0})
opt.state["lives"] += 1
for step in range(opt.resumed_step, 60):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    if step == 30 and opt.state["lives"] == 1:
        raise RuntimeError("a bug in the user's loop")
opt.close()
"""


@pytest.mark.real
def test_a_script_that_raises_exits_and_is_restarted_from_its_checkpoint(tmp_path: Path) -> None:
    import json
    import subprocess

    from conftest import ROOT, cli

    script = tmp_path / "crashes_once.py"
    script.write_text(CRASHES_ONCE)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "run",
            "--peers",
            "1",
            "--restart-failed",
            "--checkpoint-every",
            "10",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            str(script),
        ),  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    (peer,) = summary["peers"]
    assert peer["status"] == "finished" and peer["restarts"] == 1 and peer["steps"] == 60
    exits = [e for e in summary["events"] if e["kind"] == "exited"]
    assert [e["returncode"] for e in exits] == [1]  # the exception ended the process
    resumed = [e for e in summary["events"] if e["kind"] == "resumed"]
    # A checkpoint every 10 steps, the newest written before the crash at step 31 (those
    # taken just before may still have been in the writer thread when the process died).
    assert resumed and resumed[-1]["step"] in (10, 20, 30), resumed
    assert "a bug in the user's loop" in (run_dir / "peer-0" / "log.txt").read_text()


def test_gossip_optimizer_joins_only_with_the_swarms_secret(tmp_path: Path) -> None:
    from p2p.secure import write_secret

    good, bad = write_secret(tmp_path / "good.key"), write_secret(tmp_path / "bad.key")
    models = [nn.Linear(2, 2), nn.Linear(2, 2)]
    first = GossipOptimizer(
        models[0], torch.optim.SGD(models[0].parameters(), lr=0.1), run_dir=str(tmp_path / "a"),
        secret_file=str(good), linger=0,
    )  # fmt: skip
    try:
        with pytest.raises(GossipError, match="authentication failed"):
            GossipOptimizer(
                models[1], torch.optim.SGD(models[1].parameters(), lr=0.1),
                run_dir=str(tmp_path / "b"), secret_file=str(bad), join=[first.peer.node.addr],
                join_timeout=3.0,
            )  # fmt: skip
        second = GossipOptimizer(
            models[1], torch.optim.SGD(models[1].parameters(), lr=0.1), run_dir=str(tmp_path / "c"),
            secret_file=str(good), join=[first.peer.node.addr], linger=0, index=1, num_peers=2,
        )  # fmt: skip
        second.close()
    finally:
        first.close()
    assert first.peer.node.refused_callers >= 1
