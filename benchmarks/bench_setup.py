"""The trainer's CPU settings for the benchmark scripts, so their numbers are the trainer's.

Each script prints `cpu_line()` first: the same code ranks differently against torch on
different CPUs (RESULTS.md, "vs timm on the AMD EPYC host"), so a number without its CPU cannot be compared.

`python -m big_vision_lite.train` runs with glibc's defaults; `launch/cpu.sh` starts it with
glibc keeping freed memory and the block cache preloaded (platform/cpu/memory.py,
block_cache.py). A script adds `--malloc` with `add_malloc_flag`, calls
`keep_freed_memory(args.malloc)` first thing (for "keep" it restarts the script once in
launch/cpu.sh's environment) and prints the line it returns. Compile options come from
`platform.compiler_options()`, as in the trainer.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

from big_vision_lite.platform.cpu import block_cache, host as host_cpu, memory


def add_malloc_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--malloc", default="default", choices=("keep", "default"),
                  help="'default' (as python -m big_vision_lite.train): glibc as it is; 'keep' "
                       "(as launch/cpu.sh): glibc keeps freed memory mapped and large blocks "
                       "are cached for reuse, so XLA:CPU's temporaries are reused without page "
                       "faults")


def cpu_line() -> str:
  """'CPU: <model> (<vendor> family F model M), N cores, <vector ISA flags>'."""
  return "CPU: " + host_cpu.describe()


def keep_freed_memory(choice: str) -> str:
  """Applies `--malloc` and returns a line saying what holds; call it first thing.

  "keep" restarts the script once in launch/cpu.sh's environment (a benchmark may; the
  trainer never does). Any other choice (vs_pytorch.py also has "hugepages") leaves glibc's
  heap as it is.
  """
  if choice != "keep":
    return f"glibc keeps freed memory: no (--malloc {choice}); large blocks cached: no"
  if not memory.keeps_heap(os.environ):
    try:
      lib = block_cache.library()
    except RuntimeError as e:
      print(f"note: no block cache: {e}", file=sys.stderr)
      lib = None
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              memory.keep_heap_env(os.environ, lib))
  return ("glibc keeps freed memory: yes (GLIBC_TUNABLES); large blocks cached: "
          + ("yes" if block_cache.active() else "no"))


def memory_line() -> str:
  """This process's peak resident memory, and the block cache's counters where it is on."""
  # ru_maxrss is in KiB on Linux (bytes on macOS, where the cache does not apply either).
  scale = 1 if sys.platform == "darwin" else 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  line = f"peak resident memory {peak / 2**30:.2f} GiB"
  if (counters := block_cache.counters()) is not None:
    line += f"; {counters}"
  return line
