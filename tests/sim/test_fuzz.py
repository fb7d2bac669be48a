"""A short run of the fuzzing harness (benchmarks/fuzz.py) on every target, and checks that
the harness does find what it is there to find: crashes, hangs, allocations, leaks."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2p import secure
from p2p.framing import MAGIC, PREFIX, Decoder, FrameError, Limits, MsgType

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("gossip_fuzz", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


fuzz = _load()


def test_twenty_thousand_frames_through_every_target_find_nothing() -> None:
    report = fuzz.run_fuzz(20_000, seed=2026, case_timeout=10.0, trace_every=20)
    found = "\n".join(
        f"{f.kind} {f.target} #{f.case}: {f.error} at {f.where}" for f in report.findings
    )
    assert not report.findings, found
    assert report.failures == 0
    assert [t.name for t in report.targets] == list(fuzz.TARGET_NAMES)
    assert sum(t.frames for t in report.targets) >= 20_000
    for t in report.targets:
        assert t.cases > 0 and t.traced_cases > 0, t.name
    # The stream targets saw both kinds of input: refused by the decoder and handled.
    for name in ("decoder", "node", "tcp", "secure"):
        t = next(t for t in report.targets if t.name == name)
        assert 0 < t.rejected < t.cases, name


@pytest.mark.parametrize("declared", [2 << 30, 2**40, 2**64 - 1])
def test_a_declared_length_over_the_limit_allocates_nothing(declared: int) -> None:
    # A header that agrees with the prefix, so only the limit stops the allocation.
    head = fuzz.msgpack.packb({"_seg": [declared]})
    data = PREFIX.pack(MAGIC, MsgType.EXCH_PAYLOAD, 0, len(head), declared) + head + b"\0" * 64
    for limits in (fuzz.LIMITS, Limits(max_payload=(2 << 30) - 1)):
        tracemalloc.start()
        try:
            with pytest.raises(FrameError, match="over limit"):
                Decoder(limits).feed(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20  # the decoder's 64 KiB scratch buffer, not the declared length


def _target(run: Any, allowed: tuple[type[BaseException], ...] = ()) -> Any:
    ctx = fuzz.Context(1024, None)
    return fuzz.Target("probe", lambda fz: (fz.stream(ctx), 0), run, allowed)


def _run(target: Any, frames: int = 200, trace_every: int = 1, timeout: float = 5.0) -> Any:
    runner = fuzz.Runner(seed=1, case_timeout=timeout, trace_every=trace_every)
    tracemalloc.start()
    try:
        return asyncio.run(runner.run([target], frames))
    finally:
        tracemalloc.stop()


def test_the_harness_reports_an_escaping_exception_once_per_place() -> None:
    def run(case: tuple[bytes, int]) -> None:
        for frame in Decoder(fuzz.LIMITS).feed(case[0]):
            frame.header["missing"]  # a handler that trusts a field

    report = _run(_target(run, (FrameError,)))
    (res,) = report.targets
    assert res.crashes > 0 and res.rejected > 0
    (finding,) = report.findings
    assert finding.kind == "crash" and finding.error.startswith("KeyError")
    assert finding.count == res.crashes


def test_the_harness_reports_a_wait_without_deadline_as_a_hang() -> None:
    async def run(case: tuple[bytes, int]) -> None:
        if case[0][:2] != MAGIC:
            await asyncio.Event().wait()  # waits for a peer that never answers

    report = _run(_target(run), frames=100, timeout=0.05)
    (res,) = report.targets
    assert res.hangs > 0 and res.crashes == 0
    assert report.findings[0].kind == "hang"


def test_the_harness_reports_an_allocation_its_input_does_not_justify() -> None:
    hold: list[bytearray] = []
    calls = [0]

    def run(case: tuple[bytes, int]) -> None:
        calls[0] += 1
        if calls[0] > fuzz.WARM_UP and len(hold) < 3:
            hold.append(bytearray(64 << 20))  # kept: a leak as well

    report = _run(_target(run), frames=100)
    (res,) = report.targets
    kinds = {f.kind for f in report.findings}
    assert res.memory >= 2 and kinds == {"memory", "leak"}


class _Unverified:
    """AES-GCM that opens a record whose tag does not match anyway (GCM is CTR mode from
    counter block 2 under a 96-bit nonce): a sealed layer that skips tag verification."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.aead = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, associated: bytes | None) -> bytes:
        return self.aead.encrypt(nonce, data, associated)

    def decrypt(self, nonce: bytes, data: bytes, associated: bytes | None) -> bytes:
        try:
            return self.aead.decrypt(nonce, data, associated)
        except InvalidTag:
            ctr = Cipher(algorithms.AES(self.key), modes.CTR(bytes(nonce) + b"\0\0\0\2"))
            return ctr.decryptor().update(bytes(data[:-16]))


def test_the_secure_target_reports_records_accepted_without_their_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secure, "AESGCM", _Unverified)
    report = fuzz.run_fuzz(3000, seed=5, targets=["secure"], trace_every=20)
    errors = {f.error.split(",")[0] for f in report.findings if f.kind == "crash"}
    assert any("handled after record" in e for e in errors), errors
    assert any("failed authentication; connection open" in e for e in errors), errors


def test_the_secure_target_finds_nothing_in_the_sealed_layer_as_it_is() -> None:
    report = fuzz.run_fuzz(3000, seed=5, targets=["secure"], trace_every=20)
    assert not report.findings, report.findings[:3]
    (res,) = report.targets
    assert 0 < res.rejected < res.cases
