"""A small decoder-only transformer language model and the synthetic token data it trains on.

The data are deterministic from a seed and need no download: token sequences drawn from a fixed
random Markov chain (each token has a few likely successors), so the loss falls visibly as the
model learns the transition table. The generator's state is part of a checkpoint, so a resumed
run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class ModelSize:
    """Shape of the model."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    dropout: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for reports and checkpoints)."""
        return asdict(self)


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(vocab_size=256, d_model=64, n_layers=2, n_heads=2, max_seq_len=256),
    "small": ModelSize(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=512),
    "medium": ModelSize(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024),
}


class _Block(nn.Module):
    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        self.n_heads = size.n_heads
        self.dropout = size.dropout
        self.ln1 = nn.LayerNorm(size.d_model)
        self.qkv = nn.Linear(size.d_model, 3 * size.d_model)
        self.proj = nn.Linear(size.d_model, size.d_model)
        self.ln2 = nn.LayerNorm(size.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(size.d_model, 4 * size.d_model),
            nn.GELU(),
            nn.Linear(4 * size.d_model, size.d_model),
        )
        self.drop = nn.Dropout(size.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.n_heads, c // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, c)))
        out: torch.Tensor = x + self.drop(self.mlp(self.ln2(x)))
        return out


class TinyLM(nn.Module):
    """GPT-style decoder: token and position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        if size.d_model % size.n_heads:
            raise ValueError(f"d_model {size.d_model} is not divisible by {size.n_heads} heads")
        self.size = size
        self.tok = nn.Embedding(size.vocab_size, size.d_model)
        self.pos = nn.Embedding(size.max_seq_len, size.d_model)
        self.drop = nn.Dropout(size.dropout)
        self.blocks = nn.ModuleList(_Block(size) for _ in range(size.n_layers))
        self.ln = nn.LayerNorm(size.d_model)
        self.head = nn.Linear(size.d_model, size.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab)."""
        t = tokens.shape[1]
        if t > self.size.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.size.max_seq_len}")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok(tokens) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln(x))
        return logits

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over a batch of sequences."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].flatten()
        )

    def parameter_count(self) -> int:
        """Trainable parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


class SyntheticTokens:
    """Batches of token sequences from a seeded Markov chain, on the CPU, reproducibly.

    ``state_dict`` / ``load_state_dict`` carry the generator's state and position, so a resumed
    stream continues exactly where the saved one stopped.
    """

    BRANCHES = 4
    NOISE = 0.1

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        table_gen = torch.Generator().manual_seed(seed)
        self._successors = torch.randint(
            0, vocab_size, (vocab_size, self.BRANCHES), generator=table_gen
        )
        self._gen = torch.Generator().manual_seed(seed + 1)
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) tensor of token ids."""
        b, n, g = self.batch_size, self.seq_len + 1, self._gen
        out = torch.empty((b, n), dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab_size, (b,), generator=g)
        branch = torch.randint(0, self.BRANCHES, (b, n), generator=g)
        noise = torch.rand((b, n), generator=g) < self.NOISE
        random_tokens = torch.randint(0, self.vocab_size, (b, n), generator=g)
        for i in range(1, n):
            follow = self._successors[out[:, i - 1], branch[:, i]]
            out[:, i] = torch.where(noise[:, i], random_tokens[:, i], follow)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position."""
        return {"generator": self._gen.get_state(), "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state is for seed {state['seed']}, not {self.seed}")
        self._gen.set_state(state["generator"])
        self.position = int(state["position"])


def lr_at(step: int, *, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then inverse-square-root decay.

    It does not depend on the total number of steps, so a run extended with a larger ``--steps``
    follows the same schedule as one that was asked for that many from the start.
    """
    n = step + 1
    return base_lr * min(n / warmup_steps, math.sqrt(warmup_steps / n))
