"""The zygote forks real peer processes that behave like `gossip-train peer`."""

import asyncio
import json
import os
import signal

import pytest

from gossip.events import read_events as file_events
from trainer.config import PeerConfig, TrainConfig, save_config
from trainer.launch.zygote import Zygote

pytestmark = pytest.mark.real


async def read_events(events):
    out = []
    while line := await events.readline():
        out.append(json.loads(line))
    return out


def config(tmp_path, name, **train):
    cfg = PeerConfig(name=name, run_dir=str(tmp_path / name), train=TrainConfig(**train))
    return str(save_config(cfg, tmp_path / f"{name}.json"))


async def test_forked_peers_run_report_and_exit(tmp_path):
    z = Zygote()
    await z.start("default", None)
    try:
        ok, ok_events = await z.spawn(config(tmp_path, "ok", epochs=0.05), str(tmp_path / "ok.log"))
        bad, bad_events = await z.spawn(
            config(tmp_path, "bad", partition="nonsense"), str(tmp_path / "bad.log")
        )
        slow, slow_events = await z.spawn(
            config(tmp_path, "slow", epochs=1000), str(tmp_path / "slow.log")
        )
        async with asyncio.timeout(120):
            events = await read_events(ok_events)
            assert await ok.wait() == 0
            assert await bad.wait() == 2
            first = json.loads(await slow_events.readline())
            os.kill(slow.pid, signal.SIGKILL)
            assert await slow.wait() == -signal.SIGKILL
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "listening" and kinds[-1] == "finished"
        assert (tmp_path / "ok" / "final.pt").is_file()
        # The channel carried a copy; the peer's own file has the same events.
        assert [e["kind"] for e in file_events(tmp_path / "ok" / "events.jsonl")] == kinds
        assert "partition 'nonsense'" in (tmp_path / "bad.log").read_text()
        assert first["kind"] == "listening"
        assert len({ok.pid, bad.pid, slow.pid}) == 3
        for pipe in (ok_events, bad_events, slow_events):
            pipe.close()
    finally:
        await z.close()


async def test_a_bad_data_dir_fails_the_zygote_with_one_line(tmp_path):
    z = Zygote()
    with pytest.raises(Exception, match="nope"):
        await z.start("mnist", str(tmp_path / "nope"))
    await z.close()
