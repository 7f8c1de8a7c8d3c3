"""Sparse mixture-of-experts layer (V-MoE): routers, dispatch/combine, experts, aux losses.

Every router (top-k with capacity/priority/BPR, experts-choice, Soft MoE) returns
the same thing: dense `dispatch` and `combine` tensors shaped (G, S, E, C) that
map the S tokens of each of G groups to C slots of each of E experts. The hard
routers also return the same map as indices (which token fills each slot, with
what weight), and the layer dispatches and combines with those: a gather and a
scatter-add cost O(E*C*D) per group where the einsums against the one-hot
tensors cost O(S*E*C*D), which made the step 1.6x a dense one at 196 tokens per
group. Soft MoE's slots mix every token, so it keeps the einsums. With the groups
sharded over the batch axes and the experts over `expert`, the reshard between
the two layouts is an all-to-all, so tokens travel and expert weights stay put.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from big_vision_lite.models.common import part

Array = jax.Array

ROUTERS = ("topk", "experts_choice", "soft")


# ----------------------------------------------------------------------------- aux losses


def importance_loss(gates: Array) -> Array:
  """CV(sum of gates per expert)^2 of each group, averaged over groups; gates (G, S, E).

  Per group as V-MoE: over the whole batch the per-group imbalances partly cancel,
  which weakens the balancing gradient (4x with one image per group).
  """
  imp = jnp.sum(gates, axis=-2)  # (G, E)
  return jnp.mean((jnp.std(imp, axis=-1) / jnp.mean(imp, axis=-1)) ** 2)


def load_loss(logits: Array, noisy_logits: Array, noise_std: float, k: int) -> Array:
  """CV(expected per-expert load)^2, V-MoE's smooth load estimate; logits (G, S, E).

  A token reaches expert e if its clean logit plus fresh noise beats the k-th
  largest noisy logit, so P = 1 - Phi((threshold - logit_e) / noise_std). The
  expected load is averaged per group; the CV^2 is averaged over groups.
  """
  threshold = per_group(lambda z: jax.lax.top_k(z, k)[0][..., -1:], noisy_logits)
  p = 1.0 - norm.cdf((threshold - logits) / noise_std)
  p_mean = jnp.mean(p, axis=-2)  # (G, E)
  return jnp.mean((jnp.std(p_mean, axis=-1) / jnp.mean(p_mean, axis=-1)) ** 2)


# ----------------------------------------------------------------------------- routing


@dataclasses.dataclass
class Routing:
  """A router's decision for G groups of S tokens, E experts of capacity C."""
  dispatch: Array  # (G, S, E, C), 0/1 (soft: weights summing to 1 over S)
  combine: Array   # (G, S, E, C), weights of each slot's output in each token's output
  aux_loss: Array  # scalar, already weighted
  metrics: dict[str, Array]  # scalars and (E,) vectors
  # Hard routers: the same map as indices over the E*C flattened slots.
  slot_token: Array | None = None   # (G, E*C) int32, token filling each slot; S = empty
  slot_weight: Array | None = None  # (G, E*C), the combine weight of each slot


def slots_from_choices(idx: Array, pos: Array, keep: Array, weight: Array, cap: int,
                       num_experts: int) -> tuple[Array, Array]:
  """(slot_token, slot_weight) of a top-k routing: inverts token->slot into slot->token.

  Dropped choices are written to one extra sentinel slot that is cut off; slots
  no token reached keep token index S (a zero row at dispatch) and weight 0.
  """
  g, s, k = idx.shape
  n = num_experts * cap
  flat = jnp.where(keep, idx * cap + pos, n).reshape(g, s * k)
  rows = jnp.arange(g)[:, None]
  tokens = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(1, s * k)
  slot_token = jnp.full((g, n + 1), s, jnp.int32).at[rows, flat].set(
      jnp.broadcast_to(tokens, (g, s * k)))[:, :n]
  slot_weight = jnp.zeros((g, n + 1), weight.dtype).at[rows, flat].add(
      (weight * keep).reshape(g, s * k))[:, :n]
  return slot_token, slot_weight


def dispatch_by_index(x: Array, slot_token: Array) -> Array:
  """x (G, S, D) -> (G, N, D) slot inputs; slot index S (empty) reads a zero row."""
  pad = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  return jnp.take_along_axis(pad, slot_token[..., None], axis=1)


def combine_by_index(y: Array, slot_token: Array, slot_weight: Array, num_tokens: int) -> Array:
  """y (G, N, D) slot outputs -> (G, S, D): each token sums its slots' weighted outputs."""
  g, _, d = y.shape
  out = jnp.zeros((g, num_tokens + 1, d), y.dtype)
  out = out.at[jnp.arange(g)[:, None], slot_token].add(y * slot_weight[..., None].astype(y.dtype))
  return out[:, :num_tokens]


def capacity(k: int, group_size: int, capacity_factor: float, num_experts: int,
             multiple_of: int | None = None) -> int:
  """C = ceil(k * S * capacity_factor / E) rounded up to `multiple_of`, in [1, S].

  vmoe rounds up to a multiple of 4 by default; slots past S could never be
  filled (no expert sees a token twice), so the cap at S changes no output.
  """
  c = max(1, math.ceil(k * group_size * capacity_factor / num_experts))
  if multiple_of and multiple_of > 0:
    c += -c % multiple_of
  return min(c, group_size)


def top_k_positions(gates: Array, k: int, cap: int, bpr: bool) -> tuple[Array, Array, Array]:
  """Which (token, choice) pairs fit in capacity, and at which slot.

  Returns (idx (G,S,k) chosen experts, keep (G,S,k) bool, pos (G,S,k) slot).
  Priority: all top-1 choices of a group are served before any top-2 choice; within
  a rank, tokens go in order, or by descending top-1 gate with BPR (stable sort).
  """
  g, s, e = gates.shape
  top_vals, idx = jax.lax.top_k(gates, k)  # (G, S, k)
  onehot = jax.nn.one_hot(idx, e, dtype=jnp.int32)  # (G, S, k, E)
  if bpr:
    order = jnp.argsort(-top_vals[..., 0], axis=1, stable=True)  # (G, S)
    onehot = jnp.take_along_axis(onehot, order[:, :, None, None], axis=1)
  # Rank-major order: (G, k, S, E) flattened so top-1 of every token precedes any top-2.
  flat = jnp.swapaxes(onehot, 1, 2).reshape(g, k * s, e)
  pos = jnp.cumsum(flat, axis=1) - 1
  pos = jnp.sum(pos * flat, axis=-1).reshape(g, k, s)
  pos = jnp.swapaxes(pos, 1, 2)  # (G, S, k) in (possibly sorted) token order
  if bpr:
    inverse = jnp.argsort(order, axis=1)
    pos = jnp.take_along_axis(pos, inverse[:, :, None], axis=1)
  return idx, pos < cap, pos


def _usage_metrics(dispatch: Array, gates: Array, assignments: int) -> dict[str, Array]:
  """Fraction dropped (choices and whole tokens), per-expert load and importance fractions."""
  served = jnp.sum(dispatch, axis=(2, 3))  # (G, S): experts each token reached
  per_expert = jnp.sum(dispatch, axis=(0, 1, 3))  # (E,)
  importance = jnp.sum(gates, axis=(0, 1))
  return {
      "dropped": 1.0 - jnp.sum(served) / (served.size * assignments),
      "dropped_tokens": jnp.mean((served == 0).astype(jnp.float32)),
      "load": per_expert / jnp.maximum(jnp.sum(per_expert), 1.0),
      "importance": importance / jnp.sum(importance),
  }


def route_top_k(logits: Array, noisy_logits: Array | None, *, k: int, capacity_factor: float,
                bpr: bool, noise_std: float, normalize_gates: bool = False,
                importance_weight: float = 0.005, load_weight: float = 0.005,
                capacity_multiple_of: int | None = None) -> Routing:
  """V-MoE top-k routing: noisy gates route and weight the combine; None: deterministic.

  As vmoe's NoisyTopExpertsPerItemRouter: importance on the clean gates, load on
  the noisy logits, and no load term in the aux loss without noise (eval).
  """
  g, s, e = logits.shape
  if not 1 <= k <= e:
    raise ValueError(f"num_selected_experts k={k} must be in [1, num_experts={e}]")
  clean = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  noisy = noisy_logits is not None and noise_std > 0
  gates = jax.nn.softmax(noisy_logits.astype(jnp.float32), axis=-1) if noisy else clean
  cap = capacity(k, s, capacity_factor, e, capacity_multiple_of)
  idx, keep, pos = per_group(lambda gt: top_k_positions(gt, k, cap, bpr),
                             jax.lax.stop_gradient(gates))
  w = jnp.sum(gates[..., None, :] * jax.nn.one_hot(idx, e), axis=-1)  # (G, S, k) chosen gates
  if normalize_gates:  # makes an upcycled layer reproduce the dense MLP exactly
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  slot = (jax.nn.one_hot(idx, e)[..., None] * jax.nn.one_hot(pos, cap)[..., None, :]
          * keep[..., None, None])  # (G, S, k, E, C)
  dispatch = jnp.sum(slot, axis=2)
  combine = jnp.sum(slot * w[..., None, None], axis=2)
  # Scatters over G partition badly (XLA all-gathers their indices): keep them per device.
  slot_token, slot_weight = per_group(lambda *a: slots_from_choices(*a, cap, e), idx, pos, keep, w)
  imp = importance_loss(clean)
  aux = importance_weight * imp
  if noisy:
    load = load_loss(logits.astype(jnp.float32), noisy_logits.astype(jnp.float32), noise_std, k)
    aux = aux + load_weight * load
  else:  # no noise: the hard top-k counts, a metric only (vmoe has no load loss here)
    hard = jnp.mean(jnp.sum(jax.nn.one_hot(idx, e), axis=2), axis=1)  # (G, E)
    load = jnp.mean((jnp.std(hard, axis=-1) / jnp.mean(hard, axis=-1)) ** 2)
  metrics = {"importance_loss": imp, "load_loss": load, **_usage_metrics(dispatch, gates, k)}
  return Routing(dispatch, combine, aux, metrics, slot_token, slot_weight)


def route_experts_choice(logits: Array, *, capacity_factor: float,
                         capacity_multiple_of: int | None = None) -> Routing:
  """Experts choose: each expert takes its C = ceil(S*cf/E) highest-gate tokens; no aux loss."""
  g, s, e = logits.shape
  gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  cap = capacity(1, s, capacity_factor, e, capacity_multiple_of)
  tok = per_group(lambda gt: jax.lax.top_k(jnp.swapaxes(gt, 1, 2), cap)[1],
                  jax.lax.stop_gradient(gates))  # (G, E, C) token indices
  dispatch = jnp.moveaxis(jax.nn.one_hot(tok, s), -1, 1)  # (G, S, E, C)
  combine = dispatch * gates[..., None]
  metrics = _usage_metrics(dispatch, gates, 1)
  metrics["dropped"] = metrics["dropped_tokens"]  # per-choice drops are meaningless here
  slot_token = tok.reshape(g, e * cap).astype(jnp.int32)
  slot_weight = jnp.take_along_axis(jnp.swapaxes(gates, 1, 2), tok, axis=2).reshape(g, e * cap)
  return Routing(dispatch, combine, jnp.zeros((), jnp.float32), metrics, slot_token, slot_weight)


def route_soft(logits: Array, *, slots: int) -> Routing:
  """Soft MoE: logits (G, S, E*slots); each slot mixes all tokens, each token mixes all slots."""
  g, s, n = logits.shape
  logits = logits.astype(jnp.float32)
  dispatch = jax.nn.softmax(logits, axis=1).reshape(g, s, n // slots, slots)
  combine = jax.nn.softmax(logits, axis=2).reshape(g, s, n // slots, slots)
  gates = jnp.sum(combine, axis=-1)
  e = n // slots
  metrics = {"dropped": jnp.zeros(()), "dropped_tokens": jnp.zeros(()),
             "load": jnp.full((e,), 1.0 / e), "importance": jnp.sum(gates, (0, 1)) / (g * s)}
  return Routing(dispatch, combine, jnp.zeros((), jnp.float32), metrics)


# ----------------------------------------------------------------------------- sharding


def _constrain(x: Array, dims: tuple[Any, ...]) -> Array:
  """with_sharding_constraint with mesh axes from the active logical rules.

  `dims` entries: "batch" (all batch mesh axes), "batch_noexp" (the batch axes
  minus those of "exp": the groups after dispatch), "exp", or None. Flax's own
  logical constraints cannot say "batch minus expert", hence this helper. No-op
  without a mesh or rules; axes that do not divide a dimension are dropped.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  table = dict(rules)

  def axes(name):
    v = table.get(name)
    return () if v is None else ((v,) if isinstance(v, str) else tuple(v))

  exp_axes = axes("exp")
  spec = []
  for dim, name in zip(x.shape, dims):
    if name is None:
      spec.append(None)
      continue
    names = axes("batch") if name.startswith("batch") else axes(name)
    if name == "batch_noexp":
      names = tuple(a for a in names if a not in exp_axes)
    names = tuple(a for a in names if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in names)
    spec.append(names if names and dim % size == 0 else None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def batch_shards() -> int:
  """Number of devices the "batch" logical axis spans under the active mesh and rules."""
  rules = dict(nn.get_logical_axis_rules() or ())
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or rules.get("batch") is None:
    return 1
  names = rules["batch"]
  names = (names,) if isinstance(names, str) else names
  return math.prod(mesh.shape[a] for a in names if a in mesh.axis_names)


def per_group(fn, *arrays: Array):
  """Runs `fn` (per-group math, leading axis G) locally on each device's groups.

  XLA's partitioner all-gathers sort/top_k operands over batch dims; under a
  mesh, shard_map over the batch axes keeps routing decisions on-device.
  """
  rules = dict(nn.get_logical_axis_rules() or ())
  mesh = jax.sharding.get_abstract_mesh()
  names = rules.get("batch")
  if mesh.empty or names is None:
    return fn(*arrays)
  names = (names,) if isinstance(names, str) else tuple(names)
  names = tuple(a for a in names if a in mesh.axis_names)
  if arrays[0].shape[0] % math.prod(mesh.shape[a] for a in names):
    return fn(*arrays)
  spec = jax.sharding.PartitionSpec(names)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*arrays)


def groups_for(batch: int, length: int, *, group_size: int | None, num_groups: int | None,
               shards: int = 1) -> int:
  """Number of groups G for `batch` examples of `length` tokens; groups hold whole examples.

  `num_groups` asks for G directly (reduced to a divisor of the batch, so a
  batch of 1 still works); otherwise `group_size` is the maximum tokens per
  group and G is the fewest groups within it, kept a multiple of `shards` when the
  batch allows so that no group spans devices.
  """
  if num_groups:
    return math.gcd(int(num_groups), batch)
  per_shard = batch // shards if batch % shards == 0 else batch
  max_ex = max(1, (group_size or length) // length)
  ex = max(d for d in range(1, per_shard + 1) if per_shard % d == 0 and d <= max_ex)
  return batch // ex


# ----------------------------------------------------------------------------- layer


class ExpertDense(nn.Module):
  """One dense layer per expert: kernel (E, in, out), bias (E, out); x (E, N, in), expert-major."""
  features: int
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    e, din = x.shape[0], x.shape[-1]
    # Same init per expert as the dense MlpBlock: xavier on each (in, out) matrix.
    kinit = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    kernel = self.param("kernel", part(kinit, self.kernel_axes), (e, din, self.features), jnp.float32)
    bias = self.param("bias", part(nn.initializers.normal(stddev=1e-6), self.bias_axes),
                      (e, self.features), jnp.float32)
    dt = self.dtype_mm
    return jnp.einsum("eni,eio->eno", x.astype(dt), kernel.astype(dt)) + bias[:, None].astype(dt)


class MlpExperts(nn.Module):
  """E independent MLPs (Dense_0 -> GELU -> Dense_1); every weight has a leading "exp" axis.

  Input/output (G, E, C, D); parameter names match MlpBlock's plus the expert axis,
  which is what upcycling relies on.
  """
  num_experts: int
  mlp_dim: int
  dropout: float = 0.0
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if x.shape[1] != self.num_experts:
      raise ValueError(f"MlpExperts got {x.shape[1]} experts in its input, expected {self.num_experts}")
    g, e, c, d = x.shape
    # Expert-major (E, G*C, D): one plain batched matmul per expert; XLA:CPU ran the
    # (G, E, C, D) einsum about 1.3x slower because the batch dim was not leading.
    xt = _constrain(jnp.swapaxes(x, 0, 1), ("exp", "batch_noexp", None, None)).reshape(e, g * c, d)
    h = ExpertDense(self.mlp_dim, ("exp", "embed", "mlp"), ("exp", "mlp"), self.dtype_mm,
                    name="Dense_0")(xt)
    h = _constrain(h.reshape(e, g, c, -1), ("exp", "batch_noexp", None, None)).reshape(e, g * c, -1)
    h = nn.gelu(h)
    h = nn.Dropout(rate=self.dropout)(h, deterministic)
    y = ExpertDense(d, ("exp", "mlp", "embed"), ("exp", "embed"), self.dtype_mm, name="Dense_1")(h)
    return jnp.swapaxes(y.reshape(e, g, c, d), 0, 1)


class MoeMlpBlock(nn.Module):
  """Drop-in replacement for MlpBlock: (B, L, D) -> ((B, L, D), metrics dict).

  Dropped tokens get 0 here, so the block's residual passes them through.
  """
  num_experts: int = 8
  num_selected_experts: int = 2
  mlp_dim: int | None = None
  router: str = "topk"
  capacity_factor: float = 1.05
  eval_capacity_factor: float | None = None  # None: same as capacity_factor
  capacity_multiple_of: int | None = None  # round C up to a multiple (vmoe: 4); None: no rounding
  group_size: int | None = None  # max tokens per group; None: one example per group
  num_groups: int | None = None
  bpr: bool = True
  noise_std: float | None = None  # None: 1/E (V-MoE); 0: no noise
  normalize_gates: bool = False
  importance_weight: float = 0.005
  load_weight: float = 0.005
  soft_slots: int = 1  # Soft MoE slots per expert
  dropout: float = 0.0
  dtype_mm: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    if self.router not in ROUTERS:
      raise ValueError(f"unknown MoE router {self.router!r} (valid: {', '.join(ROUTERS)})")
    b, l, d = x.shape
    e = self.num_experts
    train = not deterministic
    cf = self.capacity_factor if train or self.eval_capacity_factor is None else self.eval_capacity_factor
    if self.router == "soft":  # Soft MoE mixes tokens of a group: keep one example per group
      g = b
    else:
      g = groups_for(b, l, group_size=self.group_size, num_groups=self.num_groups,
                     shards=batch_shards())
    s = b * l // g
    xg = _constrain(x.reshape(g, s, d), ("batch", None, None))

    n_out = e * self.soft_slots if self.router == "soft" else e
    # The router stays fp32: tiny, and bf16 logits flip top-k choices.
    logits = nn.Dense(n_out, use_bias=False, name="router",
                      kernel_init=part(nn.initializers.xavier_uniform(), ("embed", None)))(
                          xg.astype(jnp.float32))
    if self.router == "topk":
      std = (1.0 / e) if self.noise_std is None else float(self.noise_std)
      noisy = None  # deterministic: clean gates, no load loss
      if train and std > 0:
        noisy = logits + std * jax.random.normal(self.make_rng("dropout"), logits.shape)
      r = route_top_k(logits, noisy, k=self.num_selected_experts, capacity_factor=cf, bpr=self.bpr,
                      noise_std=std, normalize_gates=self.normalize_gates,
                      importance_weight=self.importance_weight, load_weight=self.load_weight,
                      capacity_multiple_of=self.capacity_multiple_of)
    elif self.router == "experts_choice":
      r = route_experts_choice(logits, capacity_factor=cf,
                               capacity_multiple_of=self.capacity_multiple_of)
    else:
      r = route_soft(logits, slots=self.soft_slots)

    dt = self.dtype_mm
    cap = r.dispatch.shape[-1]
    # Tokens -> expert slots. Groups are batch-sharded here; the constraint after
    # moves the expert axis onto the `expert` mesh axis: an all-to-all.
    if r.slot_token is not None:  # per_group keeps the gather on each device's own groups
      xe = per_group(dispatch_by_index, xg.astype(dt), r.slot_token).reshape(g, e, cap, d)
    else:
      xe = jnp.einsum("gsd,gsec->gecd", xg.astype(dt), r.dispatch.astype(dt))
    # Pin the local layout first: otherwise XLA all-gathers the inputs to meet the next one.
    xe = _constrain(xe, ("batch", None, None, None))
    xe = _constrain(xe, ("batch_noexp", "exp", None, None))
    ye = MlpExperts(e, self.mlp_dim or 4 * d, self.dropout, dt, name="experts")(xe, deterministic)
    ye = _constrain(ye, ("batch_noexp", "exp", None, None))
    ye = _constrain(ye, ("batch", None, None, None))  # and back: the second all-to-all
    if r.slot_token is not None:
      y = per_group(lambda y_, t_, w_: combine_by_index(y_, t_, w_, s),
                    ye.reshape(g, e * cap, d), r.slot_token, r.slot_weight)
    else:
      y = jnp.einsum("gecd,gsec->gsd", ye, r.combine.astype(ye.dtype))
    y = _constrain(y, ("batch", None, None))
    return y.reshape(b, l, d), {"aux_loss": r.aux_loss, **r.metrics}
