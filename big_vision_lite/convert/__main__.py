"""CLI: export a run to a PyTorch library, or import a big_vision/timm checkpoint as model_init.

  python -m big_vision_lite.convert --workdir runs/vit [--step N] --to timm --out out/vit
  python -m big_vision_lite.convert --workdir runs/siglip --to timm --tower img --out out/siglip_img
  python -m big_vision_lite.convert --workdir runs/siglip --to transformers --out out/siglip_hf
  python -m big_vision_lite.convert --workdir runs/siglip --to open_clip --out out/siglip_oc
  python -m big_vision_lite.convert --workdir runs/siglip2 --to transformers --out out/siglip2_hf
      (SigLIP 2: SiglipModel for a fixed-resolution tower, Siglip2Model for NaFlex)
  python -m big_vision_lite.convert --from bigvision --in vit.npz --out init.npz [--scan]
      [--image_size 224]  (needed for posemb sincos2d: the params hold no grid)
  python -m big_vision_lite.convert --from bigvision --in ckpt/checkpoint.bv --out init.npz  (tensorstore)
"""

from __future__ import annotations

import argparse
import sys

from big_vision_lite.convert import pipeline
from big_vision_lite.convert.tables import ConversionError, UnsupportedExport


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m big_vision_lite.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="training workdir to export (reads config.json + checkpoints)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
  p.add_argument("--to", choices=pipeline.TARGETS, help="export target")
  p.add_argument("--from", dest="from_", choices=("bigvision", "timm"), help="import source kind")
  p.add_argument("--in", dest="src", help="import source: big_vision .npz, big_vision tensorstore "
                 "checkpoint (folder or its prefix with a -LAST file), or a timm export folder")
  p.add_argument("--out", required=True, help="export folder, or the .npz an import writes")
  p.add_argument("--subtree", "--tower", dest="subtree", default=None,
                 help="the ViT inside the params, e.g. img (default: root for model vit, else img)")
  p.add_argument("--image_size", type=int, default=None,
                 help="input size (default: learned posemb grid, else the run's pp string)")
  p.add_argument("--pool_type", default=None, help="import: pooling when the params cannot tell")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                 help="import: scanned/unrolled layers for the target model (default: as the source)")
  p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                 help="run both models on fixed inputs and fail above 1e-4 (default: on)")
  a = p.parse_args(argv)
  try:
    if a.workdir:
      if not a.to or a.from_:
        p.error("export needs --workdir with --to (and no --from)")
      pipeline.export_run(a.workdir, a.out, to=a.to, step=a.step, subtree=a.subtree,
                          image_size=a.image_size, verify=a.verify)
    else:
      if not (a.from_ and a.src):
        p.error("give --workdir ... --to TARGET, or --from KIND --in PATH")
      pipeline.import_file(a.src, a.out, kind=a.from_, scan=a.scan, subtree=a.subtree or "",
                           pool_type=a.pool_type, image_size=a.image_size, verify=a.verify)
  except UnsupportedExport as e:  # the run's model: a config the target cannot express
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
