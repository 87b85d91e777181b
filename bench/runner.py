"""The study: for every (method, sparsity), calibrate (cached), apply, and measure every unit (each accuracy
task, WikiText-2 perplexity, the efficiency probe) into its own cell of the store. Complete cells are skipped,
so a killed run resumes where it stopped; --force recomputes."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.artifacts import ensure_calibrated
from bench.errors import BenchError
from bench.models import DEFAULT_MODEL, load_model, validate_model_name
from bench.paths import REPO_ROOT
from bench.store import Store, cell_hash
from methods import Method, MethodConfigError, make_method

BENCH_VERSION = "0.1.0"
DEFAULT_METHODS = ["dense", "random", "shortgpt", "blockpruner", "sdtp", "ftp"]
DEFAULT_LIMIT = 50
DEFAULT_PPL_WINDOWS = 10


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.25])
    tasks: list[str] | None = None  # None: every task
    limit: int | None = DEFAULT_LIMIT  # items per task; None = all
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    results: str = "results"
    force: bool = False
    batch_size: int = 16
    ppl_seq_len: int = 512
    ppl_windows: int | None = DEFAULT_PPL_WINDOWS
    latency_seq_len: int = 512
    latency_batch: int = 1
    latency_repeats: int = 5
    decode_tokens: int = 16
    threads: int | None = None
    measure_efficiency: bool = True
    measure_ppl: bool = True
    progress: bool = True


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plan_methods(config: RunConfig) -> list[Method]:
    """dense first (the shared reference), then each method at each sparsity; validated before any work."""
    for s in config.sparsities:
        if not 0.0 <= s < 1.0:
            raise BenchError(f"sparsity must be in [0, 1), got {s}; e.g. --sparsity 0.25,0.4")
    names = [n for n in config.methods if n != "dense"]
    plan = [make_method("dense", seed=config.seed)]
    for name in names:
        for s in config.sparsities:
            plan.append(make_method(name, sparsity=s, seed=config.seed))
    return plan


class StageClock:
    """Wall time per stage, printed at the end of a run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Runner:
    def __init__(self, config: RunConfig, model=None, tokenizer=None):
        """`model`/`tokenizer` may be given in memory (tests); otherwise `config.model` is loaded."""
        from bench.tasks import DEFAULT_TASKS, resolve_tasks

        self.config = config
        self.tasks = resolve_tasks(config.tasks) if config.tasks else list(DEFAULT_TASKS)
        try:
            self.plan = plan_methods(config)
        except MethodConfigError as exc:
            raise BenchError(str(exc)) from exc
        if model is None:
            validate_model_name(config.model)
        self.store = Store(config.results)
        self.clock = StageClock()
        self.cells_written: list[str] = []
        self.cells_skipped: list[str] = []
        self.run_cells: list[str] = []
        self.model, self.tokenizer = model, tokenizer

    # -- provenance -------------------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return {
            "model": self.config.model, "seed": self.config.seed, "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": version("transformers"), "lm_eval": version("lm_eval"),
            "bench": BENCH_VERSION, "git_commit": self.commit, "batch_size": self.config.batch_size,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _identity(self, method: Method, unit: str, settings: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.config.model, "method": method.registry_name, "method_version": method.version,
                "params": method.config(), "unit": unit, "settings": settings, "device": str(self.device),
                "dtype": str(self.model.dtype), "bench": BENCH_VERSION}

    def unit_settings(self) -> dict[str, dict[str, Any]]:
        c = self.config
        units = {task: {"limit": c.limit} for task in self.tasks}
        if c.measure_ppl:
            # "flops": what the unit counts (a new value re-measures cells written before the per-window count)
            units["wikitext2"] = {"seq_len": c.ppl_seq_len, "windows": c.ppl_windows, "flops": "every window"}
        if c.measure_efficiency:
            units["efficiency"] = {"batch": c.latency_batch, "seq_len": c.latency_seq_len,
                                   "repeats": c.latency_repeats, "decode_tokens": c.decode_tokens}
        return units

    # -- the study --------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)
        if self.model is None:
            self.model, self.tokenizer = self.clock.timed("load model", lambda: load_model(c.model, c.device, c.dtype))
        self.device = next(self.model.parameters()).device
        self.commit = git_commit()
        self.dense_layers = self.model.config.num_hidden_layers
        units = self.unit_settings()
        self.store.remove_stale()  # temporaries of killed runs
        outer = tqdm(self.plan, desc="methods", disable=not c.progress)
        for method in outer:
            outer.set_postfix_str(f"{method.registry_name}@{method.sparsity:g}")
            cells = {unit: cell_hash(self._identity(method, unit, s)) for unit, s in units.items()}
            self.run_cells.extend(cells.values())
            pending = [u for u in units if c.force or not self.store.is_complete(cells[u])]
            self.cells_skipped.extend(cells[u] for u in units if u not in pending)
            if not pending:
                continue
            artifact = self.clock.timed(f"calibrate {method.registry_name}", lambda m=method: ensure_calibrated(
                m, self.model, self.tokenizer, c.model, seed=c.seed, force=False))
            for unit in pending:
                with self.store.claim(cells[unit], force=c.force) as owned:  # another process may hold it
                    if not owned:
                        self.cells_skipped.append(cells[unit])
                        continue
                    stage = "accuracy" if unit in self.tasks else unit
                    rows, samples = self.clock.timed(stage, lambda u=unit, m=method: self.measure(m, u, units[u]))
                    common = {**self._common(), "cell": cells[unit], "method": method.registry_name,
                              "method_params": json.dumps(method.config(), sort_keys=True, default=str),
                              "target_sparsity": method.sparsity, "artifact": artifact.get("key_hash"),
                              "calibration": json.dumps(artifact, default=str)}
                    rows = [{**common, **row} for row in rows]
                    identity = {**self._identity(method, unit, units[unit]), "stats": method.stats(),
                                "host": platform.node()}
                    self.store.write(cells[unit], identity, rows, samples)
                    self.cells_written.append(cells[unit])
        return self.run_cells

    def measure(self, method: Method, unit: str, settings: dict[str, Any]):
        if unit == "wikitext2":
            return self.measure_perplexity(method, settings), None
        if unit == "efficiency":
            return self.measure_efficiency(method, settings), None
        return self.measure_accuracy(method, unit, settings)

    def measure_accuracy(self, method: Method, task: str, settings: dict[str, Any]):
        from lm_eval.evaluator import evaluate

        from bench.evaluate import BenchLM, measure_task_flops
        from bench.flops import analytic_decoder_flops
        from bench.tasks import TASKS, build_task_dict

        task_dict = build_task_dict([task])
        with method.apply(self.model) as pruned:
            lm = BenchLM(pruned, self.tokenizer, batch_size=self.config.batch_size,
                         sequence_dependent=method.sequence_dependent, progress=self.config.progress)
            out = evaluate(lm=lm, task_dict=task_dict, limit=settings["limit"], log_samples=True,
                           bootstrap_iters=1000, verbosity="ERROR")
            probes = lm.engine.probes.get(task) or next(iter(lm.engine.probes.values()), [])
            flops, lengths = measure_task_flops(pruned, probes)
        dense_flops = sum(analytic_decoder_flops(self.model.config, n, num_layers=self.dense_layers) for n in lengths)
        measured = 1.0 - flops / dense_flops if dense_flops else None
        result = out["results"][task]
        n_items = len(out["samples"][task])
        rows = []
        for metric in TASKS[task].metrics:
            if f"{metric},none" not in result:
                continue
            stderr = result.get(f"{metric}_stderr,none")
            rows.append({"task": task, "metric": metric, "value": float(result[f"{metric},none"]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n_items, "limit": settings["limit"], "measured_sparsity": measured})
        samples = [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in TASKS[task].metrics if m in s},
                    "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
                   for s in out["samples"][task]]
        return rows, samples

    def measure_perplexity(self, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Perplexity, and compute sparsity counted with FlopCounterMode on every window: the first window is the
        latency probe's input (`measured_sparsity`), the rest show how much a data-dependent method (argmax
        routing) varies from one input to the next."""
        from bench.flops import analytic_decoder_flops, count_flops
        from bench.perplexity import perplexity, wikitext_windows
        from methods.base import scoring

        windows = wikitext_windows(self.tokenizer, settings["seq_len"], settings["windows"])
        with method.apply(self.model) as pruned:
            result = perplexity(pruned, windows, progress=self.config.progress)
            executed = []
            for window in windows:
                ids = window[None].to(self.device)
                with scoring(torch.zeros_like(ids, dtype=torch.bool)):
                    executed.append(count_flops(pruned, ids).decoder)
        dense = analytic_decoder_flops(self.model.config, windows.shape[1], num_layers=self.dense_layers)
        per_window = np.array([1.0 - flops / dense for flops in executed])
        spread = float(per_window.std(ddof=1)) if len(per_window) > 1 else 0.0
        base = {"task": "wikitext2", "n": result.windows, "seq_len": result.seq_len,
                "measured_sparsity": float(per_window[0])}
        return [{**base, "metric": "ppl", "value": result.ppl},
                {**base, "metric": "scored_fraction", "value": result.nll_tokens / result.predictions},
                # All windows have one length, so the mean of the per-window values is one division of integer
                # sums: exact to the last bit on every CPU (numpy's SIMD mean is not, and the gate compares exactly).
                {**base, "metric": "compute_sparsity", "value": 1.0 - sum(executed) / (dense * len(executed)),
                 "stderr": spread / np.sqrt(len(per_window))},
                {**base, "metric": "compute_sparsity_sd", "value": spread}]

    def measure_efficiency(self, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
        from bench.efficiency import interleaved_latency, parameter_count, peak_memory_mb
        from bench.flops import count_flops
        from bench.perplexity import wikitext_windows

        n, b = settings["seq_len"], settings["batch"]
        ids = wikitext_windows(self.tokenizer, n, b).to(self.device)
        dense_flops = count_flops(self.model, ids).decoder
        dense_lat, pruned_lat = interleaved_latency(self.model, lambda: method.apply(self.model), ids,
                                                    repeats=settings["repeats"], new_tokens=settings["decode_tokens"])
        with method.apply(self.model) as pruned:
            flops = count_flops(pruned, ids).decoder
            memory = peak_memory_mb(pruned, ids)
            params = parameter_count(pruned)
        measured = 1.0 - flops / dense_flops
        base = {"task": "efficiency", "batch": b, "seq_len": n, "measured_sparsity": measured,
                "n": settings["repeats"]}
        spread = pruned_lat.prefill_spread * pruned_lat.prefill_median * 1000
        return [
            {**base, "metric": "decoder_flops", "value": float(flops)},
            {**base, "metric": "dense_decoder_flops", "value": float(dense_flops)},
            {**base, "metric": "compute_sparsity", "value": measured},
            {**base, "metric": "prefill_ms", "value": pruned_lat.prefill_median * 1000, "stderr": spread},
            {**base, "metric": "dense_prefill_ms", "value": dense_lat.prefill_median * 1000},
            {**base, "metric": "prefill_speedup", "value": dense_lat.prefill_median / pruned_lat.prefill_median},
            {**base, "metric": "decode_tokens_per_s", "value": pruned_lat.decode_median},
            {**base, "metric": "decode_speedup", "value": pruned_lat.decode_median / dense_lat.decode_median},
            {**base, "metric": "peak_memory_mb", "value": memory},
            {**base, "metric": "params", "value": float(params)},
        ]

