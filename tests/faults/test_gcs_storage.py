"""gs:// data_dir and workdir end to end, against a GCS emulator (gcp-storage-emulator) on 127.0.0.1.

The emulator and how each client library reaches it (gcsfs for config.json,
metrics.jsonl, TensorBoard, globs, tfds metadata; ArrayRecord's reader;
tensorstore) live in tests/gcs_emulator.py, shared with tests/test_gcs_exports.py.
"""

import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

import gcs_emulator  # noqa: E402  (tests/gcs_emulator.py: sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs loads)

pytest.importorskip("gcsfs", reason="the [test] extra installs gcsfs")
pytest.importorskip("gcp_storage_emulator.server", reason="the [test] extra installs it")

from helpers import ROOT, assert_bitwise_equal, final_params, metric_rows  # noqa: E402

from big_vision_lite import pretrained, storage  # noqa: E402

BUCKET = gcs_emulator.BUCKET
gcs = gcs_emulator.fixture(BUCKET)


def _tar_bytes(n: int) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for i in range(n):
      for ext, data in (("jpg", bytes([i]) * 10), ("txt", f"caption {i}".encode())):
        info = tarfile.TarInfo(f"{i:05d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_globs_and_sources_read_the_bucket(gcs):
  from big_vision_lite.data import sources
  from big_vision_lite.data.sources_tar import TarSource
  base = f"gs://{BUCKET}/sources"
  for shard in range(2):
    sources.write_array_record(f"{base}/ar/part-{shard}.array_record",
                               [{"label": np.int64(10 * shard + i)} for i in range(3)])
  with storage.open_file(f"{base}/tar/shard-0.tar", "wb") as f:
    f.write(_tar_bytes(4))
  assert storage.glob(f"{base}/ar/*.array_record") == [f"{base}/ar/part-0.array_record",
                                                         f"{base}/ar/part-1.array_record"]
  assert storage.glob(f"{base}/ar/*.nothing") == []
  import ml_collections
  src = sources.get_source(ml_collections.ConfigDict(
      dict(name="array_record", files=f"{base}/ar/part-*.array_record", split="train[1:]")))
  assert [int(src[i]["label"]) for i in range(len(src))] == [1, 2, 10, 11, 12]
  tar = TarSource(storage.glob(f"{base}/tar/*.tar"))
  assert len(tar) == 4 and tar[2]["caption"] == "caption 2" and tar[3]["image"] == bytes([3]) * 10


def test_missing_gcs_data_dir_is_one_line_config_error(gcs, run_cli):
  r = run_cli("", "--config.input.data.name=imagenet2012",
              f"--config.input.data.data_dir=gs://{BUCKET}/no-such-dir", env=gcs)
  assert r.returncode == 2, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert lines == [f"error: config.input.data.data_dir: directory 'gs://{BUCKET}/no-such-dir' does not exist"]


@pytest.fixture(scope="module")
def shapes_data(gcs, tmp_path_factory):
  """(local data_dir, the same copied to gs://) of bvl_shapes/tiny."""
  from big_vision_lite.data import shapes
  local = shapes.ensure_built(str(tmp_path_factory.mktemp("tfds")), config="tiny")
  remote = f"gs://{BUCKET}/tfds"
  storage.upload_tree(local, remote)
  return local, remote


def test_train_and_metrics_on_gcs(gcs, shapes_data, run_cli):
  data_dir = shapes_data[1]
  workdir = f"gs://{BUCKET}/run"
  r = run_cli(workdir, "--config.input.data.name=bvl_shapes/tiny", f"--config.input.data.data_dir={data_dir}",
              "--config.total_steps=6", "--config.ckpt_steps=0", env=gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == list(range(1, 7))
  assert json.loads(storage.read_text(f"{workdir}/config.json"))["total_steps"] == 6
  events = storage.glob(f"{workdir}/tb/events.out.tfevents.*")
  assert len(events) == 1 and storage.as_path(events[0]).stat().length > 0
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path went to the local disk"


@pytest.mark.slow  # over a minute on 2 cores: CI's slow stage runs it
def test_checkpoint_kill_and_resume_on_gcs(gcs, shapes_data, run_cli, tmp_path):
  """Orbax checkpoints (tensorstore OCDBT) in a gs:// workdir: SIGKILL after step 5 (step 4's async
  save just issued, step 2's committed), resume, and end bitwise where an uninterrupted local run does."""
  local_data, gcs_data = shapes_data
  args = ("--config.input.data.name=bvl_shapes/tiny", "--config.total_steps=8")  # ckpt_steps=2 (COMMON)
  ref = tmp_path / "ref"
  r = run_cli(ref, *args, f"--config.input.data.data_dir={local_data}")
  assert r.returncode == 0, r.stderr[-3000:]

  workdir = f"gs://{BUCKET}/resume"
  r = run_cli(workdir, *args, f"--config.input.data.data_dir={gcs_data}", fault="kill@5", env=gcs)
  assert r.returncode == -9, r.stderr[-3000:]
  assert f"{workdir}/checkpoints/2" in storage.glob(f"{workdir}/checkpoints/*")
  r = run_cli(workdir, *args, f"--config.input.data.data_dir={gcs_data}", env=gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = re.search(r"resumed from step (\d+)", r.stdout)
  assert resumed and int(resumed.group(1)) in (2, 4), r.stdout[-3000:]
  # The only tracebacks: gcsfs logging its fallback to copy+delete when setting aside an
  # uncommitted step (the emulator lacks the objects moveTo API).
  assert r.stderr.count("Traceback") == r.stderr.count("Failed to move file using moveTo API"), r.stderr[-3000:]

  import fsspec
  fsspec.get_filesystem_class("gs").clear_instance_cache()  # this process listed the folder before
  fsspec.filesystem("gs").invalidate_cache()  # the resumed run wrote; a fresh listing follows
  assert f"{workdir}/checkpoints/8" in storage.glob(f"{workdir}/checkpoints/*")
  assert_bitwise_equal(pretrained.read_params(f"{workdir}/checkpoints"), final_params(ref))
  rows = {}
  for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines():
    row = json.loads(line)
    if "loss" in row:
      assert row["step"] not in rows, f"step {row['step']} twice"
      rows[row["step"]] = row
  want = {row["step"]: row for row in metric_rows(ref) if "loss" in row}
  assert sorted(rows) == list(range(1, 9))  # the killed run's rows up to the checkpoint were uploaded
  assert [rows[s]["loss"] for s in rows] == [want[s]["loss"] for s in rows]
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path went to the local disk"


def test_caption_samples_write_into_a_gcs_workdir(gcs, shapes_data, compile_cache):
  """The CapPa recipe (tiny) with a gs:// workdir: caption_samples writes <name>.json (this run's
  captions) and <name>.jsonl (one line per eval, rewritten whole: object stores cannot append)."""
  import subprocess
  import sys
  from helpers import cpu_env
  data_dir = shapes_data[1]
  workdir = f"gs://{BUCKET}/cappa"
  pp = ("decode|resize(16)|value_range(-1, 1)|tokenize(16, model='bvl_shapes', key='caption', "
        "key_result='labels')|keep('image', 'labels')")
  evals = {"samples": {"type": "caption_samples", "pp": pp, "num_samples": 4, "log_steps": 2, "batch_size": 8,
                       "data": {"name": "bvl_shapes/tiny", "split": "validation", "data_dir": data_dir}}}
  cmd = [sys.executable, "-m", "big_vision_lite.train", "--config",
         "configs/cappa_shapes.py:steps=4,batch=8,res=16,width=16,depth=1,dec_depth=1,heads=2,patch=8,workers=0",
         "--workdir", workdir, "--config.input.data.name=bvl_shapes/tiny",
         f"--config.input.data.data_dir={data_dir}", f"--config.evals={evals!r}", "--config.ckpt_steps=0",
         "--config.progress=False", "--config.log_training_steps=1", "--config.mfu_peak_flops=1e12",
         "--config.schedule.warmup_steps=1"]
  r = subprocess.run(cmd, env={**cpu_env(2, compile_cache), **gcs}, capture_output=True, text=True, timeout=600,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(storage.read_text(f"{workdir}/samples.json"))
  assert [row["index"] for row in rows] == [0, 1, 2, 3]
  assert all(row["reference"].startswith("a ") and isinstance(row["caption"], str) for row in rows)
  history = [json.loads(line) for line in storage.read_text(f"{workdir}/samples.jsonl").splitlines()]
  assert [h["run"] for h in history] == [1, 2]  # the step-2 line kept when step 4's was added
  assert history[-1]["samples"] == rows
  metrics_rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  evals_logged = [m for m in metrics_rows if "samples/word_accuracy" in m]
  assert [m["step"] for m in evals_logged] == [2, 4]
  assert history[-1]["samples/word_accuracy"] == evals_logged[-1]["samples/word_accuracy"]
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path went to the local disk"
