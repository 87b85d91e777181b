"""BlockPruner on a tiny random LLaMA: the search, the prefix choice, exact FLOPs, cached generation, restore."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.flops import LayerFlopCoefficients, count_flops
from bench.models import tiny_llama
from bench.timing import parameter_count
from methods import make_method
from methods.base import CalibrationSet, MethodConfigError
from methods.blockpruner import BlockPrunedDecoderLayer, BlockPruner, greedy_block_search, removed_blocks

NUM_LAYERS = 4


CONFIDENCE = 1000.0  # final-norm scale: the model's logits times 1000, so it is all but certain of its argmax


def _model_with_dead_block(kind: str, layer: int, weight: str) -> torch.nn.Module:
    """A tiny random LLaMA with one block's output projection at zero (that block is an exact no-op) and its final
    norm scaled so the model is near-certain of every greedy token."""
    model = tiny_llama(num_layers=NUM_LAYERS)
    block = model.model.layers[layer].self_attn if kind == "mha" else model.model.layers[layer].mlp
    with torch.no_grad():
        getattr(block, weight).weight.zero_()
        model.model.norm.weight.mul_(CONFIDENCE)
    return model.eval()


def _greedy_text(model, rows: int, length: int, seed: int) -> torch.Tensor:
    """Each row the model's own greedy continuation of a random first token. On it the dense model scores every
    label as its argmax at near-certainty (perplexity ~1, the least any model can reach), so a removal that flips
    even one greedy token costs ~CONFIDENCE x its logit gap, while the no-op's removal changes no logit at all:
    the margin this test needs is built in, not learned."""
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        for _ in range(length - 1):
            next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
    return ids


def _greedy_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)


def _perplexity(model, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
    row_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none").mean(-1)
    return math.exp(row_nll.double().mean().item())


def _plain_greedy_search(model, calibration: CalibrationSet, steps: int) -> tuple[list[list], list[float]]:
    """Reference: the official loop with no caching at all, every candidate a full forward of the pruned model."""
    candidates = [(kind, layer) for layer in range(model.config.num_hidden_layers) for kind in ("mha", "mlp")]
    removed: list[tuple[str, int]] = []
    perplexities = []
    for _ in range(steps):
        scores = {}
        for block in candidates:
            if block not in removed:
                with removed_blocks(model, removed + [block]):
                    scores[block] = _perplexity(model, calibration.input_ids)
        best = min(scores, key=lambda b: (scores[b], 2 * b[1] + (b[0] == "mlp")))
        removed.append(best)
        perplexities.append(scores[best])
    return [list(b) for b in removed], perplexities


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def calibration(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    return CalibrationSet.from_tensor(ids, "random")


@pytest.mark.parametrize("kind, layer, weight", [("mha", 2, "o_proj"), ("mlp", 1, "down_proj")])
def test_no_op_block_is_removed_first(kind, layer, weight):
    model = _model_with_dead_block(kind, layer, weight)
    calibration = CalibrationSet.from_tensor(_greedy_text(model, rows=3, length=24, seed=7), "greedy")
    dense_tokens = _greedy_tokens(model, calibration.input_ids)
    for block_layer in range(NUM_LAYERS):  # the fixture's premise: every other block changes some greedy token
        for block_kind in ("mha", "mlp"):
            if (block_kind, block_layer) != (kind, layer):
                with removed_blocks(model, [(block_kind, block_layer)]):
                    flips = (_greedy_tokens(model, calibration.input_ids) != dense_tokens).sum().item()
                assert flips > 0, (block_kind, block_layer)
    artifact = greedy_block_search(model, calibration, steps=2, candidate_batch_size=3, progress=False)
    assert artifact["deletion_order"][0] == [kind, layer]
    # removing the no-op changes nothing; the next removal flips greedy tokens the model was near-certain of
    assert artifact["perplexities"][0] == pytest.approx(artifact["dense_perplexity"], rel=1e-6)
    assert artifact["perplexities"][1] > 1.01 * artifact["perplexities"][0]


@pytest.mark.parametrize("candidate_batch_size", [1, 5, 16])
def test_cached_search_equals_plain_search(model, calibration, candidate_batch_size):
    steps = 6
    order, perplexities = _plain_greedy_search(model, calibration, steps)
    artifact = greedy_block_search(model, calibration, steps, candidate_batch_size, progress=False)
    assert artifact["deletion_order"] == order
    assert artifact["perplexities"] == pytest.approx(perplexities, rel=1e-5)


def _method(model, calibration, sparsity: float, steps: int = 2 * NUM_LAYERS, seq_len: int = 512) -> BlockPruner:
    method = make_method("blockpruner", sparsity=sparsity, search_steps=steps, reference_seq_len=seq_len)
    method.load_artifact(method.calibrate(model, None, calibration))
    return method


def test_measured_compute_sparsity_equals_analytic_share(model, calibration):
    seq_len = 40
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(3))
    coeff = LayerFlopCoefficients.from_config(model.config)
    dense = count_flops(model, ids)
    for target in (0.1, 0.3, 0.6):
        method = _method(model, calibration, target, seq_len=seq_len)
        with method.apply(model) as pruned:
            measured = count_flops(pruned, ids)
        stats = method.stats()
        removed = stats["blocks_removed"]
        assert removed and len(removed) == stats["prefix_length"]
        expected_removed = 2 * sum(coeff.attention(seq_len) if kind == "mha" else coeff.mlp(seq_len)
                                   for kind, _ in removed)
        assert dense.decoder - measured.decoder == expected_removed
        assert 1 - measured.decoder / dense.decoder == pytest.approx(stats["compute_sparsity"], abs=1e-12)
        assert abs(stats["compute_sparsity"] - target) <= 0.5 * coeff.mlp(seq_len) / (
            NUM_LAYERS * coeff.layer(seq_len))


def test_prefix_choice_and_too_few_steps(model, calibration):
    method = _method(model, calibration, 0.0)
    with method.apply(model):
        assert method.stats()["prefix_length"] == 0
    short = _method(model, calibration, 0.6, steps=2)
    with pytest.raises(MethodConfigError, match="search_steps"), short.apply(model):
        pass
    with pytest.raises(MethodConfigError, match="search_steps"):
        BlockPruner(search_steps=0)


def _greedy(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("blocks", [[("mha", 2)], [("mha", 0)], [("mha", 0), ("mlp", 0), ("mha", 1)]])
def test_generate_with_cache_matches_no_cache(model, blocks):
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    dense = _greedy(model, prompt, use_cache=True)
    with removed_blocks(model, blocks):
        cached = _greedy(model, prompt, use_cache=True)
        uncached = _greedy(model, prompt, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, dense)  # the removal changed the model


def test_apply_restores_dense_model_exactly(model, calibration):
    ids = calibration.input_ids
    layers_before = list(model.model.layers)
    with torch.inference_mode():
        dense_logits = model(input_ids=ids).logits
    method = _method(model, calibration, 0.3)
    with method.apply(model) as pruned:
        assert pruned is model
        assert any(isinstance(layer, BlockPrunedDecoderLayer) for layer in model.model.layers)
        with torch.inference_mode():
            pruned_logits = model(input_ids=ids).logits
    assert not torch.allclose(pruned_logits, dense_logits)
    assert all(a is b for a, b in zip(model.model.layers, layers_before, strict=True))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, dense_logits)


def test_removed_blocks_weights_leave_the_model(model):
    """`params` must shrink by exactly the removed sub-blocks (norm included), not stay at the dense count."""
    layers = model.model.layers
    dense = parameter_count(model)
    attention = sum(p.numel() for m in (layers[1].self_attn, layers[1].input_layernorm) for p in m.parameters())
    mlp = sum(p.numel() for m in (layers[3].mlp, layers[3].post_attention_layernorm) for p in m.parameters())
    removed_weights = (layers[1].self_attn.q_proj.weight, layers[3].mlp.up_proj.weight)
    with removed_blocks(model, [("mha", 1), ("mlp", 3)]):
        assert parameter_count(model) == dense - attention - mlp
        assert not any(p is w for p in model.parameters() for w in removed_weights)
    assert parameter_count(model) == dense


def test_hidden_state_outputs_keep_one_entry_per_layer(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), removed_blocks(model, [("mha", 1), ("mlp", 3)]):
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    mha_skipped = out.hidden_states[1] + model.model.layers[1].mlp(
        model.model.layers[1].post_attention_layernorm(out.hidden_states[1]))
    torch.testing.assert_close(out.hidden_states[2], mha_skipped)


def test_artifact_is_json_and_tied_to_the_model(model, calibration):
    import json

    method = _method(model, calibration, 0.2, steps=3)
    artifact = json.loads(json.dumps(method.artifact))
    assert len(artifact["deletion_order"]) == len(artifact["perplexities"]) == 3
    assert "sparsity" not in method.calibration_config() and "search_steps" in method.calibration_config()
    other = tiny_llama(num_layers=NUM_LAYERS + 2)
    with pytest.raises(MethodConfigError, match="recalibrate"), method.apply(other):
        pass


def test_a_model_with_fewer_blocks_than_search_steps_gets_them_all_ordered(calibration):
    """The default K = 34 is sized for SmolLM2's 60 blocks; a user's 4-layer model is searched to its end."""
    small = tiny_llama(num_layers=2)
    method = BlockPruner(sparsity=0.25)
    assert method.search_steps > 4
    method.load_artifact(method.calibrate(small, None, calibration))
    assert sorted(tuple(b) for b in method.deletion_order(2)) == [("mha", 0), ("mha", 1), ("mlp", 0), ("mlp", 1)]
