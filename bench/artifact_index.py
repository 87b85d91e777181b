"""The index of the calibration artifacts committed in methods/artifacts/: for each, the method, model, target,
seed and calibration time from its key, and what reaches it — the study files (configs/*.toml, the gate's) and the
plain `run` of each registered method on each embedded model at c = 0.25 and seeds 0-2. An artifact nothing
reaches is history: no command of the product loads it any more. `python -m bench list --artifacts` prints the
index; methods/artifacts/README.md is that output, and a test checks it is current."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from bench.artifacts import COMMITTED_DIR, artifact_name
from bench.gate import DEFAULT_CONFIG, load_gate_config
from bench.models import MODELS
from bench.paths import REPO_ROOT
from bench.plan import RunConfig, plan_methods
from bench.shapes import model_shape
from bench.study import load_study
from methods import available_methods

INDEX_FILE = COMMITTED_DIR / "README.md"
PLAIN_SPARSITY = 0.25  # `run`'s default target
PLAIN_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Entry:
    name: str  # the directory, <method>-<key hash>
    method: str  # the registered name(s) whose fields give this key, or the class
    model: str
    target: float | None  # the key's target sparsity; None where the artifact serves every target (ShortGPT)
    seed: int
    seconds: float | None
    created: str
    reached_by: tuple[str, ...]


def _study_configs() -> list[tuple[str, object]]:
    """(label, RunConfig) for every shipped study file."""
    configs = []
    for path in sorted((REPO_ROOT / "configs").glob("*.toml")):
        study = load_study(path)
        fields = {k: v for k, v in study.items() if k in RunConfig.__dataclass_fields__}
        configs.append((str(path.relative_to(REPO_ROOT)), RunConfig(**fields)))
    gate = load_gate_config()
    configs.append((str(Path(DEFAULT_CONFIG).resolve().relative_to(REPO_ROOT)),
                    RunConfig(model=gate.run.model, methods=[m.name for m in gate.methods],
                              sparsities=[gate.run.sparsity], seed=gate.run.seed)))
    return configs


def _variants(label: str, config, sparsities) -> list[tuple[str, object]]:
    """(label, RunConfig) of `config` narrowed to each registered method, seed 0-2 and target in `sparsities`:
    what `run [--config FILE] --methods NAME --seed N --sparsity S` plans."""
    variants = []
    for name in available_methods():
        if name == "dense":
            continue
        for seed in PLAIN_SEEDS:
            for sparsity in sparsities:
                options = f"--methods {name}" + (f" --sparsity {sparsity:g}" if sparsity != PLAIN_SPARSITY else "") \
                    + (f" --seed {seed}" if seed else "")
                variants.append((f"{label} {options}".strip(), replace(
                    config, methods=[name], sparsities=[sparsity], seed=seed, calibration_seeds=None)))
    return variants


def _reached(targets: set[float]) -> dict[str, list[str]]:
    """artifact directory name -> the commands whose plan loads it: a study file as shipped, then (where that does
    not) the same file or a plain `run` narrowed to one method, seed and target."""
    sparsities = sorted({PLAIN_SPARSITY, *targets})
    studies = _study_configs()
    candidates = list(studies)
    for label, config in studies:
        candidates += _variants(label, config, config.sparsities)
    for label, config in studies:  # a study file on the other embedded model (`--model M`)
        for model in MODELS:
            if model != config.model:
                candidates += _variants(f"{label} --model {model}", replace(config, model=model), config.sparsities)
    for model in MODELS:
        plain = "run" + (f" --model {model}" if model != "smollm2-135m" else "")
        candidates += _variants(plain, RunConfig(model=model), sparsities)
    reached: dict[str, list[str]] = {}
    for label, config in candidates:
        for method in plan_methods(config, model_shape(config.model)):
            if method.needs_calibration:
                labels = reached.setdefault(artifact_name(config.model, method, method.seed), [])
                if not any(label.startswith(f"{earlier} ") or label == earlier for earlier in labels):
                    labels.append(label)
    return reached


def registered_name(key: dict) -> str:
    """The registered variant whose defaults the key's fields hold (the most specific), else the class name."""
    from methods import available_methods, method_class, variant_defaults

    fields = key.get("fields", {})
    best, best_size = key["method"], -1
    for name in available_methods():
        if method_class(name).__name__ != key["method"]:
            continue
        defaults = variant_defaults(name)
        if all(fields.get(k) == v for k, v in defaults.items()) and len(defaults) > best_size:
            best, best_size = name, len(defaults)
    return best


def index_entries() -> list[Entry]:
    metas = {path.parent.name: json.loads(path.read_text()) for path in sorted(COMMITTED_DIR.glob("*/artifact.json"))}
    targets = {m["key"].get("fields", {}).get("sparsity") for m in metas.values()} - {None}
    reached = _reached(targets)
    entries = []
    for name, meta in metas.items():
        key = meta["key"]
        fields = key.get("fields", {})
        entries.append(Entry(
            name=name, method=registered_name(key), model=key["model"], target=fields.get("sparsity"),
            seed=int(key["calibration"]["seed"]), seconds=meta.get("calibration_seconds"),
            created=str(meta.get("created", ""))[:10], reached_by=tuple(reached.get(name, ()))))
    return sorted(entries, key=lambda e: (not e.reached_by, e.model, e.method, e.target or 0, e.seed, e.created))


def format_index(entries: list[Entry]) -> str:
    served = [e for e in entries if e.reached_by]
    history = [e for e in entries if not e.reached_by]
    lines = [
        "# Committed calibration artifacts",
        "",
        "Generated by `python -m bench list --artifacts` (a test checks this file is current). Each directory is one",
        "artifact, named `<method>-<hash of its key>` (bench/artifacts.py: model, method, code version, the fields",
        "that shape calibration, the calibration data). `run` looks in the user cache first, then here, so a study",
        "needs no training when its artifacts are listed. *Reached by*: the study files whose plan loads it as",
        "shipped, else the first narrowing of one (`--methods`, `--seed`, `--sparsity`, `--model`), then a plain `run`",
        "(c = 0.25 unless it says); `-` marks history: no shipped command loads it any more (an earlier recipe's",
        "fields), kept while a committed page cites it.",
        "",
        f"{len(entries)} artifacts: {len(served)} reached, {len(history)} history.",
        "",
        "| artifact | method | model | target c | seed | calibration s | created | reached by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def shown(labels: tuple[str, ...]) -> list[str]:
        """The study files that load it as shipped, else its first narrowed study; then its first plain run."""
        shipped = [r for r in labels if not r.startswith("run") and " --" not in r]
        narrowed = [r for r in labels if not r.startswith("run") and " --" in r][:1]
        return [*(shipped or narrowed), *[r for r in labels if r.startswith("run")][:1]]

    for e in served + history:
        target = "all" if e.target is None else f"{e.target:g}"
        seconds = "-" if e.seconds is None else f"{e.seconds:.0f}"
        lines.append(f"| `{e.name}` | {e.method} | {e.model} | {target} | {e.seed} | {seconds} | {e.created} | "
                     f"{', '.join(f'`{r}`' for r in shown(e.reached_by)) or '-'} |")
    return "\n".join(lines) + "\n"
