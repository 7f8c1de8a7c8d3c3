# OpenVision 2 (caption-only: image tokens as a decoder prefix, 35% kept in training) on bvl_shapes, CPU.
#
#   python -m big_vision_lite.train --config configs/openvision2_shapes.py --workdir runs/openvision2
#
# Expected: greedy captions of validation images mostly correct (runs/openvision2/samples.json),
# scoring-classifier (zero-shot by caption likelihood) accuracy far above chance (8 classes: 0.125).
# Measured (1 CPU device, 2026-11-24, 2400 steps; 39 min wall with two other trainings sharing the
# 2 cores): at steps 400 / 800 / 1200 / 1600 / 2000 / 2400 scoring-classifier accuracy 0.232 / 0.41 /
# 0.492 / 0.598 / 0.672 / 0.686; greedy captions (200 images) word accuracy 0.819 / 0.848 / 0.86 /
# 0.88 / 0.886 / 0.889, exact match 0.115 / 0.235 / 0.30 / 0.355 / 0.405 / 0.415; final perplexity
# 1.191. Words right at the end: size 0.935, colour 1.0, shape 0.70, background 1.0, position 0.515
# (CapPa, same budget: shape 0.845, position 0.895). 10-shot probe on mean-pooled tokens 0.33.
# Args: steps, batch, res, width, depth (encoder), dec_depth, heads, patch, keep (train keep ratio of
# image tokens), keep_prob (shapes_caption attribute dropout; 1 = full captions), lr, workers.
"""OpenVision 2: small ViT; a random 35% of its tokens, projected, prefix a 2-layer caption decoder."""

import os

from big_vision_lite.config import load_config, parse_arg

_CAPPA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cappa_shapes.py")


def get_config(arg=None):
  args = parse_arg(arg, steps=2400, batch=128, res=64, width=64, depth=4, dec_depth=2, heads=4,
                   patch=8, keep=0.35, keep_prob=1.0, lr=3e-3, workers=1)
  # Same data, encoder, decoder size, optimizer and evaluators as the CapPa config, so the two
  # caption-only designs are compared on equal terms; only the model and the task differ.
  c = load_config(f"{_CAPPA}:steps={args.steps},batch={args.batch},res={args.res},"
                  f"width={args.width},depth={args.depth},dec_depth={args.dec_depth},"
                  f"heads={args.heads},patch={args.patch},keep_prob={args.keep_prob},"
                  f"lr={args.lr},workers={args.workers}")
  c.model_name = "openvision2"
  c.model.keep_ratio = args.keep
  c.task = dict(name="captioning", tokenizer="bvl_shapes")  # no parallel prediction
  return c
