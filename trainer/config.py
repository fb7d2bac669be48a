"""Peer configuration: one frozen dataclass per concern, filled by the CLI or a TOML file."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.agent import AgentConfig
from gossip.exchange import GossipConfig
from gossip.outer import OuterConfig
from gossip.policy import ScheduleConfig


@dataclass(frozen=True)
class TrainConfig:
    # What to train: a built-in task name (classifier, shakespeare) or a task file's path.
    # The classifier task reads dataset, data_dir and model below.
    task: str = "classifier"
    # "default" is the small MNIST subset shipped in the package (no download).
    dataset: str = "default"
    # Folder with the IDX files for mnist / fashion-mnist (plain, .gz or .gz.partN).
    data_dir: str | None = None
    # "mlp" (784-128-10, the reference model) or "cnn" (two conv layers; slower, stronger).
    model: str = "mlp"
    # "iid" or "dirichlet:ALPHA"; smaller ALPHA gives each peer a more skewed label mix.
    partition: str = "iid"
    # Passes over this peer's own partition; None: the task's DEFAULTS, else 1.
    epochs: float | None = None
    # Local steps to train; overrides epochs. None: from epochs (or the task's DEFAULTS).
    steps: int | None = None
    # None: the task's DEFAULTS, else 32.
    batch_size: int | None = None
    # Learning rate handed to the task's optimizer(lr=...); None: the task's own default
    # (1e-3 for the default Adam).
    lr: float | None = None
    # Clip the gradient's global norm to this before each update (0: no clipping); None:
    # the task's DEFAULTS, else no clipping.
    clip_grad: float | None = None
    # Worker processes fetching batches ahead (a torch DataLoader); 0 fetches on the
    # training thread, which is fastest for in-memory tensors.
    loader_workers: int = 0
    # "cpu", "cuda", "cuda:N" or "auto" (a GPU when there is one).
    device: str = "cpu"
    # Evaluation batch size.
    eval_batch_size: int = 256
    # Base seed. Every peer starts from the same initial weights (seed alone), shuffles its
    # data with (seed, peer index), and all peers compute the same disjoint partition.
    seed: int = 0
    # torch intra-op threads; 0 means max(1, cores // local peers).
    threads: int = 0
    # Evaluate the task's metrics every this many steps (0 = only at the end). Costs one pass
    # over the evaluation set on the training thread; used to measure time to accuracy.
    eval_every: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    # Folder for this peer's checkpoints; None disables checkpointing.
    directory: str | None = None
    # Write every this many steps (0 = off) ...
    every_steps: int = 500
    # ... or every this many seconds (0 = off), whichever comes first.
    every_seconds: float = 30.0
    # Checkpoint files kept; older ones are deleted after a new one is complete.
    keep: int = 3


@dataclass(frozen=True)
class PeerConfig:
    # Unique peer name; defaults to the advertised address.
    name: str = ""
    # Address to bind; port 0 picks a free port.
    listen: str = "127.0.0.1:0"
    # Address other peers should dial (behind NAT or in a container); defaults to listen.
    advertise: str | None = None
    # Known peers to join through; the first that answers wins. Empty: start a new swarm.
    join: tuple[str, ...] = ()
    # How long to keep trying the join addresses before giving up with an error.
    join_timeout: float = 10.0
    # Swarm name; peers of other clusters are refused at the handshake.
    cluster: str = "gossip-train"
    # This peer's index and the number of peers, for computing its data partition.
    index: int = 0
    num_peers: int = 1
    # Folder for this peer's results (final weights, log).
    run_dir: str = "runs/peer"
    # Membership profile: local, lan, wan or test.
    profile: str = "local"
    # After training, keep averaging while some live peer still trains (so slower peers keep
    # partners, and every finished peer ends near the consensus), at most this long; a peer
    # leaves as soon as every live peer it sees has finished. 0: leave at once.
    linger_seconds: float = 0.0
    # Before training, wait (up to join_timeout) until this many peers, this one included,
    # are members; the launchers set it to the run's size. 0 or 1: start at once.
    wait_peers: int = 0
    # Accept fault-injection commands (slow down) from `gossip-train chaos`. Off by default:
    # anyone who can reach the port could otherwise slow this peer down.
    allow_control: bool = False
    # The swarm's keyring (p2p.secure: one secret per line, the first used to call): every
    # connection is authenticated and sealed with it. None: no authentication, allowed on a
    # loopback address only unless ``insecure``.
    secret_file: str | None = None
    insecure: bool = False
    # Serve live Prometheus metrics on this port of the listen host (trainer.metrics); 0: off.
    metrics_port: int = 0
    # Write TensorBoard scalars into this folder, a run per peer (trainer.board); None: off.
    tensorboard: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    # Infrequent averaging with an outer optimizer (gossip.outer): [outer] steps, lr, momentum.
    outer: OuterConfig = field(default_factory=OuterConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def agent_config(self) -> AgentConfig:
        """What the gossip agent reads (gossip.agent.AgentConfig)."""
        return AgentConfig(
            name=self.name,
            listen=self.listen,
            advertise=self.advertise,
            join=self.join,
            join_timeout=self.join_timeout,
            cluster=self.cluster,
            profile=self.profile,
            linger_seconds=self.linger_seconds,
            wait_peers=self.wait_peers,
            secret_file=self.secret_file,
            seed=self.train.seed * 1000 + self.index,
            gossip=self.gossip,
            schedule=self.schedule,
        )


@dataclass(frozen=True)
class LaunchConfig:
    """Defaults of the launchers (`local`, `run`); their flags read them from here."""

    peers: int = 4
    # Stop the whole run after this many seconds.
    timeout: float = 3600.0
    # Upper bound on a finished peer's linger: it leaves earlier, as soon as every live peer
    # it sees has finished training too. Longer with faults: a restarted peer needs partners.
    linger: float = 60.0
    chaos_linger: float = 120.0
    # With --restart-failed: seconds before a restart, and how many before giving up.
    restart_delay: float = 1.0
    max_restarts: int = 10


# Variables through which `gossip-train run` tells each copy of a script where it stands
# (read by trainer.own_loop.GossipOptimizer): GOSSIP_TRAIN_LISTEN, _JOIN, _RUN_DIR, ...
ENV_PREFIX = "GOSSIP_TRAIN_"


class ConfigError(ValueError):
    pass


def default_threads(local_peers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_peers))


def _fill(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        sub = known[key].default_factory  # type: ignore[misc]
        if isinstance(value, dict) and sub is not dataclasses.MISSING:
            kwargs[key] = _fill(type(sub()), value, f"{where}.{key}")
        elif key == "join":
            kwargs[key] = tuple(value) if isinstance(value, list) else tuple(str(value).split(","))
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a value a dataclass refuses (an unknown codec)
        raise ConfigError(f"{where}: {exc}") from None


def load_toml(path: str | Path) -> PeerConfig:
    """A PeerConfig from a TOML file (top-level peer keys, [train], [gossip], [schedule],
    [outer], [checkpoint]) or from the JSON a launcher writes (``save_config``): same keys."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: not a table of settings")
    return _fill(PeerConfig, data, str(path))


load_config = load_toml


def save_config(cfg: PeerConfig, path: str | Path) -> Path:
    """Write ``cfg`` as JSON, atomically: what a launcher hands each peer it starts."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    os.replace(tmp, path)
    return path
