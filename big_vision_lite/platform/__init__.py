"""The implementation layer: models call `attention`, `layer_norm` and jit with
`compiler_options()`; config keys choose the implementation per backend (see dispatch.py).

The names load dispatch.py (and JAX) on first use, so that platform.cpu's allocator helpers
stay importable without JAX (launch/cpu.sh).
"""

import importlib

__all__ = ["ATTENTION", "AUTO", "CPU_DOTS", "KEYS", "NORM", "Impl", "PlatformConfigError",
           "Settings", "attention", "check", "compiler_options", "configure", "decisions",
           "layer_norm", "override", "settings"]


def __getattr__(name: str):
  if name in __all__:
    return getattr(importlib.import_module("big_vision_lite.platform.dispatch"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
