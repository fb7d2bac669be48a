"""A model's parameters as one flat float32 vector that gossip can snapshot and mix.

Every parameter becomes a view into a single contiguous tensor, so a snapshot is one
memcpy, a mix is one vectorised add, and the bytes on the wire are the tensor's own memory.
The training thread holds ``lock`` while the optimizer writes the weights; gossip's
snapshots and mixes take it too (``lock`` and ``array`` are what
``gossip.exchange.WeightStore`` asks for), so they never see or make a half-written vector.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from gossip.averaging import schema_hash


class FlatWeights:
    def __init__(self, model: torch.nn.Module) -> None:
        named = list(model.named_parameters())
        bad = [n for n, p in named if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"gossip averages float32 parameters only; {bad[0]} is not")
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for _, p in named]).contiguous()
            offset = 0
            for _, p in named:
                n = p.numel()
                p.data = self.flat[offset : offset + n].view_as(p)
                offset += n
        self.params = [p for _, p in named]
        self.array = self.flat.numpy()  # shares memory with the parameters
        self.schema = schema_hash((n, tuple(p.shape), str(p.dtype)) for n, p in named)
        self.nbytes = self.array.nbytes
        self.lock = threading.Lock()

    def load(self, vector: np.ndarray) -> None:
        if vector.shape != self.array.shape:
            raise ValueError(f"weight vector of {vector.size} values, model has {self.array.size}")
        with self.lock:
            self.array[:] = vector
