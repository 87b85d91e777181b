"""Seeded per-token random numbers that do not depend on the other rows of a batch: a hash of (seed, block,
position, token id), not a generator stream. The random-choice baselines (ftp-random, sdtp-random) draw from it so
that a row gets the same draws alone and in any batch."""

from __future__ import annotations

import torch

_PRIME = 2_147_483_647  # 2^31 − 1: every product below stays inside int64


def token_noise(seed: int, block: int, token_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] pseudo-uniform values in [0, 1) for the tokens `token_ids` at their original `positions` ([B, N];
    default: 0 … N−1)."""
    if positions is None:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)[None]
    h = torch.full_like(token_ids, (seed * 1_000_003 + block * 7_919) % _PRIME, dtype=torch.long)
    for part in (positions.long(), token_ids.long()):
        h = (h * 48_271 + part + 1) % _PRIME
        h = h ^ (h >> 15)
        h = (h * 69_621) % _PRIME
        h = h ^ (h >> 13)
    return h.double() / _PRIME
