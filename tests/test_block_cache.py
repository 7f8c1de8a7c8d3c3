"""The block cache (platform/cpu/block_cache.c, preloaded by launch/cpu.sh): reuse, bounds,
fallbacks to glibc, fork safety, and the launcher that preloads it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from big_vision_lite.platform.cpu import block_cache, memory as host_memory
import test_host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

pytestmark = pytest.mark.skipif(host_memory.glibc_version() is None or
                                not sys.platform.startswith("linux"), reason="glibc on Linux only")


@pytest.fixture(scope="module")
def lib():
  from big_vision_lite.platform.cpu import build as cpu_build
  if cpu_build.compiler("c") is None:
    pytest.skip("no C compiler")
  path = block_cache.library()
  assert path == cpu_build.build(block_cache.SOURCE, language="c")  # cached: the same file
  return path


# Calls the allocator through ctypes in a process that preloads the cache; prints JSON.
_PRELUDE = """
import ctypes, json, os, random, sys, threading
from big_vision_lite.platform.cpu import block_cache
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc.restype = ctypes.c_void_p
libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.aligned_alloc.restype = ctypes.c_void_p
libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
MIB = 1 << 20

def alloc(size, align=64):
  p = ctypes.c_void_p()
  rc = libc.posix_memalign(ctypes.byref(p), ctypes.c_size_t(align), ctypes.c_size_t(size))
  assert rc == 0, rc
  return p.value

def st():
  return block_cache.stats().__dict__
"""


def run_preloaded(lib, body, env=None, timeout=120):
  full_env = {**os.environ, "LD_PRELOAD": lib, **(env or {})}
  out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], env=full_env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_block_is_handed_to_the_next_request_it_fits(lib):
  r = run_preloaded(lib, """
    out = {}
    a = alloc(3 * MIB)
    out["aligned"] = a % 4096 == 0
    out["usable"] = libc.malloc_usable_size(a)
    out["after_alloc"] = st()
    libc.free(a)
    out["after_free"] = st()
    out["same"] = alloc(3 * MIB) == a           # the kept block, not a new mapping
    libc.free(a)
    b = alloc(3 * MIB // 2 + 4096)              # fits the kept 3 MiB (at most twice the size)
    out["b_is_a"] = b == a
    c = alloc(MIB + 4096)                       # the 3 MiB block is taken: a new mapping
    out["small_ours"] = block_cache.stats().live_bytes
    libc.free(b); libc.free(c)
    d = alloc(MIB + 4096)                       # c's block, not the 3 MiB one (over twice d)
    out["d_is_c"] = d == c
    libc.free(d)
    out["end"] = st()
    print(json.dumps(out))
  """)
  assert r["aligned"] and r["usable"] == 3 * MIB
  assert r["after_alloc"] == {"live_bytes": 3 * MIB, "kept_bytes": 0, "peak_live_bytes": 3 * MIB,
                              "mapped": 1, "reused": 0, "unmapped": 0, "min_bytes": MIB,
                              "waits": 0, "waits_served": 0}
  assert r["after_free"]["live_bytes"] == 0 and r["after_free"]["kept_bytes"] == 3 * MIB
  assert r["same"] and r["b_is_a"] and r["d_is_c"]
  assert r["small_ours"] == 3 * MIB + MIB + 4096
  assert r["end"] == {"live_bytes": 0, "kept_bytes": 4 * MIB + 4096, "peak_live_bytes": 4 * MIB + 4096,
                      "mapped": 2, "reused": 3, "unmapped": 0, "min_bytes": MIB, "waits": 0,
                      "waits_served": 0}


def test_live_and_kept_blocks_stay_within_twice_the_peak(lib):
  kib = 1024
  r = run_preloaded(lib, """
    KIB = 1024
    a = alloc(64 * KIB); libc.free(a)              # peak 64 KiB, kept 64
    bs = [alloc(28 * KIB) for _ in range(2)]       # too small for the kept block: mapped
    for b in bs: libc.free(b)                      # kept 120 KiB
    cs = [alloc(12 * KIB) for _ in range(4)]       # fits neither: mapped; 168 KiB in all
    for c in cs: libc.free(c)                      # each would pass 128 KiB: unmapped
    print(json.dumps(st()))
  """, env={"BVL_BLOCK_CACHE_MIN_BYTES": "8192"})
  assert r["peak_live_bytes"] == 64 * kib and r["kept_bytes"] == 120 * kib
  assert r["mapped"] == 7 and r["unmapped"] == 4 and r["live_bytes"] == 0


def test_kept_blocks_are_given_back_when_a_mapping_fails(lib):
  r = run_preloaded(lib, """
    import resource
    a = alloc(40 * MIB); libc.free(a)              # kept, and counted in VmSize
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) << 10
    resource.setrlimit(resource.RLIMIT_AS, (vm + 30 * MIB, resource.RLIM_INFINITY))
    b = alloc(50 * MIB)                            # fits only once the kept 40 MiB are unmapped
    print(json.dumps(st()))
  """)
  assert r["live_bytes"] == 50 * MIB and r["kept_bytes"] == 0
  assert r["mapped"] == 2 and r["unmapped"] == 1


def test_small_over_aligned_and_invalid_requests_go_to_glibc(lib):
  r = run_preloaded(lib, """
    out = {}
    a = alloc(MIB - 1)                  # below the threshold
    b = alloc(2 * MIB, align=65536)     # alignment beyond a page
    out["glibc"] = st()["mapped"]
    libc.free(a); libc.free(b)
    p = ctypes.c_void_p()
    out["einval"] = libc.posix_memalign(ctypes.byref(p), ctypes.c_size_t(24), ctypes.c_size_t(2 * MIB))
    odd = libc.aligned_alloc(3, 2 * MIB)           # not a power of two: glibc decides
    out["odd_alignment"] = st()["live_bytes"]
    libc.free(odd)
    q = libc.aligned_alloc(4096, 2 * MIB)
    out["aligned_alloc_ours"] = st()["live_bytes"]
    libc.free(q)
    m = libc.malloc(8 * MIB)            # plain malloc is glibc's
    out["malloc"] = st()["live_bytes"]
    libc.free(m)
    print(json.dumps(out))
  """)
  assert r["glibc"] == 0 and r["einval"] == 22 and r["odd_alignment"] == 0
  assert r["aligned_alloc_ours"] == 2 * MIB and r["malloc"] == 0


def test_realloc_keeps_the_contents(lib):
  r = run_preloaded(lib, """
    a = alloc(2 * MIB)
    ctypes.memmove(a, bytes(range(256)) * 8192, 2 * MIB)
    b = libc.realloc(a, 5 * MIB)                  # larger: a new block, contents copied
    grown = ctypes.string_at(b, 2 * MIB) == bytes(range(256)) * 8192
    c = libc.realloc(b, 1000)                     # below the threshold: to glibc
    shrunk = ctypes.string_at(c, 1000) == (bytes(range(256)) * 4)[:1000]
    libc.reallocarray.restype = ctypes.c_void_p
    libc.reallocarray.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    d = alloc(2 * MIB)
    ctypes.memset(d, 7, 16)
    e = libc.reallocarray(d, 3, MIB)              # ours too: glibc's would not know the block
    arrayed = ctypes.string_at(e, 16) == bytes([7]) * 16 and e % 4096 == 0
    overflow = libc.reallocarray(e, 1 << 62, 8)   # count * size overflows: NULL, e untouched
    libc.free(e)
    after = st()
    libc.free(c)
    print(json.dumps({"grown": grown, "shrunk": shrunk, "live": after["live_bytes"],
                      "kept": after["kept_bytes"], "arrayed": arrayed, "overflow": overflow}))
  """)
  assert r["grown"] and r["shrunk"] and r["live"] == 0 and r["kept"] == 7 * MIB
  assert r["arrayed"] and r["overflow"] is None


def test_many_blocks_freed_in_random_order(lib):
  """Exercises the live table's deletions (a lost entry would send an mmap'd block to glibc's
  free and crash) and its fallback to glibc when full."""
  r = run_preloaded(lib, """
    rng = random.Random(0)
    live = {}
    for i in range(60000):
      if live and rng.random() < 0.45:
        p = rng.choice(list(live)) if len(live) < 64 else live.popitem()[0]
        live.pop(p, None)
        libc.free(p)
      else:
        n = 8192 * rng.randint(1, 3)
        p = alloc(n)
        assert p not in live
        live[p] = n
        ctypes.memset(p, 1, 8)
    ours = st()["live_bytes"]
    for p in list(live):
      libc.free(p)
    many = [alloc(8192) for _ in range(40000)]    # past the table's 32,767 entries
    full = st()
    for p in many:
      libc.free(p)
    print(json.dumps({"ours": ours, "left": st()["live_bytes"], "full_live": full["live_bytes"]}))
  """, env={"BVL_BLOCK_CACHE_MIN_BYTES": "8192"}, timeout=300)
  assert r["ours"] > 0 and r["left"] == 0
  assert 30000 * 8192 < r["full_live"] < 40000 * 8192  # the rest went to glibc


def test_fork_while_other_threads_allocate(lib):
  r = run_preloaded(lib, """
    stop = False
    def churn():
      while not stop:
        libc.free(alloc(2 * MIB))
    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads: t.start()
    codes = []
    for _ in range(40):
      pid = os.fork()
      if pid == 0:
        libc.free(alloc(2 * MIB))               # deadlocks if the lock was copied held
        os._exit(0)
      codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    stop = True
    for t in threads: t.join()
    print(json.dumps(codes))
  """, timeout=120)
  assert r == [0] * 40


def test_fork_while_a_thread_waits_for_a_free(lib):
  """The child of a fork has no waiter, whatever the parent's condition variable recorded: its
  own frees and allocations of the same size must not hang on the parent's waiter."""
  r = run_preloaded(lib, """
    import time
    a = alloc(8 * MIB)
    t = threading.Thread(target=lambda: libc.free(alloc(8 * MIB)))  # waits up to 2 s for a
    t.start()
    time.sleep(0.3)
    codes = []
    for _ in range(3):
      pid = os.fork()
      if pid == 0:
        b = alloc(16 * MIB); libc.free(b)       # kept: a broadcast to the parent's waiter
        c = alloc(8 * MIB); libc.free(c)        # b's block (fits 8 MiB): no wait
        os._exit(0 if c == b else 3)
      codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    libc.free(a)
    t.join()
    print(json.dumps([codes, st()["waits_served"]]))
  """, env={"BVL_BLOCK_CACHE_WAIT_MIN_BYTES": str(4 << 20), "BVL_BLOCK_CACHE_WAIT_MS": "2000"},
                    timeout=120)
  assert r == [[0, 0, 0], 1]


def test_a_large_request_waits_for_a_live_block_about_to_be_freed(lib):
  """The benchmark's loop: the next step asks for its temporaries a moment before the previous
  step's are freed (here by another thread, 5 ms later); it gets them instead of a new mapping."""
  r = run_preloaded(lib, """
    import time
    out = {}
    a = alloc(8 * MIB)
    t = threading.Timer(0.005, libc.free, [a]); t.start()
    b = alloc(8 * MIB)                             # waits, and gets a's block
    t.join()
    out["b_is_a"] = b == a
    out["served"] = st()
    c = alloc(8 * MIB)                             # b is live and nothing frees it: 20 ms, mapped
    out["gave_up"] = st()
    d = alloc(8 * MIB)                             # that size is not waited for again
    e = alloc(2 * MIB)                             # under the 4 MiB threshold: no wait
    f = alloc(20 * MIB)                            # no live block fits: no wait
    out["end"] = st()
    print(json.dumps(out))
  """, env={"BVL_BLOCK_CACHE_WAIT_MIN_BYTES": str(4 << 20)})
  assert r["b_is_a"]
  assert (r["served"]["mapped"], r["served"]["reused"], r["served"]["waits"],
          r["served"]["waits_served"]) == (1, 1, 1, 1)
  assert (r["gave_up"]["mapped"], r["gave_up"]["waits"], r["gave_up"]["waits_served"]) == (2, 2, 1)
  assert (r["end"]["mapped"], r["end"]["waits"]) == (5, 2)


def test_no_wait_when_turned_off(lib):
  r = run_preloaded(lib, """
    a = alloc(8 * MIB); b = alloc(8 * MIB)
    print(json.dumps(st()))
  """, env={"BVL_BLOCK_CACHE_WAIT_MIN_BYTES": str(4 << 20), "BVL_BLOCK_CACHE_WAIT_MS": "0"})
  assert r["mapped"] == 2 and r["waits"] == 0


def test_min_bytes_from_the_environment(lib):
  r = run_preloaded(lib, "a = alloc(16384); print(json.dumps(st()))",
                    env={"BVL_BLOCK_CACHE_MIN_BYTES": "8192"})
  assert r["min_bytes"] == 8192 and r["live_bytes"] == 16384
  with pytest.raises(ValueError, match="BVL_BLOCK_CACHE_MIN_BYTES='1k' is not a whole number"):
    block_cache.check_env({"BVL_BLOCK_CACHE_MIN_BYTES": "1k"})
  with pytest.raises(ValueError, match=">= 4096"):
    block_cache.check_env({"BVL_BLOCK_CACHE_MIN_BYTES": "100"})
  with pytest.raises(ValueError, match=r"BVL_BLOCK_CACHE_WAIT_MS='20000' .* \[0, 10000\]"):
    block_cache.check_env({"BVL_BLOCK_CACHE_WAIT_MS": "20000"})
  with pytest.raises(ValueError, match="BVL_BLOCK_CACHE_WAIT_MIN_BYTES='-1'"):
    block_cache.check_env({"BVL_BLOCK_CACHE_WAIT_MIN_BYTES": "-1"})
  block_cache.check_env({"BVL_BLOCK_CACHE_WAIT_MS": "0", "BVL_BLOCK_CACHE_WAIT_MIN_BYTES": "4096"})


# ------------------------------------------------------------------------------ launcher

# Stands in for the interpreter launch/cpu.sh runs: the trainer's module is replaced by a
# report of what the launched process has; everything else runs the real Python.
_FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "big_vision_lite.train" ]; then
  shift 2
  exec {python} -c 'import json, os, sys
from big_vision_lite.platform.cpu import block_cache, memory
print(json.dumps([block_cache.active(), memory.keeps_heap(os.environ), sys.argv[1:]]))' "$@"
fi
exec {python} "$@"
"""


def test_launcher_preloads_the_cache_and_keeps_the_heap(lib, tmp_path):
  fake = tmp_path / "python"
  fake.write_text(_FAKE_PYTHON.format(python=sys.executable))
  fake.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
  out = subprocess.run([os.path.join(ROOT, "launch", "cpu.sh"), "--config", "c.py"],
                       env={**env, "PYTHON": str(fake), "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.splitlines()[-1]) == [True, True, ["--config", "c.py"]]


def test_the_trainer_does_not_restart_itself():
  """train.py starts with its imports: no re-execution, no allocator settings of its own."""
  with open(os.path.join(ROOT, "big_vision_lite", "train.py")) as f:
    text = f.read()
  assert "execve" not in text and "LD_PRELOAD" not in text and "mallopt" not in text
  assert "block_cache" not in text and "restart" not in text
  # Before the imports only the early signal handlers (a SIGTERM during the seconds of
  # imports must not be lost): every other top-level statement is an import.
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse(text)
  first_def = next(i for i, n in enumerate(tree.body) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
  early = [n for n in tree.body[1:first_def] if not isinstance(n, (ast.Import, ast.ImportFrom))]
  assert [ast.unparse(n).split("\n")[0] for n in early if not isinstance(n, ast.Assign)] == [
      "if __name__ == '__main__':"], [ast.unparse(n) for n in early]


# test_host_memory's toy, with the cache's count of mappings printed last.
_FAULTS = test_host_memory.FAULTS + """
from big_vision_lite.platform.cpu import block_cache
print(block_cache.stats().mapped)
"""


def test_xla_temporaries_are_reused_without_page_faults(lib):
  """The 128 MB toy of test_host_memory: kept by glibc alone, 0-5 of calls 10-39 map it
  afresh; with the cache none did in 8 runs. One is allowed: a call that allocates before the
  previous one has freed maps a second block (a prototype did, in 1 run of 6), kept after."""
  env = host_memory.keep_heap_env({**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, lib)
  out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  status, fresh, mapped = out.stdout.split("\n")[:3]
  assert int(fresh) <= 1, out.stdout
  # x (64 MB), the temporaries (a second block at most) and jax's own few of >= 1 MiB: 3 here.
  assert int(mapped) <= 6, out.stdout


def test_no_c_compiler_is_named(monkeypatch):
  from big_vision_lite.platform.cpu import build as cpu_build
  monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match=r"no C compiler found \(set \$CC, or install gcc or clang\)"):
    block_cache.library()
