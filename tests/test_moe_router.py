"""MoE router math against plain NumPy: capacity, top-1-before-top-2 priority, BPR, aux losses."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.models import moe


def _softmax(x):
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


def _ref_positions(gates, k, cap, bpr):
  """Loop reference: serve rank 0 of every token, then rank 1, ...; BPR visits by top gate."""
  g, s, e = gates.shape
  idx = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
  keep = np.zeros((g, s, k), bool)
  pos = np.full((g, s, k), -1)
  for gi in range(g):
    order = np.argsort(-gates[gi].max(-1), kind="stable") if bpr else np.arange(s)
    count = np.zeros(e, int)
    for r in range(k):
      for t in order:
        ex = idx[gi, t, r]
        if count[ex] < cap:
          keep[gi, t, r], pos[gi, t, r] = True, count[ex]
        count[ex] += 1
  return idx, keep, pos


def _vmoe_capacity(num_tokens, num_experts, cf, multiple_of=4):
  """vmoe/moe.py compute_capacity ("ceil"): ceil(tokens * cf / E), raised to a multiple."""
  c = int(math.ceil(num_tokens * cf / num_experts))
  if multiple_of:
    c += (-c) % multiple_of
  return c


def _vmoe_importance(gates):
  """vmoe/nn/routing.py NoisyTopExpertsPerItemRouter._importance_auxiliary_loss; gates (S, E)."""
  imp = gates.sum(0)
  return (imp.std() / imp.mean()) ** 2


def _vmoe_load(logits, noisy, noise_std, k):
  """vmoe/nn/routing.py NoisyTopExpertsPerItemRouter._load_auxiliary_loss; (S, E) each."""
  kth = np.argsort(-noisy, axis=-1, kind="stable")[:, k - 1]
  threshold = np.take_along_axis(noisy, kth[:, None], axis=-1)
  z = (threshold - logits) / noise_std
  p = 1.0 - 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
  p_mean = p.mean(0)
  return (p_mean.std() / p_mean.mean()) ** 2


def _vmoe_router(logits, noisy, noise_std, k, w_imp, w_load):
  """vmoe/nn/routing.py _compute_gates_softmax_and_metrics, vmapped over groups, then averaged.

  Importance on the clean softmax; load (training only) on clean vs noisy logits;
  the noisy softmax routes in training, the clean one when deterministic.
  """
  clean = _softmax(logits.astype(np.float64))
  imp = np.mean([_vmoe_importance(gi) for gi in clean])
  if noisy is None:
    return clean, imp, None, w_imp * imp
  load = np.mean([_vmoe_load(l, n, noise_std, k) for l, n in zip(logits.astype(np.float64),
                                                                 noisy.astype(np.float64))])
  return _softmax(noisy.astype(np.float64)), imp, load, w_imp * imp + w_load * load


def test_capacity_formula():
  assert moe.capacity(2, 196, 1.05, 8) == math.ceil(2 * 196 * 1.05 / 8) == 52
  assert moe.capacity(1, 16, 1.0, 4) == 4
  assert moe.capacity(1, 3, 0.01, 8) == 1  # at least one slot
  assert moe.capacity(2, 10, 100.0, 4) == 10  # never more than the group


@pytest.mark.parametrize("s,k,cf,e", [(64, 2, 1.05, 4), (16, 2, 1.05, 4), (196, 2, 1.05, 8),
                                      (196, 1, 0.5, 8), (64, 1, 1.05, 4), (50, 2, 0.5, 32)])
def test_capacity_multiple_of_matches_vmoe(s, k, cf, e):
  assert moe.capacity(k, s, cf, e, multiple_of=4) == min(_vmoe_capacity(s * k, e, cf), s)
  assert moe.capacity(k, s, cf, e) == _vmoe_capacity(s * k, e, cf, multiple_of=None)
  assert moe.capacity(2, 64, 1.05, 4, 4) == 36 and moe.capacity(2, 16, 1.05, 4, 4) == 12


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("k,cf", [(1, 0.5), (1, 1.05), (2, 0.5), (2, 1.05)])
def test_route_top_k_matches_vmoe_router(train, bpr, k, cf):
  """Losses, capacity and dispatch against vmoe's router on the same logits and noise."""
  g, s, e = 3, 16, 4
  rng = np.random.default_rng(100 * k + 10 * int(bpr) + int(train))
  # Per-group expert biases: groups imbalanced in different directions, so a
  # batch-wide importance (which lets them cancel) would differ from per group.
  logits = (rng.normal(size=(g, s, e)) + 2 * rng.normal(size=(g, 1, e))).astype(np.float32)
  std = 1.0 / e
  noisy = (logits + std * rng.normal(size=logits.shape)).astype(np.float32) if train else None
  gates, imp, load, aux = _vmoe_router(logits, noisy, std, k, 0.005, 0.005)
  r = moe.route_top_k(jnp.asarray(logits), None if noisy is None else jnp.asarray(noisy), k=k,
                      capacity_factor=cf, bpr=bpr, noise_std=std, capacity_multiple_of=4)
  cap = min(_vmoe_capacity(s * k, e, cf), s)
  assert r.dispatch.shape == (g, s, e, cap)
  idx, keep, pos = _ref_positions(gates.astype(np.float32), k, cap, bpr)
  want = np.zeros((g, s, e, cap))
  for gi, t, j in zip(*np.nonzero(keep)):
    want[gi, t, idx[gi, t, j], pos[gi, t, j]] = 1
  np.testing.assert_array_equal(np.asarray(r.dispatch), want)
  # fp32 softmax and CDF against float64: a few ulps of each of the S*E terms summed.
  rtol = 16 * s * e * np.finfo(np.float32).eps
  np.testing.assert_allclose(float(r.metrics["importance_loss"]), imp, rtol=rtol)
  np.testing.assert_allclose(float(r.aux_loss), aux, rtol=rtol)
  if train:
    np.testing.assert_allclose(float(r.metrics["load_loss"]), load, rtol=rtol)


def test_importance_is_per_group_not_batch_wide():
  # Two groups imbalanced in opposite directions: batch-wide they cancel, per group they do not.
  gates = np.asarray([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4], np.float32)
  got = float(moe.importance_loss(jnp.asarray(gates)))
  np.testing.assert_allclose(got, np.mean([_vmoe_importance(gi) for gi in gates]),
                             rtol=8 * np.finfo(np.float32).eps)
  assert got > 0.6  # batch-wide it would be 0


@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 1.0), (2, 0.5), (3, 1.25)])
def test_positions_match_numpy(bpr, k, cf):
  rng = np.random.default_rng(k * 10 + int(bpr))
  gates = _softmax(rng.normal(size=(3, 12, 4)) * 2).astype(np.float32)
  cap = moe.capacity(k, 12, cf, 4)
  idx, keep, pos = jax.tree.map(np.asarray, moe.top_k_positions(jnp.asarray(gates), k, cap, bpr))
  ridx, rkeep, rpos = _ref_positions(gates, k, cap, bpr)
  np.testing.assert_array_equal(idx, ridx)
  np.testing.assert_array_equal(keep, rkeep)
  np.testing.assert_array_equal(np.where(keep, pos, -1), np.where(rkeep, rpos, -1))


def test_top1_served_before_any_top2():
  # 3 tokens, 2 experts, capacity 2. Token 0's 2nd choice (expert 1) comes first in
  # token order but must lose to tokens 1 and 2 whose 1st choice is expert 1; then
  # expert 0 has one slot left for the 2nd choices: token 1 gets it, token 2 is dropped.
  gates = jnp.asarray([[[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]], jnp.float32)
  _, keep, pos = moe.top_k_positions(gates, 2, 2, bpr=False)
  np.testing.assert_array_equal(np.asarray(keep), [[[True, False], [True, True], [True, False]]])
  np.testing.assert_array_equal(np.asarray(pos)[0, 1:, 0], [0, 1])


def test_bpr_most_confident_tokens_win():
  # All tokens want expert 0; capacity 1. Without BPR token 0 wins, with BPR token 2 (gate 0.9).
  gates = jnp.asarray([[[0.55, 0.45], [0.7, 0.3], [0.9, 0.1]]], jnp.float32)
  _, keep, _ = moe.top_k_positions(gates, 1, 1, bpr=False)
  np.testing.assert_array_equal(np.asarray(keep)[0, :, 0], [True, False, False])
  _, keep, _ = moe.top_k_positions(gates, 1, 1, bpr=True)
  np.testing.assert_array_equal(np.asarray(keep)[0, :, 0], [False, False, True])


def test_importance_loss_matches_numpy():
  gates = _softmax(np.random.default_rng(0).normal(size=(2, 5, 4))).astype(np.float32)
  imp = gates.sum(1)
  want = np.mean((imp.std(-1) / imp.mean(-1)) ** 2)
  np.testing.assert_allclose(float(moe.importance_loss(jnp.asarray(gates))), want, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_matches_numpy(k):
  rng = np.random.default_rng(k)
  logits = rng.normal(size=(2, 6, 4)).astype(np.float32)
  std = 0.25
  noisy = (logits + std * rng.normal(size=logits.shape)).astype(np.float32)
  thr = np.sort(noisy, -1)[..., -k][..., None]
  phi = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
  p = 1 - phi((thr - logits) / std)
  pm = p.mean(1)
  want = np.mean((pm.std(-1) / pm.mean(-1)) ** 2)
  got = moe.load_loss(jnp.asarray(logits), jnp.asarray(noisy), std, k)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_route_top_k_dispatch_combine_and_weights():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  r = moe.route_top_k(logits, logits, k=2, capacity_factor=100.0, bpr=True, noise_std=0.0)
  gates = _softmax(np.asarray(logits))
  d, c = np.asarray(r.dispatch), np.asarray(r.combine)
  assert d.shape == (2, 8, 4, 8)
  np.testing.assert_array_equal(d.sum((2, 3)), 2)  # every token reached both its experts
  assert d.sum(1).max() == 1  # one token per slot
  top2 = np.sort(gates, -1)[..., -2:].sum(-1)
  np.testing.assert_allclose(c.sum((2, 3)), top2, rtol=1e-5)
  assert float(r.metrics["dropped"]) == 0.0
  want_aux = 0.005 * float(moe.importance_loss(jnp.asarray(gates)))
  np.testing.assert_allclose(float(r.aux_loss), want_aux, rtol=1e-6)  # no load term without noise
  # Tight capacity: drops, and a dropped choice leaves no trace in dispatch or combine.
  r = moe.route_top_k(logits, logits, k=2, capacity_factor=0.5, bpr=True, noise_std=0.0)
  assert float(r.metrics["dropped"]) > 0
  assert np.asarray(r.dispatch).sum((1, 3)).max() <= moe.capacity(2, 8, 0.5, 4)


def test_experts_choice_and_soft():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
  r = moe.route_experts_choice(logits, capacity_factor=1.0)
  d = np.asarray(r.dispatch)
  np.testing.assert_array_equal(d.sum(1), 1)  # every slot of every expert filled with one token
  assert float(r.aux_loss) == 0.0
  soft = moe.route_soft(jnp.asarray(rng.normal(size=(2, 8, 6)), jnp.float32), slots=2)
  assert soft.dispatch.shape == (2, 8, 3, 2)
  np.testing.assert_allclose(np.asarray(soft.dispatch).sum(1), 1, rtol=1e-5)  # slot = convex mix
  np.testing.assert_allclose(np.asarray(soft.combine).sum((2, 3)), 1, rtol=1e-5)
  assert float(soft.aux_loss) == 0.0 and float(soft.metrics["dropped"]) == 0.0


@pytest.mark.parametrize("router", ["topk", "topk_tight", "experts_choice"])
def test_index_dispatch_and_combine_equal_the_one_hot_einsums(router):
  """The gather/scatter path the layer runs equals the dense (G,S,E,C) einsums, values and grads."""
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
  if router == "experts_choice":
    r = moe.route_experts_choice(logits, capacity_factor=1.5)
  else:
    cf = 0.6 if router == "topk_tight" else 2.0
    r = moe.route_top_k(logits, logits, k=2, capacity_factor=cf, bpr=True, noise_std=0.0)
  x = jnp.asarray(rng.normal(size=(3, 10, 5)), jnp.float32)
  g, s, e, c = r.dispatch.shape
  np.testing.assert_allclose(moe.dispatch_by_index(x, r.slot_token).reshape(g, e, c, 5),
                             jnp.einsum("gsd,gsec->gecd", x, r.dispatch), atol=1e-6)
  w = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)  # a stand-in "expert"

  def via_index(x, sw):
    return moe.combine_by_index(moe.dispatch_by_index(x, r.slot_token) @ w, r.slot_token, sw, s)

  def via_einsum(x, comb):
    return jnp.einsum("gecd,gsec->gsd", jnp.einsum("gsd,gsec->gecd", x, r.dispatch) @ w, comb)

  np.testing.assert_allclose(via_index(x, r.slot_weight), via_einsum(x, r.combine), atol=1e-5)
  gi = jax.grad(lambda x: jnp.sum(via_index(x, r.slot_weight) ** 2))(x)
  ge = jax.grad(lambda x: jnp.sum(via_einsum(x, r.combine) ** 2))(x)
  np.testing.assert_allclose(gi, ge, atol=1e-5)
  if router == "topk_tight":
    assert float(r.metrics["dropped"]) > 0  # the sentinel slot really was exercised


def test_groups_follow_the_batch():
  assert moe.groups_for(1, 16, group_size=256, num_groups=None) == 1  # batch-1 inference
  assert moe.groups_for(32, 16, group_size=64, num_groups=None) == 8
  assert moe.groups_for(32, 16, group_size=None, num_groups=None) == 32
  assert moe.groups_for(32, 16, group_size=512, num_groups=None, shards=8) == 8  # no group spans devices
  assert moe.groups_for(1, 16, group_size=None, num_groups=8) == 1
  assert moe.groups_for(12, 16, group_size=None, num_groups=8) == 4


def _block(**kw):
  return moe.MoeMlpBlock(num_experts=4, num_selected_experts=2, mlp_dim=16, **kw)


def test_noise_only_in_training_and_dropped_tokens_get_zero():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 8)), jnp.float32)
  blk = _block(capacity_factor=0.25, eval_capacity_factor=0.25, bpr=False)
  v = blk.init({"params": jax.random.PRNGKey(0)}, x)
  y_eval, m = blk.apply(v, x)
  y_eval2, _ = blk.apply(v, x)
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_eval2))  # eval: no noise
  y_tr, _ = blk.apply(v, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(np.asarray(y_tr), np.asarray(y_eval))
  assert float(m["dropped_tokens"]) > 0
  dropped = np.all(np.asarray(y_eval) == 0, axis=-1)
  np.testing.assert_allclose(dropped.mean(), float(m["dropped_tokens"]))


def test_eval_capacity_factor_is_separate():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8)), jnp.float32)
  blk = _block(capacity_factor=0.25, eval_capacity_factor=8.0, noise_std=0.0)
  v = blk.init({"params": jax.random.PRNGKey(0)}, x)
  _, m_eval = blk.apply(v, x)
  _, m_train = blk.apply(v, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  assert float(m_eval["dropped"]) == 0.0 and float(m_train["dropped"]) > 0


def test_eval_aux_loss_is_clean_importance_only():
  """Deterministic block: aux = 0.005 * per-group importance of softmax(x @ router), no load."""
  x = np.random.default_rng(7).normal(size=(3, 8, 8)).astype(np.float32)
  blk = _block(capacity_factor=1.05, capacity_multiple_of=4)
  v = blk.init({"params": jax.random.PRNGKey(0)}, jnp.asarray(x))
  _, m = blk.apply(v, jnp.asarray(x))
  logits = x @ np.asarray(nn.meta.unbox(v)["params"]["router"]["kernel"])
  _, imp, _, aux = _vmoe_router(logits, None, 0.25, 2, 0.005, 0.005)
  np.testing.assert_allclose(float(m["aux_loss"]), aux, rtol=64 * 8 * np.finfo(np.float32).eps)
  _, m_tr = blk.apply(v, jnp.asarray(x), deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(float(m_tr["importance_loss"]), imp, rtol=64 * 8 * np.finfo(np.float32).eps)
  assert float(m_tr["aux_loss"]) > float(m["aux_loss"])  # the load term, training only


def test_unknown_router_is_a_clear_error():
  x = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match="unknown MoE router 'hash'"):
    _block(router="hash").init({"params": jax.random.PRNGKey(0)}, x)
