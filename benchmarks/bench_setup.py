"""The trainer's CPU settings for the benchmark scripts, so their numbers are the trainer's.

Each script prints `cpu_line()` first: the same code ranks differently against torch on
different CPUs (RESULTS.md, round 10), so a number without its CPU cannot be compared.

The trainer restarts itself with the block cache preloaded (block_cache.restart: freed large
blocks are kept for reuse), makes glibc keep the memory XLA:CPU frees
(host_memory.keep_freed_memory, which must run before JAX starts its backends) and compiles
with xla_options.compiler_options(). A script adds `--malloc` with `add_malloc_flag`, calls
`keep_freed_memory(args.malloc)` first thing (it may restart the script) and prints the line
it returns.
"""

from __future__ import annotations

import argparse
import resource
import sys

from big_vision_lite import block_cache, host_cpu, host_memory


def add_malloc_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--malloc", default="keep", choices=("keep", "default"),
                  help="'keep' (as the trainer): large blocks are cached for reuse "
                       "(BVL_BLOCK_CACHE=0: not) and glibc keeps freed memory mapped, so "
                       "XLA:CPU's temporaries are reused without page faults; 'default': glibc "
                       "as it is")


def cpu_line() -> str:
  """'CPU: <model> (<vendor> family F model M), N cores, <vector ISA flags>'."""
  return "CPU: " + host_cpu.describe()


def keep_freed_memory(choice: str) -> str:
  """Applies `--malloc` and returns a line saying what holds; call it first thing.

  "keep" restarts the script once with the block cache (see block_cache.restart). Any other
  choice (vs_pytorch.py also has "hugepages") leaves glibc's heap as it is.
  """
  if choice != "keep":
    return f"glibc keeps freed memory: no (--malloc {choice}); large blocks cached: no"
  cache = block_cache.restart(sys.orig_argv[1:])
  why_not = host_memory.keep_freed_memory()
  return ("glibc keeps freed memory: " + ("yes" if why_not is None else f"no ({why_not})")
          + "; large blocks cached: " + ("yes" if cache is None else f"no ({cache})"))


def memory_line() -> str:
  """This process's peak resident memory, and the block cache's counters where it is on."""
  # ru_maxrss is in KiB on Linux (bytes on macOS, where the cache does not apply either).
  scale = 1 if sys.platform == "darwin" else 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  line = f"peak resident memory {peak / 2**30:.2f} GiB"
  if (counters := block_cache.counters()) is not None:
    line += f"; {counters}"
  return line
