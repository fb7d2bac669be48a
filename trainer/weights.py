"""A model's averaged state as one flat float32 vector that gossip can snapshot and mix.

What is averaged: every trainable parameter and every floating-point buffer (BatchNorm's
running mean and variance, say), in ``named_parameters()`` then ``named_buffers()`` order.
What is not: integer buffers (BatchNorm's ``num_batches_tracked``) stay local, and frozen
parameters (``requires_grad=False``) are left out; every peer builds them from the same seed
and nothing changes them. A floating tensor that is not float32 is refused: gossip mixes
float32 only (convert the model with ``model.float()``).

Every averaged tensor becomes a view into a single contiguous tensor, so a snapshot is one
memcpy, a mix is one vectorised add, and the bytes on the wire are the tensor's own memory.
The training thread holds ``lock`` while the optimizer writes the weights; gossip's
snapshots and mixes take it too (``lock`` and ``array`` are what
``gossip.exchange.WeightStore`` asks for), so they never see or make a half-written vector.

On a GPU the flat vector lives on the device and ``array`` is a pinned host mirror:
``refresh_host`` copies the device vector into it on a side stream before gossip reads it,
and ``push_delta`` sends a mixed-in delta back on that stream; the training stream is
ordered after it by a device-side wait, never a host synchronize of the training stream.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from gossip.averaging import schema_hash


class ModelError(ValueError):
    """A model gossip cannot average as it is: one line naming the tensor."""


def _averaged(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, t in params + buffers:
        if t.dtype != torch.float32:
            raise ModelError(
                f"gossip averages float32 tensors; {name} is {str(t.dtype).removeprefix('torch.')}"
                " (convert the model with .float())"
            )
    devices = {t.device for _, t in params + buffers}
    if len(devices) > 1:
        raise ModelError(f"the model's tensors are on several devices: {sorted(map(str, devices))}")
    return params + buffers


class FlatWeights:
    def __init__(self, model: torch.nn.Module) -> None:
        named = _averaged(model)
        if not named:
            raise ModelError("the model has no trainable parameters to average")
        self.names = [n for n, _ in named]
        self.device = named[0][1].device
        with torch.no_grad():
            self.flat = torch.cat([t.detach().reshape(-1) for _, t in named]).contiguous()
            offset = 0
            for _, t in named:
                n = t.numel()
                t.data = self.flat[offset : offset + n].view_as(t)
                offset += n
        self.tensors = [t for _, t in named]
        self.params = [t for t in self.tensors if isinstance(t, torch.nn.Parameter)]
        self._model = model
        self._ptrs = [t.data_ptr() for t in self.tensors]
        # [name, shape, dtype] per tensor: what a refusal names the first difference of.
        self.layout = [[n, list(t.shape), str(t.dtype)] for n, t in named]
        self.schema = schema_hash((n, tuple(t.shape), str(t.dtype)) for n, t in named)
        self.nbytes = self.flat.numel() * 4
        self.lock = threading.Lock()
        self._mirror: _DeviceMirror | None = None
        if self.device.type == "cpu":
            self.array = self.flat.numpy()  # shares memory with the parameters
        else:
            self._mirror = _DeviceMirror(self.flat)
            self.array = self._mirror.host.numpy()

    def check_bound(self) -> None:
        """Raise ModelError if a tensor no longer lives in the flat vector (it was replaced)."""
        now: dict[str, torch.Tensor] = dict(self._model.named_parameters())
        now.update(self._model.named_buffers())
        for name, ptr in zip(self.names, self._ptrs, strict=True):
            t = now.get(name)
            if t is None or t.data_ptr() != ptr:
                raise ModelError(
                    f"{name} was replaced after gossip took the model (model.to(), .cuda() or "
                    "an assignment); move the model before building the trainer"
                )

    # -- what gossip.exchange calls under ``lock`` (no-ops on the CPU) ------------------------
    def refresh_host(self) -> None:
        if self._mirror is not None:
            self._mirror.refresh()

    def push_delta(self, delta: np.ndarray) -> None:
        if self._mirror is not None:
            self._mirror.push(delta)

    def load(self, vector: np.ndarray) -> None:
        if vector.shape != self.array.shape:
            raise ValueError(f"weight vector of {vector.size} values, model has {self.array.size}")
        with self.lock:
            if self._mirror is None:
                self.array[:] = vector
            else:
                self._mirror.refresh()
                self._mirror.push(vector - self.array)


class _DeviceMirror:
    """A pinned host copy of a device vector, moved on a side stream."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self.staging = torch.empty_like(self.host).pin_memory()
        self.upload = torch.empty_like(flat)
        self.stream = torch.cuda.Stream(device=flat.device)
        self.training = torch.cuda.default_stream(flat.device)

    def refresh(self) -> None:
        """host <- device, after what the training stream has queued so far."""
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(self.training)
            self.host.copy_(self.flat, non_blocking=True)
        self.stream.synchronize()  # the side stream only: training's stream runs on

    def push(self, delta: np.ndarray) -> None:
        """device += delta; the training stream waits for it on the device, not the host."""
        self.staging.numpy()[:] = delta
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(self.training)
            self.upload.copy_(self.staging, non_blocking=True)
            self.flat.add_(self.upload)
        self.training.wait_stream(self.stream)
        self.stream.synchronize()  # staging may be reused as soon as this returns
