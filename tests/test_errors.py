"""Every bad input gives one clear message with the fix, a non-zero exit, no traceback, and no store damage."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from bench import datafiles
from bench.cli import main
from bench.errors import BenchError


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["run", "--methods", "shortgtp"], "did you mean 'shortgpt'"),
    (["run", "--tasks", "pika"], "did you mean 'piqa'"),
    (["run", "--methods", "shortgpt", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["run", "--methods", "shortgpt", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["run", "--methods", "shortgpt", "--model", "smollm3-135m"], "did you mean 'smollm2-135m'"),
    (["calibrate", "--method", "blokpruner"], "unknown method 'blokpruner'"),
])
def test_bad_input_one_message_and_store_untouched(tmp_path, capsys, argv, expected):
    results = tmp_path / "results"
    code, err = _run(capsys, *argv, *(["--results", str(results)] if argv[0] == "run" else []))
    assert code == 2
    assert expected in err and err.startswith("error: ") and "Traceback" not in err
    assert not results.exists()


def test_calibrate_takes_a_study_files_method_fields(tmp_path, capsys):
    """`calibrate --config` applies the file's [fields.METHOD] (checked before any model loads) and names a
    missing file."""
    study = tmp_path / "study.toml"
    study.write_text("[fields.ftp]\ntrain_min_seq_len = 600\n")
    code, err = _run(capsys, "calibrate", "--method", "ftp-uniform", "--config", str(study))
    assert code == 2 and "train_min_seq_len must be in [1, train_seq_len=512]" in err and "Traceback" not in err
    code, err = _run(capsys, "calibrate", "--method", "ftp", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and "no such file" in err


def test_bad_limit_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--limit", "zero"])
    assert exc.value.code == 2
    assert "argument --limit: takes a positive integer or 'none'" in capsys.readouterr().err


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(datafiles.DATA_DIR, copy)
    monkeypatch.setattr(datafiles, "DATA_DIR", copy)
    datafiles.read_verified.cache_clear()
    yield copy
    datafiles.read_verified.cache_clear()


def test_missing_data_file(data_copy):
    (data_copy / "piqa__valid.jsonl.xz").unlink()
    with pytest.raises(BenchError, match="is missing; restore it with `git checkout -- bench/data`"):
        datafiles.read_verified("piqa/valid.jsonl")


def test_corrupt_data_file_is_detected_by_checksum(data_copy):
    import lzma

    path = data_copy / "piqa__valid.jsonl.xz"
    raw = bytearray(lzma.decompress(path.read_bytes()))
    raw[100] ^= 1  # one flipped bit, still valid xz
    path.write_bytes(lzma.compress(bytes(raw)))
    with pytest.raises(BenchError, match="is corrupt: sha256"):
        datafiles.read_verified("piqa/valid.jsonl")


def test_truncated_archive_is_detected(data_copy):
    path = data_copy / "piqa__valid.jsonl.xz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BenchError, match="is corrupt"):
        datafiles.read_verified("piqa/valid.jsonl")


def test_corrupt_cache_entry(tmp_path, tiny, tiny_calibration):
    from bench.artifacts import load_artifact_dir, save_artifact

    entry = tmp_path / "shortgpt-abc"
    save_artifact(entry, {"k": 1}, {"ranking": [1, 0], "block_influence": [0.2, 0.1]}, 1.0)
    assert load_artifact_dir(entry)[0]["ranking"] == [1, 0]
    text = (entry / "artifact.json").read_text().replace('"ranking": [\n   1,', '"ranking": [\n   5,')
    (entry / "artifact.json").write_text(text)
    with pytest.raises(BenchError, match="corrupt .*--force"):
        load_artifact_dir(entry)
    (entry / "artifact.json").write_text("{not json")
    with pytest.raises(BenchError, match="corrupt"):
        load_artifact_dir(entry)


def test_corrupt_results_entry_is_skipped_with_one_warning(tmp_path, capsys):
    from bench.store import Store

    store = Store(tmp_path / "results")
    for cell in ("abc", "def"):
        store.write(cell, {"x": 1}, [{"cell": cell, "method": "dense", "task": "piqa", "metric": "acc", "value": 0.5}])
    assert _run(capsys, "table", "--results", str(store.root))[0] == 0
    (store.cell_dir("abc") / "rows.parquet").write_bytes(b"garbage")
    code = main(["table", "--results", str(store.root)])
    out, err = capsys.readouterr()
    assert code == 0 and "def" in out and "abc" not in out  # the healthy cell is read, the damaged one skipped
    assert err.count("\n") == 1 and err.startswith("warning: skipped 1 damaged results cell")
    assert "abc: rows.parquet does not match its recorded sha256" in err and "rerun" in err
    assert (store.cell_dir("abc") / "rows.parquet").read_bytes() == b"garbage"  # readers change nothing
    assert not store.is_complete("abc") and store.is_complete("def")  # so `run` recomputes it


def test_empty_store_says_what_to_do(tmp_path, capsys):
    code, err = _run(capsys, "report", "--results", str(tmp_path / "nothing"))
    assert code == 2 and "run `python -m bench run` first" in err


def test_cli_prints_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "sdpt,shortgpt",
                           "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown method 'sdpt'")
    assert "Traceback" not in proc.stderr


def test_help_and_table_start_without_torch(tmp_path):
    """`python -m bench --help` (every subcommand's too) and `table` import nothing heavy: no torch, transformers or
    lm-eval, so they answer in a fraction of a second."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['bench'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('bench', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)\n")
    for argv in (["--help"], ["run", "--help"], ["table", "--results", str(tmp_path / "empty")]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in proc.stderr, (argv, proc.stderr[-500:])
