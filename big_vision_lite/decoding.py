"""Autoregressive decoding with a KV cache: greedy and beam search (and a cache-free greedy
reference). Model-agnostic: callers pass the first-token logits, a cache pytree and
`step_fn(cache, tokens (B, 1)) -> (logits (B, V), cache)`.

Outputs are (B, max_len) int32 token ids; after the end token everything is `pad_id`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def greedy(first_logits: jax.Array, cache: Any, step_fn: StepFn, *, max_len: int, eos_id: int,
           pad_id: int = 0) -> jax.Array:
  """Greedy decoding: token t is the argmax given tokens < t (via the cache)."""
  b = first_logits.shape[0]
  tok = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(tok)
  done = tok == eos_id

  def body(t, carry):
    tokens, cache, tok, done = carry
    logits, cache = step_fn(cache, tok[:, None])
    new = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    new = jnp.where(done, pad_id, new)
    return tokens.at[:, t].set(new), cache, new, done | (new == eos_id)

  tokens, *_ = jax.lax.fori_loop(1, max_len, body, (tokens, cache, tok, done))
  return tokens


def greedy_no_cache(logits_fn: Callable[[jax.Array], jax.Array], batch_size: int, *, max_len: int,
                    eos_id: int, pad_id: int = 0) -> jax.Array:
  """Reference greedy decoding that reruns the whole decoder each step.

  `logits_fn(targets (B, max_len)) -> (B, max_len, V)` teacher-forced logits (inputs are the
  targets shifted right inside); position t only sees targets < t, so the pad-filled tail
  does not matter.
  """
  tokens = jnp.full((batch_size, max_len), pad_id, jnp.int32)
  done = jnp.zeros((batch_size,), bool)
  for t in range(max_len):
    new = jnp.argmax(logits_fn(tokens)[:, t], axis=-1).astype(jnp.int32)
    new = jnp.where(done, pad_id, new)
    tokens = tokens.at[:, t].set(new)
    done = done | (new == eos_id)
  return tokens


def _gather_beams(tree: Any, idx: jax.Array, batch: int, beams: int) -> Any:
  """Reorders the leading (batch * beams) rows of every non-scalar leaf by beam index (B, K)."""
  def one(x):
    if x.ndim == 0:
      return x
    y = x.reshape((batch, beams) + x.shape[1:])
    y = jnp.take_along_axis(y, idx.reshape((batch, beams) + (1,) * (y.ndim - 2)), axis=1)
    return y.reshape(x.shape)
  return jax.tree.map(one, tree)


def beam_search(first_logits: jax.Array, cache: Any, step_fn: StepFn, *, max_len: int,
                beam_size: int, eos_id: int, pad_id: int = 0,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Beam search; returns (tokens (B, max_len), log-probability scores (B,)).

  `cache` is for batch B; it is repeated per beam. Finished beams only extend with
  `pad_id` at no cost. The final pick divides the sum of log-probs by
  length ** length_penalty (0: plain sum). beam_size=1 equals `greedy`.
  """
  b, v = first_logits.shape
  k = beam_size
  if k > v:
    raise ValueError(f"beam_size {k} exceeds the vocabulary size {v}")
  logp = jax.nn.log_softmax(first_logits.astype(jnp.float32))
  scores, tok = jax.lax.top_k(logp, k)                      # (B, K)
  tok = tok.astype(jnp.int32)
  tokens = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, 0].set(tok)
  done = tok == eos_id
  lengths = jnp.ones((b, k), jnp.int32)
  cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, k, axis=0), cache)
  only_pad = jnp.full((v,), -jnp.inf).at[pad_id].set(0.0)

  def body(t, carry):
    tokens, cache, tok, done, scores, lengths = carry
    logits, cache = step_fn(cache, tok.reshape(b * k, 1))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v)
    logp = jnp.where(done[:, :, None], only_pad, logp)
    cand = (scores[:, :, None] + logp).reshape(b, k * v)
    scores, flat = jax.lax.top_k(cand, k)
    beam, new = flat // v, (flat % v).astype(jnp.int32)
    tokens = jnp.take_along_axis(tokens, beam[:, :, None], axis=1).at[:, :, t].set(new)
    prev_done = jnp.take_along_axis(done, beam, axis=1)
    lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~prev_done).astype(jnp.int32)
    done = prev_done | (new == eos_id)
    cache = _gather_beams(cache, beam, b, k)
    return tokens, cache, new, done, scores, lengths

  tokens, _, _, _, scores, lengths = jax.lax.fori_loop(
      1, max_len, body, (tokens, cache, tok, done, scores, lengths))
  final = scores / lengths.astype(jnp.float32) ** length_penalty
  best = jnp.argmax(final, axis=1)
  return (jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])
