"""FTP's routed decoder block and the controller all routed blocks share.

Before every block a router decides, per token, compute or skip. Inference ("route" mode) really skips: the computed
tokens are gathered, the unchanged decoder layer runs on that shorter causal sequence with their original RoPE
positions (cos/sin gathered), and the outputs are scattered back; skipped rows are copied, are no query and no
key/value in that block, and write nothing to its KV cache. Block 0 is always computed and seeds the attention-score
table. Training ("simulate" mode) runs every token and gates the update, h + g·Δ, with skipped tokens' keys masked:
masking saves nothing and is used for training (and as the reference in tests) only.

Module replacement: `routed_model` swaps `model.model.layers[i]` for `RoutedDecoderLayer`s wrapping the original
layers, points each attention module at a shallow-copied config whose attention implementation is "ftp_probs",
captures attention probabilities with forward hooks and the 2-D padding mask with a pre-hook on the decoder, and
restores everything on exit."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.flops import LayerFlopCoefficients
from methods.base import MethodConfigError
from methods.ftp.attention import FTP_ATTENTION, attention_received, causal_visibility
from methods.ftp.router import (
    TokenRouter,
    random_compute_mask,
    router_features,
    static_compute_mask,
    topk_compute_mask,
)

ROUTERS = ("learned", "static", "random")
SELECTIONS = ("argmax", "topk")


@dataclass
class RoutingRecord:
    """Training-time outputs of one simulated forward, per routed block (blocks with s_i = 0 are absent)."""

    p_compute: dict[int, torch.Tensor] = field(default_factory=dict)  # soft P(compute) [B, N]
    static_compute: dict[int, torch.Tensor] = field(default_factory=dict)  # the static router's decision [B, N]


@dataclass
class RoutingStats:
    """Accumulated over the forwards since the last reset: what was actually computed."""

    prefill_computed: list[int]
    prefill_tokens: list[int]
    executed_flops: int = 0
    dense_flops: int = 0
    router_flops: int = 0
    decode_computed: list[int] = field(default_factory=list)
    decode_steps: int = 0
    forwards: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> RoutingStats:
        return cls(prefill_computed=[0] * num_layers, prefill_tokens=[0] * num_layers,
                   decode_computed=[0] * num_layers)


class RoutingController:
    """State shared by all routed blocks: schedule, router, attention-score table, decisions and statistics.

    mode: "route" (real skipping), "simulate" (gated training forward) or "dense" (the original layers)."""

    def __init__(self, config, schedule: list[float], router: TokenRouter | None, kind: str = "learned",
                 selection: str = "argmax", use_position: bool = True, use_sparsity: bool = True,
                 decode_threshold: float = 0.5, gumbel_tau: float = 1.0, seed: int = 0) -> None:
        if kind not in ROUTERS:
            raise MethodConfigError(f"ftp: router must be one of {ROUTERS}, got {kind!r}")
        if selection not in SELECTIONS:
            raise MethodConfigError(f"ftp: selection must be one of {SELECTIONS}, got {selection!r}")
        if kind == "learned" and router is None:
            raise MethodConfigError("ftp: the learned router needs router weights; calibrate first")
        self.num_layers = config.num_hidden_layers
        self.coefficients = LayerFlopCoefficients.from_config(config)
        self.schedule = list(schedule)
        self.router = router
        self.kind = kind
        self.selection = selection
        self.use_position = use_position
        self.use_sparsity = use_sparsity
        self.decode_threshold = decode_threshold
        self.keep_first = False  # learned router, prefill: always compute each row's first valid token (ftp-sink)
        self.compute_threshold = 0.5  # prefill argmax rule: compute iff P(compute) > 0.5 (see FTP._rescale)
        self.gumbel_tau = gumbel_tau
        self.generator = torch.Generator().manual_seed(seed)
        self.mode = "route"
        self.sample_gates = False  # simulate mode: Gumbel-sampled gates (training) or argmax
        self.forced_decisions: dict[int, torch.Tensor] | None = None  # simulate mode: given decisions per block
        self.record = RoutingRecord()
        self.stats = RoutingStats.empty(self.num_layers)
        self.last_decisions: dict[int, torch.Tensor] = {}
        self.final_hidden: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.phase = "prefill"
        self._probs: torch.Tensor | None = None

    # -- per-forward bookkeeping --------------------------------------------------------------------------
    @property
    def needs_table(self) -> bool:
        return self.kind == "learned" and self.mode != "dense"

    def table_read_after(self, index: int) -> bool:
        """Does a block after `index` run the router (and so read the attention-score table)? Blocks with s_i = 0
        compute every token without asking it."""
        return self.needs_table and any(s > 0 for s in self.schedule[index + 1:])

    def reset_stats(self) -> None:
        self.stats = RoutingStats.empty(self.num_layers)

    def begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the decoder: read the 2-D padding mask and whether this forward continues a cached one."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        batch, length = reference.shape[0], reference.shape[1]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache = kwargs.get("past_key_values", args[3] if len(args) > 3 else None)
        past = cache.get_seq_length() if cache is not None else 0
        if mask is not None and mask.dim() == 2:
            valid = mask[:, -length:].to(device=reference.device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
        self.record = RoutingRecord()
        self.last_decisions = {}
        if past == 0:
            self.phase, self.valid, self.table = "prefill", valid, None
            if self.mode == "route":
                self.stats.forwards += 1
            return
        if self.mode != "route":
            raise MethodConfigError("ftp: cached forwards are only supported in routing (inference) mode")
        if length != 1 or batch != 1:
            raise MethodConfigError(
                f"ftp: a cached forward must decode one token of one sequence (got batch {batch}, {length} tokens): "
                "each block's cache holds only its computed tokens, so rows cannot share a cache tensor. "
                "Generate with batch size 1 and prefill the whole prompt in one forward.")
        if self.valid is None or self.valid.shape[1] != past:
            raise MethodConfigError("ftp: this cache was not prefilled with FTP applied; prefill the prompt inside "
                                    "the same apply() context")
        self.phase = "decode"
        self.valid = torch.cat([self.valid, valid], dim=1)
        if self.table is not None:
            self.table = torch.cat([self.table, self.table.new_zeros(batch, 1)], dim=1)
        self.stats.decode_steps += 1

    def capture_probs(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook on attention modules: keep the probabilities ftp_probs returned (None from SDPA)."""
        self._probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None

    # -- decisions ----------------------------------------------------------------------------------------------
    def router_logits(self, index: int) -> torch.Tensor:
        features = router_features(self.valid, self.table, self.schedule[index], self.use_position,
                                   self.use_sparsity)
        return self.router(features.to(next(self.router.parameters()).dtype))

    def prefill_decision(self, index: int) -> torch.Tensor:
        """[B, N] bool: which tokens block `index` computes in a routed prefill."""
        sparsity = self.schedule[index]
        valid = self.valid
        if index == 0 or sparsity <= 0:
            return valid
        if self.kind == "static":
            return static_compute_mask(valid, sparsity)
        if self.kind == "random":
            return random_compute_mask(valid, sparsity, self.generator)
        logits = self.router_logits(index)
        self.stats.router_flops += logits.shape[0] * logits.shape[1] * self.router.flops_per_token
        p_compute = torch.softmax(logits.float(), -1)[..., 0]
        if self.keep_first:  # inside the top-k budget, on top of the argmax decisions
            p_compute = p_compute.masked_fill(valid & (valid.long().cumsum(-1) == 1), math.inf)
        if self.selection == "topk":
            return topk_compute_mask(p_compute, valid, sparsity)
        return valid & (p_compute > self.compute_threshold)

    def decode_decision(self, index: int) -> bool:
        """One-token decoding: compute the newest token in block `index`? Threshold on P(compute)."""
        sparsity = self.schedule[index]
        if index == 0 or sparsity <= 0 or self.kind == "static":  # the newest token is in the static window
            return True
        if self.kind == "random":
            return bool(torch.rand((), generator=self.generator) >= sparsity)
        logits = self.router_logits(index)[:, -1:]
        self.stats.router_flops += self.router.flops_per_token
        return bool(torch.softmax(logits.float(), -1)[0, 0, 0] >= self.decode_threshold)

    def simulated_gate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate [B, N] float carrying the router's gradient, hard decision [B, N] bool) for a simulated block."""
        valid = self.valid
        sparsity = self.schedule[index]
        if self.forced_decisions is not None and index in self.forced_decisions:
            hard = self.forced_decisions[index].to(valid.device) & valid
            return hard.float(), hard
        if index == 0 or sparsity <= 0 or self.kind != "learned":
            hard = self.prefill_decision(index)
            return hard.float(), hard
        logits = self.router_logits(index)
        p_compute = torch.softmax(logits.float(), -1)[..., 0]
        self.record.p_compute[index] = p_compute
        self.record.static_compute[index] = static_compute_mask(valid, sparsity)
        if self.sample_gates:
            gate = F.gumbel_softmax(logits.float(), tau=self.gumbel_tau, hard=True)[..., 0]
        elif self.selection == "topk":
            gate = topk_compute_mask(p_compute, valid, sparsity).float()
        else:
            gate = (p_compute > self.compute_threshold).float()
        gate = gate * valid
        return gate, gate.detach() > 0.5

    # -- accounting -----------------------------------------------------------------------------------------
    def account_table(self, probs: torch.Tensor) -> None:
        """The attention-score table's refresh is router cost. Counted the way FlopCounterMode counts every FLOP
        here, matrix products only: attention_received takes one weighted column sum over the [B, H·n, m]
        probabilities, 2·B·H·n·m FLOPs."""
        self.stats.router_flops += 2 * probs.numel()

    def account_prefill(self, index: int, compute: torch.Tensor) -> None:
        self.last_decisions[index] = compute
        valid = self.valid
        length = compute.shape[1]
        self.stats.prefill_computed[index] += int((compute & valid).sum())
        self.stats.prefill_tokens[index] += int(valid.sum())
        for n in compute.sum(-1).tolist():
            self.stats.executed_flops += self.coefficients.layer(int(n))
        self.stats.dense_flops += compute.shape[0] * self.coefficients.layer(length)


class RoutedDecoderLayer(nn.Module):
    """Replaces `model.model.layers[index]`; same call signature, returns the hidden states of every position."""

    def __init__(self, layer: nn.Module, index: int, controller: RoutingController) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.controller = controller

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        ctl = self.controller
        call = dict(position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                    position_embeddings=position_embeddings, **kwargs)
        if ctl.mode == "dense":
            out = self.layer(hidden_states, attention_mask=attention_mask, **call)
        elif ctl.mode == "simulate":
            out = self._simulate(hidden_states, attention_mask, call)
        elif ctl.phase == "decode":
            out = self._decode(hidden_states, attention_mask, call)
        else:
            out = self._prefill(hidden_states, attention_mask, call)
        if self.index == ctl.num_layers - 1:
            ctl.final_hidden = out
        return out

    def _run(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, call: dict,
             need_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original decoder layer (MHA + MLP) on these rows; probabilities come back through the hook."""
        ctl = self.controller
        ctl._probs = None
        out = self.layer(hidden_states, attention_mask=attention_mask, ftp_need_probs=need_probs, **call)
        probs, ctl._probs = ctl._probs, None
        return out, probs

    def _needs_probs(self) -> bool:
        """Refresh the table only where a later block will read it."""
        return self.controller.table_read_after(self.index)

    # -- inference: prefill --------------------------------------------------------------------------------
    def _prefill(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        ctl = self.controller
        need = self._needs_probs()
        valid = ctl.valid
        if self.index == 0:
            # Always fully computed (padding too, under the model's own mask), like the dense model.
            out, probs = self._run(hidden, attention_mask, call, need)
            compute = torch.ones_like(valid)
            if need:
                length = hidden.shape[1]
                visible = causal_visibility(length, length, hidden.device)[None] & valid[:, None, :] & valid[:, :, None]
                ctl.table = attention_received(probs, visible).detach().float()
                ctl.account_table(probs)
            ctl.account_prefill(0, compute)
            return out
        compute = ctl.prefill_decision(self.index)
        ctl.account_prefill(self.index, compute)
        if bool(compute.all()):
            out, probs = self._run(hidden, attention_mask, call, need)
            if need:
                length = hidden.shape[1]
                ctl.table = attention_received(probs).float()
                ctl.account_table(probs)
            return out
        counts = compute.sum(-1)
        if not bool(counts.any()):
            return hidden
        if bool((counts == counts[0]).all()):
            return self._gathered(hidden, compute.nonzero()[:, 1].view(len(counts), -1), call, need)
        if call.get("past_key_values") is not None:
            raise MethodConfigError(
                "ftp: rows of this batch compute different numbers of tokens, which a shared KV cache cannot hold; "
                "use selection='topk' on unpadded rows or batch size 1 when caching")
        out = hidden.clone()
        for row in range(hidden.shape[0]):
            index = compute[row].nonzero()[:, 0][None]
            if index.numel():
                out[row:row + 1] = self._gathered(hidden[row:row + 1], index, call, need, row=row)
        return out

    def _gathered(self, hidden: torch.Tensor, index: torch.Tensor, call: dict, need: bool,
                  row: int | None = None) -> torch.Tensor:
        """Run the block on hidden[:, index] (index [B, n], ascending) and scatter the outputs back."""
        ctl = self.controller
        batch, count = index.shape
        rows = slice(None) if row is None else slice(row, row + 1)
        cos, sin = (_rows(t, rows) for t in call["position_embeddings"])
        sub_call = dict(call)
        sub_call["position_embeddings"] = (_take(cos, index), _take(sin, index))
        if call.get("position_ids") is not None:
            sub_call["position_ids"] = _rows(call["position_ids"], rows).expand(batch, -1).gather(1, index)
        out_sub, probs = self._run(_take(hidden, index), None, sub_call, need)
        out = hidden.scatter(1, index[..., None].expand(-1, -1, hidden.shape[-1]), out_sub)
        if need:
            received = attention_received(probs).float()
            ctl.table[rows] = ctl.table[rows].scatter(1, index, received)
            ctl.account_table(probs)
        return out

    # -- inference: one-token decoding ----------------------------------------------------------------------
    def _decode(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        ctl = self.controller
        need = self._needs_probs()
        compute = ctl.decode_decision(self.index)
        ctl.last_decisions[self.index] = torch.tensor([[compute]], device=hidden.device)
        if not compute:
            return hidden  # no query, no K/V written: this block's cache keeps only its computed tokens
        ctl.stats.decode_computed[self.index] += 1
        # Block 0 holds every token and may need the model's padding mask; later blocks' caches hold only computed
        # (never padding) tokens, so the single query sees all of them and the mask built for layer 0 is ignored.
        mask = attention_mask if self.index == 0 else None
        out, probs = self._run(hidden, mask, call, need)
        if need:
            keys = probs.shape[-1]
            ctl.table[:, -1] = probs.float().mean(1)[:, 0, -1] * keys
        return out

    # -- training: gated simulation ---------------------------------------------------------------------------
    def _simulate(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        """h + g·Δ with skipped tokens' keys masked for the other tokens (a token still sees itself)."""
        ctl = self.controller
        need = self._needs_probs()
        valid = ctl.valid
        length = hidden.shape[1]
        gate, hard = ctl.simulated_gate(self.index)
        ctl.last_decisions[self.index] = hard
        causal = causal_visibility(length, length, hidden.device)
        itself = torch.eye(length, dtype=torch.bool, device=hidden.device)
        keys = causal[None] & valid[:, None, :] & (hard[:, None, :] | itself[None])
        out, probs = self._run(hidden, keys[:, None], call, need)
        if need:
            received = attention_received(probs, keys & hard[:, :, None]).detach().float()
            ctl.table = received if ctl.table is None else torch.where(hard, received, ctl.table)
        return hidden + gate[..., None].to(hidden.dtype) * (out - hidden)


def _rows(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """The given rows of a per-row tensor; a batch-1 tensor (shared position embeddings) as it is."""
    return tensor if tensor.shape[0] == 1 else tensor[rows]


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b]] along dim 1, broadcasting a batch-1 tensor (position embeddings) over the rows."""
    expanded = tensor.expand(index.shape[0], *tensor.shape[1:])
    return expanded.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))


@contextmanager
def routed_model(model, controller: RoutingController) -> Iterator[object]:
    """Install routed blocks on `model` in place; restore the dense model on exit."""
    decoder = model.model
    original_layers = decoder.layers
    attention_configs = [layer.self_attn.config for layer in original_layers]
    handles = []
    try:
        for layer in original_layers:
            routed_config = copy.copy(layer.self_attn.config)
            routed_config._attn_implementation = FTP_ATTENTION
            layer.self_attn.config = routed_config
            handles.append(layer.self_attn.register_forward_hook(controller.capture_probs))
        handles.append(decoder.register_forward_pre_hook(controller.begin_forward, with_kwargs=True))
        decoder.layers = nn.ModuleList(RoutedDecoderLayer(layer, i, controller)
                                       for i, layer in enumerate(original_layers))
        yield model
    finally:
        decoder.layers = original_layers
        for layer, config in zip(original_layers, attention_configs, strict=True):
            layer.self_attn.config = config
        for handle in handles:
            handle.remove()
