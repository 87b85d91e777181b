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
from bench.defaults import DEFAULT_LIMIT, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_PPL_WINDOWS
from bench.errors import BenchError
from bench.matching import PROTOCOL, MatchResult, Workload, is_matched, solve_knob
from bench.models import cpu_threads, load_model, validate_model_name
from bench.paths import REPO_ROOT
from bench.store import Store, cell_hash
from bench.study import overrides_for
from methods import Method, MethodConfigError, make_method

BENCH_VERSION = "0.1.0"


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
    executor: str = "local"  # "local": in this process; "ray": one Ray task per group of cells (bench.executors)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    # from a study file (bench.study): per method (family or variant) field values and calibration text settings
    method_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)


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
        fields = overrides_for(name, config.method_fields)
        calibration = overrides_for(name, config.calibration)
        for s in config.sparsities:
            method = make_method(name, **{"sparsity": s, "seed": config.seed, **fields})
            if calibration:  # the calibration text this method is given (part of its artifact key and cells)
                method.default_calibration = {**type(method).default_calibration, **calibration}
                method.calibration_override = calibration
            plan.append(method)
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
        self.threads_used: int | None = None  # torch CPU threads the last run() used
        self.cells_skipped: list[str] = []
        self.run_cells: list[str] = []
        self.model, self.tokenizer = model, tokenizer
        self._shapes: dict[tuple[str, bool], list[tuple[int, int]]] = {}
        self._dense_ppl: dict[tuple, Any] = {}

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
        identity = {"model": self.config.model, "method": method.registry_name, "method_version": method.version,
                    "params": method.config(), "unit": unit, "settings": settings, "device": str(self.device),
                    "dtype": str(self.model.dtype), "bench": BENCH_VERSION}
        override = getattr(method, "calibration_override", None)
        if override:
            identity["calibration"] = override
        return identity

    def unit_settings(self) -> dict[str, dict[str, Any]]:
        c = self.config
        # "protocol": how compute is matched and counted (bench.matching); a new value re-measures older cells
        units = {task: {"limit": c.limit, "batch_size": c.batch_size, "protocol": PROTOCOL} for task in self.tasks}
        if c.measure_ppl:
            units["wikitext2"] = {"seq_len": c.ppl_seq_len, "windows": c.ppl_windows, "protocol": PROTOCOL}
        if c.measure_efficiency:
            units["efficiency"] = {"batch": c.latency_batch, "seq_len": c.latency_seq_len,
                                   "repeats": c.latency_repeats, "decode_tokens": c.decode_tokens,
                                   "protocol": PROTOCOL}
        return units

    def cell_settings(self, method: Method, unit: str, settings: dict[str, Any]) -> dict[str, Any]:
        """A length-fitted static method's accuracy cells depend on every task of the study (its pruned model is
        chosen on their pooled forwards), so the task list is part of their identity."""
        if unit in self.tasks and fits_lengths(method):
            return {**settings, "pool": list(self.tasks)}
        return settings

    # -- the study --------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        """Every group of cells: in this process (`executor="local"`), or as Ray tasks (bench.executors)."""
        if self.config.executor == "ray":
            from bench.executors import run_on_ray

            return run_on_ray(self)
        return self.run_groups(range(len(self.plan)), clean=True)

    def run_groups(self, indices, clean: bool = False) -> list[str]:
        """The cells of `self.plan[i]` for each i, in this process (loading the model if none was given)."""
        c = self.config
        torch.manual_seed(c.seed)
        if self.model is None:
            self.model, self.tokenizer = self.clock.timed("load model", lambda: load_model(c.model, c.device, c.dtype))
        with cpu_threads(self.model, c.threads) as threads:
            self.threads_used = threads
            self.device = next(self.model.parameters()).device
            self.commit = git_commit()
            self.dense_layers = self.model.config.num_hidden_layers
            if clean:
                self.store.remove_stale()  # temporaries of killed runs
            selected = [self.plan[i] for i in indices]
            outer = tqdm(selected, desc="methods", disable=not c.progress)
            for method in outer:
                outer.set_postfix_str(f"{method.registry_name}@{method.sparsity:g}")
                self.run_group(method)
        return self.run_cells

    def run_group(self, method: Method) -> None:
        """One (method, sparsity): calibrate (cached) if any of its cells is pending, then measure each pending
        unit into its own cell."""
        c = self.config
        units = self.unit_settings()
        settings = {u: self.cell_settings(method, u, s) for u, s in units.items()}
        cells = {unit: cell_hash(self._identity(method, unit, settings[unit])) for unit in units}
        self.run_cells.extend(cells.values())
        pending = [u for u in units if c.force or not self.store.is_complete(cells[u])]
        self.cells_skipped.extend(cells[u] for u in units if u not in pending)
        if not pending:
            return
        artifact = self.clock.timed(f"calibrate {method.registry_name}", lambda m=method: ensure_calibrated(
            m, self.model, self.tokenizer, c.model, seed=c.seed, force=False))
        for unit in pending:
            with self.store.claim(cells[unit], force=c.force) as owned:  # another process may hold it
                if not owned:
                    self.cells_skipped.append(cells[unit])
                    continue
                stage = "accuracy" if unit in self.tasks else unit
                method.set_knob(None)
                rows, samples = self.clock.timed(stage, lambda u=unit, m=method: self.measure(m, u, units[u]))
                common = {**self._common(), "cell": cells[unit], "method": method.registry_name,
                          "method_params": json.dumps(method.config(), sort_keys=True, default=str),
                          "target_sparsity": method.sparsity, "artifact": artifact.get("key_hash"),
                          "calibration": json.dumps(artifact, default=str)}
                rows = [{**common, **row} for row in rows]
                identity = {**self._identity(method, unit, settings[unit]), "stats": method.stats(),
                            "host": platform.node()}
                method.set_knob(None)
                self.store.write(cells[unit], identity, rows, samples)
                self.cells_written.append(cells[unit])

    def measure(self, method: Method, unit: str, settings: dict[str, Any]):
        if unit == "wikitext2":
            return self.measure_perplexity(method, settings), None
        if unit == "efficiency":
            return self.measure_efficiency(method, settings), None
        return self.measure_accuracy(method, unit, settings)

    # -- matching ---------------------------------------------------------------------------------------------
    def dense_flops(self, batch: int, width: int) -> int:
        """The dense model's decoder FLOPs on a [batch, width] forward (equal to its FlopCounterMode count)."""
        from bench.flops import analytic_decoder_flops

        return analytic_decoder_flops(self.model.config, width, batch=batch, num_layers=self.dense_layers)

    def task_shapes(self, task: str, sequence_dependent: bool) -> list[tuple[int, int]]:
        """The (batch, width) of every forward the evaluator will run on `task`, read without running the model
        (lm-eval builds the requests, the engine plans its batches)."""
        from lm_eval.evaluator import evaluate

        from bench.evaluate import BenchLM
        from bench.tasks import build_task_dict

        key = (task, sequence_dependent)
        if key not in self._shapes:
            lm = BenchLM(self.model, self.tokenizer, batch_size=self.config.batch_size,
                         sequence_dependent=sequence_dependent, progress=False, plan_only=True)
            evaluate(lm=lm, task_dict=build_task_dict([task]), limit=self.config.limit, bootstrap_iters=0,
                     verbosity="ERROR")
            self._shapes[key] = [f.shape for f in lm.workload]
        return self._shapes[key]

    def fit(self, method: Method, shapes: list[tuple[int, int]]) -> MatchResult:
        """Static methods: choose the pruned model for these forwards (a no-op for layer removal)."""
        result = MatchResult(target=method.sparsity)
        fitted = method.fit_lengths(self.model.config, shapes)
        if fitted:
            result.knob, result.value = fitted["knob"], float(fitted["value"])
        return result

    def solve(self, method: Method, model, workload: Workload) -> MatchResult:
        """Input-dependent methods: solve the knob on this unit's forwards (inside the live apply())."""
        result = solve_knob(method, model, workload, self.dense_flops)
        method.reset_stats()
        return result

    @staticmethod
    def match_columns(match: MatchResult, measured: float | None) -> dict[str, Any]:
        matched = is_matched(measured, match.target)
        reason = match.reason or (None if matched else f"c = {measured} is off the target {match.target:g} "
                                  "by more than 0.02 on the scored inputs")
        return {"measured_sparsity": measured, "matched": matched, "knob": match.knob,
                "knob_value": match.value, "unmatched_reason": None if matched else reason}

    # -- units ------------------------------------------------------------------------------------------------
    def measure_accuracy(self, method: Method, task: str, settings: dict[str, Any]):
        """Accuracy, and compute sparsity counted with FlopCounterMode on every forward exactly as it was scored
        (same batches, padding and protected positions)."""
        from lm_eval.evaluator import evaluate

        from bench.evaluate import BenchLM
        from bench.tasks import TASKS, build_task_dict

        match = MatchResult(target=method.sparsity)
        if fits_lengths(method):
            pooled = [s for t in self.tasks for s in self.task_shapes(t, method.sequence_dependent)]
            match = self.fit(method, pooled)
        task_dict = build_task_dict([task])
        with method.apply(self.model) as pruned:
            def on_workload(forwards) -> None:
                nonlocal match
                if method.knob(self.model.config) is not None:
                    match = self.solve(method, pruned, Workload([(f.input_ids, f.scored, f.kwargs)
                                                                 for f in forwards]))

            lm = BenchLM(pruned, self.tokenizer, batch_size=self.config.batch_size,
                         sequence_dependent=method.sequence_dependent, progress=self.config.progress,
                         dense_flops=self.dense_flops, on_workload=on_workload)
            out = evaluate(lm=lm, task_dict=task_dict, limit=settings["limit"], log_samples=True,
                           bootstrap_iters=1000, verbosity="ERROR")
        tally = lm.engine.flops
        base = {"task": task, "limit": settings["limit"], **self.match_columns(match, tally.sparsity)}
        result = out["results"][task]
        n_items = len(out["samples"][task])
        rows = []
        for metric in TASKS[task].metrics:
            if f"{metric},none" not in result:
                continue
            stderr = result.get(f"{metric}_stderr,none")
            rows.append({**base, "metric": metric, "value": float(result[f"{metric},none"]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n_items})
        # what the compute sparsity covers: every request scored (n), their tokens, the FLOP sums
        rows += [{**base, "metric": "compute_sparsity", "value": tally.sparsity, "n": tally.items},
                 {**base, "metric": "scored_tokens", "value": float(tally.tokens), "n": tally.items},
                 {**base, "metric": "decoder_flops", "value": float(tally.executed), "n": tally.items},
                 {**base, "metric": "dense_decoder_flops", "value": float(tally.dense), "n": tally.items}]
        samples = [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in TASKS[task].metrics if m in s},
                    "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
                   for s in out["samples"][task]]
        return rows, samples

    def dense_perplexity(self, windows: torch.Tensor):
        """The dense model's per-prediction NLL on these windows (once per run), for ppl on the same positions."""
        from bench.perplexity import perplexity

        key = (tuple(windows.shape), int(windows.sum()))
        if key not in self._dense_ppl:
            self._dense_ppl[key] = perplexity(self.model, windows, progress=False)
        return self._dense_ppl[key]

    def measure_perplexity(self, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Perplexity with the knob solved on the windows themselves; compute sparsity counted with FlopCounterMode
        on every window as it was scored (`measured_sparsity`: all windows; `compute_sparsity_sd`: spread across
        windows); `ppl_ratio`: the method's perplexity ÷ the dense model's on exactly the same predictions."""
        from bench.perplexity import perplexity, wikitext_windows

        windows = wikitext_windows(self.tokenizer, settings["seq_len"], settings["windows"])
        match = self.fit(method, [(1, windows.shape[1])] * len(windows))
        with method.apply(self.model) as pruned:
            if method.knob(self.model.config) is not None:
                workload = Workload([(w[None], torch.zeros(1, len(w), dtype=torch.bool), {}) for w in windows])
                match = self.solve(method, pruned, workload)
            result = perplexity(pruned, windows, progress=self.config.progress, count_flops=True)
        dense = self.dense_perplexity(windows)
        dense_window = self.dense_flops(1, windows.shape[1])
        per_window = np.array([1.0 - flops / dense_window for flops in result.executed_flops])
        spread = float(per_window.std(ddof=1)) if len(per_window) > 1 else 0.0
        # All windows have one length, so the mean of the per-window values is one division of integer sums:
        # exact to the last bit on every CPU (numpy's SIMD mean is not, and the gate compares exactly).
        measured = 1.0 - sum(result.executed_flops) / (dense_window * len(result.executed_flops))
        base = {"task": "wikitext2", "n": result.windows, "seq_len": result.seq_len,
                **self.match_columns(match, measured)}
        dense_same = dense.ppl_on(result.scored)
        return [{**base, "metric": "ppl", "value": result.ppl},
                {**base, "metric": "dense_ppl_same_positions", "value": dense_same},
                {**base, "metric": "ppl_ratio", "value": result.ppl / dense_same},
                {**base, "metric": "scored_fraction", "value": result.nll_tokens / result.predictions},
                {**base, "metric": "compute_sparsity", "value": measured,
                 "stderr": spread / np.sqrt(len(per_window))},
                {**base, "metric": "compute_sparsity_sd", "value": spread}]

    def measure_efficiency(self, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
        from bench.efficiency import interleaved_latency, parameter_count, peak_memory_mb
        from bench.flops import count_flops
        from bench.perplexity import wikitext_windows

        n, b = settings["seq_len"], settings["batch"]
        ids = wikitext_windows(self.tokenizer, n, b).to(self.device)
        dense_flops = count_flops(self.model, ids).decoder
        match = self.fit(method, [(b, n)])
        if method.knob(self.model.config) is not None:
            with method.apply(self.model) as pruned:  # the solved knob stays set for the timed apply()s below
                match = self.solve(method, pruned, Workload([(ids, torch.zeros_like(ids, dtype=torch.bool), {})]))
        dense_lat, pruned_lat = interleaved_latency(self.model, lambda: method.apply(self.model), ids,
                                                    repeats=settings["repeats"], new_tokens=settings["decode_tokens"])
        with method.apply(self.model) as pruned:
            flops = count_flops(pruned, ids).decoder
            memory = peak_memory_mb(pruned, ids)
            params = parameter_count(pruned)
        measured = 1.0 - flops / dense_flops
        base = {"task": "efficiency", "batch": b, "seq_len": n, "n": settings["repeats"],
                **self.match_columns(match, measured)}
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


def fits_lengths(method: Method) -> bool:
    """Does this static method choose its pruned model from the study's sequence lengths (BlockPruner)?"""
    return type(method).fit_lengths is not Method.fit_lengths
