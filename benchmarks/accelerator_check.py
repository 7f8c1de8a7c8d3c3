"""One-GPU check of the accelerator paths: train-step speed, MFU and compiled memory, vs timm.

    python benchmarks/accelerator_check.py [--json check.json]   # one GPU, < 8 minutes
    python benchmarks/accelerator_check.py --toy                 # tiny sizes, any CPU

Rows: ViT-B/16 bf16 (AdamW, batch 256 at 224) with the XLA attention and with cuDNN flash
attention; SigLIP B/16 with the chunked sigmoid loss (on one device the ring has one block, so
it is the plain loss); CapPa B/16 (6-layer decoder); MoE-ViT B/16 with 8 experts in every other
block (top-2); and timm's vit_base_patch16_224 trained with torch.compile, bf16 autocast and
fused AdamW on the same GPU in the same run. MFU is analytic model FLOPs (forward + 2x for the
backward, big_vision_lite.flops) over the measured bf16 matmul peak (--peak_tflops, about
790 TFLOP/s on an H200, see /work/.library/device/KINDS.md); the XLA column is what XLA's cost
analysis counts for the compiled step.

XLA_FLAGS gets the trainer's GPU preset (--xla_flags_preset, default gpu_default) before JAX
starts. It imports only jax, flax, optax, numpy and big_vision_lite's models, flops, loss and
platform modules (no ml_collections, grain or tensorflow-datasets: the GPU host has none), and torch
and timm for the last row (skipped with a note where they are missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from big_vision_lite.platform.gpu import xla_flags  # noqa: E402  (no JAX: before it starts)


def _preset_from_argv(argv: list[str]) -> str:
  """--xla_flags_preset's value, read before argparse: XLA_FLAGS must be set before JAX starts."""
  for i, a in enumerate(argv):
    if a.startswith("--xla_flags_preset="):
      return a.split("=", 1)[1]
    if a == "--xla_flags_preset" and i + 1 < len(argv):
      return argv[i + 1]
  return xla_flags.DEFAULT_PRESET


if __name__ == "__main__":
  # As launch/gpu.sh does for the trainer; flags already in XLA_FLAGS win.
  os.environ["XLA_FLAGS"] = xla_flags.merged(_preset_from_argv(sys.argv[1:]),
                                             os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from big_vision_lite import contrastive_loss, flops  # noqa: E402
from big_vision_lite.models import get_model  # noqa: E402
from big_vision_lite import platform  # noqa: E402
from big_vision_lite.platform.gpu import attention as gpu_attention  # noqa: E402

GiB = 1024**3
ROWS = ("vit", "cudnn", "siglip", "cappa", "moe", "timm")
H200_BF16_PEAK = 790e12  # measured 8192^3 bf16 matmul on random data (KINDS.md)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The check's model and batch sizes: the real B/16 ones, or a CPU-sized toy."""
  variant: str  # ViT variant for every image tower
  res: int
  batch: int
  text_len: int
  vocab: int
  dec_depth: int
  experts: int
  classes: int
  steps: int
  warmup: int


FULL = Sizes("B/16", 224, 256, 64, 32_000, 6, 8, 1000, 20, 3)
TOY = Sizes("mu/8", 32, 4, 8, 64, 1, 4, 10, 2, 1)


@dataclasses.dataclass
class Row:
  name: str
  step_s: float | None = None
  images_per_s: float | None = None
  mfu: float | None = None
  xla_tflops: float | None = None
  memory_bytes: float | None = None
  note: str = ""


# ----------------------------------------------------------------------------- JAX rows


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=1e-4)


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(xent)


def _time_jax_step(model: Any, batch: dict, loss_fn: Callable, sizes: Sizes, init_args: tuple,
                   attention: str = "xla") -> tuple[float, float, float | None]:
  """(median step seconds, compiled bytes per device, XLA FLOPs of one step) for one train step."""
  tx = _adamw()
  rng = jax.random.PRNGKey(0)
  with platform.override(attention=attention):
    params = jax.jit(lambda r: model.init(r, *init_args)["params"])(rng)
  opt_state = tx.init(params)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with platform.override(attention=attention):
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  xla_flops = flops.compiled_flops(compiled)
  times = []
  for i in range(sizes.warmup + sizes.steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch)
    loss.block_until_ready()
    if i >= sizes.warmup:
      times.append(time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"non-finite loss {float(loss)}")
  return float(np.median(times)), float(total), xla_flops


def _tokens(sizes: Sizes, rng: np.random.Generator) -> jax.Array:
  return jnp.asarray(rng.integers(1, sizes.vocab, (sizes.batch, sizes.text_len)), jnp.int32)


def _images(sizes: Sizes, rng: np.random.Generator) -> jax.Array:
  return jnp.asarray(rng.standard_normal((sizes.batch, sizes.res, sizes.res, 3)), jnp.float32)


def _vit_kwargs(sizes: Sizes) -> dict:
  # timm's vit_base_patch16_224: class token (197 tokens), learned posemb, head on the token.
  return dict(variant=sizes.variant, num_classes=sizes.classes, pool_type="tok", posemb="learn",
              dtype_mm="bfloat16")


def vit_row(sizes: Sizes, attention: str, peak: float | None) -> Row:
  rng = np.random.default_rng(0)
  model = get_model("vit", **_vit_kwargs(sizes))
  batch = {"image": _images(sizes, rng),
           "label": jnp.asarray(rng.integers(0, sizes.classes, sizes.batch), jnp.int32)}

  def loss_fn(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"], train=True)
    return _xent(logits, batch["label"])

  note = ""
  if attention == "cudnn":
    width, heads = model.width, model.num_heads
    seq = (sizes.res // model.patch_size[0]) ** 2 + 1
    shape = (sizes.batch, seq, heads, width // heads)
    cc = gpu_attention._gpu_compute_capability()  # pylint: disable=protected-access
    reason = ("no CUDA GPU" if cc is None else
              gpu_attention.cudnn_reason(shape, shape, ("bfloat16",) * 3, None, cc))
    note = f"cuDNN not taken ({reason}): XLA math" if reason else "cuDNN flash attention"
  step_s, mem, xla_flops = _time_jax_step(model, batch, loss_fn, sizes, (batch["image"],),
                                          attention)
  fwd = flops.model_forward_flops(model, {"image": np.zeros((1, sizes.res, sizes.res, 3))})
  return _row(f"ViT-{sizes.variant} {attention} attention", sizes, step_s, mem, xla_flops,
              flops.train_flops_per_step(fwd, sizes.batch), peak, note)


def siglip_row(sizes: Sizes, peak: float | None) -> Row:
  rng = np.random.default_rng(1)
  width = get_model("vit", variant=sizes.variant).width
  text_variant = sizes.variant.split("/")[0]
  model = get_model("two_towers",
                    image=dict(variant=sizes.variant, pool_type="map", scan=True,
                               remat_policy="nothing_saveable", dtype_mm="bfloat16"),
                    text=dict(variant=text_variant, vocab_size=sizes.vocab, pool_type="last",
                              scan=True, remat_policy="nothing_saveable", dtype_mm="bfloat16"),
                    out_dim=(None, width), temperature_init=10.0, bias_init=-10.0)
  batch = {"image": _images(sizes, rng),
           "text": _tokens(sizes, rng)}

  def loss_fn(params, batch):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"], train=True)
    return contrastive_loss.chunked_sigmoid_loss(zimg, ztxt, out["t"], out["b"])

  step_s, mem, xla_flops = _time_jax_step(model, batch, loss_fn, sizes,
                                          (batch["image"], batch["text"]))
  return _row(f"SigLIP {sizes.variant} (chunked sigmoid loss)", sizes, step_s, mem, xla_flops,
              None, peak, f"text {sizes.text_len} tokens, remat nothing_saveable, scan")


def cappa_row(sizes: Sizes, peak: float | None) -> Row:
  rng = np.random.default_rng(2)
  model = get_model("cappa",
                    image=dict(variant=sizes.variant, pool_type="gap", scan=True,
                               remat_policy="nothing_saveable", dtype_mm="bfloat16"),
                    decoder=dict(variant=sizes.variant.split("/")[0], depth=sizes.dec_depth,
                                 dtype_mm="bfloat16", use_bias=False),
                    vocab_size=sizes.vocab, max_len=sizes.text_len)
  batch = {"image": _images(sizes, rng),
           "text": _tokens(sizes, rng)}

  def loss_fn(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"], batch["text"], train=True)
    return _xent(logits, batch["text"])

  step_s, mem, xla_flops = _time_jax_step(model, batch, loss_fn, sizes,
                                          (batch["image"], batch["text"]))
  return _row(f"CapPa {sizes.variant} ({sizes.dec_depth}-layer decoder)", sizes, step_s, mem,
              xla_flops, None, peak, f"teacher-forced, {sizes.text_len} tokens")


def moe_row(sizes: Sizes, peak: float | None) -> Row:
  rng = np.random.default_rng(3)
  model = get_model("vmoe", variant=sizes.variant, num_classes=sizes.classes, pool_type="gap",
                    posemb="sincos2d", moe_every=2, num_experts=sizes.experts,
                    num_selected_experts=2, dtype_mm="bfloat16")
  batch = {"image": _images(sizes, rng),
           "label": jnp.asarray(rng.integers(0, sizes.classes, sizes.batch), jnp.int32)}

  def loss_fn(params, batch):
    logits, out = model.apply({"params": params}, batch["image"], train=True)
    return _xent(logits, batch["label"]) + out["aux_loss"]

  step_s, mem, xla_flops = _time_jax_step(model, batch, loss_fn, sizes, (batch["image"],))
  fwd = flops.model_forward_flops(model, {"image": np.zeros((1, sizes.res, sizes.res, 3))})
  return _row(f"MoE-ViT {sizes.variant} E={sizes.experts}", sizes, step_s, mem, xla_flops,
              flops.train_flops_per_step(fwd, sizes.batch), peak, "top-2, every other block")


def _row(name: str, sizes: Sizes, step_s: float, mem: float, xla_flops: float | None,
         model_flops: float | None, peak: float | None, note: str) -> Row:
  return Row(name, step_s, sizes.batch / step_s,
             model_flops / step_s / peak if (model_flops and peak) else None,
             xla_flops / step_s / 1e12 if xla_flops else None, mem, note)


# ----------------------------------------------------------------------------- timm row


def timm_row(sizes: Sizes, peak: float | None, compile_model: bool) -> Row:
  """timm vit_base_patch16_224 (or the toy's equivalent), bf16 autocast, fused AdamW."""
  try:
    # The converters' import path: a CUDA-built torchvision on a CPU torch fails on its ops.
    from big_vision_lite.convert import torch_env  # pylint: disable=import-outside-toplevel
    torch = torch_env.setup()
    import timm  # pylint: disable=import-outside-toplevel
  except Exception as e:  # noqa: BLE001 - a broken torch/torchvision install raises RuntimeError
    return Row("timm ViT (torch)", note=f"skipped: timm does not import ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:120]})")
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  if sizes is FULL:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=sizes.classes)
    name = "timm vit_base_patch16_224"
  else:
    dims = get_model("vit", variant=sizes.variant)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=sizes.res, patch_size=dims.patch_size[0], embed_dim=dims.width, depth=dims.depth,
        num_heads=dims.num_heads, mlp_ratio=(dims.mlp_dim or 4 * dims.width) / dims.width,
        num_classes=sizes.classes)
    name = f"timm ViT-{sizes.variant}"
  model = model.to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=cuda)
  fn = torch.compile(model) if compile_model else model
  x = torch.randn(sizes.batch, 3, sizes.res, sizes.res, device=device)
  y = torch.randint(0, sizes.classes, (sizes.batch,), device=device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = loss_fn(fn(x), y)
    loss.backward()
    opt.step()
    return loss

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(sizes.warmup + sizes.steps):
    t0 = time.perf_counter()
    loss = step()
    if cuda:
      torch.cuda.synchronize()
    if i >= sizes.warmup:
      times.append(time.perf_counter() - t0)
  if not bool(torch.isfinite(loss.detach().float())):
    raise FloatingPointError(f"timm: non-finite loss {float(loss)}")
  step_s = float(np.median(times))
  fwd = flops.vit_forward_flops(sizes.res, get_model("vit", variant=sizes.variant).patch_size,
                                model.embed_dim, len(model.blocks),
                                mlp_dim=model.blocks[0].mlp.fc1.out_features,
                                num_classes=sizes.classes, pool_type="tok")
  mem = float(torch.cuda.max_memory_allocated()) if cuda else None
  note = ("torch.compile, " if compile_model else "eager, ") + "bf16 autocast, " + (
      "fused AdamW; memory: peak allocated" if cuda else "AdamW")
  return Row(name, step_s, sizes.batch / step_s,
             flops.train_flops_per_step(fwd, sizes.batch) / step_s / peak if peak else None,
             None, mem, note)


# ----------------------------------------------------------------------------- table


def _fmt(x: float | None, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def format_table(rows: list[Row], header: str) -> str:
  lines = [header, "| run | step ms | images/s | MFU | XLA TFLOP/s | compiled GiB | note |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in rows:
    lines.append(
        f"| {r.name} | {_fmt(r.step_s and r.step_s * 1e3, '.1f')} | {_fmt(r.images_per_s, '.1f')} "
        f"| {_fmt(r.mfu and 100 * r.mfu, '.1f')}{'%' if r.mfu else ''} "
        f"| {_fmt(r.xla_tflops, '.1f')} "
        f"| {_fmt(r.memory_bytes and r.memory_bytes / GiB, '.2f')} | {r.note} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--toy", action="store_true", help="tiny models and batch (a CPU test)")
  ap.add_argument("--peak_tflops", type=float, default=None,
                  help="bf16 peak per device for MFU (default: 790 on a GPU, none on CPU)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps per row (after warm-up)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--only", default="", help=f"comma-separated rows: {','.join(ROWS)}")
  ap.add_argument("--no_torch_compile", action="store_true", help="timm row in eager mode")
  ap.add_argument("--json", default="", help="also write the rows to this JSON file")
  ap.add_argument("--xla_flags_preset", default=xla_flags.DEFAULT_PRESET,
                  choices=sorted(xla_flags.PRESETS),
                  help="XLA_FLAGS preset (platform/gpu/xla_flags.py), as the trainer's "
                       "config.platform.xla_flags_preset")
  args = ap.parse_args(argv)
  sizes = TOY if args.toy else FULL
  if args.steps or args.batch:
    sizes = dataclasses.replace(sizes, steps=args.steps or sizes.steps,
                                batch=args.batch or sizes.batch)
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  peak = args.peak_tflops * 1e12 if args.peak_tflops else (H200_BF16_PEAK if on_gpu else None)
  wanted = set(filter(None, args.only.split(","))) or set(ROWS)
  header = (f"accelerator check: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
            f"batch {sizes.batch} at {sizes.res}px, {sizes.steps} timed steps (median) after "
            f"{sizes.warmup} warm-up; MFU vs {_fmt(peak and peak / 1e12, '.0f')} TFLOP/s bf16; "
            f"XLA flags preset {args.xla_flags_preset}")
  print(header, flush=True)
  compile_torch = not (args.toy or args.no_torch_compile)
  builders = [("vit", lambda: vit_row(sizes, "xla", peak)),
              ("cudnn", lambda: vit_row(sizes, "cudnn", peak)),
              ("siglip", lambda: siglip_row(sizes, peak)),
              ("cappa", lambda: cappa_row(sizes, peak)),
              ("moe", lambda: moe_row(sizes, peak)),
              ("timm", lambda: timm_row(sizes, peak, compile_model=compile_torch))]
  rows = []
  for key, build in builders:
    if key not in wanted:
      continue
    t0 = time.perf_counter()
    try:
      row = build()
    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others' numbers
      row = Row(key, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    rows.append(row)
    print(f"  {row.name}: {_fmt(row.step_s and row.step_s * 1e3, '.1f')} ms/step "
          f"({time.perf_counter() - t0:.0f} s with compile) {row.note}", flush=True)
  print(format_table(rows, ""), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
