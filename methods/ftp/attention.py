"""FTP's attention function: SDPA when nothing more is needed, eager attention returning the probabilities when the
router needs "attention received" (SDPA does not return probabilities).

Registered through `transformers.AttentionInterface` as "ftp_probs"; routed layers point their attention module's
(shallow-copied) config at it. A forward that wants probabilities passes `ftp_need_probs=True`, which travels with
the decoder layer's **kwargs down to this function."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

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
    groups = getattr(module, "num_key_value_groups", 1)
    key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    n, m = query.shape[2], key_states.shape[2]
    if attention_mask is None:
        attention_mask = causal_visibility(n, m, query.device)[None, None]
    if attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    else:
        logits = logits + attention_mask[..., :m]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return output, probs


def causal_visibility(n: int, m: int, device: torch.device) -> torch.Tensor:
    """[n, m] bool: query q (the (m-n+q)-th token) sees keys up to and including itself."""
    return torch.arange(m, device=device)[None, :] <= torch.arange(n, device=device)[:, None] + (m - n)


def attention_received(probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Absolute attention score of every key, [B, m] (methods.md §3, input 2, default normalisation).

    Each probability is multiplied by the number of keys its query sees, so a query attending uniformly gives every
    visible key 1; the result is the mean over heads and over the queries that see the key. Uniform attention = 1.
    `visible` [B or 1, n, m] says which (query, key) pairs exist in this block."""
    visible = visible.to(probs.dtype)
    keys_per_query = visible.sum(-1, keepdim=True)  # [B, n, 1]
    queries_per_key = visible.sum(-2)  # [B, m]
    weighted = probs.mean(1) * keys_per_query * visible  # [B, n, m]
    return weighted.sum(-2) / queries_per_key.clamp(min=1)


AttentionInterface.register(FTP_ATTENTION, ftp_attention_forward)
