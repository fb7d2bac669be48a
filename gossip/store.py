"""A ``WeightStore`` over a plain numpy vector, for simulations and benchmarks."""

from __future__ import annotations

import asyncio

import numpy as np

from .averaging import mix


class ArrayStore:
    def __init__(self, weights: np.ndarray, schema: str = "array") -> None:
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.schema = schema
        self.nbytes = self.weights.nbytes
        self._lock = asyncio.Lock()

    async def snapshot(self) -> np.ndarray:
        return self.weights.copy()

    async def mix(self, snapshot: np.ndarray, remote: np.ndarray) -> None:
        async with self._lock:
            mix(self.weights, snapshot, remote)
