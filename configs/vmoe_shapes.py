# Small MoE-ViT (V-MoE) on the built-in shapes dataset: the recipe of configs/vit_shapes.py
# (as of this writing: res 32, patch 4, width 96, depth 4) with every 2nd block's MLP
# replaced by E=4 experts, top-2 routing with BPR, capacity factor 1.05 train / 1.5 eval.
#
#   python -m big_vision_lite.train --config configs/vmoe_shapes.py --workdir runs/vmoe
#
# Expected: validation prec@1 comparable to the dense configs/vit_shapes.py.
# Measured so far (2 CPU cores shared with other jobs, ~3.5-4.7 s/step, so the full
# 1500 steps (~1.5 h there) was NOT completed): train loss 2.06 / 1.83 / 1.88 at steps
# 50 / 100 / 150, tokens dropped ~25% at capacity 1.05. No validation accuracy yet, and
# the dense number was not measured side by side.
"""MoE-ViT on bvl_shapes: the dense vit_shapes recipe with sparse expert MLPs."""

from big_vision_lite.config import ConfigDict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, res=32, steps=1500, batch=128, width=96, depth=4, heads=4, patch=4,
                   experts=4, k=2, every=2, router="topk", cf=1.05, eval_cf=1.5, group_size=0)
  c = ConfigDict()
  c.seed = 0
  c.total_steps = args.steps

  pp_common = "|value_range(-1, 1)|onehot(8, key='label', key_result='labels')|keep('image', 'labels')"
  c.input = ConfigDict()
  c.input.data = dict(name="bvl_shapes", split="train")
  c.input.batch_size = args.batch
  c.input.pp = f"decode|resize({args.res})|flip_lr" + pp_common

  c.model_name = "vmoe"
  c.model = dict(width=args.width, depth=args.depth, mlp_dim=args.width * 4, num_heads=args.heads,
                 patch_size=(args.patch, args.patch), num_classes=8, pool_type="gap",
                 posemb="sincos2d",
                 # MoE: which blocks, how many experts, routing.
                 moe_every=args.every, num_experts=args.experts, num_selected_experts=args.k,
                 router=args.router, capacity_factor=args.cf, eval_capacity_factor=args.eval_cf,
                 bpr=True, importance_weight=0.005, load_weight=0.005,
                 group_size=args.group_size or None)  # None: one image per group
  c.task = dict(name="classification", loss="softmax_xent")

  c.optax_name = "adamw"
  c.lr = 3e-3
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=100, decay_type="cosine")
  c.grad_clip_norm = 1.0

  c.evals = dict(val=dict(type="classification", data=dict(name="bvl_shapes", split="validation"),
                          pp=f"decode|resize({args.res})" + pp_common, log_steps=250, batch_size=256))
  c.log_training_steps = 50
  c.ckpt_steps = 250
  return c
