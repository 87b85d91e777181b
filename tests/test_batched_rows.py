"""Token methods batched like dense: right-padded rows of mixed lengths, every decision per row. A request keeps,
computes, counts and scores the same alone as in any batch, for every sequence-dependent method."""

from __future__ import annotations

import numpy as np
import pytest

from bench.evaluate import PER_REQUEST, BenchLM
from bench.flops import analytic_decoder_flops
from methods import available_methods, make_method
from tests.test_all_methods import _fast_fields

pytestmark = pytest.mark.usefixtures("one_thread")

SEQUENCE_DEPENDENT = [n for n in available_methods() if type(make_method(n)).sequence_dependent]


@pytest.fixture(scope="module")
def requests():
    from bench.tasks import build_task_dict

    out = []
    for task in build_task_dict(["arc_easy", "piqa", "lambada_openai", "hellaswag"]).values():
        task.build_all_requests(limit=3, rank=0, world_size=1)
        out.extend(task.instances)
    return out


def _score(model, tokenizer, method, requests, batch_size: int):
    with method.apply(model) as pruned:
        method.reset_stats()
        lm = BenchLM(pruned, tokenizer, batch_size=batch_size, sequence_dependent=True, progress=False,
                     max_batch_tokens=100_000, method_flops=method.executed_flops,
                     dense_flops=lambda b, w: analytic_decoder_flops(model.config, w, batch=b))
        scores = lm.loglikelihood(requests)
        stats = method.stats()
    return scores, lm, stats


def test_every_sequence_dependent_method_is_listed():
    assert {"sdtp", "ftp", "ftp-static", "ftp-topk"} <= set(SEQUENCE_DEPENDENT)


@pytest.mark.parametrize("name", SEQUENCE_DEPENDENT)
def test_a_request_scores_the_same_alone_and_batched_with_other_lengths(name, tiny_with_real_vocab, real_tokenizer,
                                                                        tiny_calibration, requests):
    model = tiny_with_real_vocab
    method = make_method(name, sparsity=0.2, **_fast_fields(name))
    method.load_artifact(method.calibrate(model, None, tiny_calibration))
    alone, lm_alone, stats_alone = _score(model, real_tokenizer, method, requests, batch_size=1)
    batched, lm, stats = _score(model, real_tokenizer, method, requests, batch_size=16)
    assert lm.engine.path == PER_REQUEST and lm.engine.forwards < len(requests) / 2
    assert lm.engine.padded_tokens > lm.engine.tokens  # rows of different lengths really shared batches
    assert lm_alone.engine.padded_tokens == lm_alone.engine.tokens
    np.testing.assert_allclose([s[0] for s in batched], [s[0] for s in alone], rtol=1e-5, atol=1e-5)
    assert [s[1] for s in batched] == [s[1] for s in alone]
    # the same decisions: tokens kept or computed per layer, and the same FLOPs, counted per row
    assert stats["per_layer_computed_fraction"] == pytest.approx(stats_alone["per_layer_computed_fraction"], abs=1e-12)
    assert (lm.engine.flops.executed, lm.engine.flops.dense) == (lm_alone.engine.flops.executed,
                                                                 lm_alone.engine.flops.dense)
    assert stats["compute_sparsity"] == pytest.approx(stats_alone["compute_sparsity"], abs=1e-12)
    assert lm.engine.flops.sparsity == pytest.approx(stats["compute_sparsity"], abs=1e-12)
