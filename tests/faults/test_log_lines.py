"""What a user reads in a log file: the resume point, and a warning when nothing is saved."""

import os

from conftest import COMMON, ROOT, TINY

from big_vision_lite import train


def test_resume_prints_the_step_and_checkpoint_it_starts_from(run_cli, tmp_path):
  first = run_cli(tmp_path, "--config.total_steps=4")
  assert first.returncode == 0, first.stderr[-2000:]
  assert "resumed from" not in first.stdout
  again = run_cli(tmp_path, "--config.total_steps=6")
  assert again.returncode == 0, again.stderr[-2000:]
  ckpt = os.path.join(str(tmp_path), "checkpoints", "4")
  assert f"resumed from step 4 (checkpoint {ckpt})" in again.stdout, again.stdout[-2000:]


def test_no_workdir_warns_that_nothing_is_saved(capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY), *COMMON, "--config.total_steps=2",
                     "--config.schedule.warmup_steps=1"])
  err = capsys.readouterr().err
  assert code == 0, err
  assert "warning: no --workdir: nothing (checkpoints, metrics, config.json) is saved" in err
