"""Performance a developer reruns between commits: `tox -e bench` (pytest-benchmark; timings saved as JSON under
.benchmarks/, `--benchmark-compare` diffs them against the last saved run).

Each benchmark times one thing with pytest-benchmark and, in the same run, measures what it should be compared with
(dense vs pruned interleaved, our scoring engine vs a plain forward loop and stock HFLM, a forward with and without
FLOP counting) and prints that ratio at the end. Nothing here asserts on a time."""

from __future__ import annotations

import pytest
import torch

from bench.flops import count_flops
from bench.timing import decode, interleaved_latency, prefill
from methods import make_method
from methods.base import CalibrationSet

METHODS = ["shortgpt", "blockpruner", "sdtp", "ftp"]
FAST_FIELDS = {"blockpruner": {"search_steps": 6}, "sdtp": {"train_sequences": 2, "train_seq_len": 16},
               "ftp": {"preset": "test"}}


def _calibrated_tiny(name: str, model):
    method = make_method(name, sparsity=0.25, **FAST_FIELDS.get(name, {}))
    g = torch.Generator().manual_seed(0)
    method.load_artifact(method.calibrate(model, None, CalibrationSet.from_tensor(
        torch.randint(0, 128, (4, 32), generator=g), "random-tokens")))
    return method


def _calibrated_default(name: str, model, tokenizer):
    from bench.artifacts import ensure_calibrated

    method = make_method(name, sparsity=0.25)
    ensure_calibrated(method, model, tokenizer, "smollm2-135m")  # the committed artifacts: no training
    return method


def _prefill_benchmark(benchmark, record_ratio, model, method, ids, repeats: int) -> None:
    dense, pruned = interleaved_latency(model, lambda: method.apply(model), ids, repeats=repeats, new_tokens=4)
    with method.apply(model) as m:
        benchmark.pedantic(prefill, args=(m, ids), rounds=repeats, warmup_rounds=1)
    record_ratio(prefill_speedup=dense.prefill_median / pruned.prefill_median,
                 decode_speedup=pruned.decode_median / dense.decode_median)


@pytest.mark.parametrize("name", METHODS)
def test_prefill_tiny(benchmark, record_ratio, tiny, name):
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    _prefill_benchmark(benchmark, record_ratio, tiny, _calibrated_tiny(name, tiny), ids, repeats=10)


@pytest.mark.parametrize("name", METHODS)
def test_prefill_default_model(benchmark, record_ratio, default_model, name):
    model, tokenizer = default_model
    ids = torch.randint(0, len(tokenizer), (1, 512), generator=torch.Generator().manual_seed(1))
    _prefill_benchmark(benchmark, record_ratio, model, _calibrated_default(name, model, tokenizer), ids, repeats=5)


def test_decode_default_model(benchmark, record_ratio, default_model):
    model, tokenizer = default_model
    ids = torch.randint(0, len(tokenizer), (1, 128), generator=torch.Generator().manual_seed(2))
    benchmark.pedantic(lambda: decode(model, ids, 16)(), rounds=3, warmup_rounds=1)
    record_ratio(tokens_per_s=16 / benchmark.stats.stats.median)


def test_flop_counting_overhead(benchmark, record_ratio, default_model):
    model, tokenizer = default_model
    ids = torch.randint(0, len(tokenizer), (1, 256), generator=torch.Generator().manual_seed(3))
    import time

    plain = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        plain.append(time.perf_counter() - start)
    benchmark.pedantic(count_flops, args=(model, ids), rounds=3, warmup_rounds=1)
    record_ratio(counted_vs_plain_forward=benchmark.stats.stats.median / sorted(plain)[1])


def test_scoring_engine(benchmark, record_ratio, default_model):
    from bench.engine_perf import measure

    model, tokenizer = default_model
    result = benchmark.pedantic(measure, args=(model, tokenizer, ["piqa", "arc_easy"], 5),
                                kwargs={"progress": False}, rounds=1, iterations=1)
    record_ratio(throughput_vs_forward=result.throughput_vs_forward, speedup_vs_hflm=result.speedup_vs_hflm)


@pytest.mark.parametrize("name", ["sdtp", "ftp"])
def test_method_scoring_speed(benchmark, record_ratio, default_model, name):
    """`bench perf --methods`: a token method's seconds per executed FLOP vs dense's, on the same requests."""
    from bench.defaults import DEFAULT_TASKS
    from bench.engine_perf import build_requests
    from bench.method_perf import measure_methods

    model, tokenizer = default_model
    _, requests = build_requests(list(DEFAULT_TASKS), limit=5)
    speeds = benchmark.pedantic(measure_methods, args=(model, tokenizer, "smollm2-135m", [name], requests),
                                kwargs={"progress": False}, rounds=1, iterations=1)
    dense, method, control = speeds
    record_ratio(time_vs_dense=method.seconds / dense.seconds,
                 flops_vs_dense=method.executed_flops / dense.executed_flops,
                 seconds_per_flop_vs_dense=(method.seconds / method.executed_flops)
                 / (dense.seconds / dense.executed_flops),
                 dense_control=control.seconds / dense.seconds)
