"""The scoring engine (bench/evaluate.py) against stock lm-eval: the same (logprob, is_greedy) on the same
requests, on a tiny random model that speaks the real tokenizer, for both engine paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.evaluate import PER_REQUEST, SHARED_PREFIX, BenchLM, ScoredInput, pack_requests

TASKS = ["arc_easy", "winogrande", "boolq", "lambada_openai", "piqa"]


@pytest.fixture(scope="module")
def requests():
    from lm_eval.api.instance import Instance

    from bench.tasks import build_task_dict

    out = []
    for task in build_task_dict(TASKS).values():
        task.build_all_requests(limit=2, rank=0, world_size=1)
        out.extend(task.instances)
    # a few continuations the model predicts greedily, so `is_greedy` is compared on True values too
    out.extend(Instance("loglikelihood", doc={}, arguments=("The capital of France is", f" {w}"), idx=i,
                        metadata=("greedy", 0, 1)) for i, w in enumerate(["Paris", "the", "a"]))
    return out


def _stock(model, tokenizer, requests):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8).loglikelihood(requests, disable_tqdm=True)


def _with_greedy_request(model, tokenizer, requests):
    """Append a request whose one-token continuation is the model's own argmax (is_greedy must be True)."""
    from lm_eval.api.instance import Instance

    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    word = tokenizer.decode([best])
    return [*requests, Instance("loglikelihood", doc={}, arguments=("The capital of France is", word), idx=9,
                                metadata=("greedy", 1, 1))]


def _assert_same(ours, stock):
    a, b = np.array([s[0] for s in ours]), np.array([s[0] for s in stock])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert [s[1] for s in ours] == [s[1] for s in stock]


@pytest.mark.parametrize("sequence_dependent", [False, True])
def test_engine_matches_stock_hflm(tiny_with_real_vocab, real_tokenizer, requests, sequence_dependent):
    model = tiny_with_real_vocab
    reqs = _with_greedy_request(model, real_tokenizer, requests)
    lm = BenchLM(model, real_tokenizer, batch_size=8, sequence_dependent=sequence_dependent, progress=False)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].clone(), kwargs.get("attention_mask"),
                                                  kwargs.get("position_ids"))), with_kwargs=True)
    try:
        ours = lm.loglikelihood(reqs)
    finally:
        handle.remove()
    stock = _stock(model, real_tokenizer, reqs)
    _assert_same(ours, stock)
    assert ours[-1][1] is True  # the greedy request really was greedy
    assert lm.engine.path == (PER_REQUEST if sequence_dependent else SHARED_PREFIX)
    assert lm.engine.requests == len(reqs)
    sequences = [lm._prepare(*lm._encode_pair(*r.args)).input_ids for r in reqs]
    if sequence_dependent:
        # a token-routing method gets the rows stock scoring builds: one request per row, right-padded, with the
        # 2-D padding mask where a batch is padded (no custom mask), positions 0..n-1
        assert lm.engine.computed_tokens == lm.engine.tokens <= lm.engine.padded_tokens
        rows = set()
        for ids, mask, pos in seen:
            assert pos is None and (mask is None or mask.dim() == 2)
            lengths = [ids.shape[1]] * ids.shape[0] if mask is None else mask.sum(-1).tolist()
            assert mask is None or bool((mask == (torch.arange(ids.shape[1])[None] < mask.sum(-1, keepdim=True))).all())
            rows |= {tuple(row[:n].tolist()) for row, n in zip(ids, lengths, strict=True)}
        assert rows == {tuple(s) for s in sequences}
        assert any(mask is not None for _, mask, _ in seen)  # rows of different lengths shared a batch
    else:  # each distinct prefix of a document's requests is computed once
        groups = [(r.task_name, r.doc_id) for r in reqs]
        prefixes = {(g, tuple(seq[:k + 1])) for g, seq in zip(groups, sequences, strict=True)
                    for k in range(len(seq))}
        assert lm.engine.computed_tokens == len(prefixes) < 0.85 * lm.engine.tokens


def test_shared_prefix_safe_when_a_layer_has_no_attention(tiny_with_real_vocab, real_tokenizer, requests):
    """BlockPruner may remove a whole attention block (the layer writes no KV cache): the packed trie needs no
    cache, so scores still equal stock scoring of the same pruned model."""
    from methods.blockpruner import BlockPrunedDecoderLayer

    model = tiny_with_real_vocab
    original = model.model.layers[1]
    model.model.layers[1] = BlockPrunedDecoderLayer(original, attention_removed=True, mlp_removed=False)
    try:
        lm = BenchLM(model, real_tokenizer, batch_size=8, progress=False)
        _assert_same(lm.loglikelihood(requests), _stock(model, real_tokenizer, requests))
        assert lm.engine.path == SHARED_PREFIX
    finally:
        model.model.layers[1] = original


@pytest.mark.parametrize("arch,window,path", [("mistral", 8, PER_REQUEST), ("gemma3", 8, PER_REQUEST),
                                               ("gemma3", 4096, SHARED_PREFIX)])
def test_sliding_window_models_score_as_stock(real_tokenizer, requests, arch, window, path):
    """A packed trie row carries one mask for every layer, so it cannot hold a sliding layer's window: requests
    longer than the window are scored unpacked (the model applies its own windows), shorter ones stay packed;
    both equal stock scoring."""
    import bench.models

    model = bench.models.tiny_model(arch, num_layers=3, hidden=32, heads=2, kv_heads=1, intermediate=64,
                                    vocab=len(real_tokenizer))
    model.config.sliding_window = window
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            layer.self_attn.sliding_window = window
    lm = BenchLM(model, real_tokenizer, batch_size=8, progress=False)
    _assert_same(lm.loglikelihood(requests), _stock(model, real_tokenizer, requests))
    assert lm.engine.path == path


def test_scores_are_bit_identical_across_runs(tiny_with_real_vocab, real_tokenizer, requests):
    runs = [BenchLM(tiny_with_real_vocab, real_tokenizer, batch_size=8, progress=False).loglikelihood(requests)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_trie_packing():
    """Two choices after one 3-token context: 3 + 2 + 2 nodes; each node sees only its ancestors."""
    items = [ScoredInput([1, 2, 3, 4, 5], 3), ScoredInput([1, 2, 3, 6, 7], 3), ScoredInput([9, 9], 1)]
    rows = pack_requests(items, ["doc0", "doc0", "doc1"], max_nodes=100)
    assert [r.tokens for r in rows] == [[1, 2, 3, 4, 5, 6, 7], [9, 9]]
    assert rows[0].depths == [0, 1, 2, 3, 4, 3, 4]
    assert rows[0].requests == [(0, [3, 4]), (1, [5, 6])]
    seen = rows[0].visibility(8)
    assert seen[6].tolist() == [True, True, True, False, False, True, True, False]
    assert seen[7].tolist() == [False] * 7 + [True]  # padding sees itself only (no NaN rows)
    capped = pack_requests(items[:2], ["doc0", "doc0"], max_nodes=6)
    assert [r.tokens for r in capped] == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]]
