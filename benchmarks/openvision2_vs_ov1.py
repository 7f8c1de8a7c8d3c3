"""OpenVision 2 (caption-only, 35% of image tokens kept) vs OpenVision 1 (SigLIP losses + caption
loss, text encoder, all image tokens) training step with the same ViT: step-time and
compiled peak-memory ratios, side by side in one run on CPU.

    python benchmarks/openvision2_vs_ov1.py [--batch 32] [--res 48] [--width 192] [--depth 8]

OpenVision 1 pairs every image with two captions, the web alt-text and the synthetic
caption: its text encoder (one context length, --text_len) runs on both, giving two
sigmoid losses, and its decoder generates the synthetic caption from all image tokens.
`--ov1_captions 1` keeps only the synthetic caption (a plain SigLIP + caption step,
lighter than OpenVision 1).

Both steps are jitted value_and_grad + AdamW with the trainer's CPU settings (compile options;
glibc keeps freed memory unless `--malloc default`); memory is the compiled step's
memory_analysis() (arguments + outputs + temporaries - aliased), time the median of
--steps timed steps after a warm-up. The paper (ViT-L/14, TPU) reports ~1.5x faster
and ~1.8x less memory for OpenVision 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402

from big_vision_lite import contrastive_loss, platform  # noqa: E402
from big_vision_lite.models import decoder as dec_lib, text as text_lib, vit as vit_lib  # noqa: E402
from big_vision_lite.models.openvision2 import OpenVision2  # noqa: E402
from big_vision_lite.models.two_towers import l2_normalize  # noqa: E402
from big_vision_lite.tasks.captioning import caption_loss  # noqa: E402


class OpenVision1(nn.Module):
  """ViT + text encoder (SigLIP loss on pooled embeddings) + the same prefix caption decoder
  over all image tokens (OpenVision / CLIPS design)."""
  image: dict
  text: dict
  decoder: dict
  vocab_size: int
  max_len: int
  out_dim: int

  def setup(self):
    self.img = vit_lib.vit(num_classes=0, **self.image)
    self.img_head = nn.Dense(self.out_dim)
    self.txt = text_lib.TextTransformer(num_classes=self.out_dim, vocab_size=self.vocab_size, **self.text)
    self.img_proj = nn.Dense(self.decoder["width"])
    self.dec = dec_lib.Decoder(vocab_size=self.vocab_size, max_len=self.max_len, cross=False, **self.decoder)
    self.t = self.param("t", lambda _, s: jnp.full(s, np.log(10.0), jnp.float32), (1,))
    self.b = self.param("b", lambda _, s: jnp.full(s, -10.0, jnp.float32), (1,))

  def __call__(self, image, text, alt_text=None, train=False):
    _, out = self.img(image, train=train)
    zimg = l2_normalize(self.img_head(out["head_input"]))
    ztxts = [l2_normalize(self.txt(t, train=train)[0]) for t in (text, alt_text) if t is not None]
    logits, _ = self.dec(dec_lib.shift_right(text), prefix=self.img_proj(out["encoded"]), train=train)
    return zimg, ztxts, logits, self.t[0], self.b[0]


def make_step(loss_fn, tx):
  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1), compiler_options=platform.compiler_options())


def peak_bytes(compiled) -> tuple[int, int]:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return total, m.temp_size_in_bytes


def measure(name, model, loss_fn, batch, steps):
  inputs = [batch["image"], batch["labels"]] + ([batch["alt"]] if "alt" in batch else [])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), *inputs)["params"])
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  step = make_step(loss_fn, tx)
  rng = jax.random.PRNGKey(1)
  compiled = step.lower(params, opt_state, batch, rng).compile()
  total, temp = peak_bytes(compiled)
  params, opt_state, loss = compiled(params, opt_state, batch, rng)  # warm-up
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  nparams = sum(x.size for x in jax.tree.leaves(params))
  print(f"{name:>34}: {np.median(times) * 1e3:8.1f} ms/step  peak {total / 2**20:8.1f} MiB "
        f"(temp {temp / 2**20:7.1f} MiB)  params {nparams / 1e6:.2f} M  loss {float(loss):.3f}", flush=True)
  return float(np.median(times)), total, temp


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--res", type=int, default=48)  # 36 tokens, as ViT-L/14 at 84 px (stage 1)
  p.add_argument("--patch", type=int, default=8)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--depth", type=int, default=8, help="ViT depth")
  p.add_argument("--text_depth", type=int, default=4, help="text encoder and decoder depth")
  p.add_argument("--text_len", type=int, default=80, help="synthetic caption tokens")
  p.add_argument("--ov1_captions", type=int, default=2, choices=(1, 2),
                 help="captions per image in OpenVision 1's contrastive loss (2: alt-text + synthetic)")
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--keep", type=float, default=0.35)
  p.add_argument("--steps", type=int, default=5)
  bench_setup.add_malloc_flag(p)
  a = p.parse_args()
  malloc = bench_setup.keep_freed_memory(a.malloc)  # before JAX starts
  print(bench_setup.cpu_line())
  heads = max(1, a.width // 64)
  image = dict(width=a.width, depth=a.depth, mlp_dim=4 * a.width, num_heads=heads,
               patch_size=(a.patch, a.patch), posemb="learn", pool_type="gap")
  tower = dict(width=a.width, depth=a.text_depth, mlp_dim=4 * a.width, num_heads=heads)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(a.batch, a.res, a.res, 3)), jnp.float32),
           "labels": jnp.asarray(rng.integers(2, a.vocab, size=(a.batch, a.text_len)), jnp.int32)}
  alt = jnp.asarray(rng.integers(2, a.vocab, size=(a.batch, a.text_len)), jnp.int32)
  n_tok = (a.res // a.patch) ** 2
  print(f"devices: {jax.devices()}; {malloc}; batch {a.batch}, {a.res}px / patch {a.patch} = {n_tok} image tokens, "
        f"ViT width {a.width} depth {a.depth}, text encoder/decoder depth {a.text_depth}, "
        f"{a.text_len} caption tokens, {a.ov1_captions} caption(s) per image in OV1's contrastive loss, "
        f"keep {a.keep} ({max(1, round(n_tok * a.keep))} tokens)", flush=True)

  ov2 = OpenVision2(image=image, decoder=tower, vocab_size=a.vocab, max_len=a.text_len, keep_ratio=a.keep)

  def ov2_loss(params, batch, rng):
    logits, _ = ov2.apply({"params": params}, batch["image"], batch["labels"], train=True,
                          rngs={"keep": rng, "dropout": rng})
    nll, count, _ = caption_loss(logits, batch["labels"], 0)
    return jnp.sum(nll) / jnp.sum(count)

  ov1 = OpenVision1(image=image, text=tower, decoder=tower, vocab_size=a.vocab, max_len=a.text_len,
                    out_dim=a.width)

  def ov1_loss(params, batch, rng):
    zimg, ztxts, logits, t, b = ov1.apply({"params": params}, batch["image"], batch["labels"],
                                          batch.get("alt"), train=True, rngs={"dropout": rng})
    nll, count, _ = caption_loss(logits, batch["labels"], 0)
    contrastive = sum(contrastive_loss.sigmoid_loss(zimg, z, t, b) for z in ztxts)
    return contrastive + jnp.sum(nll) / jnp.sum(count)

  ov1_batch = dict(batch, alt=alt) if a.ov1_captions == 2 else batch
  ov1_name = "OpenVision 1 (2x SigLIP + caption)" if a.ov1_captions == 2 else "SigLIP + caption"
  t1, m1, tmp1 = measure(ov1_name, ov1, ov1_loss, ov1_batch, a.steps)
  t2, m2, tmp2 = measure(f"OpenVision 2 (caption, keep {a.keep})", ov2, ov2_loss, batch, a.steps)
  print(f"step-time ratio OV1/OV2: {t1 / t2:.2f}x (paper ~1.5x); compiled peak-memory ratio: "
        f"{m1 / m2:.2f}x (temporaries alone {tmp1 / tmp2:.2f}x; paper ~1.8x)")


if __name__ == "__main__":
  main()
