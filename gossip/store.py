"""A ``WeightStore`` over a plain numpy vector, for simulations and benchmarks."""

from __future__ import annotations

import threading

import numpy as np


class ArrayStore:
    def __init__(self, weights: np.ndarray, schema: str = "array") -> None:
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.schema = schema
        self.nbytes = self.weights.nbytes
        self._lock = threading.Lock()

    def snapshot_into(self, out: np.ndarray) -> None:
        with self._lock:
            np.copyto(out, self.weights)

    def add_scaled(self, delta: np.ndarray, alpha: float) -> None:
        with self._lock:
            self.weights += np.float32(alpha) * delta
