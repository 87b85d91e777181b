"""SDTP at inference: saliency predictors before the stage layers, and the layer wrappers that really drop
tokens (gather the kept rows, run every later layer on the shorter sequence at the original RoPE positions,
scatter the survivors back to full length after the last layer).

Decoding is never pruned: a forward that finds this layer's KV cache non-empty runs every new token through
every layer, attending to whatever prompt tokens reached that layer during prefill."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import MethodConfigError, current_scoring
from methods.flop_coefficients import LayerFlopCoefficients
from methods.token_noise import token_noise
from methods.token_subsets import KeyPositions, additive_mask, gather_tokens, sliding_window, visible_keys

# Attention kernels for which `attention_mask=None` means plain causal attention during prefill.
_IS_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


class SaliencyPredictor(nn.Module):
    """π = W₂·GELU(W₁x): two logits (keep, drop) per token from its hidden state.

    `input_norm` RMS-normalises x first (no parameters, no counted FLOPs): the residual stream's scale grows
    with depth and has a few massive channels, which a small MLP trained briefly cannot absorb."""

    def __init__(self, hidden_size: int, width: int, input_norm: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, 2)
        self.input_norm = input_norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.fc1.weight.dtype)
        if self.input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(self.act(self.fc1(x)))

    def flops_per_token(self) -> int:
        """Matmul FLOPs per token, as FlopCounterMode counts them (biases and GELU are free)."""
        return 2 * self.fc1.in_features * self.fc1.out_features + 2 * self.fc2.in_features * self.fc2.out_features


def keep_logit(predictor_logits: torch.Tensor) -> torch.Tensor:
    """π_keep − π_drop: monotone in the keep probability softmax(π)_keep = sigmoid(π_keep − π_drop)."""
    return predictor_logits[..., 0] - predictor_logits[..., 1]


def stage_budget(keep_ratio: float, stage: int, prompt_len: int) -> int:
    """⌈r^s·N₀⌉ prompt tokens survive stage s (1-based); rounding guards against r^s·N₀ = 40.000000001."""
    return math.ceil(round(keep_ratio ** stage * prompt_len, 9))


def select_kept(scores: torch.Tensor, protected: torch.Tensor, budget: int,
                eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices [batch, n_keep] of the tokens to keep: every protected token plus the highest-scoring
    eligible others, up to `budget` per row (all rows keep the same count: the largest protected set wins)."""
    key = scores.detach().float().masked_fill(protected, math.inf)
    if eligible is not None:
        key = key.masked_fill(~eligible, -math.inf)
        available = int(eligible.sum(1).min())
    else:
        available = scores.shape[1]
    n_keep = min(max(budget, int(protected.sum(1).max())), available)
    return key.topk(n_keep, dim=1).indices.sort(dim=1).values


def select_kept_rows(scores: torch.Tensor, protected: torch.Tensor, budget: int | torch.Tensor,
                     present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row budgets (inference): row b keeps its protected tokens plus its highest-scoring present others, up
    to max(budget, |protected_b|) tokens, whatever the other rows hold. Returns (index [batch, n_max] into the
    current rows, ascending per row with unused slots last; slot_valid [batch, n_max]). A row's kept set is
    therefore the same alone and in any batch; unused slots are padding that the later layers mask out."""
    present = torch.ones_like(protected) if present is None else present
    protected = protected & present
    key = scores.detach().float().masked_fill(protected, math.inf).masked_fill(~present, -math.inf)
    budget = torch.as_tensor(budget, device=protected.device).expand(protected.shape[0])  # an int or one per row
    counts = torch.clamp(torch.maximum(protected.sum(1), budget), min=1)
    counts = torch.minimum(counts, present.sum(1).clamp(min=1))
    n_max = int(counts.max())
    top = key.topk(n_max, dim=1).indices  # best first
    slot_valid = torch.arange(n_max, device=scores.device)[None, :] < counts[:, None]
    order = torch.where(slot_valid, top, top + scores.shape[1]).sort(dim=1)  # valid slots first, ascending
    return top.gather(1, order.indices), slot_valid.gather(1, order.indices)


def protected_positions(batch: int, seq_len: int, prompt_len: int, protect_first: int,
                        protect_last_fraction: float, scored: torch.Tensor | None,
                        device: torch.device, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq_len] bool: attention sinks, the local window, the scored positions and generated tokens.

    `lengths` [batch] (right-padded rows): row b is its first lengths[b] positions, its prompt the first
    min(prompt_len, lengths[b]); its sinks and window are its own and its padding is never protected."""
    if lengths is None:
        return _protected_row(seq_len, prompt_len, protect_first, protect_last_fraction, device)[None].expand(
            batch, seq_len).clone() | _scored(scored, batch, seq_len, device)
    rows = [_protected_row(seq_len, min(prompt_len, int(n)), protect_first, protect_last_fraction, device, int(n))
            for n in lengths.tolist()]
    return torch.stack(rows) | _scored(scored, batch, seq_len, device)


def _protected_row(seq_len: int, prompt_len: int, protect_first: int, protect_last_fraction: float,
                   device: torch.device, length: int | None = None) -> torch.Tensor:
    protected = torch.zeros(seq_len, dtype=torch.bool, device=device)
    protected[: min(protect_first, prompt_len)] = True
    last = math.ceil(round(protect_last_fraction * prompt_len, 9))
    protected[max(prompt_len - last, 0): length] = True  # the local window and every generated token after it
    return protected


def _scored(scored: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    if scored is None:
        return torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    if scored.shape != (batch, seq_len):
        raise MethodConfigError(f"sdtp: scoring mask has shape {tuple(scored.shape)}, the input is "
                                f"{(batch, seq_len)}; pass one bool per input position")
    return scored.to(device=device, dtype=torch.bool)


# --- the prompt / generated boundary for an uncached reference forward ----------------------------------
_PROMPT_LENGTH: contextvars.ContextVar[int | None] = contextvars.ContextVar("sdtp_prompt_length", default=None)


@contextmanager
def prompt_length(n_prompt: int) -> Iterator[None]:
    """Forwards inside see only the first `n_prompt` tokens as prompt; later ones are generated tokens, which
    are never pruned and do not count in the stage budgets. This makes an uncached forward over prompt +
    generated tokens compute exactly what cached prefill followed by one-token decoding computes."""
    token = _PROMPT_LENGTH.set(int(n_prompt))
    try:
        yield
    finally:
        _PROMPT_LENGTH.reset(token)


# --- per-forward state shared by the wrappers ------------------------------------------------------------
@dataclass
class PruningStats:
    """Accumulated over prefill forwards since apply()."""

    num_layers: int
    prefill_forwards: int = 0
    decode_forwards: int = 0
    input_tokens: int = 0  # Σ batch·N over prefill forwards
    tokens_per_layer: list[int] = field(default_factory=list)  # Σ batch·n_ℓ, tokens computed by layer ℓ
    analytic_executed_flops: int = 0  # §5 formula on the kept-token schedule, predictors included
    analytic_dense_flops: int = 0
    stages_at_protected_floor: int = 0  # stage decisions where protected tokens alone exceeded the budget
    stage_decisions: int = 0

    def __post_init__(self) -> None:
        self.tokens_per_layer = [0] * self.num_layers


class PruningRuntime:
    """What the wrappers of one model share: configuration, the current forward's kept set, statistics."""

    def __init__(self, stage_layers: list[int], keep_ratio: float, num_layers: int, protect_first: int,
                 protect_last_fraction: float, coefficients: LayerFlopCoefficients,
                 predictor_flops_per_token: int, random_seed: int | None = None) -> None:
        self.stage_layers = list(stage_layers)
        self.coefficients = coefficients
        self.predictor_flops_per_token = predictor_flops_per_token
        self.random_seed = random_seed  # not None: stages score tokens at random (sdtp-random), no predictors
        self.input_ids: torch.Tensor | None = None  # the current forward's token ids (set by the embedding's hook)
        self.keep_ratio = keep_ratio
        self.num_layers = num_layers
        self.protect_first = protect_first
        self.protect_last_fraction = protect_last_fraction
        self.stats = PruningStats(num_layers)
        self.key_positions = KeyPositions()  # original positions of what each wrapped layer's cache holds
        self._reset_forward()

    def _reset_forward(self) -> None:
        self.decoding = False
        self.kept: torch.Tensor | None = None  # [batch, n] original positions of the current rows (seq_len: padding)
        self.slot_valid: torch.Tensor | None = None  # [batch, n] False at padding slots; None = no padding
        self.caching = False
        self.protected: torch.Tensor | None = None  # [batch, n] for the current rows
        self.gathered_rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per full table: gathered cos/sin
        self.prompt_len = 0
        self.prompt_lens: torch.Tensor | None = None  # [batch] each row's prompt length
        self.lengths: torch.Tensor | None = None  # [batch] each row's length (right padding excluded)
        self.seq_len = 0
        self.masks: dict[int | None, torch.Tensor | None] = {}  # per sliding window (None: full attention)
        self.rows_per_layer: list[int] = []  # this forward's n_ℓ
        self.rows_per_stage: list[int] = []  # tokens each predictor scored

    # -- forward start (the first wrapped layer) -----------------------------------------------------------
    def begin(self, hidden_states: torch.Tensor, attention_mask, past_key_values, layer: nn.Module) -> None:
        self._reset_forward()
        batch, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        if past_key_values is not None and past_key_values.get_seq_length(layer.self_attn.layer_idx) > 0:
            self.decoding = True
            self.stats.decode_forwards += 1
            return
        self.key_positions.reset()
        valid = valid_tokens(attention_mask, seq_len, sliding_window(layer))
        if valid is not None and past_key_values is not None:
            raise MethodConfigError("sdtp: a padded batch's rows keep different numbers of tokens, which a shared KV "
                                    "cache cannot hold; use_cache=False or batch rows of equal length")
        self.lengths = torch.full((batch,), seq_len, device=device) if valid is None else valid.sum(1)
        n_prompt = _PROMPT_LENGTH.get()
        self.prompt_len = seq_len if n_prompt is None else min(n_prompt, seq_len)
        self.prompt_lens = self.lengths.clamp(max=self.prompt_len)
        self.seq_len = seq_len
        self.caching = past_key_values is not None
        ctx = current_scoring()
        if ctx is not None and ctx.scored is None:
            # the caller reads every position: nothing may be dropped
            protected = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        else:
            protected = protected_positions(batch, seq_len, self.prompt_len, self.protect_first,
                                            self.protect_last_fraction, ctx.scored if ctx else None, device,
                                            None if valid is None else self.lengths)
        self.kept = torch.arange(seq_len, device=device).expand(batch, seq_len)
        if valid is not None:  # right padding: its slots are no key for anyone and scatter into the trash
            self.kept = self.kept.masked_fill(~valid, seq_len)
            protected = protected & valid
        self.slot_valid = valid
        self.protected = protected
        self.stats.prefill_forwards += 1
        self.stats.input_tokens += int(self.lengths.sum())
        self.rows_per_layer = [self.lengths] * self.stage_layers[0]

    # -- a stage: score, select, gather ---------------------------------------------------------------------
    def random_scores(self, stage: int) -> torch.Tensor:
        """sdtp-random: seeded uniform scores of the current rows' tokens (`token_noise` of their ids at their
        original positions), in place of a predictor's; a row draws the same alone and in any batch."""
        if self.input_ids is None:
            raise MethodConfigError("sdtp-random draws its scores from the token ids: call the model with input_ids "
                                    "(not inputs_embeds)")
        ids = self.input_ids.gather(1, self.kept.clamp(max=self.seq_len - 1))
        return token_noise(self.random_seed, stage, ids, self.kept).float()

    def prune(self, stage: int, predictor: SaliencyPredictor | None, hidden_states: torch.Tensor) -> torch.Tensor:
        """Stage `stage`: score the current tokens (the predictor's keep logit; random scores without one), keep
        each row's budget of them, gather."""
        scores = keep_logit(predictor(hidden_states)) if predictor is not None else self.random_scores(stage)
        present = self._present(hidden_states)
        self.rows_per_stage.append(present)
        generated = self.lengths - self.prompt_lens
        budget = torch.tensor([stage_budget(self.keep_ratio, stage, int(n)) for n in self.prompt_lens.tolist()],
                              device=present.device) + generated
        local, valid = select_kept_rows(scores, self.protected, budget, self.slot_valid)
        self.stats.stage_decisions += 1
        if bool((valid.sum(1) > torch.minimum(budget, present)).any()):
            self.stats.stages_at_protected_floor += 1
        padded = not bool(valid.all())
        if padded and self.caching:
            raise MethodConfigError("sdtp: rows of this batch keep different numbers of tokens (their scored "
                                    "spans differ), which a shared KV cache cannot hold; use_cache=False or batch "
                                    "rows with equal scored spans")
        self.kept = self.kept.gather(1, local).masked_fill(~valid, self.seq_len)
        self.protected = self.protected.gather(1, local) & valid
        self.slot_valid = valid if padded else None
        self.gathered_rope, self.masks = {}, {}
        return gather_tokens(hidden_states, local)

    def _present(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch] tokens each row holds now (its slots that are not padding)."""
        if self.slot_valid is None:
            return torch.full((hidden_states.shape[0],), hidden_states.shape[1], device=hidden_states.device)
        return self.slot_valid.sum(1)

    def position_embeddings(self, full: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's own (cos, sin) table (Gemma 3: one per layer type) at the kept rows' original positions."""
        key = id(full[0])
        if key not in self.gathered_rope:
            positions = self.kept.clamp(max=self.seq_len - 1)
            self.gathered_rope[key] = (gather_tokens(full[0], positions), gather_tokens(full[1], positions))
        return self.gathered_rope[key]

    def layer_mask(self, layer: nn.Module, hidden_states: torch.Tensor, past_key_values) -> torch.Tensor | None:
        """Kept order is preserved, so causal attention over the kept rows is right, with a sliding window
        counted in original positions (methods.token_subsets); padding slots (rows that keep fewer tokens than
        others in the batch) are no key for anyone."""
        window = sliding_window(layer)
        if past_key_values is not None:  # this layer's cache receives the kept rows
            self.key_positions.keys(past_key_values, layer.self_attn.layer_idx, self.kept)
        if window is None and self.slot_valid is None \
                and layer.self_attn.config._attn_implementation in _IS_CAUSAL_WITHOUT_MASK:
            return None
        if window not in self.masks:
            visible = visible_keys(self.kept, self.kept, window, self.slot_valid)
            self.masks[window] = additive_mask(visible, hidden_states.dtype)
        return self.masks[window]

    # -- forward end (the last layer): scatter back to the original length -----------------------------------
    def finish(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, _, hidden = hidden_states.shape
        self._record(batch)
        # one extra trash position receives the padding slots
        full = hidden_states.new_zeros(batch, self.seq_len + 1, hidden)
        full.scatter_(1, self.kept[..., None].expand(-1, -1, hidden), hidden_states)
        ctx = current_scoring()
        if ctx is not None:
            real = torch.zeros(batch, self.seq_len + 1, dtype=torch.bool, device=hidden_states.device)
            real.scatter_(1, self.kept, True)
            ctx.logit_positions = real[:, : self.seq_len]
        return full[:, : self.seq_len]

    def count(self, hidden_states: torch.Tensor) -> None:
        if not self.decoding:
            self.rows_per_layer.append(self._present(hidden_states))

    def _record(self, batch: int) -> None:
        """Each row is charged what it computes alone: its own tokens per layer (padding slots are the batch's,
        not the method's, work)."""
        coeff = self.coefficients
        for layer, n in enumerate(self.rows_per_layer):
            counts = n.tolist()
            self.stats.tokens_per_layer[layer] += sum(counts)
            self.stats.analytic_executed_flops += sum(coeff.layer(int(c)) for c in counts)
        self.stats.analytic_executed_flops += self.predictor_flops_per_token * int(sum(n.sum() for n in
                                                                                       self.rows_per_stage))
        self.stats.analytic_dense_flops += self.num_layers * sum(coeff.layer(int(c)) for c in self.lengths.tolist())


def valid_tokens(attention_mask, seq_len: int, window: int | None) -> torch.Tensor | None:
    """[batch, seq_len] bool, False at padding, from the model's mask; None when there is none. Rows may be padded
    (a key mask: a valid query sees every valid earlier key, within the layer's sliding window); anything else (a
    packed or custom 4-D mask) is refused: decisions are per row."""
    if not isinstance(attention_mask, torch.Tensor):
        return None
    mask = attention_mask[..., -seq_len:, -seq_len:]
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    positions = torch.arange(seq_len, device=mask.device)[None]
    causal = visible_keys(positions, positions, window)[0]
    valid = allowed[:, -1, :] | allowed.diagonal(dim1=1, dim2=2)  # a row's last query sees its valid keys
    expected = causal[None] & valid[:, None, :]
    prefix = positions < valid.sum(1, keepdim=True)
    if mask.shape[-2:] != (seq_len, seq_len) or not bool(((allowed == expected) | ~valid[:, :, None]).all()) \
            or not bool((valid == prefix).all()):
        raise MethodConfigError("sdtp prunes unpadded or right-padded rows only, each under plain causal attention "
                                "(the attention mask given here is neither: left padding, or a packed mask)")
    return None if bool(valid.all()) else valid


class SDTPLayer(nn.Module):
    """Stands in for decoder layer ℓ ≥ first stage. At a stage layer it first scores and drops tokens; every
    wrapped layer runs on the current kept rows with their original positions."""

    def __init__(self, layer: nn.Module, layer_index: int, runtime: PruningRuntime,
                 predictor: SaliencyPredictor | None = None, stage: int | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.layer_index = layer_index
        self.runtime = runtime
        self.predictor = predictor
        self.stage = stage  # 1-based stage number at a stage layer

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        runtime = self.runtime
        if self.layer_index == runtime.stage_layers[0]:
            runtime.begin(hidden_states, attention_mask, past_key_values, self.layer)
        if runtime.decoding:
            mask = _decoding_mask(self.layer, hidden_states, position_ids, past_key_values, runtime.key_positions)
            return self.layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        if self.stage is not None:
            hidden_states = runtime.prune(self.stage, self.predictor, hidden_states)
        out = self.layer(hidden_states, attention_mask=runtime.layer_mask(self.layer, hidden_states, past_key_values),
                         position_ids=runtime.kept, past_key_values=past_key_values, use_cache=use_cache,
                         position_embeddings=runtime.position_embeddings(position_embeddings), **kwargs)
        runtime.count(out)
        if self.layer_index == runtime.num_layers - 1:
            out = runtime.finish(out)
        return out


def _decoding_mask(layer: nn.Module, hidden_states: torch.Tensor, position_ids, past_key_values,
                   key_positions: KeyPositions) -> torch.Tensor | None:
    """New tokens see every cached token of this layer (caches differ in length per layer: each holds the tokens
    that reached it during prefill), within the sliding window by original position, and each other causally. One
    token on a full-attention layer needs no mask."""
    q_len = hidden_states.shape[1]
    if position_ids is None:
        past = past_key_values.get_seq_length(layer.self_attn.layer_idx)
        position_ids = torch.arange(past, past + q_len, device=hidden_states.device)[None]
    keys = key_positions.keys(past_key_values, layer.self_attn.layer_idx, position_ids)
    window = sliding_window(layer)
    if q_len == 1 and window is None:
        return None
    return additive_mask(visible_keys(position_ids, keys, window), hidden_states.dtype)
