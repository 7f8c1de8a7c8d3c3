"""OpenVision 2: token keeping (train only, exact count), prefix decoding with the KV cache, loss, end-to-end."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import decoding, models
from big_vision_lite.models.openvision2 import keep_tokens, num_kept
from big_vision_lite.tasks.captioning import Captioning
from tests.test_cappa import (VIT, _np_log_softmax, _random_params, caption_config,
                              check_score_classes_equals_teacher_forcing, run_and_check)

V, L = 20, 8


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("openvision2", image=VIT, decoder=dict(width=32, depth=2, num_heads=2),
                           vocab_size=V, max_len=L, keep_ratio=0.35)
  img = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))  # 16 image tokens
  txt = jax.random.randint(jax.random.PRNGKey(1), (4, L), 2, V)
  return model, _random_params(model, img, txt), img, txt


@pytest.mark.parametrize("n,ratio,want", [(16, 0.35, 6), (16, 0.25, 4), (100, 0.35, 35), (9, 0.5, 5),
                                          (4, 0.01, 1), (16, 1.0, 16)])
def test_num_kept_is_rounded(n, ratio, want):
  assert num_kept(n, ratio) == want == max(1, int(np.floor(n * ratio + 0.5)))


def test_keep_tokens_exact_subset_per_example():
  x = jnp.arange(3 * 16 * 2, dtype=jnp.float32).reshape(3, 16, 2)
  kept, idx = keep_tokens(x, jax.random.PRNGKey(0), 0.35)
  assert kept.shape == (3, 6, 2) and idx.shape == (3, 6)
  idx = np.asarray(idx)
  for b in range(3):
    assert len(set(idx[b])) == 6 and np.all(np.diff(idx[b]) > 0)  # distinct, original order
    np.testing.assert_array_equal(np.asarray(kept[b]), np.asarray(x[b])[idx[b]])
  assert len({tuple(r) for r in idx}) > 1  # independent per example


def test_keeping_is_training_only(tiny):
  model, params, img, txt = tiny
  tokens, _ = model.apply({"params": params}, img, method="encode")
  assert tokens.shape[1] == 16
  train = model.apply({"params": params}, tokens, True, method="visual_prefix", rngs={"keep": jax.random.PRNGKey(1)})
  evl = model.apply({"params": params}, tokens, False, method="visual_prefix", rngs={"keep": jax.random.PRNGKey(1)})
  assert train.shape[1] == round(16 * 0.35) == 6 and evl.shape[1] == 16
  # Eval logits do not depend on any rng; training logits do (different kept tokens).
  e1 = model.apply({"params": params}, img, txt)[0]
  e2 = model.apply({"params": params}, img, txt, rngs={"keep": jax.random.PRNGKey(5)})[0]
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  t1 = model.apply({"params": params}, img, txt, train=True, rngs={"keep": jax.random.PRNGKey(1)})[0]
  t2 = model.apply({"params": params}, img, txt, train=True, rngs={"keep": jax.random.PRNGKey(2)})[0]
  assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4


def test_text_is_causal_after_the_image_prefix(tiny):
  model, params, img, txt = tiny
  other = txt.at[:, 4:].set((txt[:, 4:] + 1) % V)
  a = np.asarray(model.apply({"params": params}, img, txt)[0])
  b = np.asarray(model.apply({"params": params}, img, other)[0])
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)  # position t sees targets < t
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_cached_decoding_equals_uncached(tiny):
  model, params, img, txt = tiny
  task = Captioning(ml_collections.ConfigDict(dict(name="captioning")), model)
  cached = np.asarray(jax.jit(task.generate)(params, img))
  ref = decoding.greedy_no_cache(jax.jit(lambda t: model.apply({"params": params}, img, t)[0]), len(img),
                                 max_len=L, eos_id=1)
  np.testing.assert_array_equal(cached, np.asarray(ref))
  # Teacher-forced logits through the cache equal the full forward.
  full = np.asarray(model.apply({"params": params}, img, txt)[0])
  mem, _ = model.apply({"params": params}, img, method="encode")
  logits, cache = model.apply({"params": params}, mem, model.init_cache(len(img), mem.shape[1]),
                              method="prefill")
  steps = [logits]
  for t in range(L - 1):
    logits, cache = model.apply({"params": params}, txt[:, t:t + 1], cache, method="step")
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
  beams = np.asarray(task.generate(params, img, beam_size=2))
  assert beams.shape == cached.shape


def test_score_classes_equals_teacher_forcing(tiny):
  check_score_classes_equals_teacher_forcing(*tiny)


def test_loss_matches_numpy_with_kept_tokens(tiny):
  model, params, img, txt = tiny
  txt = txt.at[:, 6:].set(0).at[:, 5].set(1)
  task = Captioning(ml_collections.ConfigDict(dict(name="captioning")), model)
  rng = jax.random.PRNGKey(3)
  loss, _ = task.loss(params, {"image": img, "labels": txt}, rng)
  _, drop_rng, keep_rng = jax.random.split(rng, 3)
  logits = np.asarray(model.apply({"params": params}, img, txt, train=True,
                                  rngs={"dropout": drop_rng, "keep": keep_rng})[0], np.float64)
  labels = np.asarray(txt)
  nll = -np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
  w = labels != 0
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)


def test_parallel_prediction_is_refused():
  model = models.get_model("openvision2", image=VIT, vocab_size=V, max_len=L)
  with pytest.raises(ValueError, match="parallel"):
    Captioning(ml_collections.ConfigDict(dict(name="captioning", parallel_fraction=0.5)), model)


@pytest.mark.slow  # ~40 s CPU (a 60-step run, four evaluators); minutes of wall time on a loaded machine
def test_openvision2_end_to_end_learns(tmp_path):
  run_and_check(caption_config("openvision2", keep_ratio=0.5), tmp_path / "run")
