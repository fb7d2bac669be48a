"""TensorBoard scalars of one peer (``--tensorboard DIR``): one run, DIR/<peer name>, per peer.

An ``Events`` tap: it writes on the peer's event loop thread, as each progress, eval and
finished event is emitted, never on the training thread. ``SummaryWriter`` queues the
records for a writer thread of its own, so a slow disk does not hold up the loop either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .runtime import UserError

INSTALL = "pip install 'gossip-train[tensorboard]'"
# Seconds between flushes of the event file: a live TensorBoard sees new points this soon.
FLUSH_SECONDS = 5
# Progress fields written as they are, under train/.
PROGRESS = ("loss", "exchanges", "alive", "compression_ratio", "disagreement")


def require(flag: str = "--tensorboard") -> None:
    """Fail in one line, before anything starts, when tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} needs the tensorboard package: {INSTALL}") from None


def run_name(peer: str) -> str:
    """A folder name for a peer's run: its name, with what a path must not hold replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", peer) or "peer"


class Board:
    """Writes a peer's scalars from its events; the writer is made at the first one, when
    the peer's name (an address, unless given) is known."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._writer: Any = None

    def _open(self, peer: str) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            path = self.directory / run_name(peer)
            self._writer = SummaryWriter(log_dir=str(path), flush_secs=FLUSH_SECONDS)
        return self._writer

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        step = event.get("steps" if kind == "finished" else "step")
        if kind not in ("progress", "eval", "finished") or not isinstance(step, int):
            return
        w = self._open(str(event.get("peer", "peer")))
        wall = event.get("ts")
        scalars: dict[str, float] = {}
        if kind == "progress":
            for key in PROGRESS:
                scalars[f"train/{key}"] = event.get(key)  # type: ignore[assignment]
            scalars["bytes/sent"] = event.get("bytes_sent")  # type: ignore[assignment]
            scalars["bytes/received"] = event.get("bytes_received")  # type: ignore[assignment]
            for name, way in (event.get("bytes") or {}).items():
                scalars[f"bytes/{name}_sent"] = way.get("sent")
                scalars[f"bytes/{name}_received"] = way.get("received")
        else:  # eval, and the final evaluation of "finished"
            metrics = event.get("metrics") or {}
            prefix = "eval" if kind == "eval" else "final"
            for key, value in metrics.items():
                scalars[f"{prefix}/{key}"] = value
            if metrics:  # the headline metric: the first the task reports
                scalars[f"{prefix}/headline"] = next(iter(metrics.values()))
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                w.add_scalar(tag, value, global_step=step, walltime=wall)
        if kind == "finished":
            w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
