"""The research scripts under experiments/ stay importable against the product's current API (they are not run:
each reads committed artifacts or trains, which the docs' commands do)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import experiments.ftp

MODULES = sorted(m.name for m in pkgutil.iter_modules(experiments.ftp.__path__))


def test_the_ftp_experiments_are_all_listed():
    assert {"artifacts", "decode_quality", "router_trial"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_ftp_experiment_imports(name):
    module = importlib.import_module(f"experiments.ftp.{name}")
    assert module.__doc__, f"experiments/ftp/{name}.py says what it measures in its docstring"
