"""CapPa: masks, KV-cache decoding, parallel prediction, loss vs NumPy, end-to-end run and encoder export."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import checkpoint, config as config_lib, decoding, models, pretrained, run
from big_vision_lite.convert.tables import nest
from big_vision_lite.models import decoder as dec
from big_vision_lite.tasks.captioning import Captioning
from big_vision_lite.tools import extract_encoder

VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8), posemb="sincos2d")
V, L = 20, 8


def _random_params(model, *inputs, seed=0):
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), *inputs)["params"])
  # The output layer is zero-initialised: perturb everything so decoding is not trivially constant.
  # (NumPy noise: one jax.random kernel per leaf shape would compile dozens of tiny programs.)
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(lambda p: np.asarray(p) + 0.5 * rng.standard_normal(p.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("cappa", image=VIT, decoder=dict(width=32, depth=2, num_heads=2),
                           vocab_size=V, max_len=L)
  img = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  txt = jax.random.randint(jax.random.PRNGKey(1), (4, L), 2, V)
  return model, _random_params(model, img, txt), img, txt


def test_masks_elementwise():
  for n in (1, 4, 7):
    causal, full = dec.causal_mask(n), dec.full_mask(n)
    for i in range(n):
      for j in range(n):
        assert causal[i, j] == (j <= i) and full[i, j]
  p, t = 3, 7
  m = dec.prefix_mask(p, t)
  for i in range(t):
    for j in range(t):
      want = (j < p) if i < p else (j <= i)  # image sees image only; text sees image + earlier text
      assert m[i, j] == want, (i, j)
  np.testing.assert_array_equal(dec.prefix_mask(0, 5), dec.causal_mask(5))
  # The cached mask is the full mask's rows for those positions.
  for index, q in ((0, 3), (3, 1), (5, 2)):
    np.testing.assert_array_equal(np.asarray(dec.cached_mask(jnp.int32(index), q, t, p)), m[index:index + q])


def test_cached_greedy_equals_uncached(tiny):
  model, params, img, _ = tiny
  task = Captioning(ml_collections.ConfigDict(dict(name="captioning")), model)
  cached = np.asarray(jax.jit(task.generate)(params, img))
  ref = decoding.greedy_no_cache(jax.jit(lambda t: model.apply({"params": params}, img, t)[0]), len(img),
                                 max_len=L, eos_id=1)
  np.testing.assert_array_equal(cached, np.asarray(ref))
  assert len(set(map(tuple, cached))) > 1  # not a degenerate constant output
  # beam_size=1 is greedy.
  np.testing.assert_array_equal(np.asarray(task.generate(params, img, beam_size=1)), cached)


def test_cached_logits_equal_full_forward(tiny):
  model, params, img, txt = tiny
  full = np.asarray(model.apply({"params": params}, img, txt)[0])
  mem, _ = model.apply({"params": params}, img, method="encode")
  cache = model.init_cache(len(img), mem.shape[1])
  logits, cache = model.apply({"params": params}, mem, cache, method="prefill")
  steps = [logits]
  for t in range(L - 1):
    logits, cache = model.apply({"params": params}, txt[:, t:t + 1], cache, method="step")
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_decoder_without_biases_is_the_decoder_with_zero_biases(tiny):
  """use_bias=False (big_vision's CapPa decoder_bias=False): no bias params in the blocks, and the
  same logits as the biased decoder with those biases zeroed; cached scoring still agrees."""
  model, params, img, txt = tiny
  plain = models.get_model("cappa", image=VIT, decoder=dict(width=32, depth=2, num_heads=2,
                                                            use_bias=False), vocab_size=V, max_len=L)
  flat = checkpoint.flatten_with_names(params)
  block_bias = {k for k in flat if k.startswith("decoder/EncDecBlock") and k.endswith("/bias")}
  # 2 blocks x (LayerNorm1-3, query/key/value/out of SelfAttn and CrossAttn, MLP Dense_0/1).
  assert len(block_bias) == 2 * (3 + 8 + 2)
  shapes = jax.eval_shape(lambda: nn.unbox(plain.init(jax.random.PRNGKey(0), img, txt)["params"]))
  # The final LayerNorm and the logits keep theirs.
  assert set(checkpoint.flatten_with_names(shapes)) == set(flat) - block_bias
  zeroed = nest({k: np.zeros_like(v) if k in block_bias else v for k, v in flat.items()})
  stripped = nest({k: v for k, v in flat.items() if k not in block_bias})
  want = np.asarray(model.apply({"params": zeroed}, img, txt)[0])
  got = np.asarray(plain.apply({"params": stripped}, img, txt)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  check_score_classes_equals_teacher_forcing(plain, stripped, img, txt)


def check_score_classes_equals_teacher_forcing(model, params, img, txt):
  """The scoring classifier's cached scores equal -NLL of the teacher-forced forward (pads unscored)."""
  task = Captioning(ml_collections.ConfigDict(dict(name="captioning")), model)
  classes = txt[:3].at[1, 5:].set(0).at[2, 2:].set(0)  # C=3 texts of different lengths
  got = np.asarray(jax.jit(task.score_classes)(params, img, classes))
  want = np.zeros((len(img), len(classes)))
  for c in range(len(classes)):
    text = jnp.broadcast_to(classes[c][None], (len(img), classes.shape[1]))
    logp = _np_log_softmax(np.asarray(model.apply({"params": params}, img, text)[0], np.float64))
    ll = np.take_along_axis(logp, np.asarray(text)[..., None], -1)[..., 0]
    want[:, c] = (ll * (np.asarray(text) != 0)).sum(1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_score_classes_equals_teacher_forcing(tiny):
  check_score_classes_equals_teacher_forcing(*tiny)


def test_beam_search_scores_are_sequence_log_likelihoods(tiny):
  model, params, img, _ = tiny
  mem, _ = model.apply({"params": params}, img, method="encode")
  first, cache = model.apply({"params": params}, mem, model.init_cache(len(img), 0), method="prefill")
  step = lambda c, t: model.apply({"params": params}, t, c, method="step")
  tokens, scores = decoding.beam_search(first, cache, step, max_len=L, beam_size=3, eos_id=1)
  logp = jax.nn.log_softmax(model.apply({"params": params}, img, tokens)[0])
  ll = np.take_along_axis(np.asarray(logp), np.asarray(tokens)[..., None], -1)[..., 0]
  # Up to and including the first eos (later positions are padding).
  valid = np.cumsum(np.asarray(tokens) == 1, axis=1) - (np.asarray(tokens) == 1) == 0
  np.testing.assert_allclose(np.asarray(scores), (ll * valid).sum(1), rtol=1e-4, atol=1e-4)
  greedy = decoding.greedy(first, cache, step, max_len=L, eos_id=1)
  gvalid = np.cumsum(np.asarray(greedy) == 1, axis=1) - (np.asarray(greedy) == 1) == 0
  glp = jax.nn.log_softmax(model.apply({"params": params}, img, greedy)[0])
  gll = (np.take_along_axis(np.asarray(glp), np.asarray(greedy)[..., None], -1)[..., 0] * gvalid).sum(1)
  assert np.all(np.asarray(scores) >= gll - 1e-4)  # with 3 beams, never worse than greedy here


def test_parallel_prediction_sees_only_the_image_and_ar_is_causal(tiny):
  model, params, img, txt = tiny
  other = txt.at[:, 3:].set((txt[:, 3:] + 1) % V)
  par = jnp.array([True, False, True, False])
  a = np.asarray(model.apply({"params": params}, img, txt, parallel=par)[0])
  b = np.asarray(model.apply({"params": params}, img, other, parallel=par)[0])
  c = np.asarray(model.apply({"params": params}, img, jnp.zeros_like(txt), parallel=par)[0])
  np.testing.assert_allclose(a[[0, 2]], c[[0, 2]], atol=1e-5)  # [MASK] inputs: text is ignored
  # Autoregressive rows: position t sees targets < t (inputs shifted right), so 0..3 are unchanged.
  np.testing.assert_allclose(a[[1, 3], :4], b[[1, 3], :4], atol=1e-5)
  assert np.abs(a[[1, 3], 4:] - b[[1, 3], 4:]).max() > 1e-3
  # Parallel rows differ from the autoregressive forward of the same example.
  ar = np.asarray(model.apply({"params": params}, img, txt)[0])
  assert np.abs(a[0] - ar[0]).max() > 1e-3


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_matches_numpy(tiny):
  model, params, img, txt = tiny
  txt = txt.at[:, 6:].set(0).at[:, 5].set(1)  # eos then padding: pads are not scored
  task = Captioning(ml_collections.ConfigDict(dict(name="captioning", parallel_fraction=0.5)), model)
  rng = jax.random.PRNGKey(3)
  loss, metrics = task.loss(params, {"image": img, "labels": txt}, rng)
  par = np.asarray(jax.random.uniform(jax.random.split(rng, 3)[0], (4,)) < 0.5)
  logits = np.asarray(model.apply({"params": params}, img, txt, parallel=jnp.asarray(par))[0], np.float64)
  labels = np.asarray(txt)
  nll = -np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
  w = labels != 0
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["parallel_share"]), par.mean())
  acc = ((logits.argmax(-1) == labels) * w).sum() / w.sum()
  np.testing.assert_allclose(float(metrics["token_accuracy"]), acc, rtol=1e-6)


DATA = dict(name="bvl_shapes/tiny", split="train")
VAL = dict(name="bvl_shapes/tiny", split="validation")
IMG_PP = "decode|resize(16)|value_range(-1, 1)"
TOK = "tokenize(16, key='caption', key_result='labels')"


def caption_config(model_name, steps=60, **model_extra):
  c = config_lib.ConfigDict()
  c.total_steps = steps
  c.input = dict(data=DATA, batch_size=32, pp=f"{IMG_PP}|{TOK}|keep('image', 'labels')")
  c.model_name = model_name
  c.model = dict(image=VIT, decoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64), vocab_size=64,
                 max_len=16, **model_extra)
  c.task = dict(name="captioning", parallel_fraction=0.5 if model_name == "cappa" else 0.0)
  # 1e-2: at 3e-3 the zero-initialised output layer leaves 60 steps too few to learn even the word
  # order (measured: loss 3.66 -> 2.71, word accuracy 0.19); at 1e-2 loss 3.1 -> 1.1, accuracy 0.5.
  c.lr = 1e-2
  c.schedule = dict(warmup_steps=5, decay_type="cosine")
  c.log_training_steps = 10
  c.ckpt_steps = steps
  c.async_checkpoint = False
  c.progress = False
  c.evals = dict(
      ppl=dict(type="caption_perplexity", data=VAL, pp=c.input.pp, batch_size=64),
      samples=dict(type="caption_samples", data=VAL, pp=c.input.pp, num_samples=10, batch_size=64),
      scoring=dict(type="scoring_classifier", data=VAL, pp=f"{IMG_PP}|keep('image', 'label')",
                   pp_txt="tokenize(16, key='texts')", templates=["a small red {}"], batch_size=64),
      probe=dict(type="linear_probe", train_data=DATA, train_pp=f"{IMG_PP}|keep('image', 'label')",
                 data=VAL, pp=f"{IMG_PP}|keep('image', 'label')", num_classes=8, shots=[5],
                 batch_size=64))
  return config_lib.merge_onto_defaults(c)


def run_and_check(config, workdir):
  result = run.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert losses[-1] < 0.6 * losses[0], losses
  assert 1.0 <= result["ppl/perplexity"] < np.exp(losses[0]), result
  assert 0.0 <= result["scoring/accuracy"] <= 1.0 and result["scoring/examples"] == 128
  assert {"samples/exact_match", "samples/word_accuracy", "probe/5shot"} <= set(result)
  # Word accuracy well above zero: at least "a", sizes and backgrounds come out right.
  assert result["samples/word_accuracy"] > 0.3, result
  with open(os.path.join(workdir, "samples.json")) as f:
    rows = json.load(f)
  assert len(rows) == 10 and all(r["reference"].startswith("a ") for r in rows)
  return result


@pytest.mark.slow  # ~40 s CPU (a 60-step run, four evaluators); minutes of wall time on a loaded machine
def test_cappa_end_to_end_learns_and_exports_encoder(tmp_path):
  run_and_check(caption_config("cappa"), tmp_path / "run")
  out = tmp_path / "enc.npz"
  assert extract_encoder.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
  flat = dict(np.load(out))
  assert "embedding/kernel" in flat and not any(k.startswith("decoder") for k in flat)
  # The export is a plain ViT: it loads into one and reproduces the captioner's image features.
  kw = json.load(open(tmp_path / "enc.json"))["model"]
  vit = models.get_model("vit", **kw)
  tree = nest(flat)
  img = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  feats = vit.apply({"params": tree}, img)[0]
  full = pretrained.read_params(str(tmp_path / "run"))
  ftree = nest(full)
  model = models.get_model("cappa", **caption_config("cappa").model.to_dict())
  _, want = model.apply({"params": ftree}, img, method="encode")
  np.testing.assert_allclose(np.asarray(feats), np.asarray(want), rtol=1e-5, atol=1e-5)
