"""Transformer text decoder for captioning, with the attention masks and an explicit KV cache.

One module serves both designs: CapPa (cross-attention to the image tokens,
optional parallel prediction with a [MASK] token) and OpenVision 2 (image
tokens as a prefix of the sequence, prefix mask). Parameter names follow
big_vision's CapPa decoder (`EmbedTargets`, `EncDecBlock{i}/{SelfAttn,CrossAttn,MLP}`,
`LayerNorm`, `LogitsDense`).

The cache is a plain pytree {"index": int32 scalar, "layers": [{"self": {"k", "v"},
"cross": {"k", "v"}}]} so decoding loops (decoding.py) can carry it through
lax loops and reorder its batch rows for beam search.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.common import DenseGeneral, MlpBlock, layer_norm, part

Array = jax.Array


# ----------------------------------------------------------------------------- masks (True = attend)


def causal_mask(length: int) -> np.ndarray:
  """(L, L): query i sees keys j <= i."""
  return np.tril(np.ones((length, length), bool))


def full_mask(length: int) -> np.ndarray:
  """(L, L) all True: CapPa's parallel prediction (non-causal)."""
  return np.ones((length, length), bool)


def prefix_mask(prefix_len: int, total_len: int) -> np.ndarray:
  """(T, T): the first `prefix_len` tokens see each other (and nothing after); the rest is causal
  and sees the whole prefix. prefix_len=0 is the causal mask."""
  q = np.arange(total_len)[:, None]
  k = np.arange(total_len)[None, :]
  return (k <= q) | ((k < prefix_len) & (q < prefix_len))


def cached_mask(index: Array, q_len: int, total_len: int, prefix_len: int) -> Array:
  """(q_len, total_len) mask for `q_len` queries at positions index.. against a cache of
  `total_len` slots: the prefix mask restricted to those rows (unwritten slots are never seen)."""
  qpos = index + jnp.arange(q_len)[:, None]
  kpos = jnp.arange(total_len)[None, :]
  return (kpos <= qpos) | ((kpos < prefix_len) & (qpos < prefix_len))


def shift_right(x: Array, pad: int = 0) -> Array:
  """Decoder inputs from targets: (B, L) -> [pad, x_0, ..., x_{L-2}] (pad doubles as BOS)."""
  return jnp.pad(x, ((0, 0), (1, 0)), constant_values=pad)[:, :-1]


# ----------------------------------------------------------------------------- layers


class Attention(nn.Module):
  """Multi-head attention (query/key/value/out like common.MultiHeadDotProductAttention) that
  can write new keys/values into a cache or read precomputed ones.

  `__call__(x_q, x_kv, mask, cache=None, index=None) -> (y, {"k", "v"})`:
  - x_kv given, no cache: plain attention over x_kv's keys.
  - x_kv given, cache and index: the new keys are written into cache at `index` and the
    queries attend over the whole cache (the mask hides unwritten slots).
  - x_kv None: keys/values are cache["k"], cache["v"] (cross-attention after prefill).
  """
  num_heads: int = 8
  dtype_mm: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array | None, mask: Array | None = None,
               cache: dict | None = None, index: Array | None = None) -> tuple[Array, dict]:
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"decoder width {d} is not divisible by num_heads {self.num_heads}")
    hd = d // self.num_heads
    proj = dict(features=(self.num_heads, hd), num_in=1, kernel_axes=("embed", "heads", "kv"),
                bias_axes=("heads", "kv"), dtype_mm=self.dtype_mm, use_bias=self.use_bias)
    q = DenseGeneral(name="query", **proj)(x_q)
    if x_kv is not None:
      k = DenseGeneral(name="key", **proj)(x_kv)
      v = DenseGeneral(name="value", **proj)(x_kv)
      if cache is not None:
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    else:
      k, v = cache["k"], cache["v"]
    q = q / jnp.sqrt(hd).astype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype_mm)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = DenseGeneral(features=(d,), num_in=2, kernel_axes=("heads", "kv", "embed"),
                     bias_axes=("embed",), dtype_mm=self.dtype_mm, use_bias=self.use_bias,
                     name="out")(y)
    return y, {"k": k, "v": v}


class DecoderBlock(nn.Module):
  """Pre-norm: x + SelfAttn(LN(x)), [x + CrossAttn(LN(x), memory)], x + MLP(LN(x))."""
  num_heads: int = 8
  mlp_dim: int | None = None
  dropout: float = 0.0
  cross: bool = True
  dtype_mm: Any = jnp.float32
  norm_eps: float = 1e-6
  use_bias: bool = True  # in the attention projections, the MLP and the LayerNorms

  @nn.compact
  def __call__(self, x: Array, mask: Array, memory: Array | None = None, cache: dict | None = None,
               index: Array | None = None, deterministic: bool = True,
               cross_mask: Array | None = None) -> tuple[Array, dict]:
    new_cache = {}
    bias = self.use_bias
    y = layer_norm(self.norm_eps, name="LayerNorm1", use_bias=bias)(x)
    y, new_cache["self"] = Attention(self.num_heads, self.dtype_mm, bias, name="SelfAttn")(
        y, y, mask, cache=None if cache is None else cache["self"], index=index)
    x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
    if self.cross:
      cross_cache = None if cache is None else cache.get("cross")
      if cross_cache is None and memory is None:
        raise ValueError("decoder: cross-attention needs the image tokens (memory) or a prefilled cache")
      y = layer_norm(self.norm_eps, name="LayerNorm2", use_bias=bias)(x)
      y, new_cache["cross"] = Attention(self.num_heads, self.dtype_mm, bias, name="CrossAttn")(
          y, memory if cross_cache is None else None, cross_mask, cache=cross_cache)
      x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
    y = layer_norm(self.norm_eps, name="LayerNorm3", use_bias=bias)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm,
                 use_bias=bias, name="MLP")(y, deterministic)
    x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
    return x, new_cache


class Decoder(nn.Module):
  """Token ids -> next-token logits (B, l, vocab_size).

  `__call__(tokens, memory=None, prefix=None, *, parallel=None, cache=None, train=False)`
  returns (logits, new_cache or None). `tokens` are decoder *inputs* (targets shifted
  right). `memory` (B, M, Dm): image tokens for cross-attention (cross=True). `prefix`
  (B, P, width): embeddings placed before the text (OpenVision 2); logits cover text
  positions only. `parallel` (B,) bool: those examples get [MASK] inputs and a full
  (non-causal) mask (needs mask_token=True). With `cache` (see `init_cache`), `tokens`
  are written at cache["index"]; passing `prefix` then means a prefill from index 0.
  `memory_mask` (B, M): the memory tokens cross-attention may see (NaFlex padding is not);
  given at prefill, the cache keeps it for the later steps.
  """
  vocab_size: int = 32_000
  max_len: int = 64
  width: int = 512
  depth: int = 6
  mlp_dim: int | None = None
  num_heads: int = 8
  dropout: float = 0.0
  cross: bool = True
  mask_token: bool = False  # one extra embedding row (id vocab_size) for parallel prediction
  dtype_mm: str = "float32"
  norm_eps: float = 1e-6
  # Biases in the blocks (attention projections, MLP, LayerNorms); the final LayerNorm and
  # LogitsDense keep theirs. big_vision's CapPa recipe has none there (decoder_bias=False,
  # and its attention never has any).
  use_bias: bool = True

  @nn.compact
  def __call__(self, tokens: Array, memory: Array | None = None, prefix: Array | None = None, *,
               parallel: Array | None = None, cache: dict | None = None,
               train: bool = False, memory_mask: Array | None = None) -> tuple[Array, dict | None]:
    dtype_mm = jnp.dtype(self.dtype_mm)
    if memory_mask is None and cache is not None:
      memory_mask = cache.get("memory_mask")
    cross_mask = None if memory_mask is None else (jnp.asarray(memory_mask) > 0)[:, None, None, :]
    b, l = tokens.shape
    if parallel is not None:
      if not self.mask_token:
        raise ValueError("decoder: parallel prediction needs mask_token=True (a [MASK] embedding)")
      if prefix is not None or cache is not None:
        raise ValueError("decoder: parallel prediction is a training mode without prefix or cache")
      tokens = jnp.where(parallel[:, None], self.vocab_size, tokens)
    embed = nn.Embed(self.vocab_size + int(self.mask_token), self.width, name="EmbedTargets",
                     embedding_init=part(nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    x = embed(tokens)
    pos = self.param("pos_embedding",
                     part(nn.initializers.normal(stddev=1 / np.sqrt(self.width)), (None, None, "embed")),
                     (1, self.max_len, self.width), jnp.float32)
    p_in = 0 if prefix is None else prefix.shape[1]
    if cache is None:
      if l > self.max_len:
        raise ValueError(f"decoder: {l} tokens exceed max_len {self.max_len}")
      x = x + pos[:, :l]
      prefix_len = p_in
    else:
      index = cache["index"]
      total = cache["layers"][0]["self"]["k"].shape[1]
      prefix_len = total - self.max_len  # the cache was sized prefix + max_len
      if prefix is not None and p_in != prefix_len:
        raise ValueError(f"decoder: prefix of {p_in} tokens but the cache was built for {prefix_len}")
      text_start = 0 if prefix is not None else index - prefix_len
      x = x + jax.lax.dynamic_slice_in_dim(pos, text_start, l, axis=1)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    seq = x.shape[1]

    if cache is None:
      mask = jnp.asarray(prefix_mask(prefix_len, seq))[None, None]
      if parallel is not None:
        mask = jnp.where(parallel[:, None, None, None], True, mask)
      index = None
    else:
      mask = cached_mask(index, seq, total, prefix_len)[None, None]

    x = nn.Dropout(rate=self.dropout)(x, not train)
    new_layers = []
    for i in range(self.depth):
      x, c = DecoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                          cross=self.cross, dtype_mm=dtype_mm, norm_eps=self.norm_eps,
                          use_bias=self.use_bias, name=f"EncDecBlock{i}")(
          x, mask, memory, None if cache is None else cache["layers"][i], index, not train,
          cross_mask)
      new_layers.append(c)
    x = layer_norm(self.norm_eps, name="LayerNorm")(x[:, p_in:])
    # DenseGeneral, not nn.Dense (same params): its bias gradient over (batch, length)
    # is a matmul, not XLA:CPU's slow column reduction (~30x at vocab 4096).
    logits = DenseGeneral(features=(self.vocab_size,), kernel_axes=("embed", "vocab"),
                          bias_axes=("vocab",), dtype_mm=dtype_mm,
                          kernel_init=nn.initializers.zeros, name="LogitsDense")(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits, None
    new_cache = {"index": index + seq, "layers": new_layers}
    if memory_mask is not None:
      new_cache["memory_mask"] = memory_mask
    return logits, new_cache


def init_cache(batch_size: int, total_len: int, *, width: int, depth: int, num_heads: int,
               dtype_mm: str = "float32") -> dict:
  """An empty self-attention cache of `total_len` slots (prefix + max_len) for `depth` layers."""
  hd = width // num_heads
  zeros = lambda: jnp.zeros((batch_size, total_len, num_heads, hd), jnp.dtype(dtype_mm))
  return {"index": jnp.zeros((), jnp.int32),
          "layers": [{"self": {"k": zeros(), "v": zeros()}} for _ in range(depth)]}
