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
    """Position factor j / N, j counted over the valid tokens of each row ([B, N] float)."""
    length = valid.sum(-1, keepdim=True).clamp(min=1)
    index = valid.long().cumsum(-1) - 1
    return index.clamp(min=0).float() / length


def score_ranks(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Relative rank factor rank / N of each token's attention score within its row, 0 = highest ([B, N])."""
    masked = score.masked_fill(~valid, -math.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=-1, stable=True)
    return ranks.float() / valid.sum(-1, keepdim=True).clamp(min=1)


def router_features(valid: torch.Tensor, score: torch.Tensor, block_sparsity: float,
                    use_position: bool = True, use_sparsity: bool = True) -> torch.Tensor:
    """The 4-vector per token [B, N, 4]; a disabled factor (ablations) is fed as 0 so the router keeps its shape."""
    position = token_positions(valid) if use_position else torch.zeros_like(score)
    sparsity = torch.full_like(score, float(block_sparsity) if use_sparsity else 0.0)
    return torch.stack([position, score, score_ranks(score, valid), sparsity], dim=-1)


def keep_count(block_sparsity: float, n_valid: int) -> int:
    """⌈(1 - s)·N⌉ tokens computed (at least one), the budget of the static and top-k selections."""
    if n_valid == 0:
        return 0
    return max(1, min(n_valid, math.ceil((1.0 - block_sparsity) * n_valid - 1e-9)))


def static_compute_mask(valid: torch.Tensor, block_sparsity: float) -> torch.Tensor:
    """Static router: priority x_0, x_{N-1}, x_{N-2}, …, x_1; compute the first ⌈(1 - s)·N⌉ of that order,
    i.e. the first token and the most recent window."""
    index = valid.long().cumsum(-1) - 1  # position among valid tokens
    n_valid = valid.sum(-1, keepdim=True)
    keep = torch.tensor([keep_count(block_sparsity, int(n)) for n in n_valid.flatten()],
                        device=valid.device).view_as(n_valid)
    recent = index >= n_valid - (keep - 1)
    return valid & ((index == 0) | recent)


def topk_compute_mask(p_compute: torch.Tensor, valid: torch.Tensor, block_sparsity: float) -> torch.Tensor:
    """Exactly ⌈(1 - s)·N⌉ valid tokens per row, the ones with the highest P(compute)."""
    masked = p_compute.masked_fill(~valid, -math.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    keep = torch.tensor([keep_count(block_sparsity, int(n)) for n in valid.sum(-1)], device=valid.device)
    return valid & (rank < keep[:, None])


def random_compute_mask(valid: torch.Tensor, block_sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Random skipping baseline: ⌈(1 - s)·N⌉ valid tokens chosen uniformly at random per row."""
    noise = torch.rand(valid.shape, generator=generator).to(valid.device)
    return topk_compute_mask(noise, valid, block_sparsity)
