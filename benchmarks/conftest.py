"""Shared set-up of the benchmarks: models, and the printout of the ratios each benchmark measured side by side."""

from __future__ import annotations

import pytest
import torch

RATIOS: list[tuple[str, str]] = []  # (benchmark, "name=value ...") collected for the end-of-session summary


def pytest_terminal_summary(terminalreporter):
    if RATIOS:
        terminalreporter.write_sep("-", "ratios measured side by side (timings are in the table above)")
        for name, text in RATIOS:
            terminalreporter.write_line(f"{name}: {text}")


@pytest.fixture
def record_ratio(benchmark, request):
    """Put ratios in the saved JSON (extra_info) and in the printed summary."""

    def record(**ratios: float) -> None:
        for key, value in ratios.items():
            benchmark.extra_info[key] = round(float(value), 4)
        RATIOS.append((request.node.name, " ".join(f"{k}={v:.3f}" for k, v in ratios.items())))

    return record


@pytest.fixture(scope="session")
def default_model():
    from bench.models import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny():
    from bench.models import tiny_model

    return tiny_model("llama", num_layers=6, hidden=64, vocab=128)


@pytest.fixture(autouse=True)
def threads(request):
    """The tiny model on one thread (bench.models.cpu_threads), the default model on torch's default."""
    before = torch.get_num_threads()
    if "tiny" in request.fixturenames:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
