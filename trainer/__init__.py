"""gossip-train's public face, for your own code.

    from trainer import GossipOptimizer     # gossip for a training loop you keep
    from trainer import split               # cut one data set among peers (iid, dirichlet)
    from trainer import load_task           # a task file or built-in task, checked
    from trainer import FlatAdam            # Adam over the flat weight vector (fast, exact)

Names are imported on first use, so ``import trainer`` (and the CLI) stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "GossipOptimizer": "trainer.own_loop",
    "GossipError": "trainer.own_loop",
    "split": "trainer.partition",
    "load_task": "trainer.task",
    "TaskError": "trainer.task",
    "FlatAdam": "trainer.optim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
