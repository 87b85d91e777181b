"""BlockPruner (arXiv 2406.10594): remove MHA and MLP sub-blocks found by a greedy perplexity search.

Every decoder layer holds two removable blocks, MHA (input norm + attention + its residual add) and MLP
(post-attention norm + MLP + its residual add). Removing one drops its residual branch (h <- h). The search is
the official one: one block per step, each step removing the block whose removal, together with everything
already removed, gives the lowest calibration perplexity. The deletion order is a prefix family, so one search
serves every sparsity: `apply` takes the prefix whose compute sparsity is closest to the target.

The search reuses the hidden state entering every block under the current removed set, so a candidate at block
s re-runs only the blocks after s, and evaluates several candidates in one batch; both leave the result unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DummyLayer
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from methods.base import CalibrationSet, Method, MethodConfigError, MethodStats
from methods.flop_coefficients import LayerFlopCoefficients

BLOCK_KINDS = ("mha", "mlp")
Block = tuple[str, int]  # (kind, layer index): ("mha", 25) is layer 25's attention block


# --- the two sub-blocks of a decoder layer --------------------------------------------------------------------
def sandwich_norms(layer: nn.Module) -> bool:
    """Gemma-style layers norm each branch's output too (post_attention_layernorm belongs to attention, and the MLP
    has pre/post feed-forward norms); LLaMA-style layers norm only the branch inputs."""
    return getattr(layer, "sandwich_norms", hasattr(layer, "pre_feedforward_layernorm"))


def attention_block(layer: nn.Module, hidden_states: torch.Tensor, **attention_kwargs: Any) -> torch.Tensor:
    """h + Attn(norm(h)); Gemma-style layers also norm the branch output (post_attention_layernorm)."""
    branch, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **attention_kwargs)
    if sandwich_norms(layer):
        branch = layer.post_attention_layernorm(branch)
    return hidden_states + branch


def mlp_block(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """h + MLP(norm(h)), with Gemma's pre/post feed-forward norms where the layer has them."""
    if sandwich_norms(layer):
        return hidden_states + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden_states)))
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def _mark_attention_free(cache: Any, layer_idx: int) -> None:
    """Put transformers' DummyLayer in this layer's cache slot: a layer without MHA writes no K/V, and
    `Cache.get_seq_length()` (which generate() and the model read from layer 0) then skips to a layer with
    attention instead of reporting 0 when layer 0's MHA is removed."""
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches wrap the decoder's one
    if not isinstance(cache, Cache):
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(cache.layers) <= layer_idx and replicate is not None:
        cache.layers.append(replicate())
    if layer_idx < len(cache.layers) and not isinstance(cache.layers[layer_idx], DummyLayer):
        cache.layers[layer_idx] = DummyLayer()


def block_parts(layer: nn.Module, kind: str) -> tuple[str, ...]:
    """Names of the layer's sub-modules that belong to one block ("mha" or "mlp"), norms included."""
    if kind == "mha":
        return ("input_layernorm", "self_attn") + (("post_attention_layernorm",) if sandwich_norms(layer) else ())
    if sandwich_norms(layer):
        return ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")
    return ("post_attention_layernorm", "mlp")


class BlockPrunedDecoderLayer(nn.Module):
    """Stands in for a decoder layer with the same call signature. It holds only the sub-modules of the blocks it
    keeps, so a removed block's weights are not reachable from the pruned model (they are counted out of `params`)."""

    def __init__(self, layer: nn.Module, attention_removed: bool, mlp_removed: bool) -> None:
        super().__init__()
        self.attention_removed = attention_removed
        self.mlp_removed = mlp_removed
        self.layer_idx = layer.self_attn.layer_idx
        self.sandwich_norms = sandwich_norms(layer)
        kept = [kind for kind, removed in (("mha", attention_removed), ("mlp", mlp_removed)) if not removed]
        for kind in kept:
            for name in block_parts(layer, kind):
                setattr(self, name, getattr(layer, name))
        if hasattr(layer, "attention_type"):  # some models pick the mask by the layer's attention type
            self.attention_type = layer.attention_type
        self._inherit_forward_hooks(layer)

    def _inherit_forward_hooks(self, layer: nn.Module) -> None:
        """Forward hooks on the replaced layer (transformers records `output_hidden_states` with them) fire on
        this module instead, so hidden-state outputs keep one entry per layer."""
        for hook_id, hook in layer._forward_hooks.items():
            self.register_forward_hook(hook, with_kwargs=hook_id in layer._forward_hooks_with_kwargs,
                                       always_call=hook_id in layer._forward_hooks_always_called)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = False, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if self.attention_removed:
            if past_key_values is not None:
                _mark_attention_free(past_key_values, self.layer_idx)
        else:
            hidden_states = attention_block(
                self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                **kwargs)
        if not self.mlp_removed:
            hidden_states = mlp_block(self, hidden_states)
        return hidden_states

    def extra_repr(self) -> str:
        return f"attention_removed={self.attention_removed}, mlp_removed={self.mlp_removed}"


def _check_blocks(blocks: Sequence[Block], num_layers: int) -> list[Block]:
    checked = []
    for kind, layer in blocks:
        if kind not in BLOCK_KINDS or not 0 <= int(layer) < num_layers:
            raise MethodConfigError(f"blockpruner: invalid block ({kind!r}, {layer}) for a {num_layers}-layer "
                                    "model; recalibrate for this model (calibrate --force)")
        checked.append((kind, int(layer)))
    return checked


@contextmanager
def removed_blocks(model, blocks: Sequence[Block]) -> Iterator[object]:
    """Replace every affected decoder layer by a BlockPrunedDecoderLayer in place; restore on exit."""
    layers = model.model.layers
    drop = set(_check_blocks(blocks, len(layers)))
    if isinstance(model, PreTrainedModel):
        maybe_install_capturing_hooks(model)  # before the swap, so the replacements inherit them
    originals = {}
    try:
        for i in sorted({layer for _, layer in drop}):
            originals[i] = layers[i]
            layers[i] = BlockPrunedDecoderLayer(originals[i], ("mha", i) in drop, ("mlp", i) in drop)
        yield model
    finally:
        for i, layer in originals.items():
            layers[i] = layer


# --- compute and parameter shares -----------------------------------------------------------------------------
def block_compute_shares(config, seq_len: int | None = None,
                         shapes: Sequence[tuple[int, int]] | None = None) -> dict[str, float]:
    """Share of dense decoder FLOPs one block carries (methods.md §5), over the given (batch, width) forwards
    (the study's real inputs) or, without them, one row of `seq_len` tokens. An MHA block's share grows with N."""
    coeff = LayerFlopCoefficients.from_config(config)
    shapes = list(shapes) if shapes else [(1, seq_len)]
    dense = sum(b * config.num_hidden_layers * coeff.layer(n) for b, n in shapes)
    return {"mha": sum(b * coeff.attention(n) for b, n in shapes) / dense,
            "mlp": sum(b * coeff.mlp(n) for b, n in shapes) / dense}


def prefix_compute_sparsity(order: Sequence[Block], shares: dict[str, float]) -> list[float]:
    """Compute sparsity of every prefix of the deletion order, from no block removed to all of them."""
    sparsities = [0.0]
    for kind, _ in order:
        sparsities.append(sparsities[-1] + shares[kind])
    return sparsities


def _block_parameters(layer: nn.Module, kind: str) -> int:
    return sum(p.numel() for name in block_parts(layer, kind) for p in getattr(layer, name).parameters())


# --- the search -----------------------------------------------------------------------------------------------
def _repeat_rows(value: Any, rows: int, copies: int) -> Any:
    """Tile per-row tensors (first dim == rows) `copies` times along the batch, for batched candidates."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(copies, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == rows > 1 else value
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, rows, copies) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_rows(v, rows, copies) for k, v in value.items()}
    return value


class _SubBlockRunner:
    """Runs the model block by block on the calibration rows: block s = 2·layer + (0 for MHA, 1 for MLP).

    The embedding and every layer's call arguments (mask, rotary embeddings, ...) are captured from one ordinary
    forward, so the blocks run with exactly what the model would pass them."""

    def __init__(self, model, input_ids: torch.Tensor) -> None:
        self.model = model
        self.layers = list(model.model.layers)
        self.num_blocks = 2 * len(self.layers)
        self.input_ids = input_ids
        self.rows = input_ids.shape[0]
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.layer_kwargs: list[dict[str, Any]] = [{} for _ in self.layers]
        self.embeddings = self._capture_layer_inputs()

    def _capture_layer_inputs(self) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}
        last = len(self.layers) - 1

        def pre_hook(index: int):
            def fn(module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs.update(past_key_values=None, use_cache=False)
                self.layer_kwargs[index] = kwargs
                if index == 0:
                    captured["embeddings"] = hidden
                if index == last:
                    raise _StopForward  # everything the blocks need is captured
            return fn

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        try:
            self.model(input_ids=self.input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured["embeddings"]

    def run(self, block: int, hidden_states: torch.Tensor) -> torch.Tensor:
        layer_index, kind = divmod(block, 2)
        layer = self.layers[layer_index]
        if kind == 1:
            return mlp_block(layer, hidden_states)
        copies = hidden_states.shape[0] // self.rows
        return attention_block(layer, hidden_states, **_repeat_rows(self.layer_kwargs[layer_index], self.rows, copies))

    def row_nll(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL of every calibration row, one row at a time to bound the logits' memory."""
        targets = self.input_ids[:, 1:]
        nll = []
        for row in range(hidden_states.shape[0]):
            logits = self.model.lm_head(self.model.model.norm(hidden_states[row, :-1])).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            nll.append(F.cross_entropy(logits, targets[row % self.rows]))
        return torch.stack(nll)


class _StopForward(Exception):
    """Raised by the capture hook of the last layer: nothing after it is needed."""


def perplexity(row_nll: torch.Tensor) -> float:
    """The official definition: exp of the mean over rows of each row's mean token NLL."""
    return math.exp(row_nll.double().mean().item())


def block_of(position: int) -> Block:
    layer, kind = divmod(position, 2)
    return (BLOCK_KINDS[kind], layer)


def _prefix_states(runner: _SubBlockRunner, removed: set[int]) -> list[torch.Tensor]:
    """states[s] = hidden state entering block s under the removed set (states[-1] = the final one)."""
    states = [runner.embeddings]
    for s in range(runner.num_blocks):
        states.append(states[-1] if s in removed else runner.run(s, states[-1]))
    return states


def _candidate_perplexities(runner: _SubBlockRunner, states: list[torch.Tensor], removed: set[int],
                            group: Sequence[int]) -> list[float]:
    """Perplexity of removed ∪ {c} for each candidate c of `group` (ascending positions), in one batch.

    Candidate c joins the batch with the state entering c (removing c is the identity there) and runs every
    later block that is not removed."""
    active: torch.Tensor | None = None
    joining = set(group)
    for s in range(group[0], runner.num_blocks):
        if active is not None and s not in removed:
            active = runner.run(s, active)
        if s in joining:
            active = states[s] if active is None else torch.cat([active, states[s]])
    nll = runner.row_nll(active).view(len(group), runner.rows)
    return [perplexity(row) for row in nll]


def greedy_block_search(model, calibration: CalibrationSet, steps: int, candidate_batch_size: int = 8,
                        progress: bool = True) -> dict[str, Any]:
    """The official greedy search with the prefix-state cache: `steps` blocks, one per step."""
    num_blocks = 2 * model.config.num_hidden_layers
    if not 1 <= steps <= num_blocks:
        raise MethodConfigError(f"blockpruner: search_steps must be in [1, {num_blocks}], got {steps}")
    device = next(model.parameters()).device
    removed: list[int] = []
    perplexities: list[float] = []
    with torch.inference_mode():
        runner = _SubBlockRunner(model, calibration.input_ids.to(device))
        dense_ppl = perplexity(runner.row_nll(_prefix_states(runner, set())[-1]))
        total = sum(num_blocks - k for k in range(steps))
        with tqdm(total=total, desc="blockpruner: search", unit="cand", disable=not progress) as bar:
            for _ in range(steps):
                removed_set = set(removed)
                states = _prefix_states(runner, removed_set)
                candidates = [s for s in range(num_blocks) if s not in removed_set]
                scores: dict[int, float] = {}
                for start in range(0, len(candidates), candidate_batch_size):
                    group = candidates[start:start + candidate_batch_size]
                    scores.update(zip(group, _candidate_perplexities(runner, states, removed_set, group), strict=True))
                    bar.update(len(group))
                best = min(candidates, key=lambda s: (scores[s], s))
                removed.append(best)
                perplexities.append(scores[best])
                kind, layer = block_of(best)
                bar.set_postfix_str(f"{kind}{layer} ppl={scores[best]:.2f}")
                del states
    return {"deletion_order": [list(block_of(s)) for s in removed], "perplexities": perplexities,
            "dense_perplexity": dense_ppl}


# --- the method -----------------------------------------------------------------------------------------------
@dataclass
class BlockPruner(Method):
    """Greedy sub-block removal by calibration perplexity; one search serves every sparsity.

    Fields: `search_steps` is K, the length of the deletion order the search produces (part of the artifact key;
    a model with fewer than K MHA + MLP blocks gets all of them ordered);
    `reference_seq_len` is the N at which block compute shares are evaluated to pick the prefix (an MHA block's
    share grows with N); `candidate_batch_size` is how many candidates one batched pass evaluates (speed only).

    Default calibration (the harness reads `default_calibration`): 1 row × 512 tokens of the benchmark's
    calibration text (the paper: 256 Alpaca rows × 2048 tokens). The search costs Σ_{k<K} (2L − k) candidate
    evaluations; on SmolLM2-135M one step over 1 × 512 tokens takes ~40 s on 2 CPU cores, so K = 34 steps (enough
    to reach compute sparsity 0.4 at N = 512) takes ~15 minutes; every extra row adds the same again. Raise
    n_samples where time allows (a GPU): the order is only as good as the calibration text.
    """

    search_steps: int = 34
    reference_seq_len: int = 512
    candidate_batch_size: int = 8

    name: ClassVar[str] = "blockpruner"
    needs_calibration: ClassVar[bool] = True
    # The deletion order depends on neither the target nor the prefix-choice length: one search serves all.
    calibration_ignores: ClassVar[tuple[str, ...]] = ("sparsity", "seed", "reference_seq_len")
    default_calibration: ClassVar[dict] = {"n_samples": 1, "seq_len": 512}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.search_steps, int) or self.search_steps < 1:
            raise MethodConfigError(f"blockpruner: search_steps must be a positive int, got {self.search_steps!r}")
        if not isinstance(self.reference_seq_len, int) or self.reference_seq_len < 1:
            raise MethodConfigError("blockpruner: reference_seq_len must be a positive int (tokens), "
                                    f"got {self.reference_seq_len!r}; e.g. 512")
        if not isinstance(self.candidate_batch_size, int) or self.candidate_batch_size < 1:
            raise MethodConfigError("blockpruner: candidate_batch_size must be a positive int, "
                                    f"got {self.candidate_batch_size!r}; lower it if the search runs out of memory")

    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict:
        # A model with fewer than K blocks (a user's small model) has its whole deletion order searched.
        steps = min(self.search_steps, 2 * model.config.num_hidden_layers)
        artifact = greedy_block_search(model, calibration, steps, self.candidate_batch_size)
        artifact["num_layers"] = model.config.num_hidden_layers
        return artifact

    def deletion_order(self, num_layers: int) -> list[Block]:
        artifact = self.artifact
        if artifact.get("num_layers") != num_layers:
            raise MethodConfigError(f"blockpruner: artifact was searched on {artifact.get('num_layers')} layers, "
                                    f"the model has {num_layers}; recalibrate for this model (calibrate --force)")
        return _check_blocks([tuple(block) for block in artifact["deletion_order"]], num_layers)

    def fit_lengths(self, config, shapes: list[tuple[int, int]]) -> dict[str, Any]:
        """The harness's matching rule for this static method: pick the prefix by the compute shares of the
        study's real (batch, width) forwards instead of `reference_seq_len`."""
        self._shapes = [(int(b), int(n)) for b, n in shapes]
        return {"knob": "prefix_length", "value": self.prefix_length(config)}

    def shares(self, config) -> dict[str, float]:
        shapes = getattr(self, "_shapes", None)
        return block_compute_shares(config, self.reference_seq_len, shapes)

    def prefix_length(self, config) -> int:
        """k whose prefix's compute sparsity (on the fitted forwards, else at reference_seq_len) is closest to the
        target (tie -> smaller k)."""
        order = self.deletion_order(config.num_hidden_layers)
        shares = self.shares(config)
        sparsities = prefix_compute_sparsity(order, shares)
        k = min(range(len(sparsities)), key=lambda i: (abs(sparsities[i] - self.sparsity), i))
        if self.sparsity - sparsities[-1] > min(shares.values()) / 2:
            raise MethodConfigError(
                f"blockpruner: target sparsity {self.sparsity} needs more blocks than the search produced "
                f"({len(order)} blocks reach {sparsities[-1]:.3f} on these inputs); raise "
                "search_steps and recalibrate")
        return k

    @contextmanager
    def apply(self, model) -> Iterator[object]:
        config = model.config
        k = self.prefix_length(config)
        removed = self.deletion_order(config.num_hidden_layers)[:k]
        shares = self.shares(config)
        total_params = sum(p.numel() for p in model.parameters())
        removed_params = sum(_block_parameters(model.model.layers[layer], kind) for kind, layer in removed)
        perplexities = self.artifact["perplexities"]
        both = {layer for kind, layer in removed if kind == "mha"} & {layer for kind, layer in removed if kind == "mlp"}
        fractions = [0.0 if i in both else 1.0 for i in range(config.num_hidden_layers)]
        self._stats = MethodStats(
            compute_sparsity=prefix_compute_sparsity(removed, shares)[-1],
            token_layer_sparsity=1.0 - sum(fractions) / len(fractions),
            per_layer_computed_fraction=fractions,
            removed_units=[f"{kind} {layer}" for kind, layer in removed],
            knob="prefix_length", knob_value=float(k),
            details={"prefix_length": k, "blocks_removed": [list(block) for block in removed],
                     "mha_removed": sum(kind == "mha" for kind, _ in removed),
                     "mlp_removed": sum(kind == "mlp" for kind, _ in removed),
                     "fitted_forwards": len(getattr(self, "_shapes", None) or []),
                     "reference_seq_len": None if getattr(self, "_shapes", None) else self.reference_seq_len,
                     "parameter_ratio": removed_params / total_params,
                     "calibration_perplexity": perplexities[k - 1] if k else self.artifact["dense_perplexity"]})
        with removed_blocks(model, removed) as pruned:
            yield pruned

    def measured_stats(self) -> MethodStats:
        return getattr(self, "_stats", None) or MethodStats(None, None, [], [], knob="prefix_length")
