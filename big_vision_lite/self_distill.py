"""SigLIP 2's self-distillation math: SILC local-to-global and TIPS masked-prediction losses, the
teacher's EMA and centre, patch masks and local crops. Pure functions, no model.

SigLIP 2 (Tschannen et al. 2025, Sec. 2.3) adds both losses in the last 20% of training, with a
teacher that is an EMA of the student (image tower and heads), initialised from the student when
the losses switch on:
- SILC (Naeem et al. 2023, Sec. 3, its self-distillation term): DINO's loss (Caron et al. 2021,
  Eq. 2-3) between the teacher's prototype distribution of the full image and the student's of
  each local crop. Teacher: softmax((t - c) / tau_t), c the centre (an EMA of the teacher's
  outputs over batches, DINO Eq. 4); student: log_softmax(s / tau_s); the loss is the
  cross-entropy, averaged over the local crops and the batch.
- TIPS (Maninis et al. 2024, its masked image modelling term, after iBOT, Zhou et al. 2022,
  Eq. 1): the student sees the full image with a fraction of its patch embeddings replaced by a
  learned mask token and, at each masked position, predicts the teacher's per-patch prototype
  distribution of the unmasked image: the same cross-entropy per patch, with its own centre,
  averaged over the masked patches of each image, then over images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, temp: float) -> jax.Array:
  """DINO's sharpened, centred teacher targets softmax((t - c) / temp), without gradient."""
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) - center)
  return jax.nn.softmax(t / temp, axis=-1)


def cross_entropy(targets: jax.Array, student_logits: jax.Array, temp: float) -> jax.Array:
  """-sum_k targets_k log_softmax(student / temp)_k over the last axis."""
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temp, axis=-1)
  return -jnp.sum(targets * logp, axis=-1)


def local_to_global_loss(student_local: jax.Array, teacher_global: jax.Array, center: jax.Array,
                         *, student_temp: float, teacher_temp: float) -> jax.Array:
  """SILC's local-to-global consistency: student logits of the local crops (B, N, K) against the
  teacher's logits of the full image (B, K); the cross-entropy averaged over crops and batch."""
  targets = teacher_probs(teacher_global, center, teacher_temp)[:, None, :]
  return jnp.mean(cross_entropy(targets, student_local, student_temp))


def masked_prediction_loss(student_patches: jax.Array, teacher_patches: jax.Array,
                           mask: jax.Array, center: jax.Array, *, student_temp: float,
                           teacher_temp: float) -> jax.Array:
  """TIPS' masked prediction: per-patch logits (B, P, K) of the masked student and of the
  teacher on the full image; cross-entropy at the masked positions `mask` (B, P), averaged over
  each image's masked patches, then over images (iBOT's normalisation)."""
  ce = cross_entropy(teacher_probs(teacher_patches, center, teacher_temp), student_patches,
                     student_temp)
  m = mask.astype(jnp.float32)
  per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  return jnp.mean(per_image)


def center_update(center: jax.Array, batch_mean: jax.Array, momentum: float) -> jax.Array:
  """DINO Eq. 4: c <- m c + (1 - m) mean of the teacher's logits over the batch."""
  return momentum * center + (1.0 - momentum) * batch_mean.astype(center.dtype)


def ema(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
  """The teacher's EMA update theta_t <- m theta_t + (1 - m) theta_s, leaf by leaf."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s.astype(t.dtype),
                      teacher, student)


def random_patch_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
  """(batch, num_patches) bool with exactly round(ratio * num_patches) True per row, placed
  uniformly at random (the ranks of uniform noise), so every image has the same count."""
  count = int(round(ratio * num_patches))
  noise = jax.random.uniform(rng, (batch, num_patches))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < count


def local_crop_boxes(rng: jax.Array, batch: int, num_crops: int,
                     scale: tuple[float, float]) -> jax.Array:
  """(batch, num_crops, 4) square boxes (y0, x0, side_y, side_x) in [0, 1] image units; the area
  is uniform in `scale` (SILC's / DINO's local views: 0.05 to 0.4 of the image), the position
  uniform where the box fits."""
  k_area, k_y, k_x = jax.random.split(rng, 3)
  area = jax.random.uniform(k_area, (batch, num_crops), minval=scale[0], maxval=scale[1])
  side = jnp.sqrt(area)
  y0 = jax.random.uniform(k_y, (batch, num_crops)) * (1.0 - side)
  x0 = jax.random.uniform(k_x, (batch, num_crops)) * (1.0 - side)
  return jnp.stack([y0, x0, side, side], axis=-1)


def local_crops(rng: jax.Array, images: jax.Array, num_crops: int, size: int,
                scale: tuple[float, float]) -> jax.Array:
  """`num_crops` random square crops of each image (B, H, W, C) resized to (size, size),
  bilinearly (antialiased): (B, num_crops, size, size, C)."""
  b, h, w, c = images.shape
  boxes = local_crop_boxes(rng, b, num_crops, scale)

  def crop(image, box):
    # Output pixel o samples input (o - translation) / scale: the box's corner maps to 0.
    sy, sx = size / (box[2] * h), size / (box[3] * w)
    return jax.image.scale_and_translate(
        image, (size, size, c), (0, 1), jnp.stack([sy, sx]),
        jnp.stack([-box[0] * h * sy, -box[1] * w * sx]), method="linear", antialias=True)

  per_image = jax.vmap(crop, in_axes=(None, 0))
  return jax.vmap(per_image)(images.astype(jnp.float32), boxes).astype(images.dtype)
