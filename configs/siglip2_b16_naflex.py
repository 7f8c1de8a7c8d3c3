# SigLIP 2 B/16 NaFlex: configs/siglip2_b16.py with the NaFlex image tower (models/naflex_vit.py)
# and preprocessing (ops_naflex.naflex_patches): native aspect ratio, 256-patch budget by default.
#
#   python -m big_vision_lite.train --config configs/siglip2_b16_naflex.py:data=tar,files='/data/webli/*.tar',spm=/data/gemma.model \
#       --workdir runs/siglip2_b16_naflex
#
# Args: those of siglip2_b16 (budget= sets the token budget, default 256). Each image is resized
# keeping its aspect ratio to the largest patch grid within the budget, padded to it with a mask;
# the 16 x 16 learned posemb grid is resized per image (bilinear, antialiased), attention, the MAP
# head and the LocCa decoder's cross-attention ignore the padding. The paper trains NaFlex with
# sequence lengths drawn per batch from several budgets (e.g. 128 to 1024); one budget per run
# here (one compiled step), any budget at inference.
# Expected (published, big_vision's README_siglip2): SigLIP 2 NaFlex B/16 at sequence length 256,
# 78.5% ImageNet zero-shot, COCO T->I 51.1 / I->T 67.3. NOT run at scale here: built abstractly at
# full size (tests/test_configs.py), trains 3 steps at mu/8 on stand-in tar shards, and is
# AOT-planned for v5p:8x8x4 with libtpu (tests/test_recipes_run.py plans it at v5p:2x2x2 in its
# extended part): 37.5 GiB per chip of 95 GiB
# at 128 examples per chip (2026-12-01; siglip2_b16: 37.0 GiB). The towers
# map to transformers' Siglip2Model (convert/hf_siglip2.py, outputs within 1e-4 in
# tests/test_convert_siglip2.py; not yet through the convert CLI).
"""SigLIP 2 NaFlex recipe: B/16, native aspect ratio, 256-patch budget, LocCa decoder, batch 32k."""

import importlib.util
import os


_spec = importlib.util.spec_from_file_location(
    "siglip2_b16", os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip2_b16.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)
VOCAB = base.VOCAB


def get_config(arg=None):
  arg = arg or ""
  for key, value in (("budget", "256"), ("sd_start", "1")):  # no self-distillation phase here
    if f"{key}=" not in arg:
      arg = f"{arg},{key}={value}" if arg else f"{key}={value}"
  return base.get_config(arg)
