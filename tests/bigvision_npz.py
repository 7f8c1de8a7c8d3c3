"""Shared by the big_vision import tests: write params as big_vision's .npz, import it with the CLI."""

import numpy as np

from big_vision_lite import pretrained
from big_vision_lite.convert.__main__ import main


def import_with_cli(tmp_path, flat: dict, target_params, *extra: str):
  """(params imported by `convert --from bigvision`, params of the .npz loaded directly as model_init)."""
  src = tmp_path / "bv.npz"
  np.savez(src, **{f"params/{k}": v for k, v in flat.items()})
  out = tmp_path / "init.npz"
  assert main(["--from", "bigvision", "--in", str(src), "--out", str(out), *extra]) == 0
  imported, report = pretrained.load_pretrained(target_params, str(out))
  assert not report.missing and not report.unexpected and not report.mismatched
  direct, _ = pretrained.load_pretrained(target_params, str(src))  # the .npz as model_init
  return imported, direct
