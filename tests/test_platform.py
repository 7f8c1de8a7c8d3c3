"""The platform layer: config keys checked and recorded, every implementation that runs on CPU
agrees with float64 NumPy, and `auto` on CPU measures once per CPU and shape, then reads its
cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import config as config_lib, platform
from big_vision_lite.platform.cpu import autotune

EPS32 = np.finfo(np.float32).eps


def np_attention(q, k, v, mask, scale):
  q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = scale * q @ k.transpose(0, 1, 3, 2)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


def cpu_impls(table):
  """(name, fn) for each registered implementation that can run in a CPU process."""
  out = []
  for name, impl in table.items():
    if impl.backend in (None, "cpu"):
      loaded = impl.load()
      assert not isinstance(loaded, str), loaded
      out.append((name, loaded[0]))
  return out


@pytest.fixture(autouse=True)
def defaults():
  platform.configure(None, verbose=False)
  yield
  platform.configure(None, verbose=False)


@pytest.mark.parametrize("masked", [False, True])
def test_every_cpu_attention_matches_numpy(masked):
  b, length, h, d = 2, 33, 2, 32
  r = np.random.default_rng(0)
  q, k, v = (np.float32(r.normal(size=(b, length, h, d))) for _ in range(3))
  mask = r.random((b, 1, length, length)) < 0.7 if masked else None
  if masked:
    mask[..., 0] = True  # every row attends somewhere
  want = np_attention(q, k, v, mask, d ** -0.5)
  # float32 rounding of a d-term logit and an L-term weighted sum, relative to |v| ~ 1.
  tol = 4 * (d + length) * EPS32 * np.abs(v).max()
  ran = []
  for name, fn in cpu_impls(platform.ATTENTION):
    if name == "cpu_kernel" and masked:
      continue  # the kernel takes no mask; supports() says so and the dispatcher keeps XLA
    got = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, scale=d ** -0.5)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)
    ran.append(name)
  assert ran == (["xla"] if masked else ["xla", "cpu_kernel"])


def test_every_cpu_layer_norm_matches_numpy():
  r = np.random.default_rng(1)
  x = np.float32(r.normal(size=(3, 7, 64)) * 3 + 1)
  scale, bias = np.float32(r.normal(size=64)), np.float32(r.normal(size=64))
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  want = want * scale + bias
  tol = 8 * 64 * EPS32 * np.abs(want).max()
  for name, fn in cpu_impls(platform.NORM):
    np.testing.assert_allclose(fn(x, scale, bias, 1e-6), want, rtol=0, atol=tol, err_msg=name)


def test_bad_values_name_the_key():
  cfg = config_lib.defaults()
  cfg.model.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match=r"^config.model.attention_impl: must be one"):
    platform.configure(cfg)
  cfg.model.attention_impl = "splash"
  with pytest.raises(config_lib.ConfigError, match="'splash' runs on TPU, and this run's backend"):
    platform.configure(cfg)
  platform.configure(cfg, backend="tpu", verbose=False)  # e.g. `plan` for a TPU topology
  cfg.model.attention_impl = "auto"
  cfg.platform.cpu_dots = "mkl"
  with pytest.raises(config_lib.ConfigError, match="config.platform.cpu_dots"):
    platform.configure(cfg)


def test_explicit_choice_falls_back_where_unsupported_and_records_why(tmp_path):
  cfg = config_lib.defaults()
  cfg.model.attention_impl = "cpu_kernel"
  platform.configure(cfg, workdir=str(tmp_path), verbose=False)
  q = jnp.ones((1, 4, 2, 16))
  # This process has 8 CPU devices: the kernel has no sharding rule, so XLA runs.
  out = platform.attention(q, q, q)
  np.testing.assert_allclose(out, q, rtol=4 * EPS32)  # equal values: the mean of v is v
  (what, d), = platform.decisions().items()
  assert what == "attention q float32[1,4,2,16] kv float32[1,4,2,16] mask none"
  assert d == {"requested": "cpu_kernel", "impl": "xla",
               "why": "cpu_kernel does not support these operands"}
  with open(tmp_path / "platform.json") as f:
    assert json.load(f)["decisions"] == platform.decisions()


def test_auto_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path))
  calls = []

  def candidate(name, _):
    def prepare():
      calls.append(name)
      return lambda: jax.block_until_ready(jnp.zeros(()))
    return prepare
  monkeypatch.setattr(autotune, "time_calls", lambda c: {"xla": 2e-3, "fast": 1e-3})
  first = autotune.choose("op", "f32[8]", "xla", {"xla": candidate("xla", 0),
                                                   "fast": candidate("fast", 0)})
  assert first == {"impl": "fast", "times_ms": {"xla": 2.0, "fast": 1.0}, "measured": True}
  assert calls == ["xla", "fast"]
  again = autotune.choose("op", "f32[8]", "xla", {"xla": candidate("xla", 0),
                                                   "fast": candidate("fast", 0)})
  assert again == {**first, "measured": False} and calls == ["xla", "fast"]  # not prepared again
  with open(autotune.cache_path()) as f:
    (key, entry), = json.load(f).items()
  assert key.startswith("op|f32[8]|") and f"jax {jax.__version__}" in key
  assert entry["impl"] == "fast"


def test_within_the_margin_the_xla_path_stays(tmp_path, monkeypatch):
  monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(autotune, "time_calls", lambda c: {"xla": 1.00e-3, "k": 0.99e-3})
  noop = lambda: (lambda: None)  # noqa: E731
  assert autotune.choose("op", "s", "xla", {"xla": noop, "k": noop})["impl"] == "xla"


def test_config_keys_are_in_the_defaults_and_resumable():
  cfg = config_lib.defaults()
  assert cfg.model.attention_impl == cfg.model.norm_impl == cfg.platform.cpu_dots == "auto"
  saved = json.loads(cfg.to_json_best_effort())
  cfg.model.attention_impl = "xla"
  cfg.platform.cpu_dots = "eigen"
  assert config_lib.config_changes(saved, json.loads(cfg.to_json_best_effort())) == []


def test_model_keys_do_not_reach_the_module():
  from big_vision_lite import models
  m = models.get_model("vit", variant="Ti/16", num_classes=3, attention_impl="xla",
                       norm_impl="auto")
  assert not hasattr(m, "attention_impl")


def test_auto_takes_xla_without_measuring_in_several_processes(monkeypatch):
  """Each process would measure its own host; replicas that chose differently would drift."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # the kernels' own condition (one device)
  monkeypatch.setattr(autotune, "choose", lambda *a, **k: pytest.fail("measured"))
  q = jnp.ones((16, 4, 2, 16), jnp.float32)  # shapes the CPU kernels support
  x = jnp.ones((16, 4, 32), jnp.float32)
  platform.attention(q, q, q)
  platform.layer_norm(x, jnp.ones((32,)), jnp.zeros((32,)), 1e-6)
  picked = {k: v["impl"] for k, v in platform.decisions().items()}
  print("DECISIONS", platform.decisions())
  assert picked and set(picked.values()) == {"xla"}, platform.decisions()
