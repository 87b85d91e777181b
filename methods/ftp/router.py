"""FTP's token router: the four input factors, the shared 4→64→2 MLP, and the token selections built on it
(static router, top-k budgets, argmax, random skipping).

All selections take `valid` [B, N] (False at padding): padding is never computed in a routed block and never counts
toward a budget."""

from __future__ import annotations

import math

import torch
from torch import nn

ROUTER_INPUTS = ("position", "score", "rank", "sparsity")


class TokenRouter(nn.Module):
    """Linear(4→hidden) → GELU → Linear(hidden→2); logits are (compute, skip). One router serves every block."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(len(ROUTER_INPUTS), hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    @property
    def flops_per_token(self) -> int:
        """What FlopCounterMode counts for one token: the two matrix products (biases and GELU are not counted)."""
        first, last = self.net[0], self.net[2]
        return 2 * first.in_features * first.out_features + 2 * last.in_features * last.out_features


def token_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position factor log(1 + j) / log(1 + N) of each token ([B, N] float), j counted over the valid tokens of each
    row (N of them).

    The log scale is ours (methods.md's default is j / N): it keeps the order and [0, 1) range but gives the first
    tokens room (the first is 0, the second 0.125 at N = 256 instead of 0.004), so the 4→64→2 router can single out
    the first token (the attention sink, which the static teacher always computes) by position; on the linear scale
    it could not in our runs, and it then skipped that token in every routed block (docs/experiments/ftp-router.md)."""
    index = (valid.long().cumsum(-1) - 1).clamp(min=0).float()
    length = valid.sum(-1, keepdim=True).clamp(min=1).float()
    return position_factor(index, length)


def first_valid_token(valid: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: each row's first valid token (the attention sink the static rule always computes)."""
    return valid & (valid.long().cumsum(-1) == 1)


def position_factor(index, length) -> torch.Tensor:
    """The position factor of token `index` (0-based) among `length` (tensors or floats, broadcast)."""
    return torch.log1p(torch.as_tensor(index)) / torch.log1p(torch.as_tensor(length))


def score_ranks(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Relative rank factor rank / N of each token's attention score within its row, 0 = highest ([B, N])."""
    masked = score.masked_fill(~valid, -math.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=-1, stable=True)
    return ranks.float() / valid.sum(-1, keepdim=True).clamp(min=1)


def router_features(valid: torch.Tensor, score: torch.Tensor, block_sparsity: float,
                    use_position: bool = True, use_sparsity: bool = True) -> torch.Tensor:
    """The 4-vector per token [B, N, 4]; a disabled factor (ablations) is fed as 0 so the router keeps its shape."""
    position = token_positions(valid).to(score.dtype) if use_position else torch.zeros_like(score)
    sparsity = torch.full_like(score, float(block_sparsity) if use_sparsity else 0.0)
    return torch.stack([position, score, score_ranks(score, valid), sparsity], dim=-1)


def newest_token_features(n_valid: int, score: torch.Tensor, previous_sorted: torch.Tensor, block_sparsity: float,
                          use_position: bool = True, use_sparsity: bool = True) -> torch.Tensor:
    """The 4-vector [1, 1, 4] of the newest token of a one-row sequence during cached decoding, without touching the
    other N - 1 tokens: its position factor (the last of N), its score, and its rank from a binary search in the earlier tokens'
    scores (`previous_sorted`, ascending). Equals `router_features(...)[:, -1]` over the whole sequence: ties rank
    the newest token after the earlier ones, as the stable sort there does."""
    higher_or_equal = previous_sorted.numel() - int(torch.searchsorted(previous_sorted, score.reshape(1)))
    sparsity = float(block_sparsity) if use_sparsity else 0.0
    position = float(position_factor(float(n_valid - 1), float(n_valid))) if use_position else 0.0
    values = [position, float(score), higher_or_equal / n_valid, sparsity]
    return torch.tensor(values, dtype=torch.float32, device=score.device).view(1, 1, 4)


def keep_count(block_sparsity: float, n_valid: int) -> int:
    """⌈(1 - s)·N⌉ tokens computed (at least one), the budget of the static and top-k selections."""
    if n_valid == 0:
        return 0
    return max(1, min(n_valid, math.ceil((1.0 - block_sparsity) * n_valid - 1e-9)))


def keep_counts(block_sparsity: float, n_valid: torch.Tensor) -> torch.Tensor:
    """`keep_count` of every row at once (n_valid: a tensor of valid-token counts), in the same float64 arithmetic."""
    n = n_valid.to(torch.float64)
    keep = torch.ceil((1.0 - block_sparsity) * n - 1e-9).clamp(min=1)
    return torch.minimum(keep, n).to(torch.long)


def static_compute_mask(valid: torch.Tensor, block_sparsity: float) -> torch.Tensor:
    """Static router: priority x_0, x_{N-1}, x_{N-2}, …, x_1; compute the first ⌈(1 - s)·N⌉ of that order,
    i.e. the first token and the most recent window."""
    index = valid.long().cumsum(-1) - 1  # position among valid tokens
    n_valid = valid.sum(-1, keepdim=True)
    keep = keep_counts(block_sparsity, n_valid)
    recent = index >= n_valid - (keep - 1)
    return valid & ((index == 0) | recent)


def topk_compute_mask(p_compute: torch.Tensor, valid: torch.Tensor, block_sparsity: float) -> torch.Tensor:
    """Exactly ⌈(1 - s)·N⌉ valid tokens per row, the ones with the highest P(compute)."""
    masked = p_compute.masked_fill(~valid, -math.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    return valid & (rank < keep_counts(block_sparsity, valid.sum(-1))[:, None])


def random_compute_mask(valid: torch.Tensor, block_sparsity: float, noise: torch.Tensor) -> torch.Tensor:
    """Random skipping baseline: ⌈(1 - s)·N⌉ valid tokens per row, the ones with the highest `noise` [B, N]
    (`token_noise`: uniform, and a function of the token alone, so a row draws the same alone and in a batch)."""
    return topk_compute_mask(noise, valid, block_sparsity)
