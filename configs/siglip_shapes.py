# SigLIP (sigmoid image-text loss) on the built-in shapes dataset's captions, on CPU.
#
#   python -m big_vision_lite.train --config configs/siglip_shapes.py --workdir runs/siglip
#
# Expected: zero-shot classification (class names in prompts) and image-text retrieval
# recall@1 far above chance on the validation split (8 classes: chance 0.125; 2000 captions:
# chance 0.0005). Measured (1 CPU device, 2026-11-24, 2400 steps; 37 min wall with two other
# trainings sharing the 2 cores): zero-shot 0.307 / 0.398 / 0.604 / 0.825 / 0.905 / 0.922 /
# 0.939 / 0.941 at steps 300-2400, retrieval R@1 i2t 0.426, t2i 0.485 (R@10 0.947 / 0.957),
# 10-shot linear probe on the image features 0.90.
# LiT, `:lit=runs/vit,steps=1200` (image tower locked from the quick-start classifier; measured
# 2026-11-25): zero-shot 0.947, retrieval R@1 0.020 / 0.036, 10-shot probe 0.93 (keep_prob=0.5,
# 2026-11-23: zero-shot 0.944, R@1 0.093 / 0.131).
# Args: loss=sigmoid|softmax, chunked (ring loss across devices), keep_prob (caption attribute
# dropout), lit=<vit_shapes workdir> (LiT: locked image tower), steps, batch, res, width, depth,
# patch, workers.
"""Two towers (small ViT + text transformer) trained with the SigLIP loss on bvl_shapes captions."""

from big_vision_lite.config import ConfigDict, parse_arg

MAX_LEN = 16  # longest caption is 13 words + eos
# Training captions drop attributes at random (shapes_caption), so short prompts are in-distribution.
TEMPLATES = ["a {}", "a small {}", "a medium {}", "a large {}"]


def get_config(arg=None):
  args = parse_arg(arg, res=64, steps=2400, batch=128, width=64, depth=4, heads=4, patch=8,
                   loss="sigmoid", chunked=True, keep_prob=0.1, workers=1, lit="")
  c = ConfigDict()
  c.seed = 0
  c.total_steps = args.steps

  img_pp = f"decode|resize({args.res})|value_range(-1, 1)"  # no flip_lr: captions say left/right
  tok = f"tokenize({MAX_LEN}, model='bvl_shapes', key='caption', key_result='labels')"
  c.input = ConfigDict()
  c.input.data = dict(name="bvl_shapes", split="train")
  c.input.batch_size = args.batch
  c.input.num_workers = args.workers
  # Each attribute but the shape is named with probability keep_prob: with all of them named,
  # colour/size/background/position alone single out a caption's image in a 128-image batch
  # and the towers never learn the shapes. Zero-shot at step 1200: full captions 0.24,
  # keep_prob 0.5 0.342, 0.25 0.447, 0.1 0.825 (0.941 at 2400). Retrieval on full captions
  # still learns the other attributes from the few captions that name them.
  c.input.pp = f"{img_pp}|shapes_caption({args.keep_prob})|{tok}|keep('image', 'labels')"
  full_captions = f"{img_pp}|{tok}|keep('image', 'labels')"  # evaluation: the dataset's captions

  c.model_name = "two_towers"
  c.model = dict(
      image=dict(width=args.width, depth=args.depth, mlp_dim=args.width * 4, num_heads=args.heads,
                 patch_size=(args.patch, args.patch), pool_type="map", posemb="sincos2d"),
      # The released SigLIP layout (exports to transformers and open_clip): image tower ends at
      # its MAP head, text tower pools the last token and projects to the image width.
      text=dict(width=args.width, depth=2, mlp_dim=args.width * 4, num_heads=args.heads,
                vocab_size=64, pool_type="last"),
      out_dim=(None, args.width), temperature_init=10.0,
      bias_init=-10.0 if args.loss == "sigmoid" else None)
  c.task = dict(name="contrastive", loss=args.loss, chunked=args.chunked)
  if args.lit:
    # LiT: lock the image tower of a trained configs/vit_shapes.py run (lit=runs/vit) and train
    # only the text tower; the image embedding is that ViT's gap features (its head is not loaded).
    c.model.image.pool_type = "gap"
    c.model_init = args.lit
    c.model_load = dict(target_prefix="img", allow_mismatch=True)
    c.frozen = ["img/.*"]

  c.optax_name = "adamw"
  c.lr = 1e-3
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=50, decay_type="cosine")
  c.grad_clip_norm = 1.0

  val = dict(name="bvl_shapes", split="validation")
  c.evals = dict(
      zeroshot=dict(type="zero_shot", data=val, pp=f"{img_pp}|keep('image', 'label')",
                    pp_txt=f"tokenize({MAX_LEN}, model='bvl_shapes', key='texts', key_result='labels')",
                    templates=TEMPLATES,
                    log_steps=300, batch_size=256),
      retrieval=dict(type="retrieval", data=val, pp=full_captions, log_steps=300, batch_size=256),
      probe=dict(type="linear_probe", train_data=dict(name="bvl_shapes", split="train[:1000]"),
                 train_pp=f"{img_pp}|keep('image', 'label')", data=val,
                 pp=f"{img_pp}|keep('image', 'label')", num_classes=8, shots=[1, 5, 10],
                 log_steps=0, batch_size=256),
  )
  c.log_training_steps = 50
  c.ckpt_steps = 300
  # A jax.profiler trace of 3 steps after compile and warm-up, in <workdir>/profile.
  c.profile = dict(start_step=10, num_steps=3)
  return c
