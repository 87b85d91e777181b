"""bench.console: a run shows bench's own bars and its summary; what lm-eval, datasets and transformers print
goes to <results>/run.log (issue 32)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

# every bar bench itself draws on a run of this study (the outer one, a cell's scoring, perplexity, calibration)
OWN_BARS = ("methods", "scoring (", "wikitext2 ppl", "shortgpt: block influence")


@pytest.fixture
def model_dir(tmp_path, tiny_with_real_vocab, real_tokenizer):
    path = tmp_path / "model"
    tiny_with_real_vocab.save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


def _run(model_dir, results, *extra):
    from bench.cli import main

    # HellaSwag: lm-eval's process_docs is a datasets map; LAMBADA: its perplexity metric is bootstrapped
    return main(["run", "--model", str(model_dir), "--methods", "shortgpt", "--tasks", "hellaswag,lambada_openai",
                 "--limit", "3", "--ppl-windows", "1", "--results", str(results), *extra])


def _fragments(stderr: str) -> list[str]:
    """What a terminal would show as separate lines: bars redraw with \\r and move with ESC[A."""
    return [f.strip() for f in re.split(r"[\r\n]|\x1b\[A", stderr) if f.strip()]


def test_stderr_holds_only_benchs_bars_and_the_libraries_output_is_logged(model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    assert _run(model_dir, tmp_path / "r") == 0
    captured = capsys.readouterr()
    fragments = _fragments(captured.err)
    assert fragments, "no progress shown at all"
    assert [f for f in fragments if not f.startswith(OWN_BARS)] == []
    assert "bootstrapping for stddev" not in captured.out and "Map" not in captured.err
    assert "bootstrapping for stddev: perplexity" in (tmp_path / "r" / "run.log").read_text()
    assert "[bench] wall time" in captured.out  # the summary is still there


def test_no_progress_prints_nothing_on_stderr(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    assert _run(model_dir, tmp_path / "r", "--no-progress") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "shortgpt" in captured.out


def test_verbose_leaves_the_libraries_output_on_the_terminal(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    assert _run(model_dir, tmp_path / "r", "--verbose") == 0
    captured = capsys.readouterr()
    assert "bootstrapping for stddev: perplexity" in captured.out
    assert not (tmp_path / "r" / "run.log").exists()
