# Small MoE-ViT (V-MoE) on the built-in shapes dataset: exactly the dense recipe of
# configs/vit_shapes.py (res 64, patch 8, width 64, depth 4, 1200 steps, batch 128) with
# every 2nd block's MLP replaced by E=4 experts, top-2 routing with BPR, one image per
# routing group, capacity factor 1.05 in training and 1.5 at evaluation, capacity rounded
# up to a multiple of 4 as vmoe (34 -> 36 slots per expert at 64 tokens per group).
#
#   python -m big_vision_lite.train --config configs/vmoe_shapes.py --workdir runs/vmoe
#
# Expected: validation prec@1 comparable to the dense configs/vit_shapes.py (>= 0.90).
# Measured with vmoe's per-group losses and cap_multiple=4 (2-core "Intel(R) Xeon(R) Processor"
# VM, family 6 model 207, 1 CPU device, 2026-12-01, both runs on the same host and commit):
# MoE 0.46 / 0.794 / 0.918 / 0.9415 at steps 300 / 600 / 900 / 1200; the dense vit_shapes.py
# 0.497 / 0.8225 / 0.9205 / 0.9435. 20.5% of token choices dropped at capacity 1.05 at the end
# (block 1: 22.9%, block 3: 18.0%; moe/dropped in metrics.jsonl). CPU time 13.1 min (MoE) vs
# 9.6 min (dense); wall 19 / 24 min on a machine shared with other jobs, so not comparable.
"""MoE-ViT on bvl_shapes: the dense vit_shapes recipe with sparse expert MLPs."""

import os

from big_vision_lite.config import load_config, parse_arg

_DENSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_shapes.py")


def get_config(arg=None):
  args = parse_arg(arg, res=64, steps=1200, batch=128, width=64, depth=4, heads=4, patch=8,
                   workers=1, experts=4, k=2, every=2, router="topk", cf=1.05, eval_cf=1.5,
                   group_size=0, cap_multiple=4)
  # The dense config of the same size is the baseline, so build on it rather than copy it.
  c = load_config(f"{_DENSE}:res={args.res},steps={args.steps},batch={args.batch},"
                  f"width={args.width},depth={args.depth},heads={args.heads},patch={args.patch},"
                  f"workers={args.workers}")
  c.model_name = "vmoe"
  c.model.update(
      moe_every=args.every, num_experts=args.experts, num_selected_experts=args.k,
      router=args.router, capacity_factor=args.cf, eval_capacity_factor=args.eval_cf,
      capacity_multiple_of=args.cap_multiple or None,  # vmoe's default: C 34 -> 36 at S=64
      bpr=True, importance_weight=0.005, load_weight=0.005,
      group_size=args.group_size or None)  # None: one image per group
  return c
