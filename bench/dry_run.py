"""`run --dry-run`: the cell plan, the artifacts to calibrate and an estimated cost of a study, loading no model."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median

from bench.artifact_index import registered_name
from bench.artifacts import COMMITTED_DIR, artifact_name, find_artifact
from bench.budgets import shape_matters
from bench.defaults import DEFAULT_TASKS
from bench.flops import LayerFlopCoefficients
from bench.paths import REPO_ROOT
from bench.plan import overrides_for, plan_methods
from bench.shapes import model_shape
from bench.store import Store
from bench.tasks import TASKS


def dry_run(config, out=print) -> None:
    """Print what `run` would do with `config` (a bench.plan.RunConfig) and what it would cost, loading no model."""
    shape = model_shape(config.model)  # sizes the budgets as run will (bench.budgets); None: not known offline
    plan = plan_methods(config, shape)
    if shape is None and shape_matters(plan):
        out(f"[dry-run] note: the shape of {config.model!r} is not known offline, so the artifacts below assume the "
            "default presets; a model under 20M decoder parameters will get the small presets (bench.budgets)")
    tasks = config.tasks or list(DEFAULT_TASKS)
    units = [*tasks, *(["wikitext2"] if config.measure_ppl else []),
             *(["efficiency"] if config.measure_efficiency else [])]
    out(f"[dry-run] model={config.model} device={config.device} dtype={config.dtype} seed={config.seed}")
    sweep = sum(1 for m in plan if m.registry_name != "dense") if config.latency_sweep else 0
    if sweep:
        out(f"[dry-run] + {sweep} latency-sweep cells (one per pruned method setting)")
    out(f"[dry-run] {len(plan)} method settings × {len(units)} units = {len(plan) * len(units)} cells "
        f"(tasks: {', '.join(tasks)}; limit {config.limit or 'all'} items"
        + (f"; WikiText-2 {config.ppl_windows or 'all'} windows × {config.ppl_seq_len}" if config.measure_ppl else "")
        + ("; efficiency probe" if config.measure_efficiency else "") + ")")
    out("| method | sparsity | seed | fields set by the study | calibration artifact |")
    out("|---|---|---|---|---|")
    to_calibrate = {}
    for method in plan:
        fields = {**overrides_for(method.registry_name, config.method_fields),
                  **{f"calibration.{k}": v for k, v in overrides_for(method.registry_name, config.calibration).items()}}
        if method.needs_calibration:
            name = artifact_name(config.model, method, method.seed)
            found = find_artifact(name)
            status = f"{name}: {'cached' if found else 'to calibrate'}"
            if not found:
                to_calibrate[name] = method
        else:
            status = "none needed"
        out(f"| {method.registry_name} | {method.sparsity:g} | {method.seed} | {fields or '-'} | {status} |")
    out(f"[dry-run] artifacts to calibrate: {len(to_calibrate)} (each once, shared by every cell that needs it)")
    if to_calibrate:
        _calibration_estimate(config.model, list(to_calibrate.values()), out)
    _estimate(config, shape, plan, tasks, out)


def _calibration_estimate(model: str, methods, out) -> None:
    """Calibration time from the committed artifacts of the same method (registered variant, else class) on the
    same model: their median `calibration_seconds`, as measured where they were made."""
    made: dict[str, list[float]] = {}  # registered variant name, and class name -> calibration seconds
    for path in COMMITTED_DIR.glob("*/artifact.json"):
        meta = json.loads(path.read_text())
        if meta["key"]["model"] == model and meta.get("calibration_seconds"):
            for label in (registered_name(meta["key"]), meta["key"]["method"]):
                made.setdefault(label, []).append(float(meta["calibration_seconds"]))
    total, parts, unknown = 0.0, [], []
    for method in methods:
        seconds = made.get(method.registry_name) or made.get(type(method).__name__)
        if seconds is None:
            unknown.append(method.registry_name)
            continue
        total += median(seconds)
        parts.append(f"{method.registry_name} c = {method.sparsity:g} seed {method.seed} ~{median(seconds) / 60:.0f} min")
    line = f"[dry-run] calibration: ~{total / 60:.0f} min in all ({'; '.join(parts) or 'none known'}"
    out(line + (f"; no committed artifact of {', '.join(sorted(set(unknown)))} on {model} to time it by" if unknown
                else "") + "), the median calibration time of the committed artifacts of the same method and model")


def _estimate(config, target, plan, tasks, out) -> None:
    """Evaluation cost = dense decoder FLOPs of the workload × the seconds per FLOP measured on this kind of device
    by an earlier run's dense efficiency probe (results store); task items are sized by the dense FLOPs per item the
    store measured on its model, scaled by the per-token FLOPs ratio of the two models (`target`: the shape of
    config.model, None where it is not known offline)."""
    if target is None:
        out(f"[dry-run] cost: no estimate (the shape of {config.model!r} is not known offline: pass a local "
            "directory or add it to bench.shapes.KNOWN_SHAPES)")
        return

    def measured(where):
        try:
            rows = Store(where).load_rows()
        except Exception:  # noqa: BLE001 - no store there: nothing measured
            return None
        has = len(rows) and ((rows["task"] == "efficiency") & (rows["method"] == "dense")).any()
        return rows if has else None

    # the study's store, the default one, then the committed studies (those of this model first)
    committed = sorted(str(p) for p in (REPO_ROOT / "results" / "studies").glob("*") if p.is_dir())
    found = [(where, rows) for where in dict.fromkeys([config.results, "results", *committed])
             if (rows := measured(where)) is not None]
    found.sort(key=lambda wr: (wr[0] not in (config.results, "results"), not (wr[1]["model"] == config.model).any()))
    if not found:
        out(f"[dry-run] cost: no estimate (no dense efficiency measurement in {config.results}/, results/ or "
            "results/studies/; run a small study on this machine first, e.g. `python -m bench run --methods "
            "shortgpt --tasks piqa --limit 20`)")
        return
    where, rows = found[0]
    where = str(Path(where).relative_to(REPO_ROOT)) if Path(where).is_absolute() else where
    wanted = "cuda" if config.device == "cuda" else "cpu"
    dense = rows[(rows["task"] == "efficiency") & (rows["method"] == "dense")]
    on_device = dense[dense["device"].str.startswith(wanted)]
    probe = on_device if len(on_device) else dense
    device = str(probe["device"].iloc[0]).split(":")[0]
    if device != wanted:
        out(f"[dry-run] note: nothing was measured on {wanted} here; the estimate uses this machine's {device} rate")
    speed = probe.pivot_table(index="cell", columns="metric", values="value")
    seconds_per_flop = float((speed["dense_prefill_ms"] / 1e3 / speed["dense_decoder_flops"]).median())
    measured_model = str(probe["model"].iloc[0])
    measured_shape = model_shape(measured_model)
    target_coeff = LayerFlopCoefficients.from_config(target)
    measured_coeff = LayerFlopCoefficients.from_config(measured_shape)
    ratio = (target_coeff.a + target_coeff.g) / (measured_coeff.a + measured_coeff.g)
    accuracy = rows[(rows["method"] == "dense") & (rows["metric"] == "dense_decoder_flops")
                    & (rows["model"] == measured_model)]
    flops = 0.0
    for task in tasks:
        per_item = accuracy[accuracy["task"] == task]
        items = TASKS[task].n_items if config.limit is None else min(config.limit, TASKS[task].n_items)
        if len(per_item):
            flops += float(per_item["value"].median()) / _items_in(rows, per_item) * items * ratio
    windows = config.ppl_windows or 140  # WikiText-2 test ≈ 287k tokens: ~140 windows of 2,048
    flops += windows * target_coeff.layer(config.ppl_seq_len) * target.num_hidden_layers
    flops += 2 * config.latency_repeats * target_coeff.layer(config.latency_seq_len) * target.num_hidden_layers
    hours = flops * len(plan) * seconds_per_flop / 3600
    out(f"[dry-run] estimated evaluation cost (a lower bound): {hours:.1f} {device.upper()}-hours on this machine "
        f"({flops * len(plan):.3g} decoder FLOPs for {len(plan)} method settings at "
        f"{1 / seconds_per_flop / 1e9:.0f} GFLOP/s, the dense prefill rate measured in {where}/ on {measured_model}). "
        "It counts every cell at dense cost and the dense prefill rate, and leaves out calibration, the knob solves "
        "and per-request scoring of token methods and tokenizer differences: the default CPU study (4 tasks × 50 "
        "items) reads 0.1 CPU-hours and took 577 s on an idle 2-core machine (README, \"The default study\").")


def _items_in(rows, per_item) -> int:
    """Items the cell of these accuracy rows scored (its `limit`)."""
    limits = rows[rows["cell"].isin(per_item["cell"])]["limit"].dropna()
    return int(limits.iloc[0]) if len(limits) else 1
