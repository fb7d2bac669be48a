"""Local checkpoints: atomic writes, keep-K rotation, corruption-tolerant loading.

A checkpoint is a plain dict (see ``REQUIRED_KEYS``) holding only tensors, ints, floats,
strings, bools, None, lists, tuples and dicts, so it always loads with
``torch.load(path, weights_only=True)``: a checkpoint never executes code when read.

Writes go to a temp file in the same folder, are fsynced, then renamed over the final name
and the folder is fsynced, so a crash at any moment leaves either the old file or the new
one, never a torn one under a checkpoint name.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1


class OptimizerState(Protocol):
    """What a checkpoint needs of an optimizer (``torch.optim`` ones and ``FlatAdam``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


# Key -> accepted types. ``time`` may be an int when a caller passes a whole-second stamp.
REQUIRED_KEYS: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "model": (dict,),
    "optimizer": (dict,),
    "step": (int,),
    "data": (dict,),
    "rng": (dict,),
    "config": (dict,),
    "peers": (list,),
    "incarnation": (int,),
    "time": (float, int),
}

# Config keys that must agree between a checkpoint and the peer that resumes from it: a
# different model or data slice would silently train the wrong thing.
COMPAT_KEYS: tuple[str, ...] = ("model", "dataset", "partition", "seed", "peer_index")

_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.pt$")
_TEMP_RE = re.compile(r"^\.ckpt-\d{9,}\.pt\..+\.tmp$")
_WRITE_CHUNK = 1 << 20
_MISSING = "<missing>"


class CheckpointError(Exception):
    """A checkpoint could not be written, read or used; the message names file and problem."""


# ---------------------------------------------------------------- building and checking


def build_checkpoint(
    *,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    step: int,
    data: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    peers: Iterable[str] = (),
    incarnation: int = 0,
) -> dict[str, Any]:
    """Assemble a checkpoint dict; ``rng`` defaults to the current global RNG states."""
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "model": dict(model),
        "optimizer": dict(optimizer),
        "step": int(step),
        "data": dict(data or {}),
        "rng": dict(rng) if rng is not None else capture_rng(),
        "config": dict(config or {}),
        "peers": [str(p) for p in peers],
        "incarnation": int(incarnation),
        "time": time.time(),
    }
    check_state(ckpt)
    return ckpt


def check_state(state: Mapping[str, Any], source: str = "checkpoint state") -> None:
    """Raise CheckpointError unless ``state`` has every required key with the right type."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a dict but {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a checkpoint (missing keys {', '.join(missing)})")
    for key, types in REQUIRED_KEYS.items():
        value = state[key]
        # bool is an int subclass but a True step is a bug, not a step.
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise CheckpointError(f"{source}: '{key}' must be {want}, got {type(value).__name__}")
    if state["format"] != FORMAT:
        raise CheckpointError(
            f"{source}: written in format {state['format']}, this build reads format {FORMAT}"
        )
    if state["step"] < 0:
        raise CheckpointError(f"{source}: negative step {state['step']}")


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would refuse, before it hits disk."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is {type(key).__name__}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} does not load with "
        "weights_only=True; convert it to plain ints, floats, strings, lists or tensors"
    )


# ---------------------------------------------------------------- atomic writes


class _FdWriter(io.RawIOBase):
    """Raw writer over a file descriptor that keeps the OSError torch.save would swallow.

    torch.save turns a failing ``write`` into a RuntimeError without the errno, so the real
    error is stashed here and re-raised by the caller.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            self.error = exc
            raise
        return done


def _dir_error(folder: Path, exc: OSError) -> CheckpointError:
    problems = {
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "no space left (quota)",
        errno.EACCES: "not writable",
        errno.EPERM: "not writable",
        errno.EROFS: "not writable",
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "a parent is not a directory",
    }
    problem = problems.get(exc.errno or 0, "write failed")
    reason = exc.strerror or str(exc)
    return CheckpointError(f"checkpoint dir {folder}: {problem} ({reason})")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(obj: Any, folder: Path, name: str) -> Path:
    """Serialize ``obj`` into a fsynced temp file in ``folder``; return its path."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    raw = _FdWriter(fd)
    try:
        with io.BufferedWriter(raw, buffer_size=_WRITE_CHUNK) as buffered:
            try:
                torch.save(obj, buffered)
                buffered.flush()
            except RuntimeError:
                if raw.error is not None:
                    raise raw.error from None
                raise
            os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        # BufferedWriter closes the raw object, not the descriptor it wraps.
        os.close(fd)
    return tmp


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves the old file or the new, never a mix.

    The temp file lives in the same folder (a rename across file systems is not atomic) and
    is removed on any error; the existing file at ``path`` is only replaced once the new
    bytes are on disk.
    """
    path = Path(path)
    folder = path.parent
    _check_plain(obj, path.name)
    try:
        tmp = _write_temp(obj, folder, path.name)
    except OSError as exc:
        raise _dir_error(folder, exc) from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot serialize ({_first_line(exc)})") from exc
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _dir_error(folder, exc) from exc
    try:
        _fsync_dir(folder)
    except OSError as exc:
        # The rename happened; only its durability across a power loss is in doubt.
        log.warning("checkpoint dir %s: fsync failed (%s)", folder, exc.strerror)


# ---------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_raw(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read ({exc.strerror})") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read ({exc.strerror})") from exc
    # torch.load raises many types on damaged bytes (RuntimeError, UnpicklingError,
    # EOFError, ValueError, ...); all of them mean the same thing to the caller.
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: corrupt or truncated ({_first_line(exc)})"
        ) from exc


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and structurally check one checkpoint file (weights_only, onto the CPU)."""
    path = Path(path)
    obj = _load_raw(path)
    check_state(obj, f"checkpoint {path}")
    return dict(obj)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_any(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint dict or a plain model state_dict (e.g. the final model file).

    A checkpoint comes back whole; use ``model_state(result)`` for the weights of either.
    """
    path = Path(path)
    obj = _load_raw(path)
    if isinstance(obj, Mapping) and "format" in obj:
        check_state(obj, f"checkpoint {path}")
        return dict(obj)
    if _is_state_dict(obj) and obj:
        return dict(obj)
    raise CheckpointError(
        f"file {path}: neither a checkpoint nor a model state_dict ({type(obj).__name__})"
    )


def model_state(loaded: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of what ``load_any`` returned."""
    if "format" in loaded:
        return dict(loaded["model"])
    return dict(loaded)


def is_checkpoint_file(path: str | os.PathLike[str]) -> bool:
    """True for a regular file named like a finished checkpoint (``ckpt-<step:09d>.pt``)."""
    path = Path(path)
    return _NAME_RE.match(path.name) is not None and path.is_file()


def _step_of(path: Path) -> int:
    match = _NAME_RE.match(path.name)
    if match is None:
        raise ValueError(f"not a checkpoint name: {path.name}")
    return int(match.group(1))


# ---------------------------------------------------------------- the store


class CheckpointStore:
    """A folder of ``ckpt-<step:09d>.pt`` files, newest ``keep`` kept."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._validate_dir()
        self.cleanup_temp()

    def _validate_dir(self) -> None:
        folder = self.directory
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"checkpoint dir {folder}: not a directory")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _dir_error(folder, exc) from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CheckpointError(f"checkpoint dir {folder}: not writable (Permission denied)")

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:09d}.pt"

    def list(self) -> list[Path]:
        """Finished checkpoint files, oldest step first; temp files are not listed."""
        found = [p for p in self.directory.iterdir() if is_checkpoint_file(p)]
        return sorted(found, key=_step_of)

    def cleanup_temp(self) -> int:
        """Remove temp files left by a writer that died mid-write; return how many.

        Only safe while no writer uses this folder, hence called at construction: one peer
        owns one folder, and a new store means the previous owner is gone.
        """
        removed = 0
        for entry in self.directory.iterdir():
            if _TEMP_RE.match(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info(
                "checkpoint dir %s: removed %d unfinished temp file(s)", self.directory, removed
            )
        return removed

    def save(self, state: Mapping[str, Any]) -> Path:
        """Write ``state`` atomically as ``ckpt-<step>.pt``, then prune to the newest ``keep``."""
        check_state(state)
        path = self.path_for(state["step"])
        save_atomic(dict(state), path)
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            try:
                old.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                # The new checkpoint is safe; a stale one left behind costs only disk.
                log.warning("checkpoint %s: cannot remove old file (%s)", old, exc.strerror)

    def latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None; each bad file skipped is logged once."""
        for path in reversed(self.list()):
            try:
                return load_checkpoint(path), path
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        return None


# ---------------------------------------------------------------- compatibility


def _fmt(value: Any) -> str:
    return _MISSING if value is _MISSING else repr(value)


def validate_compatible(
    ckpt_config: Mapping[str, Any],
    current_config: Mapping[str, Any],
    keys: Iterable[str] = COMPAT_KEYS,
    source: str = "checkpoint",
) -> None:
    """Raise CheckpointError naming every key in ``keys`` whose values differ.

    A key absent from both configs is not compared; absent from one side is a mismatch.
    """
    bad = []
    for key in keys:
        if key not in ckpt_config and key not in current_config:
            continue
        old = ckpt_config.get(key, _MISSING)
        new = current_config.get(key, _MISSING)
        if old != new:
            bad.append((key, old, new))
    if not bad:
        return
    was = " and ".join(f"{k} {_fmt(old)}" for k, old, _ in bad)
    now = " and ".join(f"{k} {_fmt(new)}" for k, _, new in bad)
    raise CheckpointError(f"{source} was written for {was}, this peer runs {now}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_model(
    state_dict: Mapping[str, Any], model: torch.nn.Module, source: str = "checkpoint"
) -> None:
    """Raise CheckpointError naming the first tensor whose name, shape or dtype differ."""
    expected = model.state_dict()
    for name, want in expected.items():
        got = state_dict.get(name)
        if got is None:
            raise CheckpointError(f"{source}: tensor '{name}' missing, the model has it")
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{source}: '{name}' is {type(got).__name__}, not a tensor")
        if got.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {_shape(got)}, model expects {_shape(want)}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"{source}: tensor '{name}' has dtype {got.dtype}, model expects {want.dtype}"
            )
    for name in state_dict:
        if name not in expected:
            raise CheckpointError(f"{source}: tensor '{name}' is not in the model")


def restore_training_state(
    ckpt: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: OptimizerState | None = None,
    source: str = "checkpoint",
) -> None:
    """Check the weights against ``model``, then load model and optimizer state."""
    validate_model(ckpt["model"], model, source)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{source}: optimizer state does not fit ({_first_line(exc)})"
            ) from exc


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Global torch, numpy and python RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    # Asking for CUDA states would initialise CUDA in a process that never used it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNGs from ``capture_rng()`` output."""
    try:
        torch_state = state["torch"]
        npy = state["numpy"]
        py = state["python"]
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np_state = (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        py_state = (py["version"], tuple(py["state"]), py["gauss_next"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"rng state: malformed ({_first_line(exc)})") from exc
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        raise CheckpointError("rng state: 'torch' must be a uint8 tensor")
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- background writes


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device="cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return obj


def snapshot_model_optimizer(
    model: torch.nn.Module, optimizer: OptimizerState | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """CPU copies of model and optimizer state, safe to serialize while training goes on.

    Call it under the lock that guards the step: it only copies memory, so the stall is the
    time of a memcpy of the weights and optimizer moments.
    """
    weights = {k: v.detach().to(device="cpu", copy=True) for k, v in model.state_dict().items()}
    optim_state = _clone_tree(optimizer.state_dict()) if optimizer is not None else {}
    return weights, optim_state


class BackgroundCheckpointer:
    """One worker thread that writes submitted checkpoints through a ``CheckpointStore``.

    At most one checkpoint waits: a submit while a write is in flight replaces the waiting
    one, since only the newest state is worth writing and memory must stay bounded.
    """

    def __init__(self, store: CheckpointStore, name: str = "checkpoint-writer") -> None:
        self.store = store
        self.written = 0  # checkpoints written
        self.replaced = 0  # submitted checkpoints dropped for a newer one
        self.failed = 0  # writes that raised
        self.last_path: Path | None = None
        self.last_time: float | None = None  # time.time() of the last write (checkpoint age)
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._closed = False
        self._last_error: Exception | None = None
        self._error_logged = False
        # Daemon: a write stuck on a dead disk must not keep the process alive at exit;
        # close() is the orderly path and waits a bounded time.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def last_error(self) -> Exception | None:
        """The error of the most recent write, None once a later write succeeds."""
        with self._cond:
            return self._last_error

    @property
    def in_flight(self) -> bool:
        """True while a checkpoint is being written or waits to be."""
        with self._cond:
            return self._busy or self._pending is not None

    def submit(self, state: Mapping[str, Any]) -> None:
        """Queue ``state`` (tensors already copied) for writing; never blocks on disk."""
        check_state(state)
        with self._cond:
            if self._closed:
                raise CheckpointError(f"checkpoint dir {self.store.directory}: writer is closed")
            if self._pending is not None:
                self.replaced += 1
                log.debug(
                    "checkpoint step %d replaced by step %d", self._pending["step"], state["step"]
                )
            self._pending = dict(state)
            self._cond.notify_all()

    def _next(self) -> dict[str, Any] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._closed)
            if self._pending is None:
                return None
            state, self._pending = self._pending, None
            self._busy = True
            return state

    def _run(self) -> None:
        while (state := self._next()) is not None:
            try:
                path = self.store.save(state)
            except Exception as exc:  # a writer thread that dies silently is worse
                self._record_failure(exc)
            else:
                self._record_success(path)

    def _record_failure(self, exc: Exception) -> None:
        with self._cond:
            self.failed += 1
            self._last_error = exc
            first = not self._error_logged
            self._error_logged = True
            self._busy = False
            self._cond.notify_all()
        if first:
            log.error("background checkpoint failed: %s", exc)

    def _record_success(self, path: Path) -> None:
        with self._cond:
            self.written += 1
            self.last_path = path
            self.last_time = time.time()
            self._last_error = None
            # A new streak of failures after a success deserves its own log line.
            self._error_logged = False
            self._busy = False
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until nothing is pending or in flight; True if drained."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout
            )

    def close(self, timeout: float) -> bool:
        """Write what is pending (bounded by ``timeout``), stop the worker; True if clean."""
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        with self._cond:
            if self._pending is not None:
                log.warning("checkpoint step %d dropped at close", self._pending["step"])
                self._pending = None
            self._closed = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return drained and not self._thread.is_alive()

    def __enter__(self) -> BackgroundCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(timeout=30.0)
