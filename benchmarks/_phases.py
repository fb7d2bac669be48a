"""Phase timers for one side of an exchange, attached from outside the code under test.

``instrument(exchanger)`` wraps the store's snapshot and add, the delta and update check, the
connect + handshake and the decoder's payload buffer with wall-clock timers
(in this process only; the measured modules are not edited). What is left of an exchange's
time after these phases is the transfer itself: socket I/O, framing and the event loop.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import gossip.exchange as gx
import p2p.framing as framing
from gossip.exchange import Exchanger


class PhaseClock:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._current: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self._current[name] += seconds

    def end_round(self, total: float) -> None:
        """Close one exchange: phases summed within it, the remainder called 'transfer'."""
        known = sum(self._current.values())
        self._current["transfer (I/O, framing, loop, waiting)"] = max(0.0, total - known)
        self._current["total"] = total
        for name, seconds in self._current.items():
            self.samples[name].append(seconds)
        self._current.clear()

    def discard_round(self) -> None:
        self._current.clear()

    def medians_ms(self) -> dict[str, float]:
        return {k: 1e3 * statistics.median(v) for k, v in self.samples.items()}

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper

    def timed_async(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper


def instrument(exchanger: Exchanger, clock: PhaseClock) -> None:
    """Wrap the phases of ``exchanger``'s exchanges (both roles) with ``clock``'s timers."""
    # On the event loop when the weights are free, else in a worker thread. The responder
    # copies its snapshot piece by piece while sending it: that is inside "transfer".
    ex: Any = exchanger
    ex._take_snapshot = clock.timed_async("snapshot (copy)", ex._take_snapshot)
    ex._mix = clock.timed_async("mix (add)", ex._mix)
    exchanger.node.open = clock.timed_async("connect + handshake", exchanger.node.open)  # type: ignore[method-assign]
    # The delta and its norms: pieces while the payload arrives, the rest after its last byte.
    ds = gx.DeltaStream
    advance, finish = ds._advance, ds.finish
    after_last_byte = False

    def timed_advance(self: Any, remote: Any, upto: int) -> None:
        if after_last_byte:
            advance(self, remote, upto)  # timed as part of finish
        else:
            clock.timed("delta while receiving", advance)(self, remote, upto)

    def timed_finish(self: Any, remote: Any) -> Any:
        nonlocal after_last_byte
        after_last_byte = True
        try:
            return clock.timed("delta after last byte + check", finish)(self, remote)
        finally:
            after_last_byte = False

    ds._advance = timed_advance  # type: ignore[method-assign]
    ds.finish = timed_finish  # type: ignore[method-assign]
    # The payload buffer is taken (from the pool, or allocated) when the header is decoded.
    framing.Decoder._header_done = clock.timed(  # type: ignore[method-assign]
        "payload buffer", framing.Decoder._header_done
    )
