"""The cells of the launchers' live view that need more than a format string: steps per
second over a recent window, the time left, the last evaluation's headline metric."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

# Seconds of progress events a rate is measured over: long enough to smooth the gossip
# pauses out, short enough to follow a peer that slows down (a straggler fault).
RATE_WINDOW = 10.0


class StepRate:
    """Steps per second from (time, step) samples, over the last ``window`` seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, ts: float, step: int) -> None:
        if self._samples and step < self._samples[-1][1]:
            self._samples.clear()  # restarted from an earlier checkpoint: a new series
        self._samples.append((ts, step))
        # Keep one sample older than the window, so the rate always spans all of it.
        while len(self._samples) > 2 and ts - self._samples[1][0] >= self.window:
            self._samples.popleft()

    @property
    def per_second(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def eta_seconds(step: int, total: int | None, rate: float | None) -> float | None:
    """Seconds until ``total`` steps at ``rate``; 0 when done; None when unknown."""
    if not isinstance(total, int) or total <= 0:
        return None
    if step >= total:
        return 0.0
    if not rate or rate <= 0:
        return None
    return (total - step) / rate


def format_eta(seconds: float | None) -> str:
    """At most 6 characters: ``-``, ``42s``, ``3m05s``, ``2h07m``, ``>99h``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 100 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return ">99h"


def format_rate(rate: float | None) -> str:
    """Steps per second in at most 6 characters."""
    if rate is None or not math.isfinite(rate):
        return "-"
    return f"{rate:.1f}" if rate < 1000 else f"{rate:.0f}"


def headline(ev: dict[str, Any] | None) -> tuple[str | None, float | None]:
    """(name, value) of an eval event's first metric, the task's headline; (None, None)."""
    metrics = (ev or {}).get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return None, None
    key, value = next(iter(metrics.items()))
    return str(key), float(value) if isinstance(value, (int, float)) else None


def format_value(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"[:8]
