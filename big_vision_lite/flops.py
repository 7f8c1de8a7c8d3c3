"""Analytic FLOPs of ViT forward passes, per-device peak FLOP/s, and MFU.

Counting convention: one multiply-add is 2 FLOPs, and only matmuls are counted
(patch embedding, attention projections, QK^T, AV, MLPs, heads). Softmax,
LayerNorm, GELU, biases and residual adds are ignored; they are a few percent
at real sizes. So ViT-B/16 at 224 with gap pooling is ~34.9 GFLOPs forward,
twice the ~17.5 "GFLOPs" (really GMACs) that timm and the ViT papers quote.
A training step costs 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from big_vision_lite import files
from big_vision_lite.platform.cpu import host as host_cpu

# bf16 dense peak FLOP/s per *JAX device* (not per chip where they differ:
# TPU v2/v3 expose each of a chip's two cores as a device). Matched in order
# against a lowercase device_kind, so more specific names come first.
_PEAK_TABLE: tuple[tuple[str, float, str], ...] = (
  ("tpu v6 lite", 918e12, "TPU v6e bf16"),
  ("tpu v6e", 918e12, "TPU v6e bf16"),
  ("tpu v5 lite", 197e12, "TPU v5e bf16"),
  ("tpu v5e", 197e12, "TPU v5e bf16"),
  ("tpu v5p", 459e12, "TPU v5p bf16"),
  ("tpu v5", 459e12, "TPU v5p bf16"),
  ("tpu v4", 275e12, "TPU v4 bf16"),
  ("tpu v3", 61.5e12, "TPU v3 bf16 (per core)"),
  ("tpu v2", 22.5e12, "TPU v2 bf16 (per core)"),
  ("h100 pcie", 756e12, "NVIDIA H100 PCIe bf16 dense"),
  ("h100 nvl", 835e12, "NVIDIA H100 NVL bf16 dense"),
  ("h100", 989e12, "NVIDIA H100 SXM bf16 dense"),
  ("h200", 989e12, "NVIDIA H200 bf16 dense"),
  ("gh200", 989e12, "NVIDIA GH200 bf16 dense"),
  ("a100", 312e12, "NVIDIA A100 bf16 dense"),
  ("l4", 121e12, "NVIDIA L4 bf16 dense"),
  ("v100", 125e12, "NVIDIA V100 fp16 tensor core"),
)

DEFAULT_CACHE_PATH = os.path.join("~", ".cache", "big_vision_lite", "peak_flops.json")
# A cached CPU peak older than this is measured afresh (a host's CPU can change under a VM).
PEAK_CACHE_MAX_AGE_S = 7 * 24 * 3600


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  a, b = x
  return (int(a), int(b))


def encoder_block_flops(seq_len: int, width: int, mlp_dim: int) -> float:
  """Forward matmul FLOPs of one pre-LN transformer encoder block.

  2*S*D*3D (q, k, v) + 2*S^2*D (QK^T) + 2*S^2*D (AV) + 2*S*D*D (out)
  + 2*2*S*D*mlp (two MLP dense layers). Independent of the head count, since
  heads split D into H*hd (so QK^T + AV is FACTS.md's 4*S^2*H*hd).
  """
  s, d, m = seq_len, width, mlp_dim
  return float(2 * s * d * 3 * d + 4 * s * s * d + 2 * s * d * d + 4 * s * d * m)


def map_head_flops(seq_len: int, width: int, mlp_dim: int) -> float:
  """Forward matmul FLOPs of a MAP head: one learned probe attends over S tokens.

  q from the probe 2*D*D, k and v from the tokens 2*S*D*2D, scores 2*S*D,
  weighted sum 2*S*D, out 2*D*D, then the MLP on the single pooled token 4*D*mlp.
  """
  s, d, m = seq_len, width, mlp_dim
  return float(2 * d * d + 4 * s * d * d + 4 * s * d + 2 * d * d + 4 * d * m)


def vit_forward_flops(
    image_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    width: int,
    depth: int,
    mlp_dim: int | None = None,
    num_classes: int = 0,
    pool_type: str = "gap",
    channels: int = 3,
) -> float:
  """Forward matmul FLOPs for one image through a ViT (see the module docstring).

  Terms: patch embedding 2*S*P_h*P_w*C*D; `depth` encoder blocks
  (`encoder_block_flops`); a MAP head if pool_type == "map"; the classifier
  head 2*D*num_classes (0 when num_classes is 0, i.e. no head). pool_type "tok"
  adds a class token, so the encoder sees S+1 tokens.
  """
  ih, iw = _pair(image_size)
  ph, pw = _pair(patch_size)
  # The model drops the rows/columns past the last whole patch (PatchEmbed); so does the count.
  if pool_type not in ("gap", "tok", "map", "none", "0"):
    raise ValueError(f"unknown pool_type {pool_type!r} (expected gap, tok, map or none)")
  mlp = 4 * width if mlp_dim is None else mlp_dim
  num_patches = (ih // ph) * (iw // pw)
  seq = num_patches + (1 if pool_type == "tok" else 0)
  total = 2.0 * num_patches * ph * pw * channels * width
  total += depth * encoder_block_flops(seq, width, mlp)
  if pool_type == "map":
    total += map_head_flops(seq, width, mlp)
  total += 2.0 * width * num_classes
  return total


def vmoe_forward_flops(image_size: int | Sequence[int], patch_size: int | Sequence[int], width: int,
                       depth: int, mlp_dim: int | None = None, num_classes: int = 0,
                       pool_type: str = "gap", channels: int = 3, *, num_moe_layers: int = 0,
                       num_experts: int = 8, experts_per_token: float = 2.0) -> float:
  """Forward matmul FLOPs of one image through an MoE-ViT.

  The dense ViT count, then in each of the `num_moe_layers` MoE blocks the MLP
  term 4*S*D*mlp becomes `experts_per_token` times it (k for top-k routing), plus
  the router 2*S*D*E. Dispatch/combine einsums are not counted: they are data
  movement written as matmuls, not model compute.
  """
  total = vit_forward_flops(image_size, patch_size, width, depth, mlp_dim, num_classes, pool_type,
                            channels)
  ih, iw = _pair(image_size)
  ph, pw = _pair(patch_size)
  seq = (ih // ph) * (iw // pw) + (1 if pool_type == "tok" else 0)
  mlp = 4 * width if mlp_dim is None else mlp_dim
  per_layer = (experts_per_token - 1.0) * 4 * seq * width * mlp + 2 * seq * width * num_experts
  return total + num_moe_layers * per_layer


def _vmoe_flops(model: Any, h: int, w: int, c: int) -> float:
  moe = dict(model.moe or ())
  e = int(moe.get("num_experts", 8))
  router = moe.get("router", "topk")
  seq = (h // model.patch_size[0]) * (w // model.patch_size[1])
  if router == "topk":
    per_token = float(moe.get("num_selected_experts", 2))
  elif router == "experts_choice":  # E experts x C slots over S tokens, C = ceil(S*cf/E)
    per_token = e * math.ceil(seq * float(moe.get("capacity_factor", 1.05)) / e) / seq
  else:  # soft: E*slots slot-MLPs per image, plus dispatch/combine over the slots
    per_token = e * int(moe.get("soft_slots", 1)) / seq
  return vmoe_forward_flops((h, w), model.patch_size, model.width, model.depth, model.mlp_dim,
                            model.num_classes or 0, model.pool_type, c,
                            num_moe_layers=len(model.moe_layers), num_experts=e,
                            experts_per_token=per_token)


def model_forward_flops(model: Any, example: Mapping[str, Any]) -> float | None:
  """Analytic forward FLOPs of one example for models with a formula (ViT, V-MoE); None otherwise."""
  from big_vision_lite.models.vit import ViT  # local: keep this module free of flax at import
  from big_vision_lite.models.vmoe import VMoE
  if isinstance(model, VMoE) and "image" in example:
    _, h, w, c = example["image"].shape
    return _vmoe_flops(model, h, w, c)
  if not isinstance(model, ViT) or "image" not in example:
    return None
  _, h, w, c = example["image"].shape
  return vit_forward_flops((h, w), model.patch_size, model.width, model.depth, mlp_dim=model.mlp_dim,
                           num_classes=model.num_classes or 0, pool_type=model.pool_type, channels=c)


def train_flops_per_step(forward_flops_per_example: float, batch_size: int) -> float:
  """FLOPs of one training step: forward + backward (2x forward) over the batch."""
  return 3.0 * forward_flops_per_example * batch_size


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation as a fraction in [0, 1] (ideally)."""
  if step_time_s <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
    raise ValueError(
        f"mfu needs positive step time, device count and peak; got {step_time_s}, "
        f"{num_devices}, {peak_flops_per_device}")
  return flops_per_step / (step_time_s * num_devices * peak_flops_per_device)


def table_peak_flops(device_kind: str) -> tuple[float, str] | None:
  """The table's peak for a device kind string, or None if it is not known."""
  kind = device_kind.lower()
  for key, peak, desc in _PEAK_TABLE:
    if key in kind:
      return peak, f"table: {desc}"
  return None


def measure_matmul_flops(device: Any = None, *, size: int | None = None,
                         dtype: Any = None, repeats: int = 5) -> float:
  """Best-of-`repeats` FLOP/s of one size x size matmul on `device`."""
  import jax
  import jax.numpy as jnp

  device = device or jax.devices()[0]
  is_cpu = device.platform == "cpu"
  # CPU: fp32 (what CPU runs use); accelerators: bf16 and big enough to fill them.
  size = size or (1024 if is_cpu else 8192)
  dtype = dtype or (jnp.float32 if is_cpu else jnp.bfloat16)
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.ones((size, size), dtype), device)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile and warm up
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size ** 3 / max(best, 1e-9)


def default_peak_flops(device: Any = None, *,
                       cache_path: str | None = DEFAULT_CACHE_PATH) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the number came from.

  Known TPUs/GPUs come from a table (bf16 dense). Anything else, CPU included,
  is measured with a matmul probe at every call; the highest probe of the last week is kept by
  device kind, CPU count and CPU model (`host_cpu.signature()`: a home directory shared by hosts
  with other CPUs keeps one number per CPU) in `cache_path` (None disables the cache). On CPU
  the probe measures the whole host, which all local CPU devices share, so the per-device
  peak is the host
  rate divided by the number of local CPU devices; MFU then comes out the same
  whatever `jax_num_cpu_devices` is. A config's `mfu_peak_flops` should
  override this in the trainer.
  """
  import jax

  device = device or jax.devices()[0]
  kind = str(getattr(device, "device_kind", device.platform))
  if device.platform != "cpu":
    hit = table_peak_flops(kind)
    if hit is not None:
      return hit
  cpu = host_cpu.model_name()
  key = f"{kind}|cpus={os.cpu_count()}|cpu={cpu} {host_cpu.signature()}"
  cache = {}
  path = os.path.expanduser(cache_path) if cache_path else None
  if path and os.path.exists(path):
    try:
      with open(path) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}  # a corrupt cache only costs a re-measurement
  # The probe is cheap (well under a second), so every run measures again: one probe taken while
  # the host was busy must not set the peak for good. The cache keeps the highest recent probe
  # (a loaded host measures low, never high) and forgets it after PEAK_CACHE_MAX_AGE_S.
  rate = measure_matmul_flops(device)
  entry = cache.get(key)
  now = time.time()
  if (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > rate
      and now - float(entry.get("measured", 0)) < PEAK_CACHE_MAX_AGE_S):
    rate = float(entry["flops"])
  else:
    cache[key] = {"flops": rate, "measured": now}
    if path:
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
      except OSError:
        pass  # read-only home: still return the measurement
  if device.platform == "cpu":
    n = sum(1 for d in jax.local_devices() if d.platform == "cpu") or 1
    return rate / n, (f"measured by matmul probe ({rate / 1e9:.1f} GFLOP/s fp32 host, "
                      f"{cpu}, shared by {n} CPU device{'s' if n > 1 else ''})")
  return rate, f"measured by matmul probe (unknown device kind {kind!r})"


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs from a compiled jax object's cost_analysis(), or None if unavailable.

  XLA counts a multiply-add as 2 FLOPs too, plus elementwise ops; for a sharded
  computation the number is per device. Handles the dict form (current jax)
  and the older list-of-dicts form.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  total, found = 0.0, False
  for entry in cost:
    if entry and "flops" in entry:
      total += float(entry["flops"])
      found = True
  return total if found else None
