"""Our ViT (JAX) vs timm's ViT (PyTorch) and big_vision's own ViT (JAX) on this machine: images/s
of a training step and a forward.

    python benchmarks/vs_pytorch.py [--variant S] [--batch 32] [--infer_batch 64] [--steps 5]
                                    [--block 2] [--mode train|infer|both] [--res 224]
                                    [--attention_impl auto] [--norm_impl auto] [--cpu_dots auto]
                                    [--malloc default|keep|hugepages] [--big_vision PATH]
                                    [--vs_xla]

`--big_vision PATH` (a checkout of github.com/google-research/big_vision; nothing of it is
copied here) adds its `big_vision/models/vit.py` Model with an optax step as big_vision's
train loop builds it (softmax cross-entropy, clip_by_global_norm(1.0), adamw), jitted with
jax's default compile options; without it, that side is skipped. Its utils.py imports
tensorflow.io.gfile, which the model never calls: a stub stands in where TensorFlow is not
installed.

`--vs_xla` adds our same step built on the plain XLA path ("ours_xla": attention_impl=xla,
norm_impl=xla, cpu_dots=ynnpack, jax's default emitter), timed in the same alternation: the
ratio ours/ours_xla says whether the implementations `auto` chose pay on this host.

Ours is the trainer's real step (train.build + make_train_step: forward, backward,
grad clip, AdamW, metrics) and a jitted `model.apply` for the forward; timm's is
`vit_<variant>_patch16_224` with torch.optim.AdamW and clip_grad_norm_ (train) and
`inference_mode` (forward). Both are fp32, 1000 classes, class-token pooling (197
tokens, as timm's model), compiled/warmed up first, then timed alternately in blocks
(`--block` steps of ours, the same of torch, repeated `--steps` times) so background
load on a shared machine hits both alike. Two ratios of median images/s (ours /
torch, > 1 means ours is faster) are printed, by wall time and by process CPU time
(user + sys of all threads; on a CPU shared with other jobs the wall time includes
waiting for a core, the CPU time does not):
  - "all steps": images over the summed time of every timed step, each block's first
    included (with `--block 1` this is the old one-step alternation);
  - "steady": each block's steps after its first, as in a training run, where steps
    follow each other. With `--malloc default` the first step after switching
    frameworks can be far slower: XLA:CPU maps its temporaries (2.9 GB for ViT-S at
    batch 32) afresh each step and unmaps them after, and on a VM with free page
    reporting (virtio-balloon, e.g. Firecracker) pages left free for ~2 s are handed
    back to the host and must be faulted back in (our ViT-S step: 5.0 s -> 8.0 s, mostly
    kernel time). torch reuses its heap and does not pay this. `--block 1` gives only
    "all steps".
Our side runs as the trainer does with the same config keys (big_vision_lite/platform):
`--attention_impl`, `--norm_impl` and `--cpu_dots` (config.model.attention_impl,
config.model.norm_impl, config.platform.cpu_dots; 'auto' measures on this CPU, cached); the
run prints each choice. `--malloc keep` restarts the script once in launch/cpu.sh's
environment: glibc keeps freed memory mapped (one arena, no mmap, no trimming) and the block
cache is preloaded (platform/cpu/block_cache.py: freed blocks of 1 MiB and more kept for the
next request they fit): XLA:CPU's temporaries
(2.9 GB per ViT-S step at batch 32) are then reused instead of unmapped and faulted back in,
~636k page faults per step with glibc's defaults. `--malloc hugepages` restarts the
process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 instead, which backs large allocations
with transparent huge pages (~30x fewer faults). `--malloc default` (the default, as
`python -m big_vision_lite.train`) leaves glibc as it is. All sides run in one process, so
they share the malloc settings. "machine before/after" lines give both frameworks' matmul speed and
the memory copy rate around the timed steps: on a shared VM these vary from hour to hour,
and ratios from runs whose machine lines differ are not comparable. Each side's line also
gives its GFLOP/s from the analytic FLOPs (big_vision_lite/flops.py; training = 3x forward)
and that as a share of its own framework's matmul probe before the timed steps: how near
each gets to what this machine's GEMM gives it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402

from big_vision_lite import config as config_lib, flops, platform, sharding, train  # noqa: E402
from big_vision_lite.convert import torch_env  # noqa: E402
from big_vision_lite.platform.cpu import memory as host_memory  # noqa: E402

TIMM_NAMES = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
              "B": "vit_base_patch16_224"}
CLASSES = 1000


# The plain XLA path: no CPU kernel, jax's default dot emitter.
XLA_PATH = {"attention_impl": "xla", "norm_impl": "xla", "cpu_dots": "ynnpack"}


def _config(variant: str, batch: int) -> config_lib.ConfigDict:
  c = config_lib.defaults()
  c.input.batch_size = batch
  c.total_steps = 1000
  c.model_name = "vit"
  # Class token + learned posemb + head on the token: timm's vit_*_patch16_224 architecture.
  c.model = config_lib.ConfigDict(dict(variant=f"{variant}/16", num_classes=CLASSES, pool_type="tok",
                                       posemb="learn"))
  c.task = config_lib.ConfigDict(dict(name="classification", loss="softmax_xent"))
  c.optax_name = "adamw"
  c.schedule = config_lib.ConfigDict(dict(warmup_steps=10, decay_type="cosine"))
  c.mesh = config_lib.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1))
  return c


def _images(batch: int, res: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, res, res, 3)).astype(np.float32),
          rng.integers(0, CLASSES, batch))


class Ours:
  """The trainer's compiled train step, and a jitted forward of the same model."""

  def __init__(self, variant: str, batch: int, infer_batch: int, res: int, modes: set[str],
               impls: dict[str, str]):
    c = _config(variant, batch)
    c.model.attention_impl, c.model.norm_impl = impls["attention_impl"], impls["norm_impl"]
    c.platform.cpu_dots = impls["cpu_dots"]
    platform.configure(c)
    example = {"image": np.zeros((1, res, res, 3), np.float32),
               "labels": np.zeros((1, CLASSES), np.float32)}
    self.mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    setup = train.build(c, mesh=self.mesh, example=example)
    self.rules = setup.rules
    self.model = setup.model
    with self._ctx():
      self.state = setup.init_state(jax.random.PRNGKey(0))
      self.compile_s = {}
      if "train" in modes:
        img, lab = _images(batch, res)
        self.batch = sharding.global_batch(
            {"image": img, "labels": np.eye(CLASSES, dtype=np.float32)[lab]}, self.mesh)
        t0 = time.perf_counter()
        self.step = train.make_train_step(setup, 1).lower(self.state, self.batch).compile()
        self.compile_s["train"] = time.perf_counter() - t0
      if "infer" in modes:
        self.images = jax.device_put(_images(infer_batch, res, 1)[0])
        fwd = jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False)[0],
                      compiler_options=platform.compiler_options())
        t0 = time.perf_counter()
        self.fwd = fwd.lower(self.state["params"], self.images).compile()
        self.compile_s["infer"] = time.perf_counter() - t0

  def _ctx(self):
    mesh, rules = self.mesh, self.rules

    class _Ctx:
      def __enter__(self_inner):
        self_inner.a = jax.set_mesh(mesh)
        self_inner.a.__enter__()
        self_inner.b = nn.logical_axis_rules(rules)
        self_inner.b.__enter__()

      def __exit__(self_inner, *exc):
        self_inner.b.__exit__(*exc)
        self_inner.a.__exit__(*exc)
    return _Ctx()

  def train_step(self) -> float:
    with self._ctx():
      t0 = time.perf_counter()
      self.state, m = self.step(self.state, self.batch)
      jax.block_until_ready((self.state, m))
      return time.perf_counter() - t0

  def infer(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.fwd(self.state["params"], self.images))
    return time.perf_counter() - t0


def import_big_vision_vit(path: str):
  """big_vision.models.vit from the checkout at `path` (a TensorFlow stub where none is here)."""
  import importlib.machinery  # noqa: PLC0415
  import types  # noqa: PLC0415
  import flax.training.checkpoints  # noqa: F401,PLC0415 (first: flax.io looks for a real TF)
  try:
    import tensorflow  # noqa: F401,PLC0415
  except ImportError:
    for name in ("tensorflow", "tensorflow.io", "tensorflow.io.gfile"):
      mod = types.ModuleType(name)
      mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
      sys.modules[name] = mod
    sys.modules["tensorflow"].io = sys.modules["tensorflow.io"]
    sys.modules["tensorflow.io"].gfile = sys.modules["tensorflow.io.gfile"]
  sys.path.insert(0, os.path.abspath(path))
  from big_vision.models import vit  # noqa: PLC0415
  return vit


class BigVision:
  """big_vision's models/vit.py Model with the optax step of its train loop, plain jax.jit."""

  def __init__(self, path: str, variant: str, batch: int, infer_batch: int, res: int,
               modes: set[str]):
    import optax  # noqa: PLC0415
    vit = import_big_vision_vit(path)
    self.model = vit.Model(num_classes=CLASSES, variant=f"{variant}/16", pool_type="tok",
                           posemb="learn")
    self.params = jax.jit(self.model.init)(jax.random.key(0),
                                           np.zeros((1, res, res, 3), np.float32))["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4))
    self.opt = tx.init(self.params)
    self.compile_s = {}
    if "train" in modes:
      img, lab = _images(batch, res)
      self.x, self.y = jax.device_put(img), jax.device_put(np.eye(CLASSES, dtype=np.float32)[lab])

      def step(params, opt, x, y):
        def loss_fn(p):
          logits, _ = self.model.apply({"params": p}, x, train=True)
          return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss
      t0 = time.perf_counter()
      self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
          self.params, self.opt, self.x, self.y).compile()
      self.compile_s["train"] = time.perf_counter() - t0
    if "infer" in modes:
      self.images = jax.device_put(_images(infer_batch, res, 1)[0])
      t0 = time.perf_counter()
      self.fwd = jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False)[0]).lower(
          self.params, self.images).compile()
      self.compile_s["infer"] = time.perf_counter() - t0

  def train_step(self) -> float:
    t0 = time.perf_counter()
    self.params, self.opt, loss = self.step(self.params, self.opt, self.x, self.y)
    jax.block_until_ready((self.params, loss))
    return time.perf_counter() - t0

  def infer(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.fwd(self.params, self.images))
    return time.perf_counter() - t0


class Torch:
  """timm's ViT with AdamW (+ grad-norm clip 1.0, as our default config) and an eval forward."""

  def __init__(self, variant: str, batch: int, infer_batch: int, res: int, modes: set[str]):
    self.torch = torch = torch_env.setup()
    import timm  # after torch_env.setup(): the torchvision stub
    self.model = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=CLASSES,
                                   img_size=res)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
    if "train" in modes:
      img, lab = _images(batch, res)
      self.x = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()  # NCHW, as timm wants
      self.y = torch.from_numpy(lab)
    if "infer" in modes:
      self.xi = torch.from_numpy(_images(infer_batch, res, 1)[0]).permute(0, 3, 1, 2).contiguous()

  def train_step(self) -> float:
    torch = self.torch
    self.model.train()
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    loss.item()
    return time.perf_counter() - t0

  def infer(self) -> float:
    self.model.eval()
    with self.torch.inference_mode():
      t0 = time.perf_counter()
      self.model(self.xi).sum().item()
      return time.perf_counter() - t0


def thread_settings(torch_mod) -> str:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"cores available {cores}; torch threads {torch_mod.get_num_threads()} intra-op / "
          f"{torch_mod.get_num_interop_threads()} inter-op; XLA:CPU Eigen pool = cores "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def machine_state(torch_mod, size: int = 2048, repeats: int = 5) -> tuple[str, dict[str, float]]:
  """How fast this machine is right now: both frameworks' fp32 matmul and a memory copy.

  On a shared VM the same step can take 1.5-2x longer from one hour to the next, and not
  alike for both frameworks (RESULTS.md, "a LayerNorm kernel for XLA:CPU"), so each run records the state it ran in:
  ratios are compared across runs only where these numbers match. Returns the line and the
  matmul rates in FLOP/s ({"ours": jax's, "torch": torch's}).
  """
  jax_rate = flops.measure_matmul_flops(jax.devices()[0], size=size, repeats=repeats)
  a = torch_mod.ones(size, size)
  torch_rate = 2.0 * size ** 3 / _best_s(lambda: torch_mod.mm(a, a), repeats)
  # 256 MB each, far beyond any cache, mapped apart from glibc's heap: with --malloc keep the
  # heap never shrinks, and the probe must not change the heap layout of the steps it brackets.
  nbytes = 256 << 20
  with mmap.mmap(-1, nbytes) as src_buf, mmap.mmap(-1, nbytes) as dst_buf:
    src = np.frombuffer(src_buf, np.float32)
    dst = np.frombuffer(dst_buf, np.float32)
    # The warm-up call faults pages in; the lambda runs before the del below (hence the noqa).
    copy_s = _best_s(lambda: np.copyto(dst, src), repeats)  # noqa: F821
    del src, dst  # the buffers cannot close while arrays still view them
  line = (f"{size}^2 fp32 matmul: jax {jax_rate / 1e9:.0f} GFLOP/s, torch {torch_rate / 1e9:.0f} "
          f"GFLOP/s; memory copy {2 * nbytes / copy_s / 1e9:.1f} GB/s (read + write, numpy)")
  return line, {"ours": jax_rate, "torch": torch_rate, "big_vision": jax_rate, "ours_xla": jax_rate}


def _best_s(fn: Callable[[], object], repeats: int) -> float:
  """Fastest of `repeats` timed calls of `fn`, after one untimed warm-up call."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
  return r.ru_utime + r.ru_stime


def _restart_with_hugepages() -> None:
  """Re-executes this script with glibc's THP tunable (read only at process start)."""
  if host_memory.has_hugepages_tunable(os.environ) or not sys.platform.startswith("linux"):
    return
  os.execve(sys.executable, [sys.executable, *sys.argv], host_memory.add_tunable(os.environ))


def _alternate(fns: dict[str, Callable[[], float]], rounds: int, block: int, warmup: int
               ) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
  """Wall and process CPU seconds (user + sys) of each fn: [round][step in block]."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      wall[k].append([])
      cpu[k].append([])
      for _ in range(block):
        c0 = _cpu_s()
        wall[k][-1].append(fn())
        cpu[k][-1].append(_cpu_s() - c0)
  return wall, cpu


def _report(label: str, batch: int, wall: dict[str, list[list[float]]],
            cpu: dict[str, list[list[float]]], first: int, flops_per_step: float | None,
            matmul_rates: dict[str, float]) -> dict[str, float]:
  """Prints images/s and the ratio over the steps of each block from index `first`.

  first=0: total images / total time (every step counts); first>=1: median step. With the
  step's analytic FLOPs (the same count for both sides: one model), also each side's FLOP/s
  and that as a share of its own framework's matmul probe, the most this machine gives it.
  """
  pick = lambda runs: [t for block in runs for t in block[first:]]  # noqa: E731
  stat = statistics.mean if first == 0 else statistics.median
  name = "mean" if first == 0 else "median"
  ips = {k: batch / stat(pick(t)) for k, t in wall.items()}
  cpu_ips = {k: batch / stat(pick(t)) for k, t in cpu.items()}
  print(f"  {label}:")
  for k in wall:
    rate = ""
    if flops_per_step:
      achieved = flops_per_step / stat(pick(wall[k]))
      rate = f";  {achieved / 1e9:.0f} GFLOP/s = {achieved / matmul_rates[k]:.0%} of its matmul probe"
    print(f"    {k:10s} {ips[k]:7.2f} img/s  {name} step {stat(pick(wall[k])):.3f} s;  "
          f"CPU {stat(pick(cpu[k])):.3f} s/step = {cpu_ips[k]:.2f} img/CPU-s{rate}")
  print(f"    ratio ours/torch = {ips['ours'] / ips['torch']:.3f} by wall time, "
        f"{cpu_ips['ours'] / cpu_ips['torch']:.3f} by CPU time  (goal >= 1.0)")
  if "big_vision" in ips:
    print(f"    ratio ours/big_vision = {ips['ours'] / ips['big_vision']:.3f} by wall time, "
          f"{cpu_ips['ours'] / cpu_ips['big_vision']:.3f} by CPU time  (goal >= 1.3)")
  if "ours_xla" in ips:
    print(f"    ratio ours/ours_xla = {ips['ours'] / ips['ours_xla']:.3f} by wall time, "
          f"{cpu_ips['ours'] / cpu_ips['ours_xla']:.3f} by CPU time  (goal: not below 1 by more "
          f"than the noise)")
  return ips


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="S", choices=sorted(TIMM_NAMES))
  ap.add_argument("--batch", type=int, default=32, help="training batch")
  ap.add_argument("--infer_batch", type=int, default=64, help="forward-only batch")
  ap.add_argument("--steps", type=int, default=5, help="timed rounds (blocks of each), after warm-up")
  ap.add_argument("--block", type=int, default=2, help="consecutive steps of one side per round")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--res", type=int, default=224)
  ap.add_argument("--mode", default="both", choices=("train", "infer", "both"))
  for key, table in (("attention_impl", platform.ATTENTION), ("norm_impl", platform.NORM),
                     ("cpu_dots", platform.CPU_DOTS)):
    ap.add_argument(f"--{key}", default="auto", choices=("auto", *table),
                    help=f"our config's {key} (big_vision_lite/platform)")
  ap.add_argument("--big_vision", default="", metavar="PATH",
                  help="a big_vision checkout: also time its models/vit.py (skipped if unset)")
  ap.add_argument("--vs_xla", action="store_true",
                  help="also time our step on the plain XLA path (xla attention and LayerNorm, "
                       "jax's default dots) beside the configured one")
  ap.add_argument("--malloc", default="default", choices=("keep", "hugepages", "default"),
                  help="'keep': large blocks cached and glibc keeps freed memory, as "
                       "launch/cpu.sh; 'hugepages': "
                       f"restart with GLIBC_TUNABLES={host_memory.HUGEPAGES_TUNABLE} (Linux); "
                       "'default': glibc as it is")
  args = ap.parse_args()
  if args.malloc == "hugepages":
    _restart_with_hugepages()
  # Before JAX starts (XLA's threads take their malloc arenas at their first allocation).
  malloc = bench_setup.keep_freed_memory(args.malloc)
  modes = {"train", "infer"} if args.mode == "both" else {args.mode}

  impls = {k: getattr(args, k) for k in ("attention_impl", "norm_impl", "cpu_dots")}
  ours = Ours(args.variant, args.batch, args.infer_batch, args.res, modes, impls)
  ours_options = platform.compiler_options()
  ours_xla = (Ours(args.variant, args.batch, args.infer_batch, args.res, modes, XLA_PATH)
              if args.vs_xla else None)
  theirs = Torch(args.variant, args.batch, args.infer_batch, args.res, modes)
  bv = (BigVision(args.big_vision, args.variant, args.batch, args.infer_batch, args.res, modes)
        if args.big_vision else None)
  print(f"ViT-{args.variant}/16 at {args.res}px, {CLASSES} classes, fp32; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {theirs.torch.__version__}")
  print(bench_setup.cpu_line())
  print(thread_settings(theirs.torch))
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; {malloc}")
  print(f"our config: {impls}; compiler_options {ours_options}")
  print("our compile time: " + ", ".join(f"{k} {v:.1f} s" for k, v in ours.compile_s.items()))
  if ours_xla is not None:
    print(f"ours_xla config: {XLA_PATH}; compile time: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in ours_xla.compile_s.items()))
  if bv is not None:
    print(f"big_vision ({args.big_vision}) compile time: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in bv.compile_s.items()))
  rows = []
  before, matmul_rates = machine_state(theirs.torch)
  print("machine before: " + before)
  example = {"image": np.zeros((1, args.res, args.res, 3), np.float32)}
  forward_flops = flops.model_forward_flops(ours.model, example)  # per image
  for mode in ("train", "infer"):
    if mode not in modes:
      continue
    batch = args.batch if mode == "train" else args.infer_batch
    sides = {"ours": ours, "torch": theirs, **({"big_vision": bv} if bv else {}),
             **({"ours_xla": ours_xla} if ours_xla else {})}
    fns = {k: getattr(v, "train_step" if mode == "train" else "infer") for k, v in sides.items()}
    wall, cpu = _alternate(fns, args.steps, args.block, args.warmup)
    label = "train step (fwd+bwd+AdamW)" if mode == "train" else "forward only"
    print(f"{label}, batch {batch}, {args.steps} rounds of {args.block} steps each side, "
          f"after {args.warmup} warm-up:")
    for k in fns:
      print(f"  {k:10s} wall s by round: " + " | ".join(", ".join(f"{t:.3f}" for t in b) for b in wall[k]))
    step_flops = forward_flops and (flops.train_flops_per_step(forward_flops, batch)
                                    if mode == "train" else forward_flops * batch)
    ips = _report("all steps", batch, wall, cpu, 0, step_flops, matmul_rates)
    if args.block > 1:
      ips = _report("steady (each block's first step left out)", batch, wall, cpu, 1, step_flops,
                    matmul_rates)
    rows.append((mode, ips))
  print("machine after: " + machine_state(theirs.torch)[0])
  # One line per mode, with the CPU: a ratio means nothing without it (RESULTS.md, issue 25).
  for mode, ips in rows:
    ratios = "; ".join(f"ours/{k} {ips['ours'] / ips[k]:.3f}" for k in ips if k != "ours")
    print(f"row: ViT-{args.variant}/16 {mode} img/s " + ", ".join(f"{k} {v:.2f}" for k, v in ips.items())
          + f"; {ratios}; {bench_setup.cpu_line()}")
  print(bench_setup.memory_line())


if __name__ == "__main__":
  main()
