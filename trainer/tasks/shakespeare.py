"""Built-in task: a character-level GPT on Tiny Shakespeare, nanoGPT's CPU configuration.

Model: nanoGPT's GPT (karpathy/nanoGPT, model.py) with n_layer=4, n_head=4, n_embd=128, a
64-character context and the 65 characters of the text as its vocabulary. No dropout and no
biases (bias=False, the default of nanoGPT's train.py); LayerNorm; causal attention through
``scaled_dot_product_attention``; a 4x GELU MLP; the output head tied to the token embedding;
nanoGPT's init (N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 * n_layer))).
804,096 parameters (795,904 without the position embedding: nanoGPT's "0.80M"), and no
buffers, so averaging the parameters averages the whole model.

Data: Tiny Shakespeare (karpathy/char-rnn's input.txt, 1,115,394 characters) ships in the
package as ``assets/tinyshakespeare.txt.gz``; ``data_dir`` reads ``input.txt`` from a folder
instead (it must use the same 65 characters). As in nanoGPT, the first 90% of the characters
train and the last 10% validate. A training sample is a 64-character window and the same window
shifted by one character (the targets); peers share out the windows iid. Every peer evaluates on
the same 480 windows, evenly spaced over the validation text.

Optimizer: AdamW, betas (0.9, 0.99), weight decay 0.1 on matrices and embeddings, none on the
LayerNorm weights (nanoGPT's grouping). DEFAULTS: batch 12, 2000 steps, a constant lr 1e-3,
the gradient's norm clipped at 1.0.

Expected: nanoGPT's README reports a loss of about 1.88 for this configuration after 2000
iterations of batch 12 (its lr 1e-3 warms up for 100 iterations and decays to 1e-4 by a cosine;
gradients clipped at 1.0; "about 3 minutes" on a CPU).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from trainer.partition import parse_scheme, split

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # sorted(set(text))
VOCAB_SIZE = len(CHARS)  # 65
BLOCK_SIZE = 64  # context, in characters
N_LAYER, N_HEAD, N_EMBD = 4, 4, 128
EVAL_WINDOWS = 480
ASSET = "assets/tinyshakespeare.txt.gz"

DEFAULTS = {"batch_size": 12, "lr": 1e-3, "steps": 2000, "clip_grad": 1.0}

_UNKNOWN = 255
_LUT = np.full(256, _UNKNOWN, dtype=np.uint8)  # byte -> character id
_LUT[np.frombuffer(CHARS.encode("ascii"), dtype=np.uint8)] = np.arange(VOCAB_SIZE)


def _encode_bytes(raw: bytes, where: str) -> np.ndarray:
    ids = _LUT[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(ids == _UNKNOWN)
    if bad.size:
        at = int(bad[0])
        char = raw[at : at + 1].decode("latin-1")
        raise ValueError(f"shakespeare: {where}: {char!r} at byte {at} is not in the vocabulary")
    return ids


def encode(text: str) -> list[int]:
    """Character ids of ``text`` (ValueError on a character outside the vocabulary)."""
    return _encode_bytes(text.encode("utf-8"), "encode()").tolist()


def decode(ids: Iterable[int]) -> str:
    """The text of a sequence of character ids (ints or a 1-D tensor)."""
    return "".join(CHARS[int(i)] for i in ids)


@lru_cache(maxsize=4)
def _text(data_dir: str | None) -> np.ndarray:
    """The whole text as uint8 ids, read and encoded once per process (read-only: shared)."""
    if data_dir is None:
        where = f"trainer/{ASSET}"
        raw = gzip.decompress(resources.files("trainer").joinpath(ASSET).read_bytes())
    else:
        path = Path(data_dir) / "input.txt"
        if not path.is_file():
            raise ValueError(f"shakespeare: {path} not found (data_dir must hold input.txt)")
        where, raw = str(path), path.read_bytes()
    ids = _encode_bytes(raw, where)
    ids.flags.writeable = False
    return ids


class Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item i: ``(x, y) = (text[s : s + 64], text[s + 1 : s + 65])`` as int64, s = starts[i].

    Without ``starts``, every window of the text (s = i, ``len(text) - 64`` of them).
    """

    def __init__(self, text: np.ndarray, starts: np.ndarray | None = None) -> None:
        self.text = text
        self.starts = starts

    def __len__(self) -> int:
        return len(self.text) - BLOCK_SIZE if self.starts is None else len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        s = i % n if self.starts is None else int(self.starts[i])
        # astype copies the 65 bytes: the cached text stays read-only and shared.
        chunk = torch.from_numpy(self.text[s : s + BLOCK_SIZE + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def data(
    peer: int, peers: int, seed: int = 0, partition: str = "iid", data_dir: str | None = None
) -> tuple[Dataset, Dataset]:
    """This peer's iid share of the training windows, and the fixed evaluation windows."""
    if parse_scheme(partition).kind != "iid":
        raise ValueError(f"shakespeare: partition must be iid, not {partition!r} (no labels)")
    text = _text(None if data_dir is None else str(data_dir))
    cut = int(len(text) * 0.9)
    train, val = text[:cut], text[cut:]
    if len(val) <= BLOCK_SIZE:
        raise ValueError(f"shakespeare: text of {len(text)} characters is too short")
    starts = np.linspace(0, len(val) - BLOCK_SIZE - 1, EVAL_WINDOWS).round().astype(np.int64)
    return split(Windows(train), peer, peers, partition, seed), Windows(val, starts)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln_1(x)).view(b, t, 3, N_HEAD, c // N_HEAD)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, t, head_size]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """idx [B, T] (T <= 64) -> logits [B, T, 65]."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB_SIZE, N_EMBD)
        self.wpe = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.head = nn.Linear(N_EMBD, VOCAB_SIZE, bias=False)
        self.head.weight = self.wte.weight  # tied: one parameter, listed once as wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # Residual projections shrink with depth so the residual stream's variance
                # does not grow with the number of blocks (GPT-2, as in nanoGPT).
                residual = name.endswith(("attn_proj.weight", "mlp_proj.weight"))
                std = 0.02 / math.sqrt(2 * N_LAYER) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > BLOCK_SIZE:
            raise ValueError(f"shakespeare: sequence of {t} > context of {BLOCK_SIZE}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def model() -> nn.Module:
    return GPT()


def _cross_entropy(
    net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-character cross-entropy over every position of the batch."""
    return _cross_entropy(model, batch)


def optimizer(params: Iterable[nn.Parameter], lr: float = 1e-3) -> torch.optim.Optimizer:
    params = list(params)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.99))


def metrics(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """``val_loss``: mean cross-entropy per predicted character over all evaluation batches."""
    total, tokens = 0.0, 0
    for batch in batches:
        total += _cross_entropy(model, batch, "sum").item()
        tokens += batch[1].numel()
    if tokens == 0:
        raise ValueError("shakespeare: the evaluation set gave no batches")
    return {"val_loss": total / tokens}
