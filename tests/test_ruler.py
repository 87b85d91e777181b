"""RULER's niah_single_1 offline (bench.ruler): lm-eval's generator sized with the model's local tokenizer, one task
per length, scored by generation through the engine with c counted on prefill and decode apart."""

from __future__ import annotations

import pytest

from bench.errors import BenchError
from bench.ruler import NIAH_KEPT, niah_task
from bench.tasks import GENERATION_TASKS, TASKS, build_task_dict, resolve_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 1024


@pytest.fixture(scope="module")
def tokenizer_dir():
    from bench.models import model_source

    return model_source("smollm2-135m")


def test_the_alias_names_the_kept_lengths_and_each_length_is_a_generation_task():
    assert resolve_tasks(["niah_single_1", "piqa"]) == [*(niah_task(n) for n in NIAH_KEPT), "piqa"]
    assert all(niah_task(n) in GENERATION_TASKS and TASKS[niah_task(n)].primary_metric == "acc" for n in NIAH_KEPT)
    with pytest.raises(BenchError, match="niah_single_1"):
        resolve_tasks(["niah_single_l"])


def test_without_a_local_tokenizer_the_task_says_how_to_run_it():
    with pytest.raises(BenchError, match="tokenizer"):
        build_task_dict([niah_task(LENGTH)], limit=2, tokenizer=None)


def test_documents_are_lm_evals_generator_at_the_length_and_the_same_every_time(tokenizer_dir, real_tokenizer):
    first = build_task_dict([niah_task(LENGTH)], limit=3, tokenizer=tokenizer_dir)[niah_task(LENGTH)]
    again = build_task_dict([niah_task(LENGTH)], limit=3, tokenizer=tokenizer_dir)[niah_task(LENGTH)]
    docs, docs_again = list(first.eval_docs), list(again.eval_docs)
    assert len(docs) == 3 and docs == docs_again
    for doc in docs:
        assert doc["max_length"] == LENGTH and doc["outputs"][0] in doc["input"]
        assert len(real_tokenizer(doc["input"]).input_ids) + 128 <= LENGTH  # the generator's own bound
    assert first.config.generation_kwargs["do_sample"] is False


@pytest.mark.parametrize("name", ["dense", "shortgpt", "sdtp", "ftp"])
def test_a_method_generates_on_long_prompts_with_c_by_phase(name, tiny_with_real_vocab, real_tokenizer,
                                                            tiny_calibration):
    from bench.units.accuracy import measure_accuracy
    from bench.units.context import CellContext
    from methods import make_method
    from tests.test_all_methods import _fast_fields

    # the tiny model's 4 layers leave SDTP one stage, which reaches c = 0.1 but not 0.25
    target = {"dense": 0.0, "sdtp": 0.1}.get(name, 0.25)
    method = make_method(name, sparsity=target, **_fast_fields(name))
    if method.needs_calibration:
        method.load_artifact(method.calibrate(tiny_with_real_vocab, None, tiny_calibration))
    ctx = CellContext(tiny_with_real_vocab, real_tokenizer, [niah_task(LENGTH)], limit=2, progress=False)
    rows, samples = measure_accuracy(ctx, method, niah_task(LENGTH), {"limit": 2})
    values = {r["metric"]: r["value"] for r in rows}
    assert {"acc", "compute_sparsity", "c_decode", "c_all", "decode_tokens"} <= set(values)
    assert len(samples) == 2 and all("generation" in s and s["acc"] in (0.0, 1.0) for s in samples)
    assert values["decode_tokens"] > 0 and values["dense_decode_decoder_flops"] > 0
    if name == "dense":
        assert values["compute_sparsity"] == pytest.approx(0.0, abs=1e-12)
        assert values["c_decode"] == pytest.approx(0.0, abs=1e-12)
    else:  # prefill saves compute (layer removal: 1 of the 4 layers; token methods: solved towards the target)
        assert values["compute_sparsity"] > 0.05
        assert rows[0]["measured_sparsity"] == values["compute_sparsity"]
