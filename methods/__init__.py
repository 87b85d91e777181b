"""Registry of pruning methods. Entries are lazy "module:Class" placeholders (plus default field values for
named variants) so that importing the CLI stays fast and a broken method cannot break the others."""

from __future__ import annotations

import importlib
from difflib import get_close_matches
from typing import TYPE_CHECKING

from methods.errors import MethodConfigError

if TYPE_CHECKING:
    from methods.base import CalibrationSet, Method


def __getattr__(name: str):
    """`Method` and `CalibrationSet` load torch: imported on first use, so the registry (and the CLI) starts without."""
    if name in ("CalibrationSet", "Method"):
        from methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'methods' has no attribute {name!r}")

# name -> (import target, default field overrides). Variants are the same class with other defaults.
_REGISTRY: dict[str, tuple[str, dict]] = {
    "dense": ("methods.dense:Dense", {}),
    "random": ("methods.random_layers:RandomLayers", {}),
    "tail": ("methods.tail_layers:TailLayers", {}),
    "shortgpt": ("methods.shortgpt:ShortGPT", {}),
    "blockpruner": ("methods.blockpruner:BlockPruner", {}),
    "sdtp": ("methods.sdtp:SDTP", {}),
    "sdtp-random": ("methods.sdtp:SDTP", {"scores": "random"}),
    "ftp": ("methods.ftp:FTP", {}),
    "ftp-static": ("methods.ftp:FTP", {"router": "static"}),
    "ftp-uniform": ("methods.ftp:FTP", {"schedule": "uniform"}),
    "ftp-random": ("methods.ftp:FTP", {"router": "random"}),
    "ftp-nopos": ("methods.ftp:FTP", {"position_input": False}),
    "ftp-nosparsity": ("methods.ftp:FTP", {"sparsity_input": False, "selection": "topk"}),
    "ftp-topk": ("methods.ftp:FTP", {"selection": "topk"}),
}


def register(name: str, target: str, **defaults) -> None:
    """Register a method (or a variant of one) by a lazy "module:Class" target."""
    _REGISTRY[name] = (target, defaults)


def available_methods() -> list[str]:
    return list(_REGISTRY)


def _unknown(name: str) -> MethodConfigError:
    close = get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return MethodConfigError(f"unknown method {name!r}{hint} (available: {', '.join(_REGISTRY)})")


def variant_defaults(name: str) -> dict:
    """The field values a registered variant sets (empty for a method registered as itself)."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return dict(_REGISTRY[name][1])


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise _unknown(name)
    module, _, attr = _REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), attr)


def make_method(name: str, **fields) -> Method:
    """Instantiate a registered method; `fields` override the variant's defaults."""
    if name not in _REGISTRY:
        raise _unknown(name)
    cls = method_class(name)
    kwargs = {**_REGISTRY[name][1], **fields}
    try:
        method = cls(**kwargs)
    except TypeError as exc:
        raise MethodConfigError(f"{name}: {exc}") from exc
    method.registry_name = name
    return method


__all__ = ["CalibrationSet", "Method", "MethodConfigError", "available_methods", "make_method", "method_class",
           "register", "variant_defaults"]
