"""The study: *plan* the groups of cells (one per method and sparsity, dense first) and *execute* them, here or on
Ray (bench.executors). For each group: calibrate (cached), then measure every pending unit (each accuracy task,
WikiText-2 perplexity, the efficiency probe; bench.units) into its own cell of the store. Complete cells are
skipped, so a killed run resumes where it stopped; --force recomputes."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.artifacts import ensure_calibrated
from bench.budgets import sized_fields
from bench.console import libraries_quiet, library_output_to
from bench.defaults import DEFAULT_LIMIT, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_PPL_WINDOWS
from bench.efficiency import CPU_GRID, GPU_GRID
from bench.errors import BenchError
from bench.fileutil import json_digest as cell_hash
from bench.matching import PROTOCOL
from bench.models import adds_bos, cpu_threads, load_model, validate_model_name
from bench.provenance import BENCH_VERSION, Provenance
from bench.store import ROWS, Store
from bench.study import give_calibration, model_shape, overrides_for
from bench.units import DETERMINISM, LATENCY_SWEEP, CellContext, fits_lengths, measure
from methods import Method, MethodConfigError, make_method, method_class


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
    # several seeds per pruned method (calibration sample order, router/predictor init, random layers): the summary
    # then combines item and seed variance; None: `seed` only
    calibration_seeds: list[int] | None = None
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
    verbose: bool = False  # libraries' bars and messages on the terminal; otherwise appended to <results>/run.log
    latency_sweep: bool = False  # the latency-sweep unit (bench.units.latency) for every pruned method
    latency_grid: list[tuple[int, int]] | None = None  # (batch, seq_len) points; None: CPU_GRID or GPU_GRID
    sweep_max_rounds: int = 30
    determinism_task: str | None = None  # a task dense is scored on twice, compared exactly (the gate sets it)
    executor: str = "local"  # "local": in this process; "ray"/"slurm": one task or job per group (bench.executors)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    slurm_partition: str | None = None
    slurm_timeout_min: int = 24 * 60
    # from a study file (bench.study): per method (family or variant) field values and calibration text settings
    method_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)


def plan_methods(config: RunConfig, shape=None) -> list[Method]:
    """dense first (the shared reference), then each method at each sparsity; validated before any work. With the
    model's `shape` (its config), a small model's methods get their small presets (bench.budgets)."""
    for s in config.sparsities:
        if not 0.0 <= s < 1.0:
            raise BenchError(f"sparsity must be in [0, 1), got {s}; e.g. --sparsity 0.25,0.4")
    names = [n for n in config.methods if n != "dense"]
    plan = [make_method("dense", seed=config.seed)]
    seeds = config.calibration_seeds or [config.seed]
    for name in names:
        chosen = overrides_for(name, config.method_fields)
        fields = sized_fields(name, chosen, shape)
        calibration = overrides_for(name, config.calibration)
        for s in config.sparsities:
            for seed in seeds if method_class(name).seeded else seeds[:1]:
                try:
                    method = make_method(name, **{"sparsity": s, "seed": seed, **fields})
                except MethodConfigError as exc:
                    if fields == chosen:
                        raise
                    raise MethodConfigError(
                        f"{exc} (this model is small, so {name} got its preset {fields['preset']!r} "
                        f"(bench.budgets); name a preset in the study's [fields.{name}] to choose another)") from exc
                give_calibration(method, calibration)
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
        from bench.defaults import DEFAULT_TASKS
        from bench.tasks import resolve_tasks

        self.config = config
        self.tasks = resolve_tasks(config.tasks) if config.tasks else list(DEFAULT_TASKS)
        if model is None:
            validate_model_name(config.model)
        self.plan: list[Method] = []
        self.sized = False  # has the plan seen the model's shape (small-model presets, bench.budgets)?
        # the shape from the model given, or offline (zoo table, local config.json, HF cache); else once loaded
        self.size_plan(model.config if model is not None else model_shape(config.model))
        self.store = Store(config.results)
        self.clock = StageClock()
        self.cells_written: list[str] = []
        self.threads_used: int | None = None  # torch CPU threads the last run() used
        self.cells_skipped: list[str] = []
        self.run_cells: list[str] = []
        self.not_scored: list[tuple[str, str]] = []  # (method, generation task) left out: dense scored 0 there
        self.model, self.tokenizer = model, tokenizer
        self.context: CellContext | None = None  # what the units measure with; built once the model is loaded
        self.provenance: Provenance | None = None

    def size_plan(self, shape) -> None:
        """(Re)plan with the model's shape (None: not known yet, plan with the default budgets). The order never
        changes, so a plan index means the same (method, sparsity, seed) before and after, here and in a worker."""
        try:
            self.plan = plan_methods(self.config, shape)
        except MethodConfigError as exc:
            raise BenchError(str(exc)) from exc
        self.sized = shape is not None

    def _identity(self, method: Method, unit: str, settings: dict[str, Any]) -> dict[str, Any]:
        identity = {"model": self.config.model, "method": method.registry_name, "method_version": method.version,
                    "params": method.config(), "unit": unit, "settings": settings,
                    "device": self.provenance.device, "dtype": str(self.model.dtype), "bench": BENCH_VERSION}
        override = getattr(method, "calibration_override", None)
        if override:
            identity["calibration"] = override
        return identity

    def unit_settings(self, method: Method | None = None) -> dict[str, dict[str, Any]]:
        """{unit: its settings} of `method`'s group: every task, WikiText-2, the efficiency probe, and for dense
        the determinism check when the study asks for one."""
        c = self.config
        # "protocol": how compute is matched and counted (bench.matching); a new value re-measures older cells
        units = {task: {"limit": c.limit, "batch_size": c.batch_size, "protocol": PROTOCOL} for task in self.tasks}
        if c.measure_ppl:
            units["wikitext2"] = {"seq_len": c.ppl_seq_len, "windows": c.ppl_windows, "protocol": PROTOCOL}
        if c.measure_efficiency:
            units["efficiency"] = {"batch": c.latency_batch, "seq_len": c.latency_seq_len,
                                   "repeats": c.latency_repeats, "decode_tokens": c.decode_tokens,
                                   "protocol": PROTOCOL}
        if c.latency_sweep and method is not None and method.registry_name != "dense":
            grid = c.latency_grid or (GPU_GRID if self.provenance and self.provenance.device.startswith("cuda")
                                      else CPU_GRID)
            units[LATENCY_SWEEP] = {"grid": [list(p) for p in grid], "decode_tokens": c.decode_tokens,
                                    "min_rounds": 5, "max_rounds": c.sweep_max_rounds, "protocol": PROTOCOL}
        if self.tokenizer is not None and adds_bos(self.tokenizer):
            # raw-text windows start with BOS for such a tokenizer (bench.models.adds_bos): part of what the
            # cell measured (SmolLM2's identities are unchanged)
            for unit in ("wikitext2", "efficiency", LATENCY_SWEEP):
                if unit in units:
                    units[unit] = {**units[unit], "bos": True}
        if c.determinism_task and method is not None and method.registry_name == "dense":
            units[DETERMINISM] = {"task": c.determinism_task, "limit": c.limit, "batch_size": c.batch_size,
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
        if self.config.executor in ("ray", "slurm"):
            from bench.executors import run_on_ray, run_on_slurm

            return (run_on_ray if self.config.executor == "ray" else run_on_slurm)(self)
        return self.run_groups(range(len(self.plan)), clean=True)

    def run_groups(self, indices, clean: bool = False) -> list[str]:
        """The cells of `self.plan[i]` for each i, in this process (loading the model if none was given)."""
        c = self.config
        torch.manual_seed(c.seed)
        with libraries_quiet(c.verbose):
            if self.model is None:
                self.model, self.tokenizer = self.clock.timed("load model",
                                                              lambda: load_model(c.model, c.device, c.dtype))
            if not self.sized:
                self.size_plan(self.model.config)
            with cpu_threads(self.model, c.threads) as threads:
                self.threads_used = threads
                self.provenance = Provenance.current(c.model, self.model, c.seed, c.batch_size)
                log = None if c.verbose else Path(c.results) / "run.log"
                self.context = CellContext(self.model, self.tokenizer, self.tasks, c.limit, c.batch_size, c.progress,
                                           log=log)
                if clean:
                    self.store.remove_stale()  # temporaries of killed runs
                selected = [self.plan[i] for i in indices]
                outer = tqdm(selected, desc="methods", disable=not c.progress)
                # --no-progress: a calibration's own bars go to the log too (warnings keep the terminal)
                with contextlib.nullcontext() if c.progress else library_output_to(log):
                    for method in outer:
                        outer.set_postfix_str(f"{method.registry_name}@{method.sparsity:g}")
                        self.run_group(method)
        return self.run_cells

    def run_group(self, method: Method) -> None:
        """One (method, sparsity): calibrate (cached) if any of its cells is pending, then measure each pending
        unit into its own cell."""
        c = self.config
        units = self.unit_settings(method)
        settings = {u: self.cell_settings(method, u, s) for u, s in units.items()}
        cells = {unit: cell_hash(self._identity(method, unit, settings[unit])) for unit in units}
        self.run_cells.extend(cells.values())
        pending = [u for u in units if c.force or not self.store.is_complete(cells[u])]
        self.cells_skipped.extend(cells[u] for u in units if u not in pending)
        if not pending:
            return
        artifact = self.clock.timed(f"calibrate {method.registry_name}", lambda m=method: ensure_calibrated(
            m, self.model, self.tokenizer, c.model, seed=m.seed, force=False))
        for unit in pending:
            if method.registry_name != "dense" and self.dense_at_zero(unit, settings[unit]):
                self.not_scored.append((method.registry_name, unit))
                continue
            with self.store.claim(cells[unit], force=c.force) as owned:  # another process may hold it
                if not owned:
                    self.cells_skipped.append(cells[unit])
                    continue
                stage = "accuracy" if unit in self.tasks else unit
                method.set_knob(None)
                rows, samples = self.clock.timed(stage, lambda u=unit, m=method: self.measure(m, u, units[u]))
                common = {**self.provenance.columns(), "cell": cells[unit], "method": method.registry_name,
                          "method_params": json.dumps(method.config(), sort_keys=True, default=str),
                          "target_sparsity": method.sparsity, "artifact": artifact.get("key_hash"),
                          "calibration_seed": None if method.registry_name == "dense" else method.seed,
                          "calibration": json.dumps(artifact, default=str)}
                rows = [{**common, **row} for row in rows]
                identity = {**self._identity(method, unit, settings[unit]), "stats": method.stats(),
                            "host": platform.node()}
                method.set_knob(None)
                self.store.write(cells[unit], identity, rows, samples)
                self.cells_written.append(cells[unit])

    def dense_at_zero(self, unit: str, settings: dict[str, Any]) -> bool:
        """A generation task (a RULER length) on which the dense model scored 0 in this study: no method is compared
        there (retention has no denominator), so its cells are not computed; the summary reports the length."""
        from bench.tasks import GENERATION_TASKS, TASKS

        if unit not in GENERATION_TASKS:
            return False
        dense = cell_hash(self._identity(self.plan[0], unit, settings))
        if not self.store.is_complete(dense, report=False):
            return False
        rows = pd.read_parquet(self.store.cell_dir(dense) / ROWS)
        primary = rows[rows["metric"] == TASKS[unit].primary_metric]["value"]
        return len(primary) > 0 and float(primary.iloc[0]) == 0.0

    def measure(self, method: Method, unit: str, settings: dict[str, Any]):
        """One unit's (rows, samples): bench.units, with this study's context."""
        return measure(self.context, method, unit, settings)
