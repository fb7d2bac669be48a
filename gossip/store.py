"""A ``WeightStore`` over a plain numpy vector, for simulations and benchmarks."""

from __future__ import annotations

import threading

import numpy as np


class ArrayStore:
    def __init__(self, weights: np.ndarray, schema: str = "array") -> None:
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.schema = schema
        self.nbytes = self.weights.nbytes
        self.lock = threading.Lock()

    @property
    def array(self) -> np.ndarray:
        return self.weights
