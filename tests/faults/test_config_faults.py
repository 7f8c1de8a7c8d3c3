"""Config and workdir mistakes are one-line errors before anything compiles, and a workdir
holding another run's checkpoints is never silently reused."""

import json
import os

import pytest

from conftest import COMMON, ROOT, TINY, tiny_config

from big_vision_lite import config as config_lib, train, workdir as workdir_lib


@pytest.mark.parametrize("arg,code,match", [
    ("--config.lr=-1.0", 2, "config.lr: must be >= 0, got -1.0"),
    ("--config.total_steps=-3", 2, "config.total_steps: "),
    ("--config.nan_policy=skp", 2, "config.nan_policy: must be one of 'stop', 'skip', got 'skp' (did you mean 'skip'?)"),
    ("--config.spike_skip.k=0.0", 2, "config.spike_skip.k: must be > 0"),
    ("--config.spike_skip.min_steps=1", 2, "config.spike_skip.min_steps: must be >= 2"),
    ("--config.input.bad_examples=ignore", 2, "config.input.bad_examples: must be one of 'skip', 'error'"),
    ("--config.input.max_bad_fraction=2.0", 2, "config.input.max_bad_fraction: must be in [0, 1], got 2.0"),
    ("--config.nan_polcy=skip", 2, "unknown config key 'config.nan_polcy' (did you mean 'nan_policy'?)"),
    ("--config.task.loss=softmax_xnt", 2, "config.task.loss: 'softmax_xnt' is not one of"),
    ("--config.model.pool_type=gapp", 2, "config.model (model 'vit'): unknown ViT pool_type 'gapp'"),
    ("--config.model_name=vitt", 2, "config.model_name: unknown model 'vitt'; did you mean 'vit'?"),
    # Keys of the components' own sections, checked against the code that reads them.
    ("--config.model.poool_type=map", 2, "config.model.poool_type: unknown key for model 'vit' (did you mean 'pool_type'?)"),
    ("--config.input.data.dat_dir=/x", 2, "config.input.data.dat_dir: unknown key for data source 'bvl_shapes' (did you mean 'data_dir'?)"),
    ("--config.task.los=softmax_xent", 2, "config.task.los: unknown key for task 'classification' (did you mean 'loss'?)"),
    ("--config.evals={'val': {'type': 'classification', 'log_step': 3}}", 2, "config.evals.val.log_step: unknown key for evaluator 'classification' (did you mean 'log_steps'?)"),
    ("--config.model.variant=B/16", 2, "config.model.variant: 'B/16' sets width=768 but width=16 is also given"),
    ("--config.input.pp=decode|resize(0)", 2, "config.input.pp: preprocessing op 'resize': size must be a positive int"),
    ("--config.lr=inf", 2, "config.lr: must be finite, got inf"),
    ("--config.schedule.warmup_steps=12", 2, "config.schedule: warmup (12) must be < total_steps (12)"),
])
def test_bad_values_are_one_line_errors(arg, code, match, capsys):
  got = train.main(["--config", os.path.join(ROOT, TINY), *COMMON, arg])
  err = capsys.readouterr().err.strip()
  assert got == code, err
  assert match in err and len(err.splitlines()) == 1 and err.startswith("error: "), err


def _fake_run(workdir, config):
  """A workdir as a previous run leaves it: config.json and a checkpoints folder."""
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def test_other_config_in_existing_workdir_is_refused(tmp_path, capsys):
  _fake_run(tmp_path, tiny_config())
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(tmp_path), *COMMON,
                     "--config.model.width=32", "--config.lr=0.01"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert f"error: workdir {tmp_path} holds checkpoints of a run with another config (2 change(s): " in err
  assert "config.lr: 0.003 -> 0.01" in err and "config.model.width: 16 -> 32" in err
  assert "--overwrite" in err and "allow_config_change" in err


def test_resumable_changes_pass_and_overwrite_moves_the_old_run_aside(tmp_path, capsys):
  _fake_run(tmp_path, tiny_config())
  # Longer training, other logging/checkpoint cadence, another mesh: same run, resumable.
  workdir_lib.check_workdir(tiny_config("--config.total_steps=50", "--config.log_training_steps=7",
                                  "--config.ckpt_steps=5", "--config.mesh.fsdp=2"), str(tmp_path))
  workdir_lib.check_workdir(tiny_config("--config.lr=0.5", "--config.allow_config_change=True"), str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["lr"] == 0.5  # config.json now describes the resumed run
  with pytest.raises(config_lib.ConfigError, match="another config"):
    workdir_lib.check_workdir(tiny_config("--config.seed=3"), str(tmp_path))
  workdir_lib.check_workdir(tiny_config("--config.seed=3"), str(tmp_path), overwrite=True)
  backups = [n for n in os.listdir(tmp_path) if n.startswith("overwritten-")]
  assert len(backups) == 1 and os.path.isdir(tmp_path / backups[0] / "checkpoints" / "4")
  assert not os.path.exists(tmp_path / "checkpoints")
  assert json.load(open(tmp_path / "config.json"))["seed"] == 3
  assert "--overwrite: moved the previous run's" in capsys.readouterr().err


def test_config_json_is_replaced_never_rewritten_in_place(tmp_path):
  # Other processes of a multi-process run read config.json while process 0 rewrites it; a
  # truncate-then-write would let them read an empty file, so it must be a rename.
  _fake_run(tmp_path, tiny_config())
  before = os.stat(tmp_path / "config.json").st_ino
  with open(tmp_path / "config.json") as old:
    workdir_lib.check_workdir(tiny_config("--config.total_steps=50"), str(tmp_path))
    assert json.load(old)["total_steps"] != 50  # a reader that opened it earlier keeps the old file
  assert os.stat(tmp_path / "config.json").st_ino != before
  assert json.load(open(tmp_path / "config.json"))["total_steps"] == 50
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("config")) == ["config.json"]


@pytest.mark.parametrize("arg", ["--config.model.poool_type=map", "--config.model.pool_type=gapp",
                                 "--config.schedule.warmup_steps=50", "--config.input.pp=decode|resize(0)"])
def test_config_error_comes_before_the_dataset_is_built_or_the_workdir_written(arg, tmp_path, capsys):
  # A fresh machine: no built-in dataset yet. The config error must come first, in one line,
  # not after tfds' build progress (nor with a workdir left behind).
  data_dir, workdir = tmp_path / "data", tmp_path / "run"
  got = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(workdir), *COMMON,
                    f"--config.input.data.data_dir={data_dir}", arg])
  err = capsys.readouterr().err.strip()
  assert got == 2 and len(err.splitlines()) == 1 and err.startswith("error: config."), err
  assert not data_dir.exists() and not workdir.exists()
