"""Tests for big_vision_lite.optim / schedules against plain NumPy references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import optim
from big_vision_lite.schedules import make_schedule


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _params():
  rng = np.random.default_rng(0)
  return {
      "a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
      "b": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ----------------------------------------------------------------------------- schedules

def _np_schedule(step, total, warmup=0, decay="constant", end=0.0, timescale=10_000,
                 cooldown=0):
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  if decay == "cosine":
    m = end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
  elif decay == "linear":
    m = end + (1 - end) * (1 - progress)
  elif decay == "rsqrt":
    m = 1 / math.sqrt(1 + max(step - warmup, 0) / timescale)
  else:
    m = 1.0
  if warmup:
    m *= min(1.0, step / warmup)
  if cooldown:
    m *= min(max((total - step) / cooldown, 0.0), 1.0)
  return m


@pytest.mark.parametrize("sched, total, ref_kw, key_values", [
    (dict(warmup_steps=10, decay_type="cosine"), 110, dict(warmup=10, decay="cosine"),
     {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
    (dict(warmup_steps=10, decay_type="cosine", min_lr=0.1), 110,
     dict(warmup=10, decay="cosine", end=0.1), {10: 1.0, 60: 0.55, 110: 0.1}),
    (dict(warmup_percent=0.1, decay_type="linear"), 100, dict(warmup=10, decay="linear"),
     {5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
    (dict(decay_type="linear", linear_end=0.2), 100, dict(decay="linear", end=0.2),
     {0: 1.0, 50: 0.6, 100: 0.2}),
    (dict(warmup_steps=10, decay_type="rsqrt", timescale=100, cooldown_steps=20), 200,
     dict(warmup=10, decay="rsqrt", timescale=100, cooldown=20),
     {10: 1.0, 110: 1 / math.sqrt(2), 180: 1 / math.sqrt(2.7), 190: 0.5 / math.sqrt(2.8),
      200: 0.0}),
    (dict(warmup_steps=4, decay_type="rsqrt", cooldown_percent=0.5), 20,
     dict(warmup=4, decay="rsqrt", cooldown=10), {4: 1.0, 15: 0.5 / math.sqrt(1.0011)}),
    (dict(warmup_steps=4), 20, dict(warmup=4), {2: 0.5, 4: 1.0, 20: 1.0}),
])
def test_schedule_values(sched, total, ref_kw, key_values):
  fn = make_schedule(_cfg(schedule=sched), total)
  jitted = jax.jit(fn)
  for step, want in key_values.items():
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-6)
  for step in range(0, total + 1, 3):
    want = _np_schedule(step, total, **ref_kw)
    np.testing.assert_allclose(float(jitted(jnp.int32(step))), want, rtol=1e-5, atol=1e-6)


def test_schedule_default_is_constant():
  fn = make_schedule(_cfg(), 10)
  assert [float(fn(s)) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("sched, match", [
    (dict(decay_type="cosinee"), "decay_type"),
    (dict(warmup_step=10), "unknown keys.*warmup_step"),
    (dict(warmup_steps=100), "warmup"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(warmup_steps=2, warmup_percent=0.1), "only one"),
    (dict(warmup_percent=1.5), "warmup_percent"),
])
def test_schedule_errors(sched, match):
  with pytest.raises(ValueError, match=match):
    make_schedule(_cfg(schedule=sched), 100)


# ----------------------------------------------------------------------------- adamw math

def _np_adamw(params, grads_seq, lr, wd, sched, wd_mult, b1=0.9, b2=0.999, eps=1e-8):
  """NumPy Adam + big_vision decoupled wd: p -= s(t) * (lr * adam + wd * mult * p)."""
  p = dict(params)
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq):
    for k in p:
      mu[k] = b1 * mu[k] + (1 - b1) * grads[k]
      nu[k] = b2 * nu[k] + (1 - b2) * grads[k] ** 2
      mu_hat = mu[k] / (1 - b1 ** (t + 1))
      nu_hat = nu[k] / (1 - b2 ** (t + 1))
      adam = mu_hat / (np.sqrt(nu_hat) + eps)
      p[k] = p[k] - sched(t) * (lr * adam + wd * wd_mult[k] * p[k])
  return p


def test_adamw_two_steps_matches_numpy():
  params = {"enc": {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.25]]),
                    "bias": jnp.asarray([0.3, -0.7])}}
  grads_seq = [{"enc": {"kernel": jnp.asarray([[0.1, -0.2], [0.3, 0.05]]),
                        "bias": jnp.asarray([1.0, -2.0])}},
               {"enc": {"kernel": jnp.asarray([[-0.4, 0.2], [0.1, 0.5]]),
                        "bias": jnp.asarray([0.5, 0.5])}}]
  # Linear decay over 4 steps: multipliers 1.0, 0.75; wd must see them but not lr.
  config = _cfg(optax_name="adamw", lr=0.01, wd=0.1, optax=dict(b1=0.9, b2=0.999),
                schedule=dict(decay_type="linear"))
  tx, lr_fn = optim.make_optimizer(config, params, total_steps=4)
  state = tx.init(params)
  p = params
  for g in grads_seq:
    updates, state = jax.jit(tx.update)(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  flat = lambda t: {k: np.asarray(v, np.float64) for k, v in t["enc"].items()}
  want = _np_adamw(flat(params), [flat(g) for g in grads_seq], lr=0.01, wd=0.1,
                   sched=lambda t: 1 - t / 4, wd_mult={"kernel": 1.0, "bias": 0.0})
  for k in want:
    np.testing.assert_allclose(np.asarray(p["enc"][k]), want[k], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(lr_fn(1)), 0.01 * 0.75, rtol=1e-6)


def test_wd_not_scaled_by_lr_and_bias_untouched():
  # SGD with zero grads isolates weight decay: update = -wd * mult * s(t) * p.
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  config = _cfg(optax_name="sgd", lr=1e-6, wd=0.5,
                schedule=dict(warmup_steps=4, decay_type="cosine"))
  tx, _ = optim.make_optimizer(config, params, total_steps=20)
  state = tx.init(params)
  for _ in range(2):  # step 1 has warmup multiplier 0.25
    updates, state = tx.update(zeros, state, params)
  np.testing.assert_allclose(np.asarray(updates["a"]["kernel"]),
                             -0.5 * 0.25 * np.asarray(params["a"]["kernel"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["a"]["bias"]), 0.0)


def test_wd_mults_first_match_wins():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  config = _cfg(optax_name="sgd", lr=1.0, wd=0.1,
                wd_mults=[(".*/bias", 0.5), ("a/.*", 2.0), (".*", 1.0)])
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  want = {("a", "bias"): 0.05, ("a", "kernel"): 0.2, ("b", "kernel"): 0.1}
  for (m, n), w in want.items():
    np.testing.assert_allclose(np.asarray(updates[m][n]), -w * np.asarray(params[m][n]),
                               rtol=1e-6)


def test_lr_mults_scale_updates():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  config = _cfg(optax_name="sgd", lr=0.1, lr_mults=[("a/kernel", 0.1), ("a/.*", 3.0)])
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["a"]["kernel"]), -0.01, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["a"]["bias"]), -0.3, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["b"]["kernel"]), -0.1, rtol=1e-6)


def _state_size(state):
  return sum(np.size(x) for x in jax.tree.leaves(state))


def test_frozen_zero_update_and_no_state():
  params = _params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  base = dict(optax_name="adamw", lr=0.1, wd=0.5, grad_clip_norm=1.0)
  tx, _ = optim.make_optimizer(_cfg(**base, frozen=["b/.*"]), params, total_steps=10)
  state = tx.init(params)
  p = params
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  np.testing.assert_array_equal(np.asarray(updates["b"]["kernel"]), 0.0)
  np.testing.assert_array_equal(np.asarray(p["b"]["kernel"]), np.asarray(params["b"]["kernel"]))
  assert np.all(np.asarray(updates["a"]["kernel"]) != 0)
  # Adam state (mu, nu) only for the 16 trainable numbers, plus scalar counters.
  tx_all, _ = optim.make_optimizer(_cfg(**base), params, total_steps=10)
  size_b = params["b"]["kernel"].size
  assert _state_size(tx_all.init(params)) - _state_size(state) == 2 * size_b
  trainable = params["a"]["kernel"].size + params["a"]["bias"].size
  assert _state_size(state) <= 2 * trainable + 4
  frozen_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(state)
                   if any(getattr(k, "key", None) == "b" for k in path)]
  assert frozen_leaves == []


def test_grad_clipping_matches_numpy_and_ignores_frozen():
  params = _params()
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 5, jnp.float32), params)
  np_grads = _np(grads)
  norm_a = math.sqrt(sum(np.sum(np_grads["a"][k] ** 2) for k in ("kernel", "bias")))
  norm_all = math.sqrt(norm_a ** 2 + np.sum(np_grads["b"]["kernel"] ** 2))
  np.testing.assert_allclose(float(optim.global_norm(grads)), norm_all, rtol=1e-5)

  config = _cfg(optax_name="sgd", lr=1.0, grad_clip_norm=0.5)
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["b"]["kernel"]),
                             -np_grads["b"]["kernel"] * 0.5 / norm_all, rtol=1e-5)
  # With b frozen, the norm is over a's grads only.
  tx, _ = optim.make_optimizer(_cfg(**config, frozen=["b/kernel"]), params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["a"]["bias"]),
                             -np_grads["a"]["bias"] * 0.5 / norm_a, rtol=1e-5)


@pytest.mark.parametrize("name, lr, kw", [
    ("adamw", 0.1, {}),
    ("scale_by_adam", 0.1, dict(b2=0.99)),
    ("adafactor", 0.1, dict(momentum=0.5, dtype_momentum="float32")),
    ("lion", 0.1, {}),
    ("sgd", 0.05, dict(momentum=0.9, nesterov=True)),
])
def test_each_optimizer_reduces_quadratic(name, lr, kw):
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  target = jax.tree.map(lambda x: x * 0 + 2.0, params)
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  config = _cfg(optax_name=name, lr=lr, wd=1e-4, optax=kw, grad_clip_norm=10.0,
                schedule=dict(warmup_steps=5, decay_type="cosine"))
  tx, _ = optim.make_optimizer(config, params, total_steps=50)

  @jax.jit
  def train(p):
    def step(_, carry):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return jax.tree.map(lambda a, b: a + b, p, u), s
    return jax.lax.fori_loop(0, 50, step, (p, tx.init(p)))[0]

  start, end = float(loss(params)), float(loss(train(params)))
  assert end < 0.05 * start, (name, start, end)


# ----------------------------------------------------------------------------- helpers & errors

def test_tree_paths_and_match_regexes():
  params = _params()
  assert optim.tree_paths(params)["a"]["kernel"] == "a/kernel"
  got = optim.match_regexes(params, [(".*/bias", "B"), ("a/.*", "A")], "-")
  assert got == {"a": {"kernel": "A", "bias": "B"}, "b": {"kernel": "-"}}


@pytest.mark.parametrize("overrides, match", [
    (dict(optax_name="adamm"), r"config\.optax_name.*'adamw'.*'lion'"),
    (dict(wd_mults=[("a/kernal", 1.0)]), r"config\.wd_mults.*'a/kernal'"),
    (dict(lr_mults=[(".*/kernel", 2.0), ("img/.*", 0.1)]), r"config\.lr_mults.*'img/\.\*'"),
    (dict(frozen=["txt/.*"]), r"config\.frozen.*'txt/\.\*'"),
    (dict(frozen="a/.*"), r"config\.frozen must be a list"),
    (dict(lr="0.1"), r"config\.lr must be a number"),
    (dict(wd=-1.0), r"config\.wd"),
    (dict(grad_clip_norm="1"), r"config\.grad_clip_norm"),
    (dict(wd_mults=[(".*", "x")]), r"config\.wd_mults"),
    (dict(lr_mults=[("a/.*", 0.0)]), r"config\.lr_mults.*frozen"),
    (dict(optax=dict(momentum=0.9)), r"config\.optax.*momentum"),
    (dict(optax=dict(learning_rate=0.1)), r"config\.optax\.learning_rate"),
    (dict(frozen=["a/(kernel"]), r"config\.frozen.*invalid regex"),
])
def test_config_errors(overrides, match):
  config = dict(optax_name="adamw", lr=0.1, wd=0.0)
  config.update(overrides)
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_cfg(**config), _params(), total_steps=10)
