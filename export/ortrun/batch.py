"""The runtime's batch contract, in numpy: right padding, mask 1 on real tokens, positions
0..len-1 (0 on padding), pooling at the last real token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray
    position_ids: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def row(self, i: int) -> Batch:
        n = int(self.attention_mask[i].sum())
        return Batch(
            self.input_ids[i : i + 1, :n], self.attention_mask[i : i + 1, :n], self.position_ids[i : i + 1, :n]
        )


def right_padded(rows: list[list[int]], pad_id: int) -> Batch:
    """The runtime's batch contract: right padding, mask 1 on real tokens, positions 0..len-1 (0 on padding)."""
    seq = max(len(r) for r in rows)
    ids = np.full((len(rows), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq), dtype=np.int64)
    pos = np.zeros((len(rows), seq), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
        pos[i, : len(r)] = np.arange(len(r))
    return Batch(ids, mask, pos)


def last_token(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pool at sum(mask) - 1 and L2-normalise, in float64."""
    last = mask.sum(axis=1) - 1
    emb = hidden[np.arange(hidden.shape[0]), last].astype(np.float64)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def without_start(batch: Batch, k: int) -> Batch:
    """`batch` without its first `k` columns (the start tokens every row begins with), positions kept:
    the rows as they run on top of the start states (`past.*` of those `k` tokens)."""
    return Batch(batch.input_ids[:, k:], batch.attention_mask[:, k:], batch.position_ids[:, k:])


def common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n
