"""host_memory: the glibc huge-page tunable is added to a child's environment only where it can
work, other tunables survive, BVL_HUGEPAGES=0 opts out, and the trainer's hint fires only for a
CPU run without it; the local launcher hands it to every trainer process."""

import importlib.util
import os
import subprocess

import pytest

from big_vision_lite import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNABLE = host_memory.HUGEPAGES_TUNABLE


@pytest.fixture
def thp(tmp_path, monkeypatch):
  """A fake THP sysfs file (madvise mode) on a glibc 2.36 Linux."""
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  monkeypatch.setattr(host_memory, "_THP_ENABLED", str(path))
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
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
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
  elif case == "musl":
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: None)
  else:
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
  assert host_memory.with_hugepages({}, str(thp)) == {}
  assert host_memory.hint("cpu", {}, str(thp)) is None


def test_hint_only_for_cpu_runs_without_the_tunable(thp):
  p = str(thp)
  assert TUNABLE in host_memory.hint("cpu", {}, p)
  assert host_memory.hint("cpu", {"GLIBC_TUNABLES": f"x=1:{TUNABLE}"}, p) is None
  assert host_memory.hint("gpu", {}, p) is None and host_memory.hint("tpu", {}, p) is None


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
