"""A model's parameters as one flat float32 vector that gossip can snapshot and mix.

Every parameter becomes a view into a single contiguous tensor, so a snapshot is one
memcpy, a mix is one vectorised add, and the bytes on the wire are the tensor's own memory.
The training thread holds ``lock`` for the length of a step; snapshots and mixes take it
too, so averaging lands between steps, never inside one.
"""

from __future__ import annotations

import asyncio
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
        self.array = self.flat.numpy()  # shares memory with the parameters
        self.schema = schema_hash((n, tuple(p.shape), str(p.dtype)) for n, p in named)
        self.nbytes = self.array.nbytes
        self.lock = threading.Lock()

    # -- thread-side primitives -------------------------------------------------------------
    def copy(self) -> np.ndarray:
        with self.lock:
            return self.array.copy()

    def mix_now(self, snapshot: np.ndarray, remote: np.ndarray) -> None:
        delta = np.subtract(remote, snapshot)  # computed outside the lock
        delta *= 0.5
        with self.lock:
            self.array += delta

    def load(self, vector: np.ndarray) -> None:
        if vector.shape != self.array.shape:
            raise ValueError(f"weight vector of {vector.size} values, model has {self.array.size}")
        with self.lock:
            self.array[:] = vector

    # -- WeightStore for gossip.exchange ------------------------------------------------------
    async def snapshot(self) -> np.ndarray:
        return await asyncio.to_thread(self.copy)

    async def mix(self, snapshot: np.ndarray, remote: np.ndarray) -> None:
        await asyncio.to_thread(self.mix_now, snapshot, remote)
