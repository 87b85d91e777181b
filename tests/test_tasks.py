"""bench.tasks: our tasks build the same requests as lm-eval's built-in definitions, from verified local files."""

from __future__ import annotations

import ast
import lzma
import re
import shutil

import datasets
import numpy as np
import pytest
from lm_eval.api.model import LM
from lm_eval.evaluator import evaluate
from lm_eval.utils import apply_template

from bench import datafiles, tasks
from bench.defaults import DEFAULT_TASKS
from bench.errors import BenchError

# The item counts stated in bench/data/SOURCES/<task>.md.
SOURCE_NOTE_COUNTS = {
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "openbookqa": 500,
    "lambada_openai": 5153,
}
N_DOCS = 20


@pytest.fixture(scope="module")
def task_dict():
    return tasks.build_task_dict(list(tasks.DATA_TASKS))


def built_requests(task, doc_ids: list[int] | None = None) -> dict[int, list[tuple[str, str]]]:
    """{doc_id: [(context, continuation), ...]} of the requests our task builds for the first N_DOCS items, or
    for the items doc_ids (lm-eval then numbers them 0, 1, ... in the order of the file)."""
    if doc_ids is None:
        task.build_all_requests(limit=N_DOCS)
    else:
        task.build_all_requests(samples=doc_ids)
    requests: dict[int, list[tuple[str, str]]] = {}
    for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        requests.setdefault(instance.doc_id, []).append(tuple(instance.arguments))
    return requests


def render(field, doc):
    """What a built-in YAML field gives on a doc: a function, a literal list, a doc key, or a Jinja template
    (whose digit / list output lm-eval reads as a Python literal)."""
    if callable(field):
        return field(doc)
    if isinstance(field, list):
        return field
    if field in doc:
        return doc[field]
    text = apply_template(field, doc)
    return ast.literal_eval(text) if text.isdigit() or text.startswith("[") else text


def builtin_requests(name: str, docs: list[dict]) -> tuple[list[list[tuple[str, str]]], list[int | None]]:
    """The requests and gold indices lm-eval's built-in config of `name` defines on HF-schema docs, worked out
    from the YAML dict alone (templates, functions, target delimiter), not through a ConfigurableTask."""
    config = tasks.builtin_config(name)
    if config.get("process_docs"):
        docs = list(config["process_docs"](datasets.Dataset.from_list(docs)))
    delimiter = config.get("target_delimiter", " ")
    all_requests, golds = [], []
    for doc in docs:
        text = render(config["doc_to_text"], doc)
        target = render(config["doc_to_target"], doc)
        if config["output_type"] == "loglikelihood":
            all_requests.append([(text, target)])
            golds.append(None)
            continue
        choices = render(config["doc_to_choice"], doc)
        if isinstance(text, int):  # winogrande: the choices are the contexts, the target is the continuation
            all_requests.append([(context, f"{delimiter}{target}") for context in choices])
            golds.append(text)
        else:
            all_requests.append([(text, f"{delimiter}{choice}") for choice in choices])
            golds.append(target)
    return all_requests, golds


def our_golds(task, doc_ids) -> list[int]:
    """The gold index lm-eval's process_results uses: doc_to_text for multiple-input tasks (winogrande)."""
    gold_of = task.doc_to_text if task.multiple_input else task.doc_to_target
    return [gold_of(task.eval_docs[i]) for i in doc_ids]


@pytest.mark.parametrize("name", list(tasks.DATA_TASKS))
def test_requests_equal_builtin_definition(task_dict, name):
    task = task_dict[name]
    ours = built_requests(task)
    docs = tasks.load_docs(name)[:N_DOCS]
    expected, golds = builtin_requests(name, docs)
    assert list(ours) == list(range(N_DOCS))  # the first N items, in file order
    assert [ours[i] for i in range(N_DOCS)] == expected
    if golds[0] is not None:
        assert our_golds(task, range(N_DOCS)) == golds


def raw_expected(name: str, doc_ids: list[int]) -> tuple[list[list[tuple[str, str]]], list[int | None]]:
    """Requests and gold written out from the raw files and the prompts the SOURCE notes quote from lm-eval,
    independent of our HF-schema conversion."""
    out, golds = [], []
    if name == "piqa":
        rows, labels = (
            datafiles.read_jsonl("piqa/valid.jsonl"),
            datafiles.read_text("piqa/valid-labels.lst").split(),
        )
        for i in doc_ids:
            out.append(
                [(f"Question: {rows[i]['goal']}\nAnswer:", " " + rows[i][s]) for s in ("sol1", "sol2")]
            )
            golds.append(int(labels[i]))
    elif name == "hellaswag":
        lines = datafiles.read_text("hellaswag/hellaswag_val_full.txt").split("\n")
        for i in doc_ids:
            header, label, *endings = lines[6 * i : 6 * i + 6]
            assert not re.search(
                r"\[.*?\]|  ", "".join(lines[6 * i : 6 * i + 6])
            )  # nothing left to preprocess
            out.append([(header, " " + ending) for ending in endings])
            golds.append(int(label))
    elif name == "winogrande":
        rows = datafiles.read_jsonl("winogrande/dev.jsonl")
        for i in doc_ids:
            before, after = rows[i]["sentence"].split("_")
            out.append([(before + rows[i][o], " " + after.strip()) for o in ("option1", "option2")])
            golds.append(int(rows[i]["answer"]) - 1)
    elif name in ("arc_easy", "arc_challenge", "openbookqa"):
        file = {
            "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
            "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
        }
        rows = datafiles.read_jsonl(file.get(name, "openbookqa/test.jsonl"))
        for i in doc_ids:
            q = rows[i]["question"]
            context = q["stem"] if name == "openbookqa" else f"Question: {q['stem']}\nAnswer:"
            out.append([(context, " " + c["text"]) for c in q["choices"]])
            golds.append([c["label"] for c in q["choices"]].index(rows[i]["answerKey"].strip()))
    elif name == "boolq":
        rows = datafiles.read_jsonl("boolq/dev.jsonl")
        for i in doc_ids:
            context = f"{rows[i]['passage']}\nQuestion: {rows[i]['question']}?\nAnswer:"
            out.append([(context, " no"), (context, " yes")])
            golds.append(int(rows[i]["answer"]))
    elif name == "lambada_openai":
        rows = datafiles.read_jsonl("lambada_openai/lambada_test.jsonl")
        for i in doc_ids:
            context, last_word = rows[i]["text"].rsplit(" ", 1)
            out.append([(context, " " + last_word)])
            golds.append(None)
    return out, golds


@pytest.mark.parametrize("name", list(tasks.DATA_TASKS))
def test_requests_equal_raw_files_under_lm_eval_prompts(task_dict, name):
    task = task_dict[name]
    ours = built_requests(task)
    expected, golds = raw_expected(name, list(range(N_DOCS)))
    assert [ours[i] for i in range(N_DOCS)] == expected
    if golds[0] is not None:
        assert our_golds(task, range(N_DOCS)) == golds


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_odd_items(task_dict, name):
    """Questions with 3 or 5 choices, or numeric labels, keep all their choices and map answerKey by position."""
    file = {
        "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
        "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    }
    rows = datafiles.read_jsonl(file[name])
    odd = [i for i, r in enumerate(rows) if len(r["question"]["choices"]) != 4 or r["answerKey"].isdigit()]
    assert {len(rows[i]["question"]["choices"]) for i in odd} >= {3, 5}
    assert any(rows[i]["answerKey"].isdigit() for i in odd)
    task = task_dict[name]
    ours = built_requests(task, odd)
    expected, golds = raw_expected(name, odd)
    assert [ours[k] for k in range(len(odd))] == expected
    assert our_golds(task, odd) == golds


def test_hellaswag_known_difference(task_dict):
    """The hub's first item (ind 24) has ctx_a "A man is sitting on a roof." and ctx_b "he"; lm-eval's query is
    "Roof shingle removal: A man is sitting on a roof. He". Our file lacks the ctx_a/ctx_b split, so ctx_b is not
    capitalised; the endings and gold are the same."""
    task = task_dict["hellaswag"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."
    assert task.doc_to_target(doc) == 3


def test_item_counts_match_source_notes(task_dict):
    assert {name: tasks.TASKS[name].n_items for name in tasks.DATA_TASKS} == SOURCE_NOTE_COUNTS
    for name, task in task_dict.items():
        assert len(task.eval_docs) == SOURCE_NOTE_COUNTS[name], name


def test_task_infos_follow_builtin_metric_lists():
    assert list(tasks.DATA_TASKS) == list(SOURCE_NOTE_COUNTS)
    assert set(DEFAULT_TASKS) <= set(tasks.TASKS)
    for name, info in ((n, tasks.TASKS[n]) for n in tasks.DATA_TASKS):
        builtin = tuple(m["metric"] for m in tasks.builtin_config(name)["metric_list"])
        assert info.metrics == builtin, name
        assert info.primary_metric == ("acc_norm" if "acc_norm" in builtin else "acc"), name


class LengthLM(LM):
    """A stand-in model whose log-likelihood of a continuation is minus its length in characters."""

    def loglikelihood(self, requests):
        return [(-float(len(r.args[1])), False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_evaluate_scores_first_items_and_logs_samples():
    """Through lm_eval.evaluator.evaluate: acc picks the shortest continuation; acc_norm divides by the choice's
    length without the leading space, -(L + 1) / L, so it picks the longest; both against the raw gold labels."""
    limit = 30
    results = evaluate(
        lm=LengthLM(), task_dict=tasks.build_task_dict(["piqa"]), limit=limit, bootstrap_iters=0
    )
    rows = datafiles.read_jsonl("piqa/valid.jsonl")[:limit]
    gold = np.array([int(y) for y in datafiles.read_text("piqa/valid-labels.lst").split()[:limit]])
    shortest = np.array([int(len(r["sol2"]) < len(r["sol1"])) for r in rows])
    longest = np.array([int(len(r["sol2"]) > len(r["sol1"])) for r in rows])
    assert results["results"]["piqa"]["acc,none"] == pytest.approx(np.mean(shortest == gold))
    assert results["results"]["piqa"]["acc_norm,none"] == pytest.approx(np.mean(longest == gold))
    samples = results["samples"]["piqa"]
    assert [s["doc_id"] for s in samples] == list(range(limit))
    assert [s["target"] for s in samples] == gold.tolist()
    assert samples[0]["filtered_resps"] == [
        (-1.0 - len(rows[0]["sol1"]), False),
        (-1.0 - len(rows[0]["sol2"]), False),
    ]


def test_unknown_task_suggests_close_name():
    with pytest.raises(BenchError, match="did you mean 'arc_easy'"):
        tasks.resolve_tasks(["piqa", "arc_eays"])
    with pytest.raises(BenchError, match="known tasks"):
        tasks.build_task_dict(["mmlu"])
    assert tasks.resolve_tasks(["boolq", "piqa", "boolq"]) == ["boolq", "piqa"]


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A private copy of the piqa data files that a test may damage; bench.datafiles reads it instead."""
    for name in ("MANIFEST.json", "piqa__valid.jsonl.xz", "piqa__valid-labels.lst.xz"):
        shutil.copy(datafiles.DATA_DIR / name, tmp_path / name)
    monkeypatch.setattr(datafiles, "DATA_DIR", tmp_path)
    datafiles.manifest.cache_clear()
    datafiles.read_verified.cache_clear()
    yield tmp_path
    datafiles.manifest.cache_clear()
    datafiles.read_verified.cache_clear()


def test_intact_copy_builds(data_copy):
    assert len(tasks.build_task_dict(["piqa"])["piqa"].eval_docs) == 1838


def test_flipped_byte_in_content_is_caught(data_copy):
    """One changed byte in the text that still decompresses (xz's own check passes): the sha256 catches it."""
    path = data_copy / "piqa__valid.jsonl.xz"
    text = bytearray(lzma.decompress(path.read_bytes()))
    text[1000] ^= 0x01
    path.write_bytes(lzma.compress(bytes(text)))
    with pytest.raises(BenchError, match="corrupt"):
        tasks.build_task_dict(["piqa"])


def test_flipped_byte_in_compressed_file_is_caught(data_copy):
    path = data_copy / "piqa__valid-labels.lst.xz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BenchError, match="corrupt"):
        tasks.build_task_dict(["piqa"])


def test_only_expected_lm_eval_messages_are_dropped(caplog):
    """The filter hides lm-eval's expected notices (built-in YAML defaults) but lets any other warning through."""
    import logging

    logger = logging.getLogger("lm_eval.api.task")
    with caplog.at_level(logging.WARNING, logger="lm_eval.api.task"):
        with tasks.quiet_expected_lm_eval_messages():
            tasks.build_task_dict(["boolq"])
            logger.warning("an unexpected lm-eval warning")
        logger.warning("[Task: x] metric acc is defined, but aggregation is not. outside the filter")
    messages = [r.getMessage() for r in caplog.records]
    assert "an unexpected lm-eval warning" in messages
    assert [m for m in messages if "aggregation is not" in m] == [
        "[Task: x] metric acc is defined, but aggregation is not. outside the filter"]


@pytest.mark.parametrize("name", list(tasks.DATA_TASKS))
def test_a_limited_task_holds_the_same_first_items(task_dict, name):
    """build_task_dict(limit=k) loads only the first k docs: the same k items lm-eval's limit takes from the whole
    set, because every process_docs is a 1:1 map in order (a filter or a reorder would fail here)."""
    k = 7
    limited = tasks.build_task_dict([name], limit=k)[name]
    whole = task_dict[name]
    assert len(limited.eval_docs) == k
    assert len(whole.eval_docs) == SOURCE_NOTE_COUNTS[name]
    assert [limited.eval_docs[i] for i in range(k)] == [whole.eval_docs[i] for i in range(k)]
    assert built_requests(limited) == built_requests(whole, list(range(k)))
