"""Analytic ViT FLOPs against hand arithmetic and XLA's cost analysis; peak table; MFU."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import flops


def _vit_forward(x, p, *, patch, heads, pool, nonlinear):
  """A minimal ViT forward in einsums (independent of the model module)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c) @ p["embed"]
  d = x.shape[-1]
  if pool == "tok":
    x = jnp.concatenate([jnp.broadcast_to(p["cls"], (b, 1, d)), x], axis=1)
  norm = (lambda t: (t - t.mean(-1, keepdims=True)) * jax.lax.rsqrt(t.var(-1, keepdims=True) + 1e-6)
          ) if nonlinear else (lambda t: t)
  act = jax.nn.gelu if nonlinear else (lambda t: t)
  softmax = (lambda t: jax.nn.softmax(t, axis=-1)) if nonlinear else (lambda t: t)

  def attend(q_in, kv_in, blk):
    q = jnp.einsum("bsd,dhk->bshk", q_in, blk["q"])
    k = jnp.einsum("bsd,dhk->bshk", kv_in, blk["k"])
    v = jnp.einsum("bsd,dhk->bshk", kv_in, blk["v"])
    a = softmax(jnp.einsum("bqhk,bshk->bhqs", q, k))
    return jnp.einsum("bqhk,hkd->bqd", jnp.einsum("bhqs,bshk->bqhk", a, v), blk["o"])

  for blk in p["blocks"]:
    y = norm(x)
    x = x + attend(y, y, blk)
    x = x + act(norm(x) @ blk["w1"]) @ blk["w2"]
  x = norm(x)
  if pool == "gap":
    x = x.mean(axis=1)
  elif pool == "tok":
    x = x[:, 0]
  else:  # map
    hd = p["map"]
    probe = jnp.broadcast_to(p["probe"], (b, 1, d))
    y = attend(probe, x, hd)
    y = y + act(norm(y) @ hd["w1"]) @ hd["w2"]
    x = y[:, 0]
  return x @ p["head"]


def _params(key, *, patch, c, d, heads, mlp, depth, classes):
  ks = iter(jax.random.split(key, 64))
  r = lambda *s: jax.random.normal(next(ks), s, jnp.float32) * 0.02
  blk = lambda: {"q": r(d, heads, d // heads), "k": r(d, heads, d // heads),
                 "v": r(d, heads, d // heads), "o": r(heads, d // heads, d),
                 "w1": r(d, mlp), "w2": r(mlp, d)}
  return {"embed": r(patch * patch * c, d), "cls": r(1, 1, d), "probe": r(1, 1, d),
          "blocks": [blk() for _ in range(depth)], "map": blk(), "head": r(d, classes)}


@pytest.mark.parametrize("pool", ["gap", "tok", "map"])
@pytest.mark.parametrize("nonlinear", [False, True])
def test_analytic_matches_compiled_cost_analysis(pool, nonlinear):
  cfg = dict(patch=8, c=3, d=64, heads=4, mlp=256, depth=2, classes=10)
  batch, image = 2, (32, 48)  # non-square: S = 4 * 6 = 24
  p = _params(jax.random.PRNGKey(0), **cfg)
  x = jnp.zeros((batch, *image, cfg["c"]), jnp.float32)
  fn = lambda x, p: _vit_forward(x, p, patch=cfg["patch"], heads=cfg["heads"], pool=pool,
                                 nonlinear=nonlinear)
  compiled = jax.jit(fn).lower(x, p).compile()
  measured = flops.compiled_flops(compiled) / batch
  analytic = flops.vit_forward_flops(image, cfg["patch"], cfg["d"], cfg["depth"], cfg["mlp"],
                                     num_classes=cfg["classes"], pool_type=pool,
                                     channels=cfg["c"])
  # XLA also counts elementwise ops, so it is an upper bound; without the
  # nonlinearities only residual adds and means remain (~0.1%), with them ~3% here.
  assert measured >= analytic * 0.999
  assert measured <= analytic * (1.06 if nonlinear else 1.01), (measured, analytic)
  print(f"{pool} nonlinear={nonlinear}: compiled/analytic = {measured / analytic:.4f}")


def test_vit_b16_by_hand():
  # ViT-B/16 at 224, gap, no head: S = 196, D = 768, mlp = 3072, 12 layers.
  s, d, m = 196, 768, 3072
  per_layer = 2 * s * d * 3 * d + 2 * s * s * d + 2 * s * s * d + 2 * s * d * d + 2 * 2 * s * d * m
  expected = 2 * s * 16 * 16 * 3 * d + 12 * per_layer
  assert expected == 34_941_763_584
  assert flops.vit_forward_flops(224, 16, 768, 12) == expected
  assert flops.vit_forward_flops((224, 224), (16, 16), 768, 12, 3072) == expected
  # timm quotes ViT-B/16 (class token, 1000 classes) as 17.6 "GFLOPs" = GMACs.
  tok = flops.vit_forward_flops(224, 16, 768, 12, num_classes=1000, pool_type="tok")
  assert round(tok / 2 / 1e9, 1) == 17.6


def test_map_head_and_classes_terms():
  base = flops.vit_forward_flops(64, 16, 32, 1, 64, pool_type="gap")
  with_head = flops.vit_forward_flops(64, 16, 32, 1, 64, num_classes=5, pool_type="gap")
  assert with_head - base == 2 * 32 * 5
  mapped = flops.vit_forward_flops(64, 16, 32, 1, 64, pool_type="map")
  s, d, m = 16, 32, 64
  assert mapped - base == 2 * d * d + 2 * s * d * 2 * d + 2 * s * d + 2 * s * d + 2 * d * d + 4 * d * m


def test_image_not_a_multiple_of_the_patch_counts_the_whole_patches_only():
  # As PatchEmbed, which drops the rows and columns past the last whole patch.
  assert flops.vit_forward_flops(30, 16, 32, 1) == flops.vit_forward_flops(16, 16, 32, 1)
  assert flops.vit_forward_flops(47, 16, 32, 1) == flops.vit_forward_flops(32, 16, 32, 1)


def test_bad_inputs_are_clear():
  with pytest.raises(ValueError, match="pool_type"):
    flops.vit_forward_flops(32, 16, 32, 1, pool_type="avg")
  with pytest.raises(ValueError, match="positive"):
    flops.mfu(1e9, 0.0, 8, 1e12)


def test_train_flops_and_mfu():
  step = flops.train_flops_per_step(1e9, 64)
  assert step == 192e9
  assert flops.mfu(step, 0.5, 8, 1e12) == pytest.approx(192e9 / (0.5 * 8 * 1e12))
  assert flops.mfu(step, 0.5, 8, 1e12) == pytest.approx(0.048)


@pytest.mark.parametrize("kind,peak,desc", [
    ("TPU v4", 275e12, "TPU v4"), ("TPU v5 lite", 197e12, "TPU v5e"),
    ("TPU v5p", 459e12, "TPU v5p"), ("TPU v6 lite", 918e12, "TPU v6e"),
    ("NVIDIA H100 80GB HBM3", 989e12, "H100 SXM"), ("NVIDIA A100-SXM4-40GB", 312e12, "A100"),
])
def test_peak_table(kind, peak, desc):
  dev = types.SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind)
  got, description = flops.default_peak_flops(dev, cache_path=None)
  assert got == peak
  assert description.startswith("table: ") and desc in description


def test_cpu_peak_is_measured_cached_and_shared(tmp_path, monkeypatch):
  cache = tmp_path / "sub" / "peak.json"
  dev = jax.devices()[0]
  peak, desc = flops.default_peak_flops(dev, cache_path=str(cache))
  assert "measured by matmul probe" in desc
  data = json.loads(cache.read_text())
  (key, entry), = data.items()
  assert key.startswith(dev.device_kind) and "cpus=" in key
  host_rate = entry["flops"]
  assert host_rate > 1e8  # any real CPU does > 0.1 GFLOP/s
  n = len(jax.local_devices())
  assert peak == pytest.approx(host_rate / n)


def test_cpu_peak_probe_under_load_does_not_stick(tmp_path, monkeypatch):
  # A probe taken while the host was busy measures low; the next, higher probe replaces it,
  # and a later low one does not lower the peak again.
  cache = tmp_path / "peak.json"
  dev = jax.devices()[0]
  n = len(jax.local_devices())
  for probe, expected in ((1e10, 1e10), (4e10, 4e10), (2e10, 4e10)):
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, _p=probe, **k: _p)
    assert flops.default_peak_flops(dev, cache_path=str(cache))[0] == pytest.approx(expected / n)


def test_cpu_peak_older_than_a_week_is_replaced(tmp_path, monkeypatch):
  cache = tmp_path / "peak.json"
  dev = jax.devices()[0]
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 4e10)
  flops.default_peak_flops(dev, cache_path=str(cache))
  data = json.loads(cache.read_text())
  for entry in data.values():
    entry["measured"] -= flops.PEAK_CACHE_MAX_AGE_S + 1
  cache.write_text(json.dumps(data))
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 1e10)
  assert flops.default_peak_flops(dev, cache_path=str(cache))[0] == pytest.approx(1e10 / len(jax.local_devices()))


def test_cpu_peak_of_another_cpu_model_is_not_reused(tmp_path, monkeypatch):
  # A home directory shared by hosts with different CPUs (NFS on a cluster, or a VM moved to
  # another host) must not hand one CPU's peak to the other.
  cache = tmp_path / "peak.json"
  dev = jax.devices()[0]
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 1e11)
  monkeypatch.setattr(flops.host_cpu, "signature", lambda *a, **k: "cpu-a")
  flops.default_peak_flops(dev, cache_path=str(cache))
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 3e11)
  monkeypatch.setattr(flops.host_cpu, "signature", lambda *a, **k: "cpu-b")
  n = len(jax.local_devices())
  peak, desc = flops.default_peak_flops(dev, cache_path=str(cache))
  assert peak == pytest.approx(3e11 / n)
  assert flops.host_cpu.model_name() in desc
  rates = sorted(e["flops"] for e in json.loads(cache.read_text()).values())
  assert rates == [1e11, 3e11]


def test_compiled_flops_forms():
  one = types.SimpleNamespace(cost_analysis=lambda: {"flops": 10.0})
  many = types.SimpleNamespace(cost_analysis=lambda: [{"flops": 10.0}, {"flops": 5.0}])
  none = types.SimpleNamespace(cost_analysis=lambda: None)

  def boom():
    raise NotImplementedError

  assert flops.compiled_flops(one) == 10.0
  assert flops.compiled_flops(many) == 15.0
  assert flops.compiled_flops(none) is None
  assert flops.compiled_flops(types.SimpleNamespace(cost_analysis=boom)) is None
  c = jax.jit(lambda a, b: a @ b).lower(np.ones((8, 4), np.float32),
                                        np.ones((4, 2), np.float32)).compile()
  assert flops.compiled_flops(c) == 2 * 8 * 4 * 2


def test_corrupt_cpu_peak_cache_is_remeasured(tmp_path, monkeypatch):
  cache = tmp_path / "peak.json"
  cache.write_text("{not json")
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 4e9)
  dev = jax.devices()[0]
  peak, _ = flops.default_peak_flops(dev, cache_path=str(cache))
  assert peak == pytest.approx(4e9 / len(jax.local_devices()))
  # Rewritten with the new probe.
  assert [e["flops"] for e in json.loads(cache.read_text()).values()] == [4e9]
