"""`bench perf --methods`: the table's ratios from measured speeds, the target verdict, and bad names."""

from __future__ import annotations

from bench.method_perf import MethodSpeed, format_speeds


def test_seconds_per_flop_is_time_ratio_over_flop_ratio():
    dense = MethodSpeed("dense", 100, seconds=10.0, executed_flops=1000)
    fast = MethodSpeed("shortgpt", 100, seconds=7.5, executed_flops=750)  # time follows FLOPs: 1.00
    slow = MethodSpeed("ftp", 100, seconds=30.0, executed_flops=1500, solve_s=2.0, knob_value=1.2)  # 2.00
    text = format_speeds([dense, fast, slow, MethodSpeed("dense", 100, 10.5, 1000)], matmul_flops=1000.0)
    header, shortgpt, ftp, *notes = text.splitlines()
    assert shortgpt.split()[:6] == ["shortgpt", "75.0", "0.75", "0.75", "1.00", "yes"]
    assert ftp.split()[:8] == ["ftp", "300.0", "3.00", "1.50", "2.00", "NO", "2.0", "1.2"]
    assert "dense vs dense control 1.05" in notes[0] and "= 10% of it" in notes[1]


def test_unknown_method_is_one_clear_error(capsys):
    from bench.cli import main

    assert main(["perf", "--methods", "ftpp"]) == 2
    assert "unknown method 'ftpp'" in capsys.readouterr().err
