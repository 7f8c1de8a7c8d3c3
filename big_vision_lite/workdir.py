"""The workdir guard: config.json written once, a resumed run's config checked against it."""

from __future__ import annotations

import json
import sys
import time

import jax
import ml_collections

from big_vision_lite import config as config_lib, files, storage


def check_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> None:
  """Writes config.json into `workdir`, refusing a config that differs from the run it holds.

  Resuming is for the same run: only config_lib.RESUMABLE_CHANGES may differ
  unless config.allow_config_change. `overwrite` moves the previous run's files
  into `<workdir>/overwritten-<unix time>/` (nothing is deleted) and starts afresh.
  """
  path = storage.join(workdir, "config.json")
  ckpt_dir = storage.join(workdir, "checkpoints")
  has_run = storage.isdir(ckpt_dir) and bool(storage.listdir(ckpt_dir))
  is_main = jax.process_index() == 0
  if overwrite:
    old = [n for n in ("checkpoints", "metrics.jsonl", "tb", "config.json", "profile")
           if storage.exists(storage.join(workdir, n))]
    if old and is_main:
      backup = storage.join(workdir, f"overwritten-{int(time.time())}")
      storage.makedirs(backup, exist_ok=False)
      for n in old:
        storage.rename(storage.join(workdir, n), storage.join(backup, n))
      print(f"--overwrite: moved the previous run's {', '.join(old)} to {backup}", file=sys.stderr,
            flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("big_vision_lite_overwrite")
  elif has_run and storage.exists(path) and not config.allow_config_change:
    saved = json.loads(storage.read_text(path))
    changes = config_lib.config_changes(saved, json.loads(config.to_json_best_effort()))
    if changes:
      raise config_lib.ConfigError(
          f"workdir {workdir} holds checkpoints of a run with another config ({len(changes)} "
          f"change(s): {'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}); use the "
          f"same config, --config.allow_config_change=True to resume anyway, or --overwrite to "
          f"start over")
  if is_main:
    storage.makedirs(workdir)
    # The other processes read this file above at the same time; rewritten in place
    # they could read it truncated, as an empty (unparseable) config.
    files.write_atomic(path, config.to_json_best_effort(indent=2))
