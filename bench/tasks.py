"""The zero-shot evaluation tasks: lm-eval's own built-in task configs, fed from the vendored data files.

Each task is the built-in YAML of lm-eval (prompt templates, choice/target functions, process_docs, metric list)
loaded unchanged; only the dataset part is replaced by a `custom_dataset` callable that converts our sha256-checked
file (bench/data, SOURCE notes in bench/data/SOURCES) to the HF schema that YAML expects. So the prompts are
lm-eval's and nothing reaches the hub. Documents keep file order, so `evaluate(limit=N)` scores the first N items.

HellaSwag is the one task whose docs cannot equal the hub's: the vendored file is a derived text format without the
ctx_a/ctx_b split, so lm-eval's `ctx_b.capitalize()` cannot be applied (see `_hellaswag_docs`).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import datafiles
from bench.errors import BenchError
from bench.ruler import NIAH, NIAH_ITEMS, NIAH_KEPT, NIAH_TASKS, niah_config, niah_task

# Our tasks never call datasets.load_dataset, but nothing in lm-eval or datasets may try the hub either.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class TaskInfo:
    """What the runner needs to know about a task without building it."""

    name: str
    metrics: tuple[str, ...]
    primary_metric: str
    n_items: int


def _bad_file(name: str, problem: str) -> BenchError:
    return BenchError(
        f"vendored data file {name!r} does not have the expected form: {problem}; "
        "restore bench/data with `git checkout -- bench/data` (see bench/data/SOURCES)"
    )


def _labels(name: str, n_items: int, allowed: set[str]) -> list[str]:
    labels = datafiles.read_text(name).split()
    if len(labels) != n_items or not set(labels) <= allowed:
        raise _bad_file(name, f"expected {n_items} labels in {sorted(allowed)}, got {len(labels)}")
    return labels


def _piqa_docs() -> list[dict[str, Any]]:
    """HF `baber/piqa` schema: goal, sol1, sol2, label (int)."""
    rows = datafiles.read_jsonl("piqa/valid.jsonl")
    labels = _labels("piqa/valid-labels.lst", len(rows), {"0", "1"})
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
        for r, y in zip(rows, labels, strict=True)
    ]


def _hellaswag_docs() -> list[dict[str, Any]]:
    """HF `Rowan/hellaswag` schema (activity_label, ctx_a, ctx_b, ctx, endings, label as a string) from the
    6-lines-per-item text file.

    The file holds `preprocess(activity_label) + ": " + preprocess(ctx_a + " " + ctx_b)`; the ctx_a/ctx_b split is
    lost, so the whole context goes in ctx_a and ctx_b is "". lm-eval's process_docs then builds
    `preprocess(activity_label + ": " + ctx_a + " ")`, which differs from the hub query in one way: lm-eval
    applies `ctx_b.capitalize()` (upper-cases the first letter of the unfinished last sentence of ActivityNet
    items and lower-cases the rest of it); here ctx_b stays as written. Bracketed strings the extractor kept
    (13 lines) are removed by lm-eval's preprocess as on the hub.
    """
    name = "hellaswag/hellaswag_val_full.txt"
    lines = datafiles.read_text(name).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _bad_file(name, f"{len(lines)} lines is not a multiple of 6")
    docs = []
    for start in range(0, len(lines), 6):
        header, label, *endings = lines[start : start + 6]
        activity_label, sep, ctx = header.partition(": ")
        if not sep or label not in {"0", "1", "2", "3"}:
            raise _bad_file(name, f"item at line {start + 1} is malformed")
        docs.append(
            {
                "activity_label": activity_label,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": label,
            }
        )
    return docs


def _winogrande_docs() -> list[dict[str, Any]]:
    """HF `allenai/winogrande` (winogrande_xl) schema: sentence, option1, option2, answer ("1"/"2")."""
    rows = datafiles.read_jsonl("winogrande/dev.jsonl")
    labels = _labels("winogrande/dev-labels.lst", len(rows), {"1", "2"})
    if any(r["answer"] != y for r, y in zip(rows, labels, strict=True)):
        raise _bad_file("winogrande/dev-labels.lst", "labels disagree with the `answer` fields of dev.jsonl")
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "text": [c["text"] for c in question["choices"]],
        "label": [c["label"] for c in question["choices"]],
    }


def _arc_docs(name: str) -> list[dict[str, Any]]:
    """HF `allenai/ai2_arc` schema: id, question (the stem), choices {text, label}, answerKey."""
    return [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": _choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in datafiles.read_jsonl(name)
    ]


def _boolq_docs() -> list[dict[str, Any]]:
    """HF `aps/super_glue` boolq schema (question, passage, idx, label: 1 = yes) from the original Google format."""
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(datafiles.read_jsonl("boolq/dev.jsonl"))
    ]


def _openbookqa_docs() -> list[dict[str, Any]]:
    """HF `allenai/openbookqa` (main) schema: id, question_stem, choices {text, label}, answerKey."""
    return [
        {
            "id": r["id"],
            "question_stem": r["question"]["stem"],
            "choices": _choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in datafiles.read_jsonl("openbookqa/test.jsonl")
    ]


def _lambada_docs() -> list[dict[str, Any]]:
    """HF `EleutherAI/lambada_openai` (default) schema: text."""
    return [{"text": r["text"]} for r in datafiles.read_jsonl("lambada_openai/lambada_test.jsonl")]


@dataclass(frozen=True)
class _Source:
    """Where a task's built-in config lives and how to make its docs from our files."""

    builtin_yaml: str  # relative to the lm_eval/tasks folder
    data_files: tuple[str, ...]
    load_docs: Callable[[], list[dict[str, Any]]]


_SOURCES: dict[str, _Source] = {
    "piqa": _Source("piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa_docs),
    "hellaswag": _Source("hellaswag/hellaswag.yaml", ("hellaswag/hellaswag_val_full.txt",), _hellaswag_docs),
    "winogrande": _Source(
        "winogrande/default.yaml", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), _winogrande_docs
    ),
    "arc_easy": _Source(
        "arc/arc_easy.yaml",
        ("arc_easy/ARC-Easy-Test.jsonl",),
        functools.partial(_arc_docs, "arc_easy/ARC-Easy-Test.jsonl"),
    ),
    "arc_challenge": _Source(
        "arc/arc_challenge.yaml",
        ("arc_challenge/ARC-Challenge-Test.jsonl",),
        functools.partial(_arc_docs, "arc_challenge/ARC-Challenge-Test.jsonl"),
    ),
    "boolq": _Source("super_glue/boolq/default.yaml", ("boolq/dev.jsonl",), _boolq_docs),
    "openbookqa": _Source("openbookqa/openbookqa.yaml", ("openbookqa/test.jsonl",), _openbookqa_docs),
    "lambada_openai": _Source(
        "lambada/lambada_openai.yaml", ("lambada_openai/lambada_test.jsonl",), _lambada_docs
    ),
}

# Metric lists are those of the built-in YAMLs (tests check they still agree); counts are the SOURCE notes'.
TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo("piqa", ("acc", "acc_norm"), "acc_norm", 1838),
        TaskInfo("hellaswag", ("acc", "acc_norm"), "acc_norm", 10042),
        TaskInfo("winogrande", ("acc",), "acc", 1267),
        TaskInfo("arc_easy", ("acc", "acc_norm"), "acc_norm", 2376),
        TaskInfo("arc_challenge", ("acc", "acc_norm"), "acc_norm", 1172),
        TaskInfo("boolq", ("acc",), "acc", 3270),
        TaskInfo("openbookqa", ("acc", "acc_norm"), "acc_norm", 500),
        TaskInfo("lambada_openai", ("perplexity", "acc"), "acc", 5153),
        # generation: RULER's needle in a haystack at one prompt length each (bench.ruler)
        *(TaskInfo(name, ("acc",), "acc", NIAH_ITEMS) for name in NIAH_TASKS),
    )
}
# a name that stands for several tasks: niah_single_1 = the lengths the default model can do dense
TASK_ALIASES: dict[str, tuple[str, ...]] = {NIAH: tuple(niah_task(n) for n in NIAH_KEPT)}
GENERATION_TASKS = frozenset(NIAH_TASKS)
DATA_TASKS = tuple(name for name in TASKS if name in _SOURCES)  # the tasks fed from the vendored files


def resolve_tasks(names: list[str]) -> list[str]:
    """Check task names (duplicates dropped, order kept, an alias expanded); an unknown one raises BenchError
    naming the close ones."""
    expanded = [task for name in names for task in TASK_ALIASES.get(name, (name,))]
    for name in expanded:
        if name not in TASKS:
            known = [*TASKS, *TASK_ALIASES]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise BenchError(f"unknown task {name!r}; {hint}known tasks: {', '.join(known)}")
    return list(dict.fromkeys(expanded))


def builtin_config(name: str) -> dict[str, Any]:
    """lm-eval's own config dict for a task, loaded from its YAML in site-packages (`!function`s resolved)."""
    if name in NIAH_TASKS:
        from bench.ruler import _niah_utils

        _niah_utils()  # its YAML's !function imports lm-eval's RULER module: NLTK offline first
        return copy.deepcopy(_load_builtin_yaml("ruler/niah_single_1.yaml"))
    return copy.deepcopy(_load_builtin_yaml(_SOURCES[name].builtin_yaml))


@functools.cache
def _load_builtin_yaml(relative_path: str) -> dict[str, Any]:
    from lm_eval import tasks as lm_eval_tasks
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager uses (includes, !function)

    return load_yaml(Path(lm_eval_tasks.__file__).parent / relative_path, resolve_func=True)


def load_docs(name: str) -> list[dict[str, Any]]:
    """A task's documents in the HF schema its built-in config expects, in file order, from verified files."""
    docs = _SOURCES[resolve_tasks([name])[0]].load_docs()
    if len(docs) != TASKS[name].n_items:
        raise BenchError(
            f"task {name}: {len(docs)} items, expected {TASKS[name].n_items}; restore bench/data"
        )
    return docs


def _eval_split(config: dict[str, Any]) -> str:
    """The split lm-eval evaluates on: test if the config names one, else validation (Task.eval_docs)."""
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise BenchError(
            f"lm-eval's {config['task']} config names no evaluation split; check the lm-eval version"
        )
    return split


class _ProcessDocsOnce:
    """lm-eval calls process_docs on every access to `eval_docs` (five or more per run); HellaSwag's map over 10k
    docs would repeat each time. This applies the built-in function once per dataset object."""

    def __init__(self, process_docs: Callable[[Any], Any]) -> None:
        self.process_docs = process_docs
        self._done: dict[int, tuple[Any, Any]] = {}

    def __call__(self, dataset: Any) -> Any:
        if id(dataset) not in self._done:
            self._done[id(dataset)] = (dataset, self.process_docs(dataset))
        return self._done[id(dataset)][1]

    def __repr__(self) -> str:
        return f"{self.process_docs.__module__}.{self.process_docs.__name__}"


@dataclass(frozen=True)
class _LocalDataset:
    """The config's `custom_dataset`: our docs as the one split lm-eval evaluates, only the first `limit` of them
    when a run scores no more (lm-eval's `limit` takes the first items of the processed docs, and every built-in
    process_docs here is a 1:1 map in order, which tests/test_tasks.py checks, so the items are the same; a 50-item
    run no longer maps all 10,042 HellaSwag docs). lm-eval passes the config's metadata as keyword arguments; they
    are unused. A dataclass, so results["configs"] records it as {name, split, limit}, the same in every run."""

    name: str
    split: str
    limit: int | None = None

    def __call__(self, **_metadata: Any) -> Any:
        import datasets

        docs = load_docs(self.name)
        if self.limit is not None:
            docs = docs[: self.limit]
        return datasets.DatasetDict({self.split: datasets.Dataset.from_list(docs)})

    def __repr__(self) -> str:
        first = "" if self.limit is None else f"[:{self.limit}]"
        return f"bench.tasks.load_docs({self.name!r}){first} as split {self.split!r}"


def task_config(name: str, limit: int | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """The built-in config of `name` with only its dataset part replaced by our verified local docs (the first
    `limit` of them, when given). Generated tasks (RULER) are sized with `tokenizer`, a local directory."""
    if name in NIAH_TASKS:
        return niah_config(name, builtin_config(name), limit, tokenizer)
    config = builtin_config(name)
    for structural_key in ("tag", "group", "task_list"):
        config.pop(structural_key, None)
    split = _eval_split(config)
    source = _SOURCES[name]
    config.update(
        dataset_path=f"bench/data/{name}",
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=_LocalDataset(name, split, limit),
        training_split=None,
        validation_split=None if config.get("test_split") else split,
        test_split=split if config.get("test_split") else None,
        fewshot_split=None,
    )
    if config.get("process_docs") is not None:
        config["process_docs"] = _ProcessDocsOnce(config["process_docs"])
    manifest = datafiles.manifest()
    config["metadata"] = {
        **(config.get("metadata") or {}),
        "bench_data": {f: manifest[f]["sha256"] for f in source.data_files},
    }
    return config


# lm-eval messages that are expected in how bench drives it, and only clutter a run's output: the advice on
# passing --metadata to a custom_dataset, the built-in YAMLs leaving aggregation/higher_is_better to their
# defaults, and HFLM noting that it was handed an already-loaded model (which is the point of BenchLM).
EXPECTED_LM_EVAL_MESSAGES: dict[str, tuple[str, ...]] = {
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`", "is defined, but aggregation is not",
                         "is defined, but higher_is_better is not"),
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
}


@contextlib.contextmanager
def quiet_expected_lm_eval_messages():
    """Drop the messages in EXPECTED_LM_EVAL_MESSAGES while inside; every other lm-eval message passes."""
    filters = []
    for name, fragments in EXPECTED_LM_EVAL_MESSAGES.items():
        def keep(record: logging.LogRecord, fragments=fragments) -> bool:
            return not any(fragment in record.getMessage() for fragment in fragments)
        logging.getLogger(name).addFilter(keep)
        filters.append((name, keep))
    try:
        yield
    finally:
        for name, keep in filters:
            logging.getLogger(name).removeFilter(keep)


def build_task_dict(names: list[str], limit: int | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    """{name: lm_eval ConfigurableTask} for `lm_eval.evaluator.evaluate(lm=..., task_dict=..., limit=limit)`: with
    a limit, each task holds only the docs it will score. `tokenizer`: the model's local tokenizer directory
    (`tokenizer.name_or_path`), which generated tasks (RULER) are sized with."""
    from lm_eval.api.task import ConfigurableTask

    with quiet_expected_lm_eval_messages():
        return {name: ConfigurableTask(config=task_config(name, limit, tokenizer)) for name in resolve_tasks(names)}
