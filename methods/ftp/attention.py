"""FTP's attention function and the "attention received" statistic its router reads (methods.md §3, input 2).

Registered through `transformers.AttentionInterface` as "ftp_probs"; routed layers point their attention module's
(shallow-copied) config at it. What a forward wants travels with the decoder layer's **kwargs down to this
function:
- nothing: plain SDPA;
- `ftp_received=True` (inference): the block's output together with the attention every key received, from one
  blocked pass (`attention_with_received`): queries in chunks, each chunk against only the keys it can see, softmax,
  its output rows and its weighted column sums. No [B, H, n, m] probability tensor is built and the masked upper
  triangle is never computed, so it costs what SDPA costs; it is one custom op so FlopCounterMode counts it the way
  it counts SDPA (QKᵀ and AV over the full n×m) plus the column sums (2·H·n·m), never less;
- `ftp_need_probs=True` (training simulation, which needs gradients and arbitrary key masks): eager attention
  returning the probabilities [B, H, n, m]; `ftp_key_gates` [B, m] multiplies each key's probabilities by its
  gate and renormalises (the simulation's differentiable key mask)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FTP_ATTENTION = "ftp_probs"
QUERY_CHUNK = 128  # query rows per step of the blocked pass; its work is the same for any chunk size


def ftp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          ftp_need_probs: bool = False, ftp_received: bool = False,
                          ftp_valid: torch.Tensor | None = None, ftp_key_gates: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output [B, n, H, hd], extra): extra is the probabilities [B, H, n, m] (`ftp_need_probs`), the attention
    each key received [B, m] (`ftp_received`; `ftp_valid` [B, n] leaves padding queries out), or None.

    With no mask the attention is causal, aligned so the n queries are the last n of the m keys (a one-token
    decoding step sees every cached key)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if ftp_need_probs:
        return _probability_attention(module, query, key, value, attention_mask, dropout, scaling, ftp_key_gates)
    if ftp_received:
        n, m = query.shape[2], key.shape[2]
        visible = None if attention_mask is None else mask_visibility(attention_mask, m)
        if ftp_valid is not None:
            base = causal_visibility(n, m, query.device)[None] if visible is None else visible
            visible = base & ftp_valid[:, :, None].to(query.device)
        output, received = torch.ops.ftp.attention_with_received(query, key, value, visible, float(scaling))
        return output.transpose(1, 2).contiguous(), received
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def mask_visibility(attention_mask: torch.Tensor, m: int) -> torch.Tensor:
    """[B, n, m] bool from a model's 4-D mask (bool: True = visible; additive: 0 = visible)."""
    mask = attention_mask[:, 0, :, :m]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def causal_visibility(n: int, m: int, device: torch.device) -> torch.Tensor:
    """[n, m] bool: query q (the (m-n+q)-th token) sees keys up to and including itself."""
    return torch.arange(m, device=device)[None, :] <= torch.arange(n, device=device)[:, None] + (m - n)


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, n, hd] → [B, KV, (H/KV)·n, hd]: query head h uses KV head h // groups, so the query heads of one KV
    head are stacked along the sequence axis and share one matmul with it (no repeat_kv copies)."""
    batch, heads, n, head_dim = query.shape
    return query.reshape(batch, kv_heads, (heads // kv_heads) * n, head_dim)


def _probability_attention(module, query, key, value, attention_mask, dropout, scaling, key_gates=None):
    batch, heads, n, head_dim = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    logits = torch.matmul(_grouped(query * scaling, kv_heads), key.transpose(2, 3)).view(batch, heads, n, m)
    if attention_mask is None:
        logits.masked_fill_(~causal_visibility(n, m, query.device), torch.finfo(logits.dtype).min)
    elif attention_mask.dtype == torch.bool:
        logits.masked_fill_(~attention_mask[..., :m], torch.finfo(logits.dtype).min)
    else:
        logits.add_(attention_mask[..., :m])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if key_gates is not None:
        # The training simulation's key mask as a gate: key k's probabilities times g_k (each query keeps itself),
        # renormalised. With hard 0/1 gates this is exactly the softmax over the kept keys; its gradient tells the
        # router what a skipped key is worth to the queries that attend to it.
        gates = key_gates[:, None, None, :m].float().expand(batch, 1, n, m)
        itself = torch.arange(m, device=query.device)[None, :] == torch.arange(n, device=query.device)[:, None] + (m - n)
        gates = torch.where(itself, torch.ones_like(gates), gates)
        probs = probs * gates
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
    probs = probs.to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    output = torch.matmul(probs.view(batch, kv_heads, -1, m), value).view(batch, heads, n, head_dim)
    return output.transpose(1, 2).contiguous(), probs


@torch.library.custom_op("ftp::attention_with_received", mutates_args=())
def attention_with_received(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            visible: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, n, hd], received [B, m] float32) of causal attention, blocked over query chunks.

    `visible` [B, n, m] (None: plain causal) must be causal (no query sees a later key). Rows no key is visible to
    get a finite, unused output and count for nothing in `received`."""
    batch, heads, n, head_dim = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    keys_per_query, queries_per_key = _visibility_counts(n, m, visible, query.device, torch.float32)
    weights = (keys_per_query / heads).expand(batch, n)
    causal = causal_visibility(n, m, query.device)[None] if visible is None else None
    output = query.new_empty(batch, heads, n, head_dim)
    received = torch.zeros(batch, m, device=query.device, dtype=torch.float32)
    lowest = torch.finfo(torch.float32).min
    for start in range(0, n, QUERY_CHUNK):
        end = min(n, start + QUERY_CHUNK)
        rows, seen = end - start, m - n + end  # keys beyond `seen` are in the future of every query of the chunk
        logits = torch.matmul(_grouped(query[:, :, start:end] * scale, kv_heads),
                              key[:, :, :seen].transpose(2, 3)).view(batch, heads, rows, seen).float()
        hidden = ~(causal if visible is None else visible)[:, start:end, :seen]
        logits.masked_fill_(hidden[:, None], lowest)
        probs = torch.softmax(logits, dim=-1)
        probs.masked_fill_(hidden[:, None], 0.0)
        output[:, :, start:end] = torch.matmul(probs.to(value.dtype).view(batch, kv_heads, groups * rows, seen),
                                               value[:, :, :seen]).view(batch, heads, rows, head_dim)
        chunk_weights = weights[:, start:end].repeat(1, heads)[:, None]  # [B, 1, H·rows], head-major
        received[:, :seen] += torch.matmul(chunk_weights, probs.reshape(batch, heads * rows, seen))[:, 0]
    return output, received / queries_per_key.clamp(min=1)


@attention_with_received.register_fake
def _(query, key, value, visible, scale):
    return query.new_empty(query.shape), query.new_empty(query.shape[0], key.shape[2], dtype=torch.float32)


@register_flop_formula(torch.ops.ftp.attention_with_received)
def _attention_with_received_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """What SDPA is counted for (QKᵀ and AV over the full n×m, 4·B·H·n·m·hd) plus the column sums, 2·B·H·n·m."""
    batch, heads, n, head_dim = query_shape
    m = key_shape[2]
    return 4 * batch * heads * n * m * head_dim + 2 * batch * heads * n * m


def _visibility_counts(n: int, m: int, visible: torch.Tensor | None, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys each query sees [B or 1, n], queries that see each key [B or 1, m]); `visible` None: plain causal with
    the n queries the last n keys. A padding query sees no key, so its row counts for nothing."""
    if visible is None:
        keys_per_query = torch.arange(m - n + 1, m + 1, device=device, dtype=dtype)[None]
        queries_per_key = torch.arange(m, 0, -1, device=device, dtype=dtype).clamp(max=n)[None]
        return keys_per_query, queries_per_key
    visible = visible.to(dtype)
    return visible.sum(-1), visible.sum(-2)


def attention_received(probs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute attention score of every key, [B, m], from probabilities (the training simulation's path).

    Each probability is multiplied by the number of keys its query sees, so a query attending uniformly gives every
    visible key 1; the result is the mean over heads and over the queries that see the key. Uniform attention = 1.
    `visible` [B or 1, n, m] says which (query, key) pairs exist in this block (None: plain causal, the n queries
    being the last n keys). `probs` [B, H, n, m] is zero at the pairs a valid query cannot see (the attention mask
    saw to that), so one weighted column sum over the H·n query rows is all it takes."""
    batch, heads, n, m = probs.shape
    keys_per_query, queries_per_key = _visibility_counts(n, m, visible, probs.device, probs.dtype)
    weights = (keys_per_query / heads).expand(batch, n).repeat(1, heads)[:, None]  # [B, 1, H·n]
    received = torch.matmul(weights, probs.reshape(batch, heads * n, m))[:, 0]
    return received / queries_per_key.clamp(min=1)


AttentionInterface.register(FTP_ATTENTION, ftp_attention_forward)
