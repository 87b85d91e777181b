"""`python -m bench gate`: the regression gate. A small fixed study (bench/gate.toml) on the real default model,
compared with the committed baseline (results/baseline/gate.json), in the manner of llm-compressor's recovery
gate: a pruned method is judged by its accuracy *retention* (pruned ÷ dense on the same items).

It fails (exit 1, with a table of what moved and by how much) when a method's retention drops below its baseline
by more than its tolerance, a dense accuracy moves beyond a tight tolerance, FLOPs or measured sparsity change at
all (they are deterministic), perplexity moves beyond tolerance, or two dense scorings of one task are not bit
identical. Timings are reported, never gated on. `--update-baseline` rewrites the baseline and prints the diff.

The comparison (`compare`) is a pure function over summary records, so its failure modes are tested without a
model (tests/test_gate.py)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from bench.artifacts import artifact_exists
from bench.errors import BenchError
from bench.inputs import read_json_object
from bench.paths import REPO_ROOT

DEFAULT_CONFIG = Path(__file__).resolve().parent / "gate.toml"
DEFAULT_BASELINE = REPO_ROOT / "results" / "baseline" / "gate.json"
BASELINE_FORMAT = 1


# -- the typed config ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateRun:
    model: str = "smollm2-135m"
    sparsity: float = 0.25
    tasks: tuple[str, ...] = ("piqa", "arc_easy", "hellaswag")
    limit: int = 20
    ppl_windows: int = 3
    ppl_seq_len: int = 512
    seed: int = 0
    threads: int = 2
    batch_size: int = 16
    latency_seq_len: int = 128
    determinism_task: str = "piqa"


@dataclass(frozen=True)
class Tolerances:
    dense_accuracy: float = 0.04
    retention: float = 0.02
    ppl_relative: float = 0.002


@dataclass(frozen=True)
class MethodGate:
    name: str
    retention_tolerance: float | None = None  # None: Tolerances.retention
    calibrate_if_missing: bool = False


@dataclass(frozen=True)
class GateConfig:
    run: GateRun = field(default_factory=GateRun)
    tolerances: Tolerances = field(default_factory=Tolerances)
    methods: tuple[MethodGate, ...] = ()

    def retention_tolerance(self, method: str) -> float:
        for m in self.methods:
            if m.name == method and m.retention_tolerance is not None:
                return m.retention_tolerance
        return self.tolerances.retention


def _build(cls, table: dict[str, Any], where: str):
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise BenchError(f"gate config [{where}]: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**values)


def load_gate_config(path: str | Path | None = None) -> GateConfig:
    path = Path(path or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"gate config {path} not readable ({exc}); pass --config FILE") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"gate config {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - {"run", "tolerances", "methods"})
    if unknown:
        raise BenchError(f"gate config {path}: unknown table(s) {unknown}; expected [run], [tolerances], "
                         "[methods.<name>]")
    methods = tuple(_build(MethodGate, {"name": name, **(table or {})}, f"methods.{name}")
                    for name, table in raw.get("methods", {}).items() if name != "dense")
    return GateConfig(run=_build(GateRun, raw.get("run", {}), "run"),
                      tolerances=_build(Tolerances, raw.get("tolerances", {}), "tolerances"), methods=methods)


# -- records: what the gate compares --------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def gate_records(rows, summary) -> dict[str, dict[str, Any]]:
    """Per method: retention (with CI), primary accuracy per task, ppl, decoder FLOPs, measured sparsity per
    unit, and timings, from the store's rows and `bench.summary.summarize`'s frame."""
    from bench.summary import accuracy_rows

    records: dict[str, dict[str, Any]] = {}
    for _, line in summary.iterrows():
        method = line["method"]
        group = rows[rows["method"] == method]
        acc = accuracy_rows(group)
        eff = group[group["task"] == "efficiency"].set_index("metric")["value"]
        wiki = group[group["task"] == "wikitext2"]
        every_window = wiki[wiki["metric"] == "compute_sparsity"]
        sparsity = {task: _number(s) for task, s in zip(acc["task"], acc["measured_sparsity"], strict=True)}
        matched = {task: bool(m) for task, m in zip(acc["task"], acc["matched"].fillna(False), strict=True)}
        if len(every_window):
            sparsity["wikitext2"] = _number(every_window["value"].iloc[0])
            matched["wikitext2"] = bool(every_window["matched"].fillna(False).iloc[0])
        if "compute_sparsity" in eff:
            sparsity["efficiency"] = _number(eff["compute_sparsity"])
            eff_rows = group[(group["task"] == "efficiency") & (group["metric"] == "compute_sparsity")]
            matched["efficiency"] = bool(eff_rows["matched"].fillna(False).iloc[0])
        records[method] = {
            "target_sparsity": _number(line["target"]),
            "retention": _number(line["retention"]),
            "retention_ci": [_number(line["ret_lo"]), _number(line["ret_hi"])],
            "accuracy": {task: _number(v) for task, v in zip(acc["task"], acc["value"], strict=True)},
            "ppl": _number(line["ppl"]),
            "ppl_ratio": _number(line["ppl_ratio"]),
            "matched": matched,
            "decoder_flops": int(eff["decoder_flops"]) if "decoder_flops" in eff else None,
            "dense_decoder_flops": int(eff["dense_decoder_flops"]) if "dense_decoder_flops" in eff else None,
            "measured_sparsity": sparsity,
            "timings": {k: _number(eff[k]) for k in ("prefill_ms", "dense_prefill_ms", "prefill_speedup",
                                                     "decode_tokens_per_s") if k in eff},
        }
    return records


# -- the comparison (pure) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    method: str
    quantity: str
    baseline: Any
    current: Any
    tolerance: str
    status: str  # "FAIL", "ok", "note", "info"

    @property
    def delta(self) -> float | None:
        if isinstance(self.baseline, (int, float)) and isinstance(self.current, (int, float)):
            return self.current - self.baseline
        return None

    @property
    def moved(self) -> bool:
        return self.baseline != self.current


def _exact(method: str, quantity: str, base: Any, cur: Any) -> Check:
    return Check(method, quantity, base, cur, "exact", "ok" if base == cur else "FAIL")


def compare(baseline: dict[str, Any], current: dict[str, Any], config: GateConfig) -> list[Check]:
    """Every gated quantity of every method in either record set, with its verdict. `baseline` and `current`
    are gate documents ({"run": ..., "methods": {name: record}, "determinism": ...})."""
    checks: list[Check] = []
    tol = config.tolerances
    if baseline.get("run") != current.get("run"):
        checks.append(Check("*", "gate run settings", baseline.get("run"), current.get("run"), "exact", "FAIL"))
    determinism = current.get("determinism")
    if determinism is not None:
        checks.append(Check("dense", f"bit-identical rescoring ({determinism.get('task')})", True,
                            bool(determinism.get("identical")), "exact",
                            "ok" if determinism.get("identical") else "FAIL"))
    base_methods, cur_methods = baseline.get("methods", {}), current.get("methods", {})
    for method in list(dict.fromkeys([*base_methods, *cur_methods])):
        base, cur = base_methods.get(method), cur_methods.get(method)
        if cur is None:
            reason = current.get("skipped", {}).get(method, "not run")
            checks.append(Check(method, "skipped", "in baseline", reason, "-", "note"))
            continue
        if base is None:
            checks.append(Check(method, "new method", "absent", "run", "-", "note"))
            continue
        if method == "dense":
            for task in sorted(set(base["accuracy"]) | set(cur["accuracy"])):
                b, c = base["accuracy"].get(task), cur["accuracy"].get(task)
                bad = b is None or c is None or abs(c - b) > tol.dense_accuracy + 1e-12
                checks.append(Check(method, f"accuracy {task}", b, c, f"±{tol.dense_accuracy:g}",
                                    "FAIL" if bad else "ok"))
        else:
            b, c = base["retention"], cur["retention"]
            limit = config.retention_tolerance(method)
            bad = b is not None and (c is None or c < b - limit - 1e-12)
            checks.append(Check(method, "retention", b, c, f"-{limit:g}", "FAIL" if bad else "ok"))
            for task in sorted(set(base["accuracy"]) | set(cur["accuracy"])):
                checks.append(Check(method, f"accuracy {task}", base["accuracy"].get(task),
                                    cur["accuracy"].get(task), "(via retention)", "info"))
        # dense: its perplexity; every other method: its ratio to dense on the same positions (SDTP scores fewer)
        quantity, key = ("ppl wikitext2", "ppl") if method == "dense" else ("ppl_ratio wikitext2", "ppl_ratio")
        b, c = base.get(key), cur.get(key)
        bad = (b is None) != (c is None) or (b is not None and abs(c / b - 1) > tol.ppl_relative + 1e-12)
        checks.append(Check(method, quantity, b, c, f"±{tol.ppl_relative:.1%}", "FAIL" if bad else "ok"))
        if method != "dense":  # the benchmark's promise: every gated comparison at matched compute
            for unit, ok in sorted(cur.get("matched", {}).items()):
                checks.append(Check(method, f"matched {unit}", True, ok, "|c − target| <= 0.02",
                                    "ok" if ok else "FAIL"))
        checks.append(_exact(method, "decoder FLOPs", base["decoder_flops"], cur["decoder_flops"]))
        checks.append(_exact(method, "dense decoder FLOPs", base["dense_decoder_flops"],
                             cur["dense_decoder_flops"]))
        for unit in sorted(set(base["measured_sparsity"]) | set(cur["measured_sparsity"])):
            checks.append(_exact(method, f"measured sparsity {unit}", base["measured_sparsity"].get(unit),
                                 cur["measured_sparsity"].get(unit)))
        for key in sorted(set(base.get("timings", {})) | set(cur.get("timings", {}))):
            checks.append(Check(method, key, base.get("timings", {}).get(key), cur.get("timings", {}).get(key),
                                "not gated", "info"))
    return checks


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def format_checks(checks: list[Check], only_moved: bool = True) -> str:
    """A fixed-width table; by default only what moved, failed or deserves a note."""
    shown = [c for c in checks if c.status in ("FAIL", "note") or (c.moved or not only_moved)]
    if not shown:
        return "(nothing moved)"
    header = ("status", "method", "quantity", "baseline", "current", "delta", "rel", "tolerance")
    lines = [header]
    for c in shown:
        delta = c.delta
        rel = f"{delta / c.baseline:+.2%}" if delta is not None and c.baseline else ""
        lines.append((c.status, c.method, c.quantity, _fmt(c.baseline), _fmt(c.current),
                      "" if delta is None else f"{delta:+.4g}", rel, c.tolerance))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


# -- running it ------------------------------------------------------------------------------------------------
def plan(config: GateConfig) -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: why}): unregistered methods and methods whose calibration artifact is
    missing and too costly to make in the gate are skipped, loudly."""
    from bench.budgets import sized_fields
    from bench.shapes import model_shape
    from methods import _REGISTRY, make_method

    runnable, skipped = [], {}
    shape = model_shape(config.run.model)  # the budgets the run will use (bench.budgets)
    for gate in config.methods:
        if gate.name not in _REGISTRY:
            skipped[gate.name] = "not registered in methods/__init__.py"
            continue
        try:
            fields = {"sparsity": config.run.sparsity, "seed": config.run.seed}
            method = make_method(gate.name, **sized_fields(gate.name, fields, shape))
        except Exception as exc:  # a method being written may not import yet; the gate still runs the others
            skipped[gate.name] = f"cannot be built ({type(exc).__name__}: {exc})"
            continue
        if method.needs_calibration and not gate.calibrate_if_missing \
                and not artifact_exists(method, config.run.model, config.run.seed):
            skipped[gate.name] = ("no calibration artifact cached or committed under methods/artifacts/, and the "
                                  "gate does not train it (calibrate_if_missing = false); run `python -m bench "
                                  f"calibrate --method {gate.name}` once")
            continue
        runnable.append(gate.name)
    return runnable, skipped


def determinism_record(rows, task: str) -> dict[str, Any]:
    """The dense determinism unit's result (bench.units.measure_determinism), read from the study's rows."""
    from bench.units import DETERMINISM

    found = rows[(rows["task"] == DETERMINISM) & (rows["metric"] == f"identical:{task}")]
    if found.empty:
        return {"task": task, "identical": False, "items": 0, "why": f"no determinism cell for {task}"}
    return {"task": task, "identical": bool(found["value"].iloc[0] == 1.0), "items": int(found["n"].iloc[0])}


def run_config_dict(config: GateConfig) -> dict[str, Any]:
    """The settings a baseline is only comparable under (the methods are the keys of its records)."""
    return {**asdict(config.run), "tasks": list(config.run.tasks)}


def run_gate(config_path: str | None = None, baseline_path: str | None = None, results: str | None = None,
             update: bool = False) -> int:
    from bench.runner import RunConfig, Runner
    from bench.summary import format_summary, summarize

    config = load_gate_config(config_path)
    baseline_file = Path(baseline_path or DEFAULT_BASELINE)
    baseline = None
    if baseline_file.is_file():
        baseline = read_json_object(baseline_file, "gate baseline", "restore it with `git checkout -- "
                                    "results/baseline/gate.json`, or rewrite it with `python -m bench gate --update-baseline`")
    elif not update:
        raise BenchError(f"no gate baseline at {baseline_file}; create it with `python -m bench gate "
                         "--update-baseline` and commit it")
    methods, skipped = plan(config)
    for name, why in skipped.items():
        print(f"[gate] !!! SKIPPING {name}: {why}", flush=True)
    r = config.run
    store_dir = results or tempfile.mkdtemp(prefix="bench-gate-")
    run_config = RunConfig(model=r.model, methods=["dense", *methods], sparsities=[r.sparsity],
                           tasks=list(r.tasks), limit=r.limit, seed=r.seed, results=store_dir, force=True,
                           batch_size=r.batch_size, ppl_seq_len=r.ppl_seq_len, ppl_windows=r.ppl_windows,
                           latency_seq_len=r.latency_seq_len, latency_repeats=1, decode_tokens=8, threads=r.threads,
                           device="cpu", dtype="float32", determinism_task=r.determinism_task)
    print(f"[gate] model={r.model} methods=dense,{','.join(methods)} sparsity={r.sparsity} tasks="
          f"{','.join(r.tasks)} limit={r.limit} ppl windows={r.ppl_windows}x{r.ppl_seq_len} threads={r.threads} "
          f"store={store_dir}", flush=True)
    start = time.perf_counter()
    runner = Runner(run_config)
    runner.run()
    rows = runner.store.load_rows()
    rows = rows[rows["cell"].isin(runner.run_cells)]
    summary = summarize(rows, runner.store)
    determinism = determinism_record(rows, r.determinism_task)
    current = {"format": BASELINE_FORMAT, "run": run_config_dict(config),
               "methods": gate_records(rows, summary), "determinism": determinism, "skipped": skipped,
               "provenance": {k: runner.provenance.columns()[k] for k in ("torch", "transformers", "lm_eval",
                                                                          "git_commit", "threads", "timestamp")}}
    print()
    print(format_summary(summary))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in runner.clock.seconds.items())
    print(f"\n[gate] wall time {time.perf_counter() - start:.0f}s ({stages}); timings are reported, never gated")
    if update:
        checks = compare(baseline, current, config) if baseline else []
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        stored = {k: v for k, v in current.items() if k != "skipped"}
        baseline_file.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        print(f"\n[gate] baseline rewritten: {baseline_file}; diff against the previous one (review before "
              "committing):")
        print(format_checks(checks) if baseline else "(no previous baseline)")
        return 0
    checks = compare(baseline, current, config)
    failures = [c for c in checks if c.status == "FAIL"]
    print()
    print(format_checks(checks))
    if failures:
        print(f"\n[gate] FAILED: {len(failures)} check(s) out of tolerance (table above). If the change is "
              "intended, run `python -m bench gate --update-baseline` and commit results/baseline/gate.json.")
        return 1
    print(f"\n[gate] passed: {sum(c.status == 'ok' for c in checks)} checks within tolerance")
    return 0
