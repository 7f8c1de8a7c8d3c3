"""Exports the image encoder of a two-part model (CapPa, OpenVision 2, two towers) as a plain
ViT checkpoint: a big_vision-style .npz of flat 'a/b/c' params, plus the ViT's model kwargs.

  python -m big_vision_lite.tools.extract_encoder --workdir runs/cappa --out enc.npz [--subtree img]

The .npz loads like any ViT checkpoint: `config.model_name='vit'`, `config.model=<the printed
kwargs, plus num_classes>`, `config.model_init='enc.npz'` (the head is reported missing and keeps
its init). Loading straight from the workdir also works: `config.model_init='runs/cappa'`,
`config.model_load.subtree='img'`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from big_vision_lite import pretrained, storage
from big_vision_lite.checkpoint import CheckpointError


def vit_config_of(workdir: str, subtree: str) -> dict | None:
  """The image model kwargs from the workdir's config.json (config.model.<image>), if present."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path) or storage.isdir(path):
    return None
  model = json.loads(storage.read_text(path)).get("model", {})
  kw = dict(model.get("image") or {}) if subtree == "img" else None
  if kw is not None:
    kw.pop("num_classes", None)  # the encoder is exported without a head
  return kw


def extract(workdir: str, out: str, subtree: str = "img") -> tuple[int, dict | None]:
  """Writes `out` (.npz) with the params under `subtree`; returns (number of arrays, ViT kwargs)."""
  flat = pretrained.read_params(workdir, subtree=subtree)
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  if storage.is_remote(out):  # zip in memory, then one upload (object stores cannot seek back)
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with storage.open_file(out, "wb") as f:
      f.write(buf.getvalue())
  else:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **arrays)
  kw = vit_config_of(workdir, subtree)
  if kw is not None:
    with storage.open_file(os.path.splitext(out)[0] + ".json", "w") as f:
      json.dump({"model_name": "vit", "model": kw}, f, indent=2)
  return len(flat), kw


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m big_vision_lite.tools.extract_encoder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="training workdir (latest complete step), "
                      "step folder, or .npz")
  parser.add_argument("--out", required=True, help="output .npz path")
  parser.add_argument("--subtree", default="img", help="params prefix of the encoder (default img)")
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    print(f"error: --out {args.out!r} must end with .npz", file=sys.stderr)
    return 2
  try:
    n, kw = extract(args.workdir, args.out, args.subtree)
  except (CheckpointError, FileNotFoundError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {n} arrays of {args.subtree!r} to {args.out}")
  if kw is not None:
    print(f"ViT kwargs (also in {os.path.splitext(args.out)[0]}.json): {json.dumps(kw)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
