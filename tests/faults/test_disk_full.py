"""Disk full during an (async) save or a metrics write: one error line naming the cause and the
newest intact checkpoint, no tracebacks; the previous checkpoint stays complete and restorable."""

import errno
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import async_path

from conftest import COMMON, ROOT, TINY, steps_on_disk
from helpers import metric_rows

from big_vision_lite.checkpoint import CheckpointError, Checkpointer
from big_vision_lite.save_errors import short_error


def _state(seed):
  mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rep = NamedSharding(mesh, P())
  return {"params": {"w": jax.device_put(np.full((4, 4), seed, np.float32), rep)},
          "step": jax.device_put(np.int32(seed), rep)}


@pytest.mark.parametrize("async_save", [True, False])
def test_enospc_during_save_is_one_clear_error_and_keeps_previous(tmp_path, monkeypatch, async_save):
  c = Checkpointer(str(tmp_path), save_interval_steps=1, async_save=async_save)
  assert c.save(1, _state(1))
  c.wait_until_finished()
  real = async_path.write_text

  async def full_disk(path, text, *a, **k):
    if "commit_success" in str(path):  # the last write of a save: everything else went through
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await real(path, text, *a, **k)
  monkeypatch.setattr(async_path, "write_text", full_disk)
  with pytest.raises(CheckpointError) as e:
    c.save(2, _state(2))
    c.wait_until_finished()  # async: the background write's error surfaces here
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path) in msg and "No space left on device" in msg
  assert "newest complete checkpoint (left intact): step 1" in msg
  monkeypatch.setattr(async_path, "write_text", real)

  c2 = Checkpointer(str(tmp_path), save_interval_steps=1)
  assert c2.latest_step() == 1
  restored = c2.restore(None, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           _state(0)))
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((4, 4), 1, np.float32))
  c2.close()
  try:
    c.close()
  except CheckpointError:
    pass


def test_short_error_keeps_the_cause_past_the_limit():
  inner = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/" + "y" * 400)
  try:
    try:
      raise ValueError("Error writing local file: " + "/x/" + "y" * 400 + " [OSError: No space left on device]")
    except ValueError as e:
      raise RuntimeError("tensorstore failed") from e
  except RuntimeError as e:
    text = short_error(e)
  assert "No space left on device" in text and "\n" not in text and len(text) < 400
  assert "No space left on device" in short_error(inner) and short_error(inner).count("No space") == 1


@pytest.mark.parametrize("where", ["ckpt", "metrics"])
def test_full_disk_is_one_line_with_the_cause_and_the_intact_step(compile_cache, tmp_path, where):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  driver = os.path.join(os.path.dirname(__file__), "disk_full_driver.py")
  r = subprocess.run([sys.executable, driver, where, "--config", TINY, "--workdir", str(tmp_path), *COMMON],
                     env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith("error: ") and "No space left on device" in lines[0]
  # ckpt: steps 1 and 2 were saved before the disk filled; metrics: the step-4 save finished.
  want = 2 if where == "ckpt" else 4
  assert f"newest complete checkpoint (left intact): step {want} in " in lines[0], lines[0]
  assert want in steps_on_disk(tmp_path)


def _mount_namespace() -> list[str] | None:
  """`unshare` arguments giving a private mount namespace where tmpfs can be mounted, else None."""
  for args in (["unshare", "-m"], ["unshare", "-rm"]):
    try:
      r = subprocess.run([*args, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                         capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      return None
    if r.returncode == 0:
      return args
  return None


def test_disk_filling_during_array_writes_is_one_line_and_the_run_resumes(compile_cache, tmp_path):
  """A real full disk (a 64 MiB tmpfs) during a checkpoint's tensorstore writes: one line, exit 1,
  no tracebacks of orbax's background threads (asyncio's "Event loop is closed", "exception was
  never retrieved"); once space is freed the same command resumes from the intact step."""
  ns = _mount_namespace()
  if ns is None:
    pytest.skip("needs a private mount namespace for a small tmpfs (root or user namespaces)")
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  out.mkdir()
  q = shlex.quote
  args = " ".join(q(a) for a in ["--config", TINY, "--workdir", str(disk / "run"), *COMMON])
  driver = q(os.path.join(os.path.dirname(__file__), "disk_full_driver.py"))
  py = q(sys.executable)
  script = f"""
mount -t tmpfs -o size=64m tmpfs {q(str(disk))} || exit 99
{py} {driver} fill {q(str(disk))} 6 {args} > {q(str(out / '1.out'))} 2> {q(str(out / '1.err'))}
echo $? > {q(str(out / '1.rc'))}
rm -f {q(str(disk / 'filler'))}
{py} -m big_vision_lite.train {args} > {q(str(out / '2.out'))} 2> {q(str(out / '2.err'))}
echo $? > {q(str(out / '2.rc'))}
cp -r {q(str(disk / 'run'))} {q(str(out / 'run'))}
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  env.pop("BVL_FAULT", None)
  r = subprocess.run([*ns, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=600,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  read = lambda name: (out / name).read_text()
  err = read("1.err")
  assert read("1.rc").strip() == "1", err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err[-3000:]}"
  assert lines[0].startswith("error: ") and "No space left on device" in lines[0], lines[0]
  assert "newest complete checkpoint (left intact): step 4 in " in lines[0], lines[0]
  # Nothing lost: step 4 restores and the run finishes; metrics.jsonl holds every step once.
  assert read("2.rc").strip() == "0", read("2.err")[-3000:]
  assert "resumed from step 4 " in read("2.out"), read("2.out")[-2000:]
  assert [row["step"] for row in metric_rows(out / "run")] == list(range(1, 13))
  assert 12 in steps_on_disk(out / "run")
