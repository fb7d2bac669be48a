"""Training and resuming in a fresh process never import torch._dynamo (FlatAdam)."""

from __future__ import annotations

import subprocess
import sys


def test_training_never_imports_dynamo(tmp_path) -> None:
    """A torch.optim optimizer imports torch._dynamo (1.4 CPU s) on first use; ours does not."""
    code = f"""
import sys, threading
from trainer.config import CheckpointConfig, TrainConfig
from trainer.loop import Trainer
tr = Trainer(TrainConfig(epochs=0.02), 0, 2)
tr.enable_checkpoints(CheckpointConfig(directory={str(tmp_path)!r}, every_steps=5))
tr.run(threading.Event(), lambda info: None)
tr.checkpoint_now(wait=True)
tr.close()
again = Trainer(TrainConfig(epochs=0.02), 0, 2)
again.enable_checkpoints(CheckpointConfig(directory={str(tmp_path)!r}))
assert again.optimizer.steps == tr.step > 0, (again.optimizer.steps, tr.step)
print("dynamo" if "torch._dynamo" in sys.modules else "clean")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "clean", out.stderr[-2000:]
