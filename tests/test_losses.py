"""Losses and mixup against plain NumPy."""

import jax
import numpy as np

from big_vision_lite import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_softmax_xent_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = np.eye(7, dtype=np.float32)[rng.integers(0, 7, 5)] * 0.8 + 0.2 / 7
  want = -(labels * _np_log_softmax(logits.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(losses.softmax_xent(logits, labels), want, rtol=1e-5)


def test_sigmoid_xent_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 6)) * 5
  labels = (rng.random((4, 6)) > 0.5).astype(np.float64)
  p = 1 / (1 + np.exp(-logits))
  want = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(-1)
  np.testing.assert_allclose(losses.sigmoid_xent(logits.astype(np.float32), labels), want, rtol=1e-4)


def test_mixup_is_convex_combination_with_neighbour():
  x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  y = np.eye(4, dtype=np.float32)
  mx, my = losses.mixup(jax.random.PRNGKey(0), 0.2, x, y)
  a = float(my[0, 0])
  assert 0.5 <= a <= 1.0
  np.testing.assert_allclose(mx, a * x + (1 - a) * np.roll(x, 1, axis=0), rtol=1e-6)
  np.testing.assert_allclose(my.sum(-1), 1.0, rtol=1e-6)
