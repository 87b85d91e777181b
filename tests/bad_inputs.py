"""Every bad input of issue 17 as a replayable case: what the user does, and the one line bench answers with.
tests/test_bad_inputs.py checks each case; scripts/bad_inputs_table.py prints them as docs/robustness.md's table.

A case runs in this process in a scratch directory and returns (exit code, stderr): CLI cases through
`bench.cli.main`, damaged-cache cases through the function a run calls, with a BenchError shown as the CLI
shows it (`error: ...`, exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from bench.errors import BenchError
from methods.base import Method


@dataclass(frozen=True)
class Case:
    name: str  # test id
    what: str  # the input, as docs/robustness.md's table shows it
    run: Callable[[Path], tuple[int, str]]
    expected: str  # in the one line of stderr
    code: int = 2  # 2: refused with the fix; 0: recovered (one warning line)


def _captured(fn: Callable[[], object]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            result = fn()
        except BenchError as exc:
            print(f"error: {exc}", file=err)
            return 2, err.getvalue()
        except SystemExit as exc:
            return int(exc.code), err.getvalue()
    return (result if isinstance(result, int) else 0), err.getvalue()


def cli(*argv: str, setup: Callable[[Path], None] | None = None) -> Callable[[Path], tuple[int, str]]:
    def run(tmp: Path) -> tuple[int, str]:
        from bench.cli import main

        if setup:
            setup(tmp)
        return _captured(lambda: main([a.format(tmp=tmp) for a in argv]))
    return run


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


# -- damaged caches and data (what a run reads back) ---------------------------------------------------------
def _tiny_build(tmp: Path) -> None:
    from bench.models import tiny_llama

    tiny_llama(num_layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32, vocab=32).save_pretrained(tmp)


def _model_cache(damage: Callable[[Path], None]) -> Callable[[Path], tuple[int, str]]:
    def run(tmp: Path) -> tuple[int, str]:
        from bench.cachedir import cached_dir, problem

        target = cached_dir(tmp / "models" / "tiny", _tiny_build)
        damage(target / "model.safetensors")
        code, err = _captured(lambda: cached_dir(target, _tiny_build))
        assert problem(target) is None, "the damaged cache was not rebuilt"
        return code, err
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


class _Chars:
    """A byte-level stand-in tokenizer: calibration windows without loading a real one."""

    eos_token, name_or_path = "\n", "bytes"

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": list(text[:4096].encode("utf-8", "replace")[:4096])}


@dataclass
class _TensorMethod(Method):
    """A calibrated method whose artifact holds a tensor, as SDTP's and FTP's do (calibration: instant)."""

    name: ClassVar[str] = "sdtp"
    needs_calibration: ClassVar[bool] = True
    default_calibration: ClassVar[dict] = {"n_samples": 1, "seq_len": 8}

    def calibrate(self, model, tokenizer, calibration):
        return {"keep": [0.9, 0.8], "w": torch.ones(64, 64)}


def _tensor_method() -> Method:
    return _TensorMethod(sparsity=0.25)


def _artifact(damage: Callable[[Path], None], committed: bool = False) -> Callable[[Path], tuple[int, str]]:
    """What `run` does (ensure_calibrated, force=False) with a damaged cached or committed artifact entry."""
    def run(tmp: Path) -> tuple[int, str]:
        import os

        from bench import artifacts

        saved = os.environ.get("BENCH_CACHE"), artifacts.COMMITTED_DIR
        os.environ["BENCH_CACHE"] = str(tmp / "cache")
        artifacts.COMMITTED_DIR = tmp / "methods" / "artifacts"
        try:
            save_to = artifacts.COMMITTED_DIR if committed else None
            info = artifacts.ensure_calibrated(_tensor_method(), None, _Chars(), "tiny", save_to=save_to)
            damage(Path(info["path"]))
            return _captured(lambda: artifacts.ensure_calibrated(_tensor_method(), None, _Chars(), "tiny"))
        finally:
            os.environ.pop("BENCH_CACHE")
            if saved[0] is not None:
                os.environ["BENCH_CACHE"] = saved[0]
            artifacts.COMMITTED_DIR = saved[1]
    return run


def _store_with_damaged(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Two accuracy cells (rows + samples) written by the store, then one of them damaged."""
    def setup(tmp: Path) -> None:
        from bench.store import Store

        store = Store(tmp / "results")
        for cell in ("healthy", "damaged"):
            store.write(cell, {"unit": "piqa"}, [{"cell": cell, "method": "dense", "task": "piqa", "metric": "acc",
                                                  "value": 0.5}], samples=[{"doc_id": 0, "acc": 1.0}])
        damage(store.cell_dir("damaged"))
    return setup


def _data_manifest(text: str) -> Callable[[Path], tuple[int, str]]:
    def run(tmp: Path) -> tuple[int, str]:
        from bench import datafiles

        copy = tmp / "data"
        shutil.copytree(datafiles.DATA_DIR, copy)
        (copy / "MANIFEST.json").write_text(text)
        original = datafiles.DATA_DIR
        datafiles.DATA_DIR = copy
        datafiles.manifest.cache_clear()
        datafiles.read_verified.cache_clear()  # a file read earlier in the session must be read (and checked) again
        try:
            return _captured(lambda: datafiles.read_text("piqa/valid.jsonl"))
        finally:
            datafiles.DATA_DIR = original
            datafiles.manifest.cache_clear()
            datafiles.read_verified.cache_clear()
    return run


CASES: list[Case] = [
    Case("results-is-file", "`run --results PATH`, PATH an existing file",
         cli("run", "--results", "{tmp}/file", setup=_write("file", "x")), "is an existing file, not a directory"),
    Case("results-unwritable", "`run --results DIR`, DIR not writable (here /sys/bench-results)",
         cli("run", "--results", "/sys/bench-results"), "cannot write in /sys"),
    Case("latency-repeats-0", "`run --latency-repeats 0`", cli("run", "--latency-repeats", "0"),
         "argument --latency-repeats: must be a positive integer"),
    Case("ppl-seq-len-0", "`run --ppl-seq-len 0`", cli("run", "--ppl-seq-len", "0"),
         "argument --ppl-seq-len: must be a positive integer"),
    Case("threads-0", "`run --threads 0`", cli("run", "--threads", "0"), "argument --threads: must be a positive"),
    Case("batch-size-0", "`run --batch-size 0`", cli("run", "--batch-size", "0"), "argument --batch-size: must be"),
    Case("ppl-windows-0", "`run --ppl-windows 0`", cli("run", "--ppl-windows", "0"), "argument --ppl-windows: must"),
    Case("tasks-empty", "`run --tasks ''`", cli("run", "--tasks", ""), "argument --tasks: empty list"),
    Case("methods-empty", "`run --methods ''`", cli("run", "--methods", ""), "argument --methods: empty list"),
    Case("sparsity-empty", "`run --sparsity ''`", cli("run", "--sparsity", ""), "argument --sparsity: empty list"),
    Case("report-out-is-file", "`report --out PATH`, PATH an existing file",
         cli("report", "--out", "{tmp}/file", setup=_write("file", "x")), "--out"),
    Case("baseline-invalid-json", "`gate --baseline FILE`, FILE invalid JSON",
         cli("gate", "--baseline", "{tmp}/b.json", setup=_write("b.json", "{oops")), "is not valid JSON"),
    Case("baseline-list", "`gate --baseline FILE`, FILE a JSON list",
         cli("gate", "--baseline", "{tmp}/b.json", setup=_write("b.json", "[1, 2]")), "holds a JSON list"),
    Case("baseline-missing", "`gate --baseline FILE`, FILE missing", cli("gate", "--baseline", "{tmp}/none.json"),
         "does not exist"),
    Case("gate-config-garbled", "`gate --config FILE`, FILE not TOML",
         cli("gate", "--config", "{tmp}/g.toml", setup=_write("g.toml", "[run\nx=")), "is not valid TOML"),
    Case("model-cache-truncated", "the cached dequantised model's safetensors truncated",
         _model_cache(_truncate), "rebuilding it", code=0),
    Case("model-cache-garbled", "the cached dequantised model's safetensors header garbled",
         _model_cache(_garble_header), "rebuilding it", code=0),
    Case("model-cache-legacy-truncated", "a model cache built before the manifest, its safetensors truncated",
         _model_cache(lambda p: ((p.parent / "bench-manifest.json").unlink(), _truncate(p))), "incomplete metadata",
         code=0),
    Case("cell-samples-truncated", "a cell's `_samples.jsonl.gz` truncated, then `table` (or `report`, `run`)",
         cli("table", "--results", "{tmp}/results",
             setup=_store_with_damaged(lambda d: _truncate(d / "_samples.jsonl.gz"))),
         "damaged: _samples.jsonl.gz does not match its recorded sha256", code=0),
    Case("cell-samples-missing", "a cell's `_samples.jsonl.gz` deleted, then `table`",
         cli("table", "--results", "{tmp}/results",
             setup=_store_with_damaged(lambda d: (d / "_samples.jsonl.gz").unlink())),
         "damaged: _samples.jsonl.gz is missing", code=0),
    Case("cell-rows-garbled", "a cell's `rows.parquet` garbled among healthy cells, then `table`",
         cli("table", "--results", "{tmp}/results",
             setup=_store_with_damaged(lambda d: (d / "rows.parquet").write_bytes(b"PAR1 garbage"))),
         "damaged: rows.parquet does not match", code=0),
    Case("artifact-tensors-truncated", "a cached artifact's `tensors.safetensors` truncated",
         _artifact(lambda e: _truncate(e / "tensors.safetensors")), "recalibrating it", code=0),
    Case("artifact-tensors-garbled", "a cached artifact's `tensors.safetensors` header garbled",
         _artifact(lambda e: _garble_header(e / "tensors.safetensors")), "recalibrating it", code=0),
    Case("artifact-json-list", "a cached artifact's JSON replaced by a JSON list",
         _artifact(lambda e: (e / "artifact.json").write_text("[1, 2]")), "not an artifact record", code=0),
    Case("committed-artifact-damaged", "a committed artifact (`methods/artifacts/`) truncated",
         _artifact(lambda e: _truncate(e / "tensors.safetensors"), committed=True), "it ships with the repository"),
    Case("data-manifest-garbled", "the vendored data manifest garbled", _data_manifest("{not json"),
         "data manifest"),
    Case("data-manifest-list", "the vendored data manifest a JSON list", _data_manifest(json.dumps([1, 2])),
         "holds a JSON list"),
    Case("ray-address-unreachable", "`run --executor ray --ray-address 127.0.0.1:1` (nothing listens there)",
         cli("run", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--methods", "shortgpt", "--tasks", "piqa",
             "--limit", "1", "--results", "{tmp}/results"), "--ray-address 127.0.0.1:1: nothing answers there"),
    Case("ray-address-malformed", "`run --executor ray --ray-address head-node` (no port)",
         cli("run", "--executor", "ray", "--ray-address", "head-node", "--methods", "shortgpt", "--tasks", "piqa",
             "--limit", "1", "--results", "{tmp}/results"), "--ray-address head-node: not host:port"),
]
