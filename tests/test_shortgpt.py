"""ShortGPT: Block Influence ranking, layer deletion, KV-cached generation, restoration."""

from __future__ import annotations

import pytest
import torch

from methods import make_method
from methods.layer_removal import layers_to_remove
from methods.shortgpt import block_influence


def _make_identity(model, index: int) -> None:
    layer = model.model.layers[index]
    layer.self_attn.o_proj.weight.data.zero_()
    layer.mlp.down_proj.weight.data.zero_()


def test_identity_layer_has_zero_influence_and_goes_first(tiny, tiny_calibration):
    _make_identity(tiny, 3)
    bi = block_influence(tiny, tiny_calibration, progress=False)
    assert bi[3] == pytest.approx(0.0, abs=1e-6)
    assert min(range(len(bi)), key=bi.__getitem__) == 3
    method = make_method("shortgpt", sparsity=0.17)
    method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    with method.apply(tiny):
        assert method.stats()["layers_removed"] == [3]


def test_block_influence_is_rowwise_mean(tiny, tiny_calibration):
    """BI equals 1 - mean cosine computed directly from output_hidden_states (all but the last layer)."""
    bi = block_influence(tiny, tiny_calibration, batch_size=2, progress=False)
    with torch.no_grad():
        hs = tiny(tiny_calibration.input_ids, output_hidden_states=True).hidden_states
    for i in range(len(bi) - 1):  # the last entry of hidden_states is final-normed
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert bi[i] == pytest.approx(1 - cos.item(), abs=1e-5)


def test_layers_to_remove_rounds_to_nearest_tie_smaller():
    assert layers_to_remove(0.25, 30) == 7  # 0.233 beats 0.267
    assert layers_to_remove(0.25, 4) == 1  # exact: 1/4
    assert layers_to_remove(0.125, 4) == 0  # tie 0 vs 0.25 -> smaller
    assert layers_to_remove(0.0, 30) == 0


def test_generate_with_cache_equals_uncached(tiny, tiny_calibration):
    method = make_method("shortgpt", sparsity=0.34)
    method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with method.apply(tiny) as pruned:
        assert pruned.config.num_hidden_layers == 4
        assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
        cached = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_apply_restores_dense_model(tiny, tiny_calibration):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = tiny(ids).logits
    method = make_method("shortgpt", sparsity=0.5)
    method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    with method.apply(tiny) as pruned, torch.no_grad():
        assert not torch.allclose(pruned(ids).logits, before)
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, before)
    assert tiny.config.num_hidden_layers == 6 and len(tiny.model.layers) == 6


def test_random_baseline_is_seeded_and_matched(tiny):
    a = make_method("random", sparsity=0.34, seed=1)
    b = make_method("random", sparsity=0.34, seed=1)
    with a.apply(tiny):
        removed_a = a.stats()["layers_removed"]
    with b.apply(tiny):
        assert b.stats()["layers_removed"] == removed_a
    assert len(removed_a) == 2
