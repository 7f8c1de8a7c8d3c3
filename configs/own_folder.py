# Small ViT classifier on your own images: a dataset folder that bvl-make-dataset wrote
# (README "Your own data"; docs/data.md). Its dataset_info.json gives the number of classes
# and the train split's size, from which total_epochs becomes a step count.
#
#   bvl-make-dataset path/to/images ds/mine            # images/CLASS/*.jpg -> ds/mine
#   python -m big_vision_lite.train --config configs/own_folder.py:data=ds/mine --workdir runs/own
#
# Expected: on scikit-learn's load_digits (1797 real 8x8 handwritten digits, 10 classes, written
# out as PNG files into class folders; README "Your own data"), held-out top-1 >= 0.95 on the
# 179-image validation split. Measured (2-core "Intel(R) Xeon(R) Processor" VM, shared, 1 CPU
# device, defaults: 30 epochs = 759 steps of 64 at 32 px): 0.972 (174 of 179) in 2 min 42 s wall.
# Args: data (required), res, patch, epochs, batch, width, depth, heads, lr, warmup (steps), flip (random
# left-right flips; off by default: digits and text are not mirror-symmetric), workers.
"""ViT on a bvl-make-dataset folder: classes and epoch size from its dataset_info.json."""

import os

from big_vision_lite.config import ConfigDict, ConfigError, parse_arg
from big_vision_lite.data import dataset_info


def get_config(arg=None):
  args = parse_arg(arg, data="", res=32, patch=4, epochs=30.0, batch=64, width=64, depth=4, heads=4,
                   lr=1e-3, warmup=50, flip=False, workers=1)
  info = dataset_info.load(args.data)
  if not info.get("num_classes"):
    raise ConfigError(f"config arg 'data': {args.data!r} has no labels (num_classes is "
                      f"not set in its {dataset_info.INFO_FILE})")
  classes = info["num_classes"]

  def files(split):
    return os.path.join(args.data, f"{split}-*.array_record")

  c = ConfigDict()
  c.seed = 0
  c.total_epochs = args.epochs  # the train split's size comes from dataset_info.json

  labels = f"|value_range(-1, 1)|onehot({classes}, key='label', key_result='labels')|keep('image', 'labels')"
  c.input = ConfigDict()
  c.input.data = dict(name="array_record", files=files("train"))
  c.input.batch_size = args.batch
  c.input.num_workers = args.workers
  c.input.pp = f"decode|resize({args.res})" + ("|flip_lr" if args.flip else "") + labels

  c.model_name = "vit"
  c.model = dict(width=args.width, depth=args.depth, mlp_dim=args.width * 4, num_heads=args.heads,
                 patch_size=(args.patch, args.patch), num_classes=classes, pool_type="gap",
                 posemb="sincos2d")
  c.task = dict(name="classification", loss="softmax_xent")

  c.optax_name = "adamw"
  c.lr = args.lr
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=args.warmup, decay_type="cosine")
  c.grad_clip_norm = 1.0

  # log_steps=0: evaluated once, at the last step.
  c.evals = dict(val=dict(type="classification", data=dict(name="array_record", files=files("validation")),
                          pp=f"decode|resize({args.res})" + labels, log_steps=0, batch_size=256))
  c.log_training_steps = 50
  c.ckpt_steps = 500
  # A jax.profiler trace of 3 steps after compile and warm-up, in <workdir>/profile.
  c.profile = dict(start_step=10, num_steps=3)
  return c
