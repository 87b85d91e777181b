"""Greedy generation through every registered method (bench.generation): the engine's tokens equal
`model.generate` on the same pruned model, a batch gives each row's tokens alone, and FLOPs are counted by phase."""

from __future__ import annotations

import pytest
import torch

from bench.flops import analytic_decoder_flops
from bench.generation import DenseCost, GenerationTally, equal_length_batches, greedy_generate
from methods import available_methods, make_method
from methods.flop_coefficients import LayerFlopCoefficients
from tests.test_all_methods import _fast_fields

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 6


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [20, 20, 13, 20]  # three of one length share a batch, one runs alone
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _cost(config) -> DenseCost:
    coeff = LayerFlopCoefficients.from_config(config)
    layers = config.num_hidden_layers
    return DenseCost(prefill=lambda b, n: analytic_decoder_flops(config, n, batch=b, num_layers=layers),
                     step=lambda b, past: b * layers * coeff.layer(1, past + 1))


def _method(name: str, model, calibration):
    method = make_method(name, sparsity=0.0 if name == "dense" else 0.25, **_fast_fields(name))
    if method.needs_calibration:
        method.load_artifact(method.calibrate(model, None, calibration))
    return method


def test_equal_length_batches_group_by_length_only():
    assert equal_length_batches([[1, 2], [3], [4, 5], [6, 7]], batch_size=2) == [[0, 2], [3], [1]]


@pytest.mark.parametrize("name", available_methods())
def test_engine_tokens_equal_model_generate_and_a_batch_equals_each_row_alone(name, tiny, tiny_calibration):
    model = tiny
    prompts = _prompts(model.config.vocab_size)
    method = _method(name, model, tiny_calibration)
    batch = 4 if type(method).batched_decode else 1
    with method.apply(model) as pruned:
        alone = greedy_generate(pruned, prompts, NEW_TOKENS, done=lambda _: False, batch_size=1)
        batched = greedy_generate(pruned, prompts, NEW_TOKENS, done=lambda _: False, batch_size=batch)
        reference = []
        for prompt in prompts:
            with torch.inference_mode():
                out = pruned.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            reference.append(out[0, len(prompt):].tolist())
    assert alone == reference, name
    assert batched == alone, name
    assert all(len(t) == NEW_TOKENS for t in alone)


def test_generation_stops_at_eos_and_at_a_stop_condition(tiny):
    prompts = _prompts(tiny.config.vocab_size)[:1]
    free = greedy_generate(tiny, prompts, NEW_TOKENS, done=lambda _: False)[0]
    assert greedy_generate(tiny, prompts, NEW_TOKENS, done=lambda _: False, eos_token_ids=[free[2]])[0] \
        == free[:free.index(free[2]) + 1]
    assert greedy_generate(tiny, prompts, NEW_TOKENS, done=lambda t: len(t) == 2)[0] == free[:2]


@pytest.mark.parametrize("name", ["dense", "shortgpt", "random", "tail"])
def test_flops_are_counted_by_phase(name, tiny, tiny_calibration):
    """Layer removal saves n/L of every forward, prefill and decode alike; dense counts exactly its formula."""
    model = tiny
    method = _method(name, model, tiny_calibration)
    cost = _cost(model.config)
    tally = GenerationTally()
    prompts = _prompts(model.config.vocab_size)
    with method.apply(model) as pruned:
        greedy_generate(pruned, prompts, NEW_TOKENS, done=lambda _: False, batch_size=4, cost=cost, tally=tally)
        removed = method.stats()["compute_sparsity"]
    assert (removed > 0) == (name != "dense")
    assert tally.requests == len(prompts)
    assert tally.prefill.forwards == 2 and tally.decode.forwards == 2 * (NEW_TOKENS - 1)
    assert tally.prefill.tokens == sum(map(len, prompts)) and tally.decode.tokens == len(prompts) * (NEW_TOKENS - 1)
    assert tally.prefill.sparsity == pytest.approx(removed, abs=1e-12)
    assert tally.decode.sparsity == pytest.approx(removed, abs=1e-12)


@pytest.mark.parametrize("name", ["sdtp", "ftp"])
def test_token_methods_save_prefill_compute(name, tiny, tiny_calibration):
    """A token method's prefill executes less than dense; its decode is counted against dense's decode steps."""
    model = tiny
    method = _method(name, model, tiny_calibration)
    tally = GenerationTally()
    prompts = [p * 3 for p in _prompts(model.config.vocab_size)]  # long enough for every SDTP stage to drop tokens
    with method.apply(model) as pruned:
        greedy_generate(pruned, prompts, NEW_TOKENS, done=lambda _: False, cost=_cost(model.config), tally=tally,
                        batch_size=4 if type(method).batched_decode else 1)
    assert tally.prefill.sparsity > 0.05
    assert tally.decode.dense > 0 and tally.decode.sparsity is not None


def test_dense_decode_flops_equal_flop_counter_on_every_architecture(arch_model):
    """CellContext's dense decode formula (sliding-window layers attend to their window) = FlopCounterMode."""
    from bench.units.context import CellContext

    ctx = CellContext(arch_model, tokenizer=None, tasks=[], limit=None)
    tally = GenerationTally()
    prompts = [p + p for p in _prompts(arch_model.config.vocab_size)]  # 26-40 tokens: past the tiny window of 8
    greedy_generate(arch_model, prompts, NEW_TOKENS, done=lambda _: False, batch_size=4,
                    cost=DenseCost(ctx.dense_flops, ctx.dense_decode_flops), tally=tally)
    assert tally.prefill.executed == tally.prefill.dense
    assert tally.decode.executed == tally.decode.dense
