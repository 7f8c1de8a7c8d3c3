# CapPa B/16 at 224 (big_vision's recipe): ViT-B/16 encoder + 6-layer cross-attention decoder,
# 75% of examples trained with parallel prediction, captions of up to 64 tokens.
#
#   python -m big_vision_lite.train --config configs/cappa_b16.py:data=tar,files='/data/shards/*.tar',spm=/data/c4_en.model \
#       --workdir runs/cappa_b16
#
# Args: data=tar|array_record|<tfds name>, files (tar/array_record glob), data_dir (tfds), split, text_key
# (caption key of the examples), spm (local sentencepiece .model, or a word-per-line .txt; nothing is
# downloaded), vocab (its size), variant (encoder, default B/16), res, batch, steps, parallel, opt
# (adafactor|adamw).
# The settings are those of big_vision's configs/proj/cappa/pretrain.py (its reference config, also
# never run at scale in public): batch 8192, 366,500 steps, lr 1e-3 with 10k warmup steps and cosine
# decay, wd 1e-4, grad clip 1.0, big_vision's Adafactor with beta2 capped at 0.999 (optim.py's
# defaults), parallel prediction for 75% of examples with every input token masked, and no biases in
# the decoder blocks (decoder_bias=False; its attention has none either).
# Expected: the paper (CapPa, "Image Captioners Are Scalable Vision Learners Too") reports encoders
# competitive with contrastive ones of the same size; FACTS.md records no accuracy number for it, so
# none is promised here. This recipe has NOT been run at scale in this project (no
# accelerator data): only loaded and built abstractly at full size (tests/test_configs.py). The
# encoder is exported with `python -m big_vision_lite.tools.extract_encoder --workdir runs/cappa_b16 --out enc.npz`.
"""CapPa recipe: ViT-B/16 at 224, decoder 6 x 768, max_len 64 (eos sticky), parallel 0.75, batch 8192."""

from big_vision_lite.config import ConfigDict, ConfigError, parse_arg
from big_vision_lite.recipes import image_text_input


def get_config(arg=None):
  args = parse_arg(arg, variant="B/16", res=224, batch=8192, steps=0, data="tar", files="", data_dir="",
                   split="train", text_key="caption", spm="", vocab=32_000, text_len=64, parallel=0.75,
                   dec_depth=6, opt="adafactor")
  if args.opt not in ("adafactor", "adamw"):
    raise ConfigError(f"config arg opt: {args.opt!r} is not adafactor or adamw")
  c = ConfigDict()
  c.seed = 0
  c.total_steps = args.steps or 366_500  # big_vision's: ~3B examples at batch 8192

  c.input = image_text_input(args, args.res)

  c.model_name = "cappa"
  c.model = dict(
      image=dict(variant=args.variant, pool_type="gap", scan=True, remat_policy="nothing_saveable",
                 dtype_mm="bfloat16"),
      # The decoder has the encoder's width/heads/mlp (variant without patch) and 6 layers.
      decoder=dict(variant=args.variant.split("/")[0], depth=args.dec_depth, dtype_mm="bfloat16",
                   use_bias=False),
      vocab_size=args.vocab, max_len=args.text_len)
  c.task = dict(name="captioning", parallel_fraction=args.parallel, tokenizer=args.spm)

  c.optax_name = args.opt
  if args.opt == "adamw":
    c.optax = dict(b2=0.95)
  c.lr = 1e-3
  c.wd = 1e-4
  c.schedule = dict(warmup_steps=10_000, decay_type="cosine")
  c.grad_clip_norm = 1.0

  c.evals = {}  # add caption_perplexity / scoring_classifier / linear_probe on your own splits
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  # A jax.profiler trace of 3 steps after compile and warm-up, in <workdir>/profile.
  c.profile = dict(start_step=10, num_steps=3)
  return c
