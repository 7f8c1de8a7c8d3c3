"""MoE-ViT (V-MoE), registered as model "vmoe": a ViT whose chosen blocks use a sparse MoE MLP.

Parameter names are the ViT's, except that an MoE block's `MlpBlock_0` becomes
`MoeMlpBlock_0/{router, experts/Dense_0, experts/Dense_1}` (expert axis first),
so a dense ViT checkpoint loads as is and can be upcycled into the experts.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import MODELS
from big_vision_lite.models.common import (
    ACT_EMBED, Encoder1DBlock, MultiHeadDotProductAttention, layer_norm, remat_policy)
from big_vision_lite.models.moe import MoeMlpBlock
from big_vision_lite.models.vit import ViT, _pair, merge_variant

__all__ = ["VMoE", "vmoe", "moe_block_indices", "MoeEncoder1DBlock"]

# MoeMlpBlock fields a config may set on the model (flat, e.g. config.model.num_experts).
MOE_FIELDS = ("num_experts", "num_selected_experts", "router", "capacity_factor",
              "eval_capacity_factor", "capacity_multiple_of", "group_size", "num_groups", "bpr", "noise_std",
              "normalize_gates", "importance_weight", "load_weight", "soft_slots")


def moe_block_indices(depth: int, *, every: int = 0, last: int = 0,
                      layers: Sequence[int] | None = None) -> tuple[int, ...]:
  """Which blocks get an MoE MLP: an explicit list, else the last `last`, else every `every`-th.

  "Every 2nd block" means blocks 1, 3, 5, ... (0-based), as V-MoE's "every other".
  """
  if layers is not None and len(layers):
    out = tuple(sorted({int(i) for i in layers}))
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
      raise ValueError(f"moe_layers {list(layers)} has block {bad[0]} outside [0, depth={depth})")
    return out
  if last:
    if not 0 < last <= depth:
      raise ValueError(f"moe_last={last} must be in [1, depth={depth}]")
    return tuple(range(depth - last, depth))
  if every:
    if every < 1:
      raise ValueError(f"moe_every={every} must be >= 1")
    return tuple(i for i in range(depth) if (i + 1) % every == 0)
  raise ValueError("vmoe needs one of moe_layers, moe_last or moe_every to choose the MoE blocks")


class MoeEncoder1DBlock(nn.Module):
  """Encoder1DBlock with an MoE MLP: x + Attn(LN(x)), then x + MoE(LN(x)). Returns (x, metrics)."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6
  moe: Any = None  # dict of MoeMlpBlock fields

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None):
    x = nn.with_logical_constraint(x, ACT_EMBED)
    y = layer_norm(self.norm_eps)(x)
    y = MultiHeadDotProductAttention(num_heads=self.num_heads, dtype_mm=self.dtype_mm)(y, y, mask)
    y = nn.with_logical_constraint(y, ACT_EMBED)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = layer_norm(self.norm_eps)(x)
    y, metrics = MoeMlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm,
                             **dict(self.moe or {}))(y, deterministic)
    y = nn.with_logical_constraint(y, ACT_EMBED)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y  # dropped tokens got y = 0: the residual carries them
    return nn.with_logical_constraint(x, ACT_EMBED), metrics


class MoeEncoder(nn.Module):
  """`depth` blocks named like the ViT encoder's; blocks in `moe_layers` are MoeEncoder1DBlock."""
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  remat_policy: str = "none"
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6
  moe_layers: tuple[int, ...] = ()
  moe: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True):
    policy = remat_policy(self.remat_policy)
    dense, sparse = Encoder1DBlock, MoeEncoder1DBlock
    if policy is not None:
      dense = nn.remat(dense, static_argnums=(2,), policy=policy)
      sparse = nn.remat(sparse, static_argnums=(2,), policy=policy)
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype_mm=self.dtype_mm, norm_eps=self.norm_eps)
    per_layer = {}
    for i in range(self.depth):
      if i in self.moe_layers:
        x, per_layer[i] = sparse(name=f"encoderblock_{i}", moe=self.moe, **kw)(x, deterministic)
      else:
        x, _ = dense(name=f"encoderblock_{i}", **kw)(x, deterministic)
    return layer_norm(self.norm_eps, name="encoder_norm")(x), per_layer


def _summarise(per_layer: dict[int, dict[str, jax.Array]]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sum of the layers' weighted aux losses, and flat scalar router metrics for logging."""
  aux = sum((m["aux_loss"] for m in per_layer.values()), jnp.zeros((), jnp.float32))
  metrics: dict[str, jax.Array] = {}
  for i, m in per_layer.items():
    for key in ("dropped", "importance_loss", "load_loss"):
      if key in m:
        metrics[f"moe/block{i:02d}/{key}"] = m[key]
  if per_layer:
    for key in ("load", "importance"):  # per-expert fractions, averaged over MoE layers
      mean = jnp.mean(jnp.stack([m[key] for m in per_layer.values()]), axis=0)
      for e in range(mean.shape[0]):
        metrics[f"moe/{key}/expert{e}"] = mean[e]
    metrics["moe/dropped"] = jnp.mean(jnp.stack([m["dropped"] for m in per_layer.values()]))
  return aux, metrics


class VMoE(ViT):
  """ViT with MoE MLPs in `moe_layers`; out dict adds "aux_loss" and "moe_metrics".

  Everything but the encoder (stem, posemb, pooling, head, parameter names) is
  the ViT's own.
  """
  moe_layers: tuple[int, ...] = ()
  moe: Any = None  # MoeMlpBlock fields as (name, value) pairs (see MOE_FIELDS)

  def encode(self, x: jax.Array, *, train: bool, dtype_mm: Any) -> tuple[jax.Array, dict]:
    if self.scan:
      raise ValueError("vmoe does not support scan=True (its blocks are not all alike)")
    x, per_layer = MoeEncoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        remat_policy=self.remat_policy, dtype_mm=dtype_mm, norm_eps=self.norm_eps,
        moe_layers=tuple(self.moe_layers), moe=self.moe, name="Transformer")(x, not train)
    aux_loss, moe_metrics = _summarise(per_layer)
    return x, {"aux_loss": aux_loss, "moe_metrics": moe_metrics}


@MODELS.register("vmoe")
def vmoe(variant: str | None = None, *, moe_every: int = 0, moe_last: int = 0,
         moe_layers: Sequence[int] | None = None, **kwargs) -> VMoE:
  """Builds a VMoE from a ViT variant ("S/16"); MoE fields (MOE_FIELDS) are flat kwargs.

  MoE blocks: `moe_layers` (explicit), else `moe_last` (last n), else `moe_every`
  (every n-th; default 2 when none is given).
  """
  cfg = merge_variant(variant, kwargs)
  moe = {k: cfg.pop(k) for k in MOE_FIELDS if k in cfg}
  if cfg.pop("scan", False):
    raise ValueError("vmoe does not support scan=True (its blocks are not all alike)")
  if "patch_size" in cfg:
    cfg["patch_size"] = _pair(cfg["patch_size"])
  if not (moe_layers or moe_last or moe_every):
    moe_every = 2
  depth = cfg.get("depth", VMoE.depth)
  layers = moe_block_indices(depth, every=moe_every, last=moe_last, layers=moe_layers)
  # A tuple of items, not a dict: module fields should be hashable (remat, jit statics).
  return VMoE(moe_layers=layers, moe=tuple(sorted(moe.items())), **cfg)


vmoe.extra_keys = MOE_FIELDS  # type: ignore[attr-defined]  # flat MoE kwargs, for config checks
