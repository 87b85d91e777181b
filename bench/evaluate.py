"""Accuracy through lm-eval (unforked): an `HFLM` subclass whose log-likelihood engine scores exactly the tokens
stock `HFLM._loglikelihood_tokens` scores (same truncation, same continuation slice), only faster.

Two paths, chosen per method (`BenchLM.path`):

- "shared-prefix" (default; every method whose decisions are per position: dense, ShortGPT, random, BlockPruner).
  The requests of one document (its multiple-choice options) are merged into a token trie and run as ONE packed
  row: each trie node is a token at RoPE position = its depth, and a 4-D attention mask lets a node see exactly
  its ancestors. So the shared context is computed once and every choice continues from it; each scored
  position sees the very tokens it sees under stock scoring, hence the same log-probabilities (to float
  rounding). It needs no KV cache, so a method that removes a whole attention block (BlockPruner) is safe.
- "per-request" (methods with `sequence_dependent = True`: FTP, SDTP; and attention kernels that take no custom
  mask). One row per request, as stock lm-eval builds it, right-padded to its batch's longest row. A token method
  is given the 2-D padding mask and makes every decision per row over that row's own tokens (its budgets, top-k,
  protected positions, router features), so a row keeps, computes and scores what it does alone; its FLOPs are
  counted per row (`bench.flops.RowFlops`). Tests check alone = batched on mixed lengths for every such method.
  (Not packed as segments of one row like the shared-prefix path: attention over a packed row costs and is
  counted as the square of the packed length, so a request's FLOPs would depend on what it is packed with.)

Both paths sort by length (little padding), run under `torch.inference_mode`, compute logits only at scored
positions, and tell the method which positions are scored (`methods.base.scoring`). The harness plans a task's
forwards first (`Forward`: exactly what will run), lets an input-dependent method solve its matching knob on them
(`on_workload`), then runs each under FlopCounterMode (`dense_flops`): the cell's compute sparsity is counted on
every forward it scored."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from bench.console import terminal  # noqa: E402
from bench.flops import RowFlops  # noqa: E402
from bench.generation import DenseCost, GenerationTally, greedy_generate  # noqa: E402
from bench.tasks import quiet_expected_lm_eval_messages  # noqa: E402
from methods.base import scoring  # noqa: E402
from methods.token_subsets import smallest_window  # noqa: E402

MIN_FILL = 0.8  # a batch's rows are at least this fraction of its longest row
SHARED_PREFIX, PER_REQUEST = "shared-prefix", "per-request"
# attention kernels that honour an arbitrary 4-D mask (the packed trie needs one)
_CUSTOM_MASK_KERNELS = {"sdpa", "eager"}


@dataclass
class ScoredInput:
    """One request's forward as stock lm-eval builds it: the input tokens and the first scored position."""

    input_ids: list[int]
    scored_from: int  # first position whose logits score a continuation token

    def scored_mask(self) -> torch.Tensor:
        mask = torch.zeros(1, len(self.input_ids), dtype=torch.bool)
        mask[0, self.scored_from:] = True
        return mask


@dataclass
class Forward:
    """One forward the engine runs, exactly as it runs it: the padded batch, the scored positions the method must
    protect, the logit positions kept, and the extra model kwargs (packed rows: 4-D mask and RoPE positions)."""

    input_ids: torch.Tensor  # [batch, width]
    scored: torch.Tensor  # [batch, width] bool
    keep: torch.Tensor  # positions whose logits are computed
    kwargs: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])


@dataclass
class FlopTally:
    """Executed decoder FLOPs (FlopCounterMode, on the forwards as evaluated) and the dense model's on the same
    batches (the analytic formula, which equals the dense count exactly): c = 1 − executed / dense."""

    executed: int = 0
    dense: int = 0
    items: int = 0  # requests scored
    tokens: int = 0  # input tokens of those requests (unpadded)

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.executed / self.dense if self.dense else None


@dataclass
class EngineStats:
    """What the engine did: `tokens` = request tokens (what stock scoring would compute, unpadded),
    `computed_tokens` = rows actually run (after prefix sharing), `padded_tokens` = with padding."""

    path: str = ""
    forwards: int = 0
    requests: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    flops: FlopTally = field(default_factory=FlopTally)


@dataclass
class PackedRow:
    """Requests merged into a token trie. Nodes are in insertion order (a parent precedes its children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, scored node per token)

    def add(self, request: int, item: ScoredInput) -> None:
        node = -1
        path = []
        for token in item.input_ids:
            key = (node, token)
            if key not in self.children:
                self.children[key] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1 if node >= 0 else 0)
            node = self.children[key]
            path.append(node)
        self.requests.append((request, path[item.scored_from:]))

    def visibility(self, width: int) -> np.ndarray:
        """[width, width] bool: node i sees node j iff j is i or an ancestor of i (padding sees only itself)."""
        seen = np.zeros((width, width), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                seen[i] = seen[parent]
            seen[i, i] = True
        idx = np.arange(len(self.tokens), width)
        seen[idx, idx] = True
        return seen


def pack_requests(items: list[ScoredInput], groups: list[object], max_nodes: int) -> list[PackedRow]:
    """One trie per group (a document's choices); a request that would push a trie past `max_nodes` starts a
    new row of its own group."""
    rows: list[PackedRow] = []
    open_row: dict[object, PackedRow] = {}
    for i, (item, group) in enumerate(zip(items, groups, strict=True)):
        row = open_row.get(group)
        if row is None or len(row.tokens) + len(item.input_ids) > max_nodes:
            row = open_row[group] = PackedRow()
            rows.append(row)
        row.add(i, item)
    return rows


class BenchLM(HFLM):
    """HFLM over an in-memory (possibly pruned) model.

    sequence_dependent: the method's decisions depend on the whole sequence (token routing): score each request
        as its own row (the per-request path), never packed with other choices; a padded batch carries its 2-D
        padding mask so the method decides per row on the row's own tokens.
    dense_flops: (batch, width) -> the dense model's decoder FLOPs on such a batch. When given, every forward is
        counted (`bench.flops.RowFlops`) and `engine.flops` tallies executed vs dense FLOPs on exactly what
        was scored.
    method_flops: the method's own running count of executed FLOPs (`Method.executed_flops`), used on padded
        batches so each row is counted as it costs alone.
    on_workload: called with the task's list of `Forward`s before any runs (the harness solves an input-dependent
        method's knob on them; it may run the model on them, it must not change them).
    plan_only: record the forwards in `workload` and return placeholder scores without running the model (the
        harness reads the study's sequence lengths this way).
    decode_flops: (batch, past) -> the dense model's decoder FLOPs of one decode step; with `dense_flops`, generation
        is counted by phase in `generation` (prefill and decode apart).

    `generate_until` requests (greedy) run through `bench.generation.greedy_generate`: the prompts' prefill forwards
    are planned first (one `Forward` each, its last position scored) and handed to `on_workload`, so a token method's
    knob is solved on the prompts it will prefill; then each prompt is prefilled with a KV cache and decoded token by
    token, rows batched only with prompts of their own length (`Method.batched_decode` False: one row at a time)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, sequence_dependent: bool = False,
                 progress: bool = True, max_batch_tokens: int = 4096,
                 dense_flops: Callable[[int, int], int] | None = None,
                 method_flops: Callable[[], int | None] | None = None,
                 on_workload: Callable[[list[Forward]], None] | None = None, plan_only: bool = False,
                 decode_flops: Callable[[int, int], int] | None = None, batched_decode: bool = True):
        with quiet_expected_lm_eval_messages():
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.sequence_dependent = sequence_dependent
        self.progress = progress
        self.max_batch_tokens = max_batch_tokens
        self.dense_flops = dense_flops
        self._flops = None if dense_flops is None else RowFlops(dense_flops, method_flops)
        self.on_workload = on_workload
        self.plan_only = plan_only
        self.workload: list[Forward] = []
        self.engine = EngineStats(path=self.path)
        self._group_of_request: list[object] = []
        self.cost = None if dense_flops is None or decode_flops is None else DenseCost(dense_flops, decode_flops)
        self.batched_decode = batched_decode
        self.generation = GenerationTally()
        self._generation_bar = None

    @property
    def path(self) -> str:
        kernel = getattr(self.model.config, "_attn_implementation", "sdpa")
        return PER_REQUEST if self.sequence_dependent or kernel not in _CUSTOM_MASK_KERNELS else SHARED_PREFIX

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # a document's requests share one trie (its choices; WinoGrande's options share the text before the blank)
        self._group_of_request = [(r.task_name, r.doc_id) if getattr(r, "doc_id", None) is not None else r.args[0]
                                  for r in requests]
        return super().loglikelihood(requests, disable_tqdm=True)

    # -- generation ---------------------------------------------------------------------------------------------
    def _max_gen_toks(self, gen_kwargs: dict) -> int:
        return int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    def _prompt_ids(self, context: str, gen_kwargs: dict) -> list[int]:
        """A request's prompt exactly as HFLM.generate_until encodes it (same call, left-truncated the same way)."""
        ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - self._max_gen_toks(gen_kwargs),
                                       truncation=self.truncation)
        return ids[0].tolist()

    def generate_until(self, requests, disable_tqdm: bool = False):
        prompts = [self._prompt_ids(r.args[0], r.args[1]) for r in requests]
        forwards = []
        for ids in prompts:
            scored = torch.zeros(1, len(ids), dtype=torch.bool)
            scored[0, -1] = True
            forwards.append(Forward(torch.tensor([ids]), scored, torch.tensor([len(ids) - 1])))
        self.workload.extend(forwards)
        if self.plan_only:
            return [""] * len(requests)
        if self.on_workload is not None:
            self.on_workload(forwards)
        self.engine.path = "generate"
        self.engine.requests += len(requests)
        self.engine.tokens += sum(map(len, prompts))
        start = time.perf_counter()
        self._generation_bar = tqdm(total=len(requests), desc="generating", disable=not self.progress,
                                    file=terminal(), leave=False)
        try:
            return super().generate_until(requests, disable_tqdm=True)
        finally:
            self._generation_bar.close()
            self.engine.seconds += time.perf_counter() - start

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Greedy continuations of a left-padded batch, as [batch, width + new] (context, then the new tokens,
        right-padded), the form HFLM.generate_until reads."""
        if generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) not in (0.0, None):
            raise NotImplementedError("bench scores generation greedily only (do_sample=False, temperature 0)")
        mask = generation_kwargs.get("attention_mask")
        rows = [c[m.bool()].tolist() if mask is not None else c.tolist() for c, m in
                zip(context.cpu(), mask.cpu() if mask is not None else [None] * len(context), strict=True)]
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos_ids = {self.eot_token_id} | set(eos if isinstance(eos, list) else [] if eos is None else [eos])

        def done(tokens: list[int]) -> bool:
            text = self.tok_decode(tokens)
            return any(s in text for s in stop if s)

        new = greedy_generate(self.model, rows, max_length - context.shape[1], done, sorted(eos_ids),
                              batch_size=self.batch_size if self.batched_decode else 1, cost=self.cost,
                              tally=self.generation, on_row=self._generation_bar.update if self._generation_bar else None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max(map(len, new), default=0)
        tail = torch.full((len(new), width), pad, dtype=torch.long)
        for b, tokens in enumerate(new):
            tail[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return torch.cat([context.cpu(), tail], dim=1)

    # -- log-likelihood -------------------------------------------------------------------------------------------
    def _prepare(self, context_enc: list[int], continuation_enc: list[int]) -> ScoredInput:
        whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
        inp = whole[:-1]
        return ScoredInput(input_ids=inp, scored_from=len(inp) - len(continuation_enc))

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Longest first (worst-case memory shows at once); a batch holds at most `batch_size` rows and
        `max_batch_tokens` padded tokens, and no row shorter than `MIN_FILL` of its longest (on CPU the cost is
        linear in padded tokens, so a smaller batch is cheaper than padding)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for idx in order:
            width = lengths[batches[-1][0]] if batches else 0
            if batches and len(batches[-1]) < self.batch_size \
                    and (len(batches[-1]) + 1) * width <= self.max_batch_tokens \
                    and lengths[idx] >= MIN_FILL * width:
                batches[-1].append(idx)
            else:
                batches.append([idx])
        return batches

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        items = [self._prepare(ctx, cont) for _, ctx, cont in requests]
        targets = [cont[len(cont) - (len(it.input_ids) - it.scored_from):] for it, (_, _, cont)
                   in zip(items, requests, strict=True)]
        n = len(items)
        groups = self._group_of_request if len(self._group_of_request) == n \
            else [tuple(ctx) for _, ctx, _ in requests]
        self.engine.path = self.path
        window = smallest_window(self.model.config)
        if window is not None and max((len(it.input_ids) for it in items), default=0) > window:
            # one shared mask cannot hold both a sliding layer's window and a full layer's causal mask, so rows
            # longer than the window are scored unpacked, where the model applies its windows itself
            self.engine.path = PER_REQUEST
        if self.engine.path == SHARED_PREFIX:
            rows = pack_requests(items, groups, max_nodes=self.max_batch_tokens)
            plan = [self._packed_forward([rows[b] for b in batch], targets)
                    for batch in self._batches([len(r.tokens) for r in rows])]
        else:
            plan = [self._row_forward(batch, items, targets)
                    for batch in self._batches([len(it.input_ids) for it in items])]
        forwards = [forward for forward, _, _ in plan]
        self.workload.extend(forwards)
        if self.plan_only:
            return [(0.0, False)] * n
        if self.on_workload is not None:
            self.on_workload(forwards)
        self.engine.requests += n
        self.engine.tokens += sum(len(it.input_ids) for it in items)
        results: list[tuple[float, bool] | None] = [None] * n
        start = time.perf_counter()
        pbar = tqdm(total=n, desc=f"scoring ({self.engine.path})", disable=not self.progress,
                    file=terminal(), leave=False)  # loglikelihood() hands disable_tqdm=True for lm-eval's own bar
        for forward, read, requests_in_forward in plan:
            tally = self.engine.flops
            tally.items += len(requests_in_forward)
            tally.tokens += sum(len(items[i].input_ids) for i in requests_in_forward)
            read(self._forward(forward), results)
            pbar.update(len(requests_in_forward))
        pbar.close()
        self.engine.seconds += time.perf_counter() - start
        return results

    def _forward(self, forward: Forward) -> torch.Tensor:
        """Log-probabilities [batch, len(keep), vocab] at the kept positions; FLOPs tallied when counting."""
        kwargs = {k: v.to(self.device) for k, v in forward.kwargs.items()}
        with torch.inference_mode(), scoring(forward.scored.to(self.device)):
            call = dict(input_ids=forward.input_ids.to(self.device), use_cache=False,
                        logits_to_keep=forward.keep.to(self.device), **kwargs)
            if self.dense_flops is None:
                logits = self.model(**call).logits
            else:
                out, executed, dense = self._flops.forward(self.model, **call)
                logits = out.logits
                self.engine.flops.executed += executed
                self.engine.flops.dense += dense
        self.engine.forwards += 1
        self.engine.padded_tokens += forward.input_ids.numel()
        return F.log_softmax(logits.float(), dim=-1).cpu()

    @staticmethod
    def _read(logprobs: torch.Tensor, positions: torch.Tensor, target: list[int]) -> tuple[float, bool]:
        span = logprobs[positions]
        target_t = torch.tensor(target, dtype=torch.long)
        greedy = bool((span.argmax(-1) == target_t).all())
        return float(span.gather(-1, target_t[:, None]).sum()), greedy

    def _packed_forward(self, rows: list[PackedRow], targets: list[list[int]]):
        """(the forward of these packed rows, how to read its log-probs into results, the requests it scores)."""
        width = max(len(r.tokens) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        visible = np.zeros((len(rows), 1, width, width), dtype=bool)
        for b, row in enumerate(rows):
            ids[b, :len(row.tokens)] = torch.tensor(row.tokens)
            positions[b, :len(row.tokens)] = torch.tensor(row.depths)
            visible[b, 0] = row.visibility(width)
            for _, nodes in row.requests:
                scored[b, nodes] = True
        keep = scored.any(0).nonzero().flatten()
        column = torch.full((width,), -1, dtype=torch.long)
        column[keep] = torch.arange(len(keep))
        mask = torch.from_numpy(visible)
        if getattr(self.model.config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(mask.shape, dtype=self.model.dtype).masked_fill(~mask, torch.finfo(self.model.dtype).min)
        self.engine.computed_tokens += sum(len(r.tokens) for r in rows)

        def read(logprobs: torch.Tensor, results: list) -> None:
            for b, row in enumerate(rows):
                for request, nodes in row.requests:
                    results[request] = self._read(logprobs[b], column[nodes], targets[request])

        forward = Forward(ids, scored, keep, {"attention_mask": mask, "position_ids": positions})
        return forward, read, [request for row in rows for request, _ in row.requests]

    def _row_forward(self, batch: list[int], items: list[ScoredInput], targets: list[list[int]]):
        """(one unpadded-or-right-padded row per request, its reader, the requests): no mask, plain causal."""
        width = max(len(items[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            ids[row, :len(items[i].input_ids)] = torch.tensor(items[i].input_ids)
            scored[row, items[i].scored_from:len(items[i].input_ids)] = True
        first = min(items[i].scored_from for i in batch)
        self.engine.computed_tokens += sum(len(items[i].input_ids) for i in batch)

        def read(logprobs: torch.Tensor, results: list) -> None:
            for row, i in enumerate(batch):
                lo, end = items[i].scored_from, len(items[i].input_ids)
                results[i] = self._read(logprobs[row], torch.arange(lo - first, end - first), targets[i])

        # right padding needs no mask under causal attention (as in stock HFLM); a token method is told which
        # tokens are padding, so that its per-row decisions leave them out
        lengths = torch.tensor([len(items[i].input_ids) for i in batch])
        kwargs = {}
        if self.sequence_dependent and bool((lengths < width).any()):
            kwargs["attention_mask"] = (torch.arange(width)[None] < lengths[:, None]).long()
        return Forward(ids, scored, torch.arange(first, width), kwargs), read, list(batch)
