# SigLIP B/16 at 224 (or So400m/14 at 384) on real image-text data.
#
#   python -m big_vision_lite.train --config configs/siglip_b16.py:data=tar,files='/data/shards/*.tar',spm=/data/spm.model \
#       --workdir runs/siglip_b16
#
# Args: variant=B/16|So400m/14 (So400m/14 uses res 384 unless res= is given), res, batch, steps,
# loss=sigmoid|softmax, lit (lock a pretrained image tower from init=...: LiT), data=tar|array_record|<tfds name>,
# files (tar/array_record glob), data_dir (tfds), split, text_key (caption key of the examples), spm (local
# sentencepiece .model; nothing is downloaded), vocab (its size), init (image tower checkpoint for lit).
# Expected (published, SigLIP 2 B/16 at 224 after full WebLI training): 78.2% ImageNet zero-shot; this recipe
# has not been run at scale here (no accelerator data), only built and shape-checked.
"""SigLIP recipe: ViT image tower (map pooling) + text transformer (last-token pooling), text length 64, t=log 10, b=-10."""

from big_vision_lite.config import ConfigDict, ConfigError, parse_arg
from big_vision_lite.models.vit import VARIANTS
from big_vision_lite.recipes import image_text_input


def get_config(arg=None):
  args = parse_arg(arg, variant="B/16", res=0, batch=32768, steps=0, epochs=0.0, loss="sigmoid", lit=False,
                   data="tar", files="", data_dir="", split="train", text_key="caption", spm="",
                   vocab=32_000, init="", text_len=64)
  name, _, patch = args.variant.partition("/")
  res = args.res or (384 if name == "So400m" else 224)
  c = ConfigDict()
  c.seed = 0
  c.total_steps = args.steps
  c.total_epochs = args.epochs if not args.steps else 0.0
  if not args.steps and not args.epochs:
    c.total_steps = 10_000  # override with steps=/epochs=

  c.input = image_text_input(args, res)

  c.model_name = "two_towers"
  c.model = dict(
      image=dict(variant=args.variant, pool_type="map", scan=True, remat_policy="nothing_saveable",
                 dtype_mm="bfloat16"),
      # As big_vision's released SigLIP (and what transformers/open_clip expect): the image tower
      # ends at its MAP head, the text tower pools the last token and projects to the image width.
      text=dict(variant=name, vocab_size=args.vocab, pool_type="last", scan=True,
                remat_policy="nothing_saveable", dtype_mm="bfloat16"),
      # The text tower projects to the image tower's width (B: 768, So400m: 1152).
      out_dim=(None, VARIANTS[name][0]), temperature_init=10.0,
      bias_init=-10.0 if args.loss == "sigmoid" else None)
  c.task = dict(name="contrastive", loss=args.loss, chunked=True)

  c.optax_name = "adamw"
  c.optax = dict(b2=0.95)
  c.lr = 1e-3
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=min(5000, max(1, c.total_steps // 10)), decay_type="cosine")
  c.grad_clip_norm = 1.0

  if args.lit:
    # LiT: the image tower is loaded from `init` (a ViT classifier .npz or workdir) and locked.
    if not args.init:
      raise ConfigError("config arg init: lit needs an image-tower checkpoint (init=/path/vit.npz)")
    c.model_init = args.init
    c.model_load = dict(target_prefix="img", allow_mismatch=True)  # its classifier head is not loaded
    c.frozen = ["img/.*"]

  c.evals = {}
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  # A jax.profiler trace of 3 steps after compile and warm-up, in <workdir>/profile.
  c.profile = dict(start_step=10, num_steps=3)
  return c
