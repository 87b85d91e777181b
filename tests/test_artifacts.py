"""Calibration artifacts: content-hash keys, atomic cache entries, and the committed artifacts' integrity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.artifacts import (
    COMMITTED_DIR,
    CalibrationSettings,
    artifact_key,
    ensure_calibrated,
    key_hash,
    load_artifact_dir,
)
from methods import make_method

COMMITTED = sorted(p for p in COMMITTED_DIR.glob("*") if (p / "artifact.json").is_file()) if COMMITTED_DIR.is_dir() else []


@pytest.mark.parametrize("entry", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_artifact_matches_its_recorded_hashes(entry: Path):
    artifact, meta = load_artifact_dir(entry)  # raises on a content-hash mismatch
    assert entry.name.endswith(key_hash(meta["key"])), "directory name must be the hash of the recorded key"
    assert artifact


def test_committed_shortgpt_artifact_is_found_by_key():
    method = make_method("shortgpt", sparsity=0.25)
    key = artifact_key("smollm2-135m", method, CalibrationSettings.for_method(method, seed=0))
    assert (COMMITTED_DIR / f"shortgpt-{key_hash(key)}").is_dir()


def test_key_ignores_sparsity_only_where_the_method_says_so():
    settings = CalibrationSettings(n_samples=4, seq_len=32, source="c4", seed=0)
    a = key_hash(artifact_key("m", make_method("shortgpt", sparsity=0.1), settings))
    b = key_hash(artifact_key("m", make_method("shortgpt", sparsity=0.4), settings))
    c = key_hash(artifact_key("m", make_method("shortgpt", sparsity=0.4, reference_last_layer_norm=True), settings))
    d = key_hash(artifact_key("m", make_method("shortgpt", sparsity=0.4), CalibrationSettings(4, 32, "c4", 1)))
    assert a == b and len({a, c, d}) == 3


def test_calibrate_once_then_load_from_cache(tiny_with_real_vocab, real_tokenizer, monkeypatch):
    method = make_method("shortgpt", sparsity=0.25)
    monkeypatch.setattr(type(method), "default_calibration", {"n_samples": 2, "seq_len": 16})
    first = ensure_calibrated(method, tiny_with_real_vocab, real_tokenizer, "tiny-test")
    assert first["cached"] is None
    again = make_method("shortgpt", sparsity=0.5)
    calls = []
    monkeypatch.setattr(type(again), "calibrate", lambda *a: calls.append(a) or {})
    second = ensure_calibrated(again, tiny_with_real_vocab, real_tokenizer, "tiny-test")
    assert second["cached"] and not calls
    assert again.artifact["ranking"] == method.artifact["ranking"]
    assert isinstance(again.artifact["block_influence"], list) and not isinstance(again.artifact, torch.Tensor)


def test_the_artifact_index_is_current_and_every_history_entry_is_cited():
    """methods/artifacts/README.md is what `bench list --artifacts` prints today; every committed artifact is in it
    once; the default study's artifacts are reached by a plain `run`; an artifact no shipped command loads is cited
    by a committed page (or it should go)."""
    from bench.artifact_index import INDEX_FILE, format_index, index_entries
    from bench.paths import REPO_ROOT

    entries = index_entries()
    assert INDEX_FILE.read_text() == format_index(entries), "rerun `python -m bench list --artifacts > " \
        "methods/artifacts/README.md`"
    assert sorted(e.name for e in entries) == sorted(p.name for p in COMMITTED)
    plain = {e.method for e in entries if e.model == "smollm2-135m" and e.seed == 0
             and any(r == f"run --methods {e.method}" for r in e.reached_by)}
    assert {"shortgpt", "blockpruner", "sdtp", "ftp"} <= plain
    pages = "\n".join(p.read_text() for p in [*(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md"])
    for entry in entries:
        if not entry.reached_by:
            assert entry.name in pages, f"{entry.name}: no shipped command loads it and no page cites it"
