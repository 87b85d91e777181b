"""FTP's attention function: SDPA when nothing more is needed, eager attention returning the probabilities when the
router needs "attention received" (SDPA does not return probabilities).

Registered through `transformers.AttentionInterface` as "ftp_probs"; routed layers point their attention module's
(shallow-copied) config at it. A forward that wants probabilities passes `ftp_need_probs=True`, which travels with
the decoder layer's **kwargs down to this function."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FTP_ATTENTION = "ftp_probs"


def ftp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          ftp_need_probs: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output [B, n, H, hd], probabilities [B, H, n, m] or None).

    With no mask the attention is causal, aligned so the n queries are the last n of the m keys (a one-token
    decoding step sees every cached key)."""
    if not ftp_need_probs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, n, head_dim = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    scaling = head_dim ** -0.5 if scaling is None else scaling
    # Grouped-query attention without repeat_kv's copies: query head h uses KV head h // groups, so the query
    # heads of one KV head are stacked along the sequence axis and share one matmul with it.
    grouped = (query * scaling).reshape(batch, kv_heads, (heads // kv_heads) * n, head_dim)
    logits = torch.matmul(grouped, key.transpose(2, 3)).view(batch, heads, n, m)
    if attention_mask is None:
        logits.masked_fill_(~causal_visibility(n, m, query.device), torch.finfo(logits.dtype).min)
    elif attention_mask.dtype == torch.bool:
        logits.masked_fill_(~attention_mask[..., :m], torch.finfo(logits.dtype).min)
    else:
        logits.add_(attention_mask[..., :m])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    output = torch.matmul(probs.view(batch, kv_heads, -1, m), value).view(batch, heads, n, head_dim)
    return output.transpose(1, 2).contiguous(), probs


def causal_visibility(n: int, m: int, device: torch.device) -> torch.Tensor:
    """[n, m] bool: query q (the (m-n+q)-th token) sees keys up to and including itself."""
    return torch.arange(m, device=device)[None, :] <= torch.arange(n, device=device)[:, None] + (m - n)


def attention_received(probs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute attention score of every key, [B, m] (methods.md §3, input 2, default normalisation).

    Each probability is multiplied by the number of keys its query sees, so a query attending uniformly gives every
    visible key 1; the result is the mean over heads and over the queries that see the key. Uniform attention = 1.
    `visible` [B or 1, n, m] says which (query, key) pairs exist in this block (None: plain causal, the n queries
    being the last n keys). `probs` [B, H, n, m] is zero at the pairs a valid query cannot see (the attention mask
    saw to that), so one weighted column sum over the H·n query rows is all it takes."""
    batch, heads, n, m = probs.shape
    if visible is None:
        keys_per_query = torch.arange(m - n + 1, m + 1, device=probs.device, dtype=probs.dtype)[None]  # [1, n]
        queries_per_key = torch.arange(m, 0, -1, device=probs.device, dtype=probs.dtype).clamp(max=n)[None]
    else:
        visible = visible.to(probs.dtype)
        keys_per_query = visible.sum(-1)  # [B, n]; 0 for a padding query, whose row is left out
        queries_per_key = visible.sum(-2)  # [B, m]
    weights = (keys_per_query / heads).expand(batch, n).repeat(1, heads)[:, None]  # [B, 1, H·n]
    received = torch.matmul(weights, probs.reshape(batch, heads * n, m))[:, 0]
    return received / queries_per_key.clamp(min=1)


AttentionInterface.register(FTP_ATTENTION, ftp_attention_forward)
