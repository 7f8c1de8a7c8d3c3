"""The trainer's CPU settings for the benchmark scripts, so their numbers are the trainer's.

Each script prints `cpu_line()` first: the same code ranks differently against torch on
different CPUs (RESULTS.md, round 10), so a number without its CPU cannot be compared.

The trainer makes glibc keep the memory XLA:CPU frees (host_memory.keep_freed_memory, which must
run before JAX starts its backends) and compiles with xla_options.compiler_options(). A script
adds `--malloc` with `add_malloc_flag`, calls `keep_freed_memory(args.malloc)` before its first
JAX computation and prints the line it returns.
"""

from __future__ import annotations

import argparse

from big_vision_lite import host_cpu, host_memory


def add_malloc_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--malloc", default="keep", choices=("keep", "default"),
                  help="'keep' (as the trainer): glibc keeps freed memory mapped, so XLA:CPU's "
                       "temporaries are reused without page faults; 'default': glibc as it is")


def cpu_line() -> str:
  """'CPU: <model> (<vendor> family F model M), N cores, <vector ISA flags>'."""
  return "CPU: " + host_cpu.describe()


def keep_freed_memory(choice: str) -> str:
  """Applies `--malloc` and returns a line saying what holds; call it before JAX starts.

  Any choice but "keep" (vs_pytorch.py also has "hugepages") leaves glibc's heap as it is.
  """
  if choice != "keep":
    return f"glibc keeps freed memory: no (--malloc {choice})"
  why_not = host_memory.keep_freed_memory()
  return "glibc keeps freed memory: " + ("yes" if why_not is None else f"no ({why_not})")
