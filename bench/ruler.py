"""RULER's single needle in a haystack (lm-eval's `niah_single_1`) at fixed prompt lengths, offline.

lm-eval's own generator (`lm_eval.tasks.ruler.niah_utils.niah_single_1`: the "repeat" haystack, a 7-digit number
hidden under a word key, 500 samples per length, its random_seed 42) builds the documents, sized with the model's
own tokenizer from its local directory, so nothing is downloaded. The task is lm-eval's built-in YAML (prompt,
gen_prefix, greedy generation of up to 128 tokens), with three parts replaced, because the built-in task reports
one metric per length in a list fixed at 4K-128K and a run here is one length per task:

- `custom_dataset`: the generator at one length (`max_seq_lengths = [L]`), the first `limit` documents;
- `process_results`: lm-eval's own scorer (`common_utils.process_results`: the fraction of the needle's values
  found in the answer, 0 or 1 here), its value at the document's length kept as `acc`;
- `metric_list`: `acc`, mean.

Each length is its own task (`niah_single_1_1024`, ...); `niah_single_1` names the lengths the default model can
still do dense (`NIAH_KEPT`). The generator draws its needles from Python's global `random`, which lm-eval's
`simple_evaluate` seeds with 0 before building tasks; the dataset seeds it the same way (and restores it).
Importing lm-eval's RULER module asks NLTK for its punkt_tab sentence splitter (only the essay haystacks use
it) and tries to download it when absent: a local empty resource directory is put on NLTK's path first."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError

NIAH = "niah_single_1"
NIAH_LENGTHS = (1024, 2048, 4096, 8192)
# the lengths where SmolLM2-135M-Instruct dense finds the needle well above zero (docs/long-context.md)
NIAH_KEPT = (1024, 2048, 4096)
NIAH_ITEMS = 500  # the generator's num_samples
GLOBAL_SEED = 0  # lm-eval's simple_evaluate default random_seed


def niah_task(length: int) -> str:
    return f"{NIAH}_{length}"


NIAH_TASKS = {niah_task(n): n for n in NIAH_LENGTHS}


def _offline_nltk() -> None:
    """An empty `tokenizers/punkt_tab` resource on NLTK's path, so importing lm-eval's RULER module does not try
    the network (the repeat haystack never splits sentences)."""
    from bench.paths import cache_dir

    root = cache_dir() / "nltk_data"
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    paths = os.environ.get("NLTK_DATA", "")
    if str(root) not in paths.split(os.pathsep):
        os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (paths, str(root)) if p)
    try:
        import nltk
    except ImportError as e:
        raise BenchError(f"{NIAH} needs lm-eval's RULER extras: pip install wonderwords nltk ({e})") from e
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def _niah_utils():
    _offline_nltk()
    try:
        from lm_eval.tasks.ruler import niah_utils
    except ImportError as e:
        raise BenchError(f"{NIAH} needs lm-eval's RULER extras: pip install wonderwords nltk ({e})") from e
    return niah_utils


@dataclass(frozen=True)
class NiahDataset:
    """The config's `custom_dataset`: lm-eval's generator at one length, sized with this tokenizer."""

    length: int
    tokenizer: str
    limit: int | None = None

    def __call__(self, **_metadata: Any) -> Any:
        niah_utils = _niah_utils()
        state = random.getstate()
        random.seed(GLOBAL_SEED)
        try:
            data = niah_utils.niah_single_1(tokenizer=self.tokenizer, max_seq_lengths=[self.length])
        finally:
            random.setstate(state)
        if self.limit is not None and self.limit < len(data["test"]):
            data["test"] = data["test"].select(range(self.limit))
        return data

    def __repr__(self) -> str:
        first = "" if self.limit is None else f"[:{self.limit}]"
        return f"lm_eval.tasks.ruler.niah_utils.niah_single_1(max_seq_lengths=[{self.length}]){first}"


def niah_score(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's RULER scorer, its value at this document's length as `acc`."""
    from lm_eval.tasks.ruler import common_utils

    return {"acc": common_utils.process_results(doc, results)[str(doc["max_length"])]}


def niah_config(name: str, builtin: dict[str, Any], limit: int | None, tokenizer: str | None) -> dict[str, Any]:
    if tokenizer is None or not Path(tokenizer).is_dir():
        raise BenchError(f"task {name} sizes its prompts with the model's tokenizer from a local directory "
                         f"(got {tokenizer!r}); run it through `python -m bench run`, which passes the model's")
    length = NIAH_TASKS[name]
    config = dict(builtin)
    for structural_key in ("tag", "group", "task_list"):
        config.pop(structural_key, None)
    config.update(task=name, custom_dataset=NiahDataset(length, tokenizer, limit), process_results=niah_score,
                  metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    config["metadata"] = {**(config.get("metadata") or {}), "max_seq_lengths": [length],
                          "generator": "lm_eval.tasks.ruler.niah_utils.niah_single_1", "random_seed": GLOBAL_SEED}
    return config
