"""Running decoder layers on a subset of a sequence's tokens, at their original positions, on every architecture.

Token methods (FTP's routed blocks, SDTP's pruned layers) call a model's own decoder layers on gathered rows, and
SDTP's training runs the layers by hand. What the architectures differ in that such callers must get right lives
here, in one place:

- sliding-window attention (Mistral: every layer; Qwen2/Qwen3 with `layer_types`; Gemma 3: five of every six
  layers): a token sees the keys whose *original* positions are within the window, whatever was dropped between;
- per-layer-type rotary tables (Gemma 3's local and global layers use different RoPE bases);
- the KV cache of a layer that held only some tokens: which original positions its entries are, including after a
  sliding-window cache layer has dropped its oldest entries.

Everything else (q/k norms, q/k/v biases, Gemma's pre- and post-norms, scaled embeddings, tied heads) is inside the
decoder layer and the embedding module, which methods call as they are.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [1 or batch, n, ...] → [batch, k, ...] at `index` [batch, k] along dim 1 (a batch-1 tensor, e.g. the
    rotary tables, is broadcast over the rows)."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    return tensor.gather(1, index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:]))

def sliding_window(layer: nn.Module) -> int | None:
    """The attention window of a decoder layer (a key is seen when q − k < window), None for full attention.

    Qwen2/Qwen3/Gemma 3 attention modules carry their own (None on full-attention layers); Mistral's read the
    config's, which applies to every layer."""
    attention = layer.self_attn
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def smallest_window(config) -> int | None:
    """The attention window of a model's sliding layers, None when every layer attends to all earlier keys (read
    from the config, so it holds whatever a method did to the layers)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return window if types is None or "sliding_attention" in types else None


def layer_type(model, index: int) -> str:
    """"sliding_attention" or "full_attention" of decoder layer `index` (configs without `layer_types`: full)."""
    types = getattr(model.config, "layer_types", None)
    return types[index] if types else "full_attention"


def rotary_tables(model, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """{layer type: (cos, sin)} as the model's own forward computes them (Gemma 3's rotary module takes the layer
    type; the others have one table for all layers)."""
    rotary = model.model.rotary_emb
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return {kind: rotary(hidden, position_ids, layer_type=kind) for kind in types}
    table = rotary(hidden, position_ids=position_ids)
    return {kind: table for kind in types}


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None,
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n, m] bool: query i sees key j when key j's original position is at most query i's, and (sliding
    layers) less than `window` before it. Positions are [B or 1, n] and [B or 1, m]; `key_valid` [B, m] masks out
    padding slots."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = k <= q
    if window is not None:
        visible = visible & (q - k < window)
    if key_valid is not None:
        visible = visible & key_valid[:, None, :]
    return visible


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, n, m] → float [B, 1, n, m]: 0 where visible, the dtype's minimum elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def cached_length(cache, layer_idx: int) -> int:
    """How many key/value entries layer `layer_idx` of a transformers Cache holds now (a sliding-window layer keeps
    only its last window − 1; `get_seq_length` counts every token it was ever given)."""
    if cache is None or layer_idx >= len(getattr(cache, "layers", ())):
        return 0
    keys = getattr(cache.layers[layer_idx], "keys", None)
    return 0 if keys is None or keys.dim() < 3 else int(keys.shape[-2])


class KeyPositions:
    """The original positions of the tokens whose keys each layer's KV cache holds, for layers that cache only
    some tokens. `keys(...)` is called before a layer writes new entries and returns the positions of every key
    that layer's attention will see (the entries the cache still holds, then the new ones)."""

    def __init__(self) -> None:
        self._positions: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self._positions.clear()

    def keys(self, cache, layer_idx: int, new_positions: torch.Tensor) -> torch.Tensor:
        held = cached_length(cache, layer_idx)
        past = self._positions.get(layer_idx)
        if past is None or held == 0:
            past = new_positions[:, :0]
        else:
            past = past[:, past.shape[1] - held:]
        # a decode step's position ids may be one row for the whole batch (rows of one length share positions)
        rows = max(past.shape[0], new_positions.shape[0])
        positions = torch.cat([past.expand(rows, -1), new_positions.expand(rows, -1)], dim=1)
        self._positions[layer_idx] = positions
        return positions
