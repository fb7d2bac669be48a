"""The zygote forks real peer processes that behave like `gossip-train peer`."""

import asyncio
import json
import os
import signal

import pytest

from trainer.launch.zygote import Zygote

pytestmark = pytest.mark.real


async def read_events(child):
    events = []
    while line := await child.stdout.readline():
        events.append(json.loads(line))
    return events


async def test_forked_peers_run_report_and_exit(tmp_path):
    z = Zygote()
    await z.start("default", None)
    try:
        ok = await z.spawn(
            ["peer", "--epochs", "0.05", "--events", "jsonl", "--run-dir", str(tmp_path / "ok")],
            str(tmp_path / "ok.log"),
        )
        bad = await z.spawn(["peer", "--partition", "nonsense"], str(tmp_path / "bad.log"))
        slow = await z.spawn(
            ["peer", "--epochs", "1000", "--events", "jsonl", "--run-dir", str(tmp_path / "slow")],
            str(tmp_path / "slow.log"),
        )
        async with asyncio.timeout(120):
            events = await read_events(ok)
            assert await ok.wait() == 0
            assert await bad.wait() == 2
            first = json.loads(await slow.stdout.readline())
            os.kill(slow.pid, signal.SIGKILL)
            assert await slow.wait() == -signal.SIGKILL
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "listening" and kinds[-1] == "finished"
        assert (tmp_path / "ok" / "final.pt").is_file()
        assert "partition 'nonsense'" in (tmp_path / "bad.log").read_text()
        assert first["kind"] == "listening"
        assert len({ok.pid, bad.pid, slow.pid}) == 3
    finally:
        await z.close()


async def test_a_bad_data_dir_fails_the_zygote_with_one_line(tmp_path):
    z = Zygote()
    with pytest.raises(Exception, match="nope"):
        await z.start("mnist", str(tmp_path / "nope"))
    await z.close()
