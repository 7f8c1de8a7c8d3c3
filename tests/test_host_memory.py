"""platform/cpu/memory: with the keep-heap tunables in its environment (launch/cpu.sh) a process's
XLA:CPU temporaries mostly stop faulting in every call; the glibc huge-page tunable is added to a
child's environment only where it can work, other tunables survive, BVL_HUGEPAGES=0 opts out;
the local launcher hands the tunable to every trainer process."""

import importlib.util
import os
import subprocess
import sys

import pytest

from big_vision_lite.platform.cpu import memory as host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNABLE = host_memory.HUGEPAGES_TUNABLE


@pytest.fixture
def thp(tmp_path, monkeypatch):
  """A fake THP sysfs file (madvise mode) on a glibc 2.36 Linux."""
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  monkeypatch.setattr(host_memory, "_THP_ENABLED", str(path))
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  return path


def test_thp_mode_parses_the_bracketed_choice(tmp_path):
  p = tmp_path / "enabled"
  for text, mode in (("[always] madvise never", "always"), ("always madvise [never]\n", "never"),
                     ("garbage", None)):
    p.write_text(text)
    assert host_memory._thp_mode(str(p)) == mode
  assert host_memory._thp_mode(str(tmp_path / "missing")) is None


def test_with_hugepages_adds_keeps_and_opts_out(thp):
  p = str(thp)
  assert host_memory.with_hugepages({}, p)["GLIBC_TUNABLES"] == TUNABLE
  other = "glibc.malloc.arena_max=2"
  assert host_memory.with_hugepages({"GLIBC_TUNABLES": other}, p)["GLIBC_TUNABLES"] == f"{other}:{TUNABLE}"
  once = host_memory.with_hugepages({}, p)
  assert host_memory.with_hugepages(once, p) == once
  assert "GLIBC_TUNABLES" not in host_memory.with_hugepages({"BVL_HUGEPAGES": "0"}, p)
  env = {"A": "1"}
  host_memory.with_hugepages(env, p)
  assert env == {"A": "1"}  # a copy, the caller's mapping is untouched


@pytest.mark.parametrize("case", ["thp_never", "old_glibc", "musl", "not_linux"])
def test_with_hugepages_leaves_env_where_it_cannot_work(thp, monkeypatch, case):
  if case == "thp_never":
    thp.write_text("always madvise [never]\n")
  elif case == "old_glibc":
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 31))
  elif case == "musl":
    monkeypatch.setattr(host_memory, "glibc_version", lambda: None)
  else:
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
  assert host_memory.with_hugepages({}, str(thp)) == {}


def test_local_launcher_gives_each_process_the_tunable(thp, monkeypatch):
  spec = importlib.util.spec_from_file_location(
      "local_multiprocess", os.path.join(ROOT, "launch", "local_multiprocess.py"))
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  envs = []

  class FakePopen:
    def __init__(self, cmd, env, **kwargs):
      envs.append(env)

  monkeypatch.setattr(subprocess, "Popen", FakePopen)
  launcher.start(2, ["--config", "c.py"], env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert [e["GLIBC_TUNABLES"] for e in envs] == [f"glibc.malloc.arena_max=2:{TUNABLE}"] * 2
  envs.clear()
  launcher.start(1, ["--config", "c.py"], env={"BVL_HUGEPAGES": "0"})
  assert "GLIBC_TUNABLES" not in envs[0]


FAULTS = """
import os, resource
from big_vision_lite.platform.cpu import memory
print(memory.keeps_heap(os.environ))
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x.T)).sum(0))  # one 128 MB block of temporaries
x = jnp.ones((4096, 4096))
faults = []
for _ in range(40):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(n > 16384 for n in faults[10:]))  # calls that faulted in >= 64 MB afresh
"""


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="glibc only")
def test_kept_memory_is_mostly_reused_without_page_faults():
  """With glibc's defaults XLA:CPU's 128 MB block of temporaries is mapped afresh on every
  call (32,770 faults each). Kept (the tunables), most calls reuse it, but not all: glibc 2.36's
  posix_memalign asks for the size plus alignment padding, so a freed block of exactly the
  old size is often too small for the next request and the heap grows by a block instead.
  Over calls 10-39: 30 of 30 afresh by default, 0-5 of 30 kept (16 runs, glibc 2.36)."""
  def fresh_calls(keep):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("GLIBC_TUNABLES", None)
    env = host_memory.keep_heap_env(env) if keep else env
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    status, count = out.stdout.split("\n")[:2]
    return status, int(count)

  status, kept = fresh_calls(True)
  assert status == "True" and kept <= 15, (status, kept)
  status, default = fresh_calls(False)
  assert status == "False" and default >= 27, (status, default)


def test_keep_heap_env_adds_tunables_and_the_preload_once():
  env = host_memory.keep_heap_env({"GLIBC_TUNABLES": "x=1", "LD_PRELOAD": "/a.so"}, "/cache.so")
  assert env["GLIBC_TUNABLES"] == "x=1:" + ":".join(host_memory.KEEP_HEAP_TUNABLES)
  assert env["LD_PRELOAD"] == "/cache.so:/a.so"
  assert host_memory.keep_heap_env(env, "/cache.so") == env and host_memory.keeps_heap(env)


