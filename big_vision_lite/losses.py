"""Loss functions and batch-level augmentations as pure functions (tested against NumPy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy against (soft) one-hot labels; computed in fp32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(labels * logp, axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sum over classes of binary cross-entropy (big_vision's sigmoid_xent)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  return -jnp.sum(labels * logp + (1.0 - labels) * log_not_p, axis=-1)


def mixup(rng: jax.Array, p: float, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """big_vision mixup: a ~ Beta(p, p), a = max(a, 1-a), mix each example with its neighbour."""
  a = jax.random.beta(rng, p, p)
  a = jnp.maximum(a, 1.0 - a)
  mix = lambda x: (a * x + (1.0 - a) * jnp.roll(x, 1, axis=0)).astype(x.dtype)
  return mix(images), mix(labels)
