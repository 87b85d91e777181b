"""FTP's routed decoder block: the routing policy, the per-forward state, and the controller all routed blocks share.

Before every block a router decides, per token, compute or skip. Inference really skips: the computed tokens are
gathered, the unchanged decoder layer runs on that shorter causal sequence with their original RoPE positions
(cos/sin gathered), and the outputs are scattered back; skipped rows are copied, are no query and no key/value in
that block, and write nothing to its KV cache. Block 0 is always computed and seeds the attention-score table, which
every block refreshes for its computed tokens from the same blocked attention pass that computes its output
(`attention.attention_with_received`). The training simulation runs every token and gates the update, h + g·Δ, with
skipped tokens' keys masked: masking saves nothing and is used for training (and as the reference in tests) only.

Module replacement: `routed_model` swaps `model.model.layers[i]` for `RoutedDecoderLayer`s wrapping the original
layers, points each attention module at a shallow-copied config whose attention implementation is "ftp_probs",
captures what that function returns beside the output with forward hooks, reads the 2-D padding mask with a
pre-hook on the decoder, and restores everything on exit."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodConfigError
from methods.flop_coefficients import LayerFlopCoefficients
from methods.ftp.attention import FTP_ATTENTION, attention_received
from methods.ftp.router import (
    TokenRouter,
    first_valid_token,
    newest_token_features,
    random_compute_mask,
    router_features,
    static_compute_mask,
    topk_compute_mask,
)
from methods.token_noise import token_noise
from methods.token_subsets import KeyPositions, additive_mask, gather_tokens, sliding_window, visible_keys

ROUTERS = ("learned", "static", "random")
SELECTIONS = ("argmax", "topk")


@dataclass(frozen=True)
class RoutingPolicy:
    """What decides which tokens a block computes; fixed during a forward (`replace` it to change the schedule).

    kind: "learned" (the router), "static" (first token + most recent window) or "random".
    selection: "argmax" (the paper's rule: compute iff logit(compute) ≥ logit(skip)) or "topk" (exactly
    ⌈(1 - s_i)·N⌉ tokens by P(compute)). Cached decoding uses argmax for both (per-sequence budgets do not apply).
    log_features: log (features, static decision) pairs per routed block (the warm start's data): while the static
    router routes (its own states, for which it also builds the attention-score table) or while the learned
    router routes (the states its own decisions lead to, labelled by the static rule)."""

    schedule: tuple[float, ...]
    kind: str = "learned"
    selection: str = "argmax"
    use_position: bool = True  # False: the no-position ablation feeds the position factor as 0
    use_sparsity: bool = True
    log_features: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ROUTERS:
            raise MethodConfigError(f"ftp: router must be one of {ROUTERS}, got {self.kind!r}")
        if self.selection not in SELECTIONS:
            raise MethodConfigError(f"ftp: selection must be one of {SELECTIONS}, got {self.selection!r}")
        object.__setattr__(self, "schedule", tuple(float(s) for s in self.schedule))

    def routed(self, index: int) -> bool:
        """Block 0 and blocks with s_i = 0 compute every token without asking a router."""
        return index > 0 and self.schedule[index] > 0

    @property
    def needs_table(self) -> bool:
        return self.kind == "learned" or self.log_features

    def table_read_after(self, index: int) -> bool:
        """Does a block after `index` run the router (and so read the attention-score table)?"""
        return self.needs_table and any(self.routed(i) for i in range(index + 1, len(self.schedule)))


@dataclass
class Simulation:
    """The training forward: gates instead of skipping. `sample_gates`: straight-through Gumbel samples (training),
    else the policy's own rule; `forced`: decisions given per block (tests, references). Filled per routed block:
    soft P(compute), the logits and the attention-score input they came from, the static router's decision (the
    guide loss's target), and the gates."""

    sample_gates: bool = False
    forced: dict[int, torch.Tensor] | None = None
    p_compute: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    static_compute: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ForwardState:
    """One forward's (or one cached generation's) state: padding, the attention-score table, decisions.

    decode: `previous_sorted` holds the valid earlier tokens' table values in ascending order (built once after
    the prefill, one insertion per step), so a step's router features cost O(log N), not a sort of N tokens."""

    valid: torch.Tensor  # [B, N] bool, False at padding
    token_ids: torch.Tensor | None = None  # [B, N] the prefill's tokens (the random router's noise is keyed on them)
    phase: str = "prefill"
    table: torch.Tensor | None = None  # [B, N] float: the attention each token last received
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)  # this forward's, per block
    previous_sorted: torch.Tensor | None = None
    newest_pending: bool = False  # a decode step's token whose score joins previous_sorted at the next step
    key_positions: KeyPositions = field(default_factory=KeyPositions)  # what each routed block's cache holds


@dataclass
class RoutingStats:
    """Accumulated over the forwards since the last reset: what was actually computed."""

    prefill_computed: list[int]
    prefill_tokens: list[int]
    first_computed: list[int]  # rows whose first valid token the block computed
    rows: list[int]
    executed_flops: int = 0
    dense_flops: int = 0
    router_flops: int = 0
    decode_computed: list[int] = field(default_factory=list)
    decode_steps: int = 0
    forwards: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> RoutingStats:
        return cls(prefill_computed=[0] * num_layers, prefill_tokens=[0] * num_layers,
                   first_computed=[0] * num_layers, rows=[0] * num_layers, decode_computed=[0] * num_layers)


class RoutingController:
    """What all routed blocks share: the policy, the router, the current forward's state and the statistics.

    Mode: routing (real skipping, the default), `dense()` (the original layers) or `simulating(...)` (the gated
    training forward)."""

    def __init__(self, config, policy: RoutingPolicy, router: TokenRouter | None, gumbel_tau: float = 1.0,
                 seed: int = 0) -> None:
        if policy.kind == "learned" and router is None:
            raise MethodConfigError("ftp: the learned router needs router weights; calibrate first")
        if len(policy.schedule) != config.num_hidden_layers:
            raise MethodConfigError(f"ftp: the schedule has {len(policy.schedule)} blocks, the model "
                                    f"{config.num_hidden_layers}; recalibrate for this model")
        self.num_layers = config.num_hidden_layers
        self.coefficients = LayerFlopCoefficients.from_config(config)
        self.heads = config.num_attention_heads
        self.policy = policy
        self.router = router
        self.gumbel_tau = gumbel_tau
        self.seed = seed
        self.stats = RoutingStats.empty(self.num_layers)
        self.state: ForwardState | None = None
        self.simulation: Simulation | None = None
        self.is_dense = False
        self.feature_log: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._extra: torch.Tensor | None = None

    # -- modes ----------------------------------------------------------------------------------------------
    @contextmanager
    def dense(self) -> Iterator[None]:
        self.is_dense = True
        try:
            yield
        finally:
            self.is_dense = False

    @contextmanager
    def simulating(self, sample_gates: bool = False,
                   forced: dict[int, torch.Tensor] | None = None) -> Iterator[Simulation]:
        self.simulation = Simulation(sample_gates=sample_gates, forced=forced)
        try:
            yield self.simulation
        finally:
            self.simulation = None

    def with_schedule(self, schedule) -> None:
        self.policy = replace(self.policy, schedule=tuple(schedule))

    def reset_stats(self) -> None:
        self.stats = RoutingStats.empty(self.num_layers)

    @property
    def last_decisions(self) -> dict[int, torch.Tensor]:
        return {} if self.state is None else self.state.decisions

    # -- hooks ----------------------------------------------------------------------------------------------
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
        if past == 0:
            tokens = input_ids if input_ids is not None else torch.zeros(batch, length, dtype=torch.long,
                                                                          device=reference.device)
            self.state = ForwardState(valid=valid, token_ids=tokens)
            if not self.is_dense and self.simulation is None:
                self.stats.forwards += 1
            return
        if self.is_dense or self.simulation is not None:
            raise MethodConfigError("ftp: cached forwards are only supported in routing (inference) mode")
        if length != 1 or batch != 1:
            raise MethodConfigError(
                f"ftp: a cached forward must decode one token of one sequence (got batch {batch}, {length} tokens): "
                "each block's cache holds only its computed tokens, so rows cannot share a cache tensor. "
                "Generate with batch size 1 and prefill the whole prompt in one forward.")
        state = self.state
        if state is None or state.valid.shape[1] != past:
            raise MethodConfigError("ftp: this cache was not prefilled with FTP applied; prefill the prompt inside "
                                    "the same apply() context")
        if state.table is not None:
            if state.previous_sorted is None:  # first step: one sort of the prompt's scores
                state.previous_sorted = torch.sort(state.table[0][state.valid[0]]).values
            elif state.newest_pending:  # the last step's token joins the earlier ones (a binary-search insert)
                value = state.table[0, -1:]
                at = int(torch.searchsorted(state.previous_sorted, value))
                state.previous_sorted = torch.cat([state.previous_sorted[:at], value, state.previous_sorted[at:]])
            state.table = torch.cat([state.table, state.table.new_zeros(batch, 1)], dim=1)
            state.newest_pending = bool(valid[0, 0])
        state.phase, state.decisions = "decode", {}
        state.valid = torch.cat([state.valid, valid], dim=1)
        if state.token_ids is not None:  # the random router keys each decoded token's noise on it, as in prefill
            new = input_ids if input_ids is not None else state.token_ids.new_zeros(batch, length)
            state.token_ids = torch.cat([state.token_ids, new.to(state.token_ids.device)], dim=1)
        self.stats.decode_steps += 1

    def capture_extra(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook on attention modules: keep what ftp_probs returned beside the output (probabilities during
        the simulation, attention received while routing; None from SDPA)."""
        self._extra = output[1] if isinstance(output, tuple) and len(output) > 1 else None

    # -- decisions ----------------------------------------------------------------------------------------------
    def _p_compute(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [..., 2] = (compute, skip), P(compute)) of the router on these features."""
        logits = self.router(features.to(next(self.router.parameters()).dtype)).float()
        return logits, torch.softmax(logits, -1)[..., 0]

    def prefill_decision(self, index: int) -> torch.Tensor:
        """[B, N] bool: which tokens block `index` computes in a routed prefill."""
        policy, state = self.policy, self.state
        valid = state.valid
        if not policy.routed(index):
            return valid
        sparsity = policy.schedule[index]
        if policy.kind == "static":
            compute = static_compute_mask(valid, sparsity)
            if policy.log_features:
                features = router_features(valid, state.table, sparsity, policy.use_position, policy.use_sparsity)
                self.feature_log.append((features[valid].cpu(), compute[valid].cpu()))
            return compute
        if policy.kind == "random":
            return random_compute_mask(valid, sparsity, token_noise(self.seed, index, state.token_ids))
        features = router_features(valid, state.table, sparsity, policy.use_position, policy.use_sparsity)
        logits, p_compute = self._p_compute(features)
        self.stats.router_flops += int(valid.sum()) * self.router.flops_per_token  # padding is not the method's
        if policy.log_features:  # the teacher's label in the state the learned router itself produced
            self.feature_log.append((features[valid].cpu(), static_compute_mask(valid, sparsity)[valid].cpu()))
        if policy.selection == "topk":
            return topk_compute_mask(p_compute, valid, sparsity)
        return valid & (logits[..., 0] >= logits[..., 1])

    def decode_decision(self, index: int) -> bool:
        """One-token decoding: compute the newest token in block `index`? The learned router decides by argmax on
        features built incrementally (O(log N) per block)."""
        policy, state = self.policy, self.state
        sparsity = policy.schedule[index]
        if not policy.routed(index) or policy.kind == "static":  # the newest token is in the static window
            return True
        if policy.kind == "random":
            # the noise prefill would give this token at its position (token_noise), not a draw from a stream: a
            # sequence decodes the same whatever ran before it
            position = torch.tensor([[state.token_ids.shape[1] - 1]], device=state.token_ids.device)
            return bool(token_noise(self.seed, index, state.token_ids[:, -1:], position)[0, 0] >= sparsity)
        features = newest_token_features(int(state.valid.sum()), state.table[0, -1], state.previous_sorted,
                                         sparsity, policy.use_position, policy.use_sparsity)
        logits, _ = self._p_compute(features)
        self.stats.router_flops += self.router.flops_per_token
        return bool(logits[0, 0, 0] >= logits[0, 0, 1])

    def simulated_gate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate [B, N] float carrying the router's gradient, hard decision [B, N] bool) for a simulated block."""
        policy, state, sim = self.policy, self.state, self.simulation
        valid = state.valid
        if sim.forced is not None and index in sim.forced:
            hard = sim.forced[index].to(valid.device) & valid
            return hard.float(), hard
        if not policy.routed(index) or policy.kind != "learned":
            hard = self.prefill_decision(index)
            return hard.float(), hard
        sparsity = policy.schedule[index]
        features = router_features(valid, state.table, sparsity, policy.use_position, policy.use_sparsity)
        logits, p_compute = self._p_compute(features)
        sim.p_compute[index], sim.logits[index], sim.scores[index] = p_compute, logits, features[..., 1]
        sim.static_compute[index] = static_compute_mask(valid, sparsity)
        if sim.sample_gates:
            gate = F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=True)[..., 0]
        elif policy.selection == "topk":
            gate = topk_compute_mask(p_compute, valid, sparsity).float()
        else:
            gate = (logits[..., 0] >= logits[..., 1]).float()
        gate = gate * valid
        sim.gates[index] = gate
        return gate, gate.detach() > 0.5

    # -- accounting -----------------------------------------------------------------------------------------
    def account_table(self, batch: int, queries: int, keys: int) -> None:
        """The attention-score table's refresh is router cost: the column sums the blocked attention pass adds,
        2·B·H·n·m (FlopCounterMode counts its QKᵀ and AV with the block, as it counts SDPA's)."""
        self.stats.router_flops += 2 * batch * self.heads * queries * keys

    def account_table_rows(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """The same per row ([B] counts): a padded batch is charged what its rows cost alone."""
        self.stats.router_flops += 2 * self.heads * int((queries * keys).sum())

    def account_prefill(self, index: int, compute: torch.Tensor) -> None:
        state = self.state
        state.decisions[index] = compute
        valid = state.valid
        st = self.stats
        st.prefill_computed[index] += int((compute & valid).sum())
        st.prefill_tokens[index] += int(valid.sum())
        first = first_valid_token(valid)
        st.first_computed[index] += int((compute & first).sum())
        st.rows[index] += int(first.sum())
        coefficients = self.coefficients
        st.executed_flops += sum(coefficients.layer(int(n)) for n in (compute & valid).sum(-1).tolist())
        st.dense_flops += sum(coefficients.layer(int(n)) for n in valid.sum(-1).tolist())


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
        if ctl.is_dense:
            out = self.layer(hidden_states, attention_mask=attention_mask, **call)
        elif ctl.simulation is not None:
            out = self._simulate(hidden_states, attention_mask, call)
        elif ctl.state.phase == "decode":
            out = self._decode(hidden_states, attention_mask, call)
        else:
            out = self._prefill(hidden_states, attention_mask, call)
        return out

    def _run(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, call: dict,
             **extra_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original decoder layer (MHA + MLP) on these rows; what the attention returns beside its output comes
        back through the hook."""
        ctl = self.controller
        ctl._extra = None
        out = self.layer(hidden_states, attention_mask=attention_mask, **call, **extra_kwargs)
        extra, ctl._extra = ctl._extra, None
        return out, extra

    def _received(self, hidden, attention_mask, call, need: bool, valid: torch.Tensor | None = None):
        """Run the block; with `need`, also the attention each key received ([B, m], padding queries left out)."""
        if not need:
            return self._run(hidden, attention_mask, call)
        return self._run(hidden, attention_mask, call, ftp_received=True, ftp_valid=valid)

    # -- inference: prefill --------------------------------------------------------------------------------
    def _prefill(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        ctl = self.controller
        need = ctl.policy.table_read_after(self.index)
        valid = ctl.state.valid
        batch, length = valid.shape
        compute = valid if self.index == 0 else ctl.prefill_decision(self.index)
        if self.index == 0:
            # Always fully computed (padding too, under the model's own mask), like the dense model; a padded
            # batch's rows are charged what they cost alone (padding is the engine's, not the method's, work).
            out, received = self._received(hidden, attention_mask, call, need, valid)
            ctl.account_prefill(0, valid)
            if need:
                ctl.state.table = received
                lengths = valid.sum(-1)
                ctl.account_table_rows(lengths, lengths)
            return out
        ctl.account_prefill(self.index, compute)
        if bool(compute.all()):
            if call.get("past_key_values") is not None:  # every token's key enters this block's cache
                ctl.state.key_positions.keys(call["past_key_values"], self.index, _positions(call, hidden))
            out, received = self._received(hidden, attention_mask, call, need)
            if need:
                ctl.state.table = received
                ctl.account_table(batch, length, length)
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
        return self._gathered_ragged(hidden, compute, counts, call, need)

    def _gathered(self, hidden: torch.Tensor, index: torch.Tensor, call: dict, need: bool) -> torch.Tensor:
        """Run the block on hidden[:, index] (index [B, n], ascending) and scatter the outputs back."""
        ctl = self.controller
        batch, count = index.shape
        sub_call, positions = self._sub_call(call, hidden, index)
        out_sub, received = self._received(gather_tokens(hidden, index), self._subset_mask(positions, call, hidden.dtype),
                                           sub_call, need)
        out = hidden.scatter(1, index[..., None].expand(-1, -1, hidden.shape[-1]), out_sub)
        if need:
            ctl.state.table = ctl.state.table.scatter(1, index, received)
            ctl.account_table(batch, count, count)
        return out

    def _gathered_ragged(self, hidden: torch.Tensor, compute: torch.Tensor, counts: torch.Tensor, call: dict,
                         need: bool) -> torch.Tensor:
        """Rows computing different numbers of tokens, in one call: row b's computed tokens fill its first
        counts[b] slots in order, the rest are padding slots after them (so under causal attention no computed token
        sees one), which are no query for the attention table and write nothing back. Each row computes what it
        computes alone."""
        ctl = self.controller
        batch, length = compute.shape
        width = int(counts.max())
        slot_valid = torch.arange(width, device=compute.device)[None] < counts[:, None]
        # computed positions first, in order, then the others: the first `width` of that order are the slots
        order = torch.where(compute, torch.arange(length, device=compute.device)[None], length).sort(dim=1).values
        index = order[:, :width].clamp(max=length - 1)
        sub_call, positions = self._sub_call(call, hidden, index)
        mask = self._subset_mask(positions, call, hidden.dtype, slot_valid)
        out_sub, received = self._received(gather_tokens(hidden, index), mask, sub_call, need, slot_valid)
        trash = torch.where(slot_valid, index, length)  # padding slots scatter into one extra, dropped position
        wide = torch.cat([hidden, hidden.new_zeros(batch, 1, hidden.shape[-1])], dim=1)
        out = wide.scatter(1, trash[..., None].expand(-1, -1, hidden.shape[-1]), out_sub)[:, :length]
        if need:
            table = torch.cat([ctl.state.table, ctl.state.table.new_zeros(batch, 1)], dim=1)
            ctl.state.table = table.scatter(1, trash, received)[:, :length]
            ctl.account_table_rows(counts, counts)
        return out

    def _sub_call(self, call: dict, hidden: torch.Tensor, index: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The layer's call for the gathered rows: their RoPE tables and original positions."""
        cos, sin = call["position_embeddings"]
        sub_call = dict(call)
        sub_call["position_embeddings"] = (gather_tokens(cos, index), gather_tokens(sin, index))
        positions = _positions(call, hidden).expand(index.shape[0], -1).gather(1, index)
        sub_call["position_ids"] = positions
        return sub_call, positions

    def _subset_mask(self, positions: torch.Tensor, call: dict, dtype: torch.dtype,
                     slot_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """The attention mask of this block's computed tokens at their original `positions` [B, n], against what
        its cache already holds plus themselves (methods.token_subsets): None where that is plain causal (padding
        slots, placed after every computed token, are then seen by no computed token)."""
        window = sliding_window(self.layer)
        cache = call.get("past_key_values")
        keys = positions if cache is None else self.controller.state.key_positions.keys(cache, self.index, positions)
        if window is None and keys.shape[1] == positions.shape[1]:
            return None
        return additive_mask(visible_keys(positions, keys, window, slot_valid), dtype)

    # -- inference: one-token decoding ----------------------------------------------------------------------
    def _decode(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        ctl = self.controller
        need = ctl.policy.table_read_after(self.index)
        compute = ctl.decode_decision(self.index)
        ctl.state.decisions[self.index] = torch.tensor([[compute]], device=hidden.device)
        if not compute:
            return hidden  # no query, no K/V written: this block's cache keeps only its computed tokens
        ctl.stats.decode_computed[self.index] += 1
        # Block 0 holds every token and may need the model's padding mask; later blocks' caches hold only computed
        # (never padding) tokens, so the single query sees all of them (sliding layers: those within the window).
        if self.index == 0:
            mask = attention_mask
        else:
            mask = self._subset_mask(_positions(call, hidden), call, hidden.dtype)
        out, received = self._received(hidden, mask, call, need)
        if need:
            ctl.state.table[:, -1] = received[:, -1]  # only the newest query sees the newest key
            ctl.account_table(1, 1, received.shape[-1])
        return out

    # -- training: gated simulation ---------------------------------------------------------------------------
    def _simulate(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, call: dict) -> torch.Tensor:
        """h + g·Δ, with skipped tokens' keys gated out for the other tokens (a token still sees itself): each key's
        attention probabilities are multiplied by its gate and renormalised, which with hard gates is exactly the
        softmax over the computed keys, and carries the router's gradient through the keys too."""
        ctl = self.controller
        state = ctl.state
        valid = state.valid
        length = hidden.shape[1]
        gate, hard = ctl.simulated_gate(self.index)
        state.decisions[self.index] = hard
        positions = torch.arange(length, device=hidden.device)[None]
        keys = visible_keys(positions, positions, sliding_window(self.layer), valid)
        out, probs = self._run(hidden, keys[:, None], call, ftp_need_probs=True, ftp_key_gates=gate)
        if ctl.policy.table_read_after(self.index):
            itself = torch.eye(length, dtype=torch.bool, device=hidden.device)
            seen = keys & (hard[:, None, :] | itself[None]) & hard[:, :, None]
            received = attention_received(probs.detach(), seen).float()
            state.table = received if state.table is None else torch.where(hard, received, state.table)
        return hidden + gate[..., None].to(hidden.dtype) * (out - hidden)


def _positions(call: dict, hidden: torch.Tensor) -> torch.Tensor:
    """[1 or B, n] original positions of this call's rows (the model passes them; 0..n−1 otherwise)."""
    positions = call.get("position_ids")
    if positions is None:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return positions


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
            handles.append(layer.self_attn.register_forward_hook(controller.capture_extra))
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
