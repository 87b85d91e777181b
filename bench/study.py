"""Studies as TOML files: `python -m bench run --config configs/NAME.toml`.

A file names what `run` takes on the command line (model, dtype, device, methods, sparsities, tasks, limits, …) plus
two tables per method, applied to the method and to its registered variants (`[fields.ftp]` reaches `ftp-static`
too; `[fields.ftp-static]` only that variant):

    [fields.ftp]            # the method's dataclass fields, e.g. preset = "paper"
    [calibration.blockpruner]  # the calibration text it is given: n_samples, seq_len, source

Options given on the command line override the file. Unknown keys, wrong types and bad values are errors that say
what to write instead; nothing here imports torch, so a config is checked (and `--dry-run` planned) in a second.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paths import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# key -> (type check, example): what `run` takes, by its RunConfig name
_NONE = "none"
RUN_KEYS: dict[str, tuple[str, str]] = {
    "description": ("str", '"LLaMA-2-7B, the paper\'s four sparsities"'),
    "model": ("str", '"smollm2-135m"'),
    "device": ("choice:auto,cpu,cuda", '"cuda"'),
    "dtype": ("choice:auto,float32,bfloat16", '"bfloat16"'),
    "seed": ("int>=0", "0"),
    "methods": ("names", '["shortgpt", "ftp"]'),
    "sparsities": ("sparsities", "[0.22, 0.25, 0.30, 0.40]"),
    "tasks": ("names", '["piqa", "arc_easy"]'),
    "limit": ("count|none", '50 or "none"'),
    "ppl_windows": ("count|none", '10 or "none"'),
    "ppl_seq_len": ("count", "2048"),
    "batch_size": ("count", "16"),
    "latency_repeats": ("count", "5"),
    "latency_seq_len": ("count", "512"),
    "decode_tokens": ("count", "16"),
    "threads": ("count", "2"),
    "results": ("str", '"results"'),
    "calibration_seeds": ("seeds", "[0, 1, 2]"),
    "latency_sweep": ("bool", "true"),
    "measure_ppl": ("bool", "false"),  # the WikiText-2 unit (default true)
    "measure_efficiency": ("bool", "false"),  # the latency probe unit (default true)
    "executor": ("choice:local,ray,slurm", '"ray"'),
}
TABLES = ("fields", "calibration")
# study keys `run` has no command-line option for: RunConfig takes them from the file only
FILE_ONLY = ("latency_seq_len", "decode_tokens", "method_fields", "calibration", "measure_ppl", "measure_efficiency")
CALIBRATION_KEYS = {"n_samples": "count", "seq_len": "count", "source": "str"}


def _error(path: Path, where: str, message: str) -> BenchError:
    return BenchError(f"{path}: {where}: {message}")


def _unknown(path: Path, where: str, key: str, known: list[str]) -> BenchError:
    close = get_close_matches(key, known, n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return _error(path, where, f"unknown key {key!r}; {hint}known keys: {', '.join(known)}")


def _check(path: Path, key: str, value: Any, kind: str, example: str) -> Any:
    bad = _error(path, key, f"{value!r} is not valid; write e.g. {key} = {example}")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
    elif kind.startswith("choice:"):
        if value not in kind.split(":", 1)[1].split(","):
            raise bad
    elif kind == "int>=0":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad
    elif kind in ("count", "count|none"):
        if kind == "count|none" and value == _NONE:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "seeds":
        if not isinstance(value, list) or not value or len(set(value)) != len(value) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad
    elif kind == "names":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad
    elif kind == "sparsities":
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value):
            raise _error(path, key, f"{value!r} is not valid; sparsities are in [0, 1), e.g. {key} = {example}")
        return [float(v) for v in value]
    return value


def load_study(path: str | Path) -> dict[str, Any]:
    """The validated file as {RunConfig field: value, "method_fields": {...}, "calibration": {...}}."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--config {path}: no such file; the shipped studies are in configs/ "
                         f"({', '.join(sorted(p.name for p in (REPO_ROOT / 'configs').glob('*.toml')))})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"--config {path}: not valid TOML ({exc}); see configs/default_cpu.toml for the format") from exc
    out: dict[str, Any] = {"method_fields": {}, "calibration": {}}
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise _error(path, key, f"write one table per method, e.g. [{key}.ftp]")
            continue
        if key not in RUN_KEYS:
            raise _unknown(path, "top level", key, [*RUN_KEYS, *TABLES])
        kind, example = RUN_KEYS[key]
        out[key] = _check(path, key, value, kind, example)
    for method, fields in data.get("fields", {}).items():
        out["method_fields"][method] = dict(fields)
    for method, settings in data.get("calibration", {}).items():
        for key, value in settings.items():
            if key not in CALIBRATION_KEYS:
                raise _unknown(path, f"[calibration.{method}]", key, list(CALIBRATION_KEYS))
            _check(path, f"calibration.{method}.{key}", value, CALIBRATION_KEYS[key],
                   '"c4-all"' if key == "source" else "512")
        out["calibration"][method] = dict(settings)
    _check_methods(path, out)
    out.pop("description", None)
    return out


def _check_methods(path: Path, study: dict[str, Any]) -> None:
    """Method and task names, and that every table names a method of the study (a typo would be ignored)."""
    from methods import available_methods

    known = available_methods()
    names = study.get("methods", [])
    for name in names:
        if name not in known:
            raise _unknown(path, "methods", name, known)
    for table in ("method_fields", "calibration"):
        for name in study[table]:
            if name not in known:
                raise _unknown(path, f"[{'fields' if table == 'method_fields' else table}.{name}]", name, known)
    if "tasks" in study:
        from bench.tasks import TASK_ALIASES, TASKS

        for task in study["tasks"]:
            if task not in TASKS and task not in TASK_ALIASES:
                raise _unknown(path, "tasks", task, [*TASKS, *TASK_ALIASES])


# -- --dry-run: the cell plan, the artifacts to calibrate, an estimated cost; no model is loaded -------------------
# Shapes of the models the shipped studies name, so a plan needs no network (values of their config.json files).
KNOWN_SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "gemma3-270m": {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256},
    "meta-llama/Llama-2-7b-hf": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "Qwen/Qwen1.5-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32},
}


def model_shape(model: str):
    """The decoder shape of `model` without the network: the table above, a local directory's config.json, or the
    Hugging Face cache; None when none of them has it."""
    from types import SimpleNamespace

    if model in KNOWN_SHAPES:
        return SimpleNamespace(**KNOWN_SHAPES[model])
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None


def dry_run(config, out=print) -> None:
    """Print what `run` would do with `config` (a bench.plan.RunConfig) and what it would cost, loading no model."""
    from bench.artifacts import artifact_name, find_artifact
    from bench.budgets import shape_matters
    from bench.defaults import DEFAULT_TASKS
    from bench.plan import overrides_for, plan_methods

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
    _estimate(config, plan, tasks, out)


def _calibration_estimate(model: str, methods, out) -> None:
    """Calibration time from the committed artifacts of the same method (registered variant, else class) on the
    same model: their median `calibration_seconds`, as measured where they were made."""
    import json
    from statistics import median

    from bench.artifact_index import registered_name
    from bench.artifacts import COMMITTED_DIR

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


def _estimate(config, plan, tasks, out) -> None:
    """Evaluation cost = dense decoder FLOPs of the workload × the seconds per FLOP measured on this kind of device
    by an earlier run's dense efficiency probe (results store); task items are sized by the dense FLOPs per item the
    store measured on its model, scaled by the per-token FLOPs ratio of the two models."""
    from bench.flops import LayerFlopCoefficients
    from bench.store import Store
    from bench.tasks import TASKS

    target = model_shape(config.model)
    if target is None:
        out(f"[dry-run] cost: no estimate (the shape of {config.model!r} is not known offline: pass a local "
            "directory or add it to bench.study.KNOWN_SHAPES)")
        return
    from bench.paths import REPO_ROOT

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
