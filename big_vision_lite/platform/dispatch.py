"""Chooses and records the implementation of each attention, LayerNorm and compile: by config
key (config.model.attention_impl, config.model.norm_impl, config.platform.cpu_dots), and for
`auto` by backend, shape and, on CPU, a measurement."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import config_errors


Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Impl:
  """An implementation: `module.fn(...)` where `module.supports(...)` and `backend` allow."""
  backend: str | None  # None: every backend
  module: str
  fn: str
  supports: str

  def load(self) -> tuple[Callable[..., Array], Callable[..., bool]] | str:
    """(fn, supports), or why the module cannot be imported."""
    try:
      mod = importlib.import_module(self.module)
      return getattr(mod, self.fn), getattr(mod, self.supports)
    except (ImportError, AttributeError) as e:
      return f"{self.module}.{self.fn} unavailable: {e}"


# Attention: fn(q, k, v, *, mask=None, scale) -> out, BTNH operands (jax.nn.dot_product_attention's
# layout), mask bool broadcastable to (B, H, Q, K); supports(q, k, v, mask) -> bool.
ATTENTION: dict[str, Impl] = {
    "xla": Impl(None, "big_vision_lite.platform.xla", "attention", "supports_attention"),
    "cpu_kernel": Impl("cpu", "big_vision_lite.platform.cpu.attention", "attention", "supports"),
    "cudnn": Impl("gpu", "big_vision_lite.platform.gpu.attention", "cudnn_attention",
                  "supports_cudnn"),
    "splash": Impl("tpu", "big_vision_lite.platform.tpu.attention", "splash_attention",
                   "supports_splash"),
}
# LayerNorm: fn(x, scale, bias, eps) -> y over x's last axis; supports(x, scale, bias) -> bool.
NORM: dict[str, Impl] = {
    "xla": Impl(None, "big_vision_lite.platform.xla", "layer_norm", "supports_layer_norm"),
    "cpu_kernel": Impl("cpu", "big_vision_lite.platform.cpu.layer_norm", "layer_norm", "supports"),
}
# XLA:CPU's dot emitter: Eigen's GEMM, or YNNPACK (jax's default since 0.10).
CPU_DOTS: dict[str, dict[str, str]] = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynnpack": {},
}
AUTO = "auto"
# Config keys and the registry each one names.
KEYS = {"model.attention_impl": ATTENTION, "model.norm_impl": NORM, "platform.cpu_dots": CPU_DOTS}
# What `auto` tries first on each backend, before the XLA path.
_AUTO_FIRST = {"attention": {"cpu": "cpu_kernel", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"},
               "norm": {"cpu": "cpu_kernel"}}
# `auto` on TPU takes splash attention from this many tokens: below it, padding to 128-token
# blocks costs more than it saves (vit_i1k on v5e:4x4 planned 5.16 GiB per chip with splash at
# 197 tokens against 3.92 GiB with XLA's attention, benchmarks/RESULTS.md).
SPLASH_AUTO_MIN_LEN = 1024
# Autotune measures at most this many (batch x heads) attention blocks / LayerNorm rows: the
# kernels work block by block, so a slice of the batch ranks them as the whole batch does.
_TUNE_BLOCKS = 64
_TUNE_ROWS = 8192
_TUNE_DOT_ROWS = 2048


class PlatformConfigError(config_errors.ConfigError):
  """A config value names no implementation, or one for another backend."""


@dataclasses.dataclass
class Settings:
  attention: str = AUTO
  norm: str = AUTO
  cpu_dots: str = AUTO
  backend: str | None = None  # None: jax.default_backend(); `plan` sets the target's
  record_path: str | None = None  # a JSON file the decisions are written to
  verbose: bool = True


_settings = Settings()
_decisions: dict[str, dict[str, Any]] = {}
_dots_hint: list[int] = []  # the first (rows, width) an attention or LayerNorm saw


def _backend() -> str:
  return _settings.backend or jax.default_backend()


def check(key: str, value: Any, backend: str | None = None) -> None:
  """Raises PlatformConfigError naming `config.<key>` where `value` cannot run on `backend`."""
  table = KEYS[key]
  names = (AUTO, *table)
  if value not in names:
    raise PlatformConfigError(f"config.{key}: must be one of {', '.join(map(repr, names))}, "
                              f"got {value!r}")
  impl = table.get(value)
  if backend and isinstance(impl, Impl) and impl.backend and impl.backend != _family(backend):
    raise PlatformConfigError(f"config.{key}: {value!r} runs on {impl.backend.upper()}, and "
                              f"this run's backend is {backend} (use 'auto' or 'xla')")


def _family(backend: str) -> str:
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def configure(config: Any = None, *, workdir: str | None = None, backend: str | None = None,
              verbose: bool = True) -> Settings:
  """Sets this process's choices from `config` (a ConfigDict, or None for the defaults).

  Forgets earlier decisions. `workdir`: where platform.json records each decision (process 0).
  `backend`: the backend the code is compiled for (default: jax's default backend).
  Raises PlatformConfigError (a one-line message naming the key) for a bad value.
  """
  global _settings
  model = (config.get("model") if config is not None else None) or {}
  plat = (config.get("platform") if config is not None else None) or {}
  values = {"model.attention_impl": model.get("attention_impl", AUTO),
            "model.norm_impl": model.get("norm_impl", AUTO),
            "platform.cpu_dots": plat.get("cpu_dots", AUTO)}
  target = backend or jax.default_backend()
  for key, value in values.items():
    check(key, value, target)
  record = None
  if workdir and jax.process_index() == 0:
    from big_vision_lite import storage  # noqa: PLC0415 (epath: only for a trainer's workdir)
    record = storage.join(workdir, "platform.json")
  _settings = Settings(values["model.attention_impl"], values["model.norm_impl"],
                       values["platform.cpu_dots"], backend, record, verbose)
  _decisions.clear()
  _dots_hint.clear()
  return _settings


@contextlib.contextmanager
def override(*, attention: str) -> Iterator[None]:
  """Traces with `attention` (a key of ATTENTION, or 'auto') in place of the configured choice.

  The implementation is read while a step is traced, so one process can compile the same
  step with two of them and compare (`plan` prints splash against XLA attention).
  """
  global _settings
  check("model.attention_impl", attention)
  saved = _settings
  _settings = dataclasses.replace(saved, attention=attention)
  try:
    yield
  finally:
    _settings = saved


def settings() -> Settings:
  return _settings


def decisions() -> dict[str, dict[str, Any]]:
  """Each decision this process made since configure(): {what: {requested, impl, why, ...}}."""
  return {k: dict(v) for k, v in _decisions.items()}


def _record(what: str, requested: str, impl: str, why: str, times: dict | None = None) -> None:
  if what in _decisions:
    return
  entry = {"requested": requested, "impl": impl, "why": why}
  if times:
    entry["times_ms"] = times
  _decisions[what] = entry
  if _settings.verbose and jax.process_index() == 0:
    print(f"platform: {what}: {impl} ({why})", flush=True)
  if _settings.record_path:
    from big_vision_lite import storage  # noqa: PLC0415
    try:
      storage.makedirs(_settings.record_path.rsplit("/", 1)[0])
      with storage.open_file(_settings.record_path, "w") as f:
        json.dump({"backend": _backend(), "jax": jax.__version__, "decisions": _decisions}, f,
                  indent=1)
    except OSError as e:
      print(f"warning: cannot write {_settings.record_path}: {e}", flush=True)


def _shape(x: Array | None) -> str:
  return "none" if x is None else f"{jnp.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"


def _measured_why(tuned: dict) -> str:
  times = ", ".join(f"{k} {v:.2f} ms" for k, v in tuned["times_ms"].items())
  return f"auto, {'measured' if tuned['measured'] else 'cached measurement'}: {times}"


def _resolve(kind: str, table: dict[str, Impl], requested: str, args: tuple,
             tune: Callable[[str, Callable, Callable], dict]) -> tuple[str, str, dict | None]:
  """(impl name, why, times) for one call's operands."""
  if requested == "xla":
    return "xla", "configured", None
  name = _AUTO_FIRST[kind].get(_backend()) if requested == AUTO else requested
  if name is None:
    return "xla", f"auto: no other {kind} implementation on {_backend()}", None
  loaded = table[name].load()
  if isinstance(loaded, str):
    return "xla", f"{'auto: ' if requested == AUTO else ''}{loaded}", None
  fn, supports = loaded
  if not supports(*args):
    return "xla", f"{name} does not support these operands", None
  if requested != AUTO:
    return name, "configured", None
  if _family(_backend()) != "cpu":
    if name == "splash" and args[0].shape[-3] < SPLASH_AUTO_MIN_LEN:
      return "xla", (f"auto: XLA's attention at {args[0].shape[-3]} tokens (splash pads to "
                     f"128-token blocks; it is chosen from {SPLASH_AUTO_MIN_LEN})"), None
    return name, f"auto: {name} supports these operands on {_backend()}", None
  if jax.process_count() > 1:
    # Each process would measure on its own host; processes that chose differently would train
    # replicas that drift apart by rounding. XLA everywhere keeps them one program.
    return "xla", "auto: several processes choose alike, not measured", None
  tuned = tune(name, fn, table["xla"].load()[0])
  return tuned["impl"], _measured_why(tuned), tuned["times_ms"]


def attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
              scale: float | None = None, impl: str | None = None) -> Array:
  """softmax(scale q k^T, masked) v with the configured (or `impl`) implementation.

  q (B, Q, H, hd), k and v (B, K, H, hd) (BTNH); `mask` bool broadcastable to (B, H, Q, K),
  True = attend; `scale` defaults to 1/sqrt(hd). Implementations agree up to float rounding.
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  requested = impl or _settings.attention
  if not _dots_hint:
    _dots_hint.extend([math.prod(q.shape[:-2]), q.shape[-2] * q.shape[-1]])
  what = f"attention q {_shape(q)} kv {_shape(k)} mask {_shape(mask)}"
  name, why, times = _resolve("attention", ATTENTION, requested, (q, k, v, mask),
                              lambda n, fn, ref: _tune_attention(n, fn, ref, q, k, v, scale))
  _record(what, requested, name, why, times)
  fn = ATTENTION[name].load()[0]
  return fn(q, k, v, mask=mask, scale=scale)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float, impl: str | None = None) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over x's last axis, float32 statistics."""
  requested = impl or _settings.norm
  if not _dots_hint:
    _dots_hint.extend([math.prod(x.shape[:-1]), x.shape[-1]])
  what = f"layer_norm x {_shape(x)}"
  name, why, times = _resolve("norm", NORM, requested, (x, scale, bias),
                              lambda n, fn, ref: _tune_norm(n, fn, ref, x, eps))
  _record(what, requested, name, why, times)
  return NORM[name].load()[0](x, scale, bias, eps)


def compiler_options() -> dict[str, str] | None:
  """jax.jit(..., compiler_options=...) for this backend: the CPU dot emitter; None elsewhere."""
  if _family(_backend()) != "cpu" or jax.default_backend() != "cpu":
    return None
  requested = _settings.cpu_dots
  if requested != AUTO:
    _record("cpu dots", requested, requested, "configured")
    return dict(CPU_DOTS[requested]) or None
  if "cpu dots" not in _decisions and jax.process_count() > 1:
    # Each process would measure on its own host and could compile another program.
    _record("cpu dots", AUTO, "eigen", "auto: several processes compile alike, not measured")
  if "cpu dots" not in _decisions:
    tuned = _tune_dots(*(_dots_hint or (_TUNE_DOT_ROWS, 384)))
    _record("cpu dots", AUTO, tuned["impl"], _measured_why(tuned), tuned["times_ms"])
  return dict(CPU_DOTS[_decisions["cpu dots"]["impl"]]) or None


# ------------------------------------------------------------------------- CPU measurements


def _jit_vjp(f: Callable[..., Array], *args: np.ndarray) -> Callable[[], object]:
  """A call of f's forward and backward (the train step's cost), compiled like the trainer."""
  ct = np.random.default_rng(1).standard_normal(jax.eval_shape(f, *args).shape, np.float32)

  def fwd_bwd(*a):
    out, vjp = jax.vjp(f, *a[:-1])
    return out, vjp(a[-1])
  compiled = jax.jit(fwd_bwd).lower(*args, ct).compile(compiler_options() or {})
  return lambda: compiled(*args, ct)


def _tune_attention(name, fn, ref, q, k, v, scale) -> dict:
  from big_vision_lite.platform.cpu import autotune  # noqa: PLC0415
  batch = max(1, min(math.prod(q.shape[:-3]), _TUNE_BLOCKS // q.shape[-2]))
  rng = np.random.default_rng(0)
  ops = [rng.standard_normal((batch, *t.shape[-3:]), np.float32) for t in (q, k, v)]
  shape = f"{_shape(q)} kv {_shape(k)} (timed at batch {batch})"
  make = lambda f: lambda: _jit_vjp(lambda *a: f(*a, mask=None, scale=scale), *ops)  # noqa: E731
  return autotune.choose("attention", shape, "xla", {"xla": make(ref), name: make(fn)})


def _tune_norm(name, fn, ref, x, eps) -> dict:
  from big_vision_lite.platform.cpu import autotune  # noqa: PLC0415
  rows = max(1, min(math.prod(x.shape[:-1]), _TUNE_ROWS))
  d = x.shape[-1]
  rng = np.random.default_rng(0)
  ops = [rng.standard_normal((rows, d), np.float32), 1 + 0.1 * rng.standard_normal(d, np.float32),
         0.1 * rng.standard_normal(d, np.float32)]
  shape = f"{_shape(x)} (timed at {rows} rows)"
  make = lambda f: lambda: _jit_vjp(lambda *a: f(*a, eps), *ops)  # noqa: E731
  return autotune.choose("layer_norm", shape, "xla", {"xla": make(ref), name: make(fn)})


def _tune_dots(rows: int, width: int) -> dict:
  """Eigen vs YNNPACK on an MLP block of the model's width: x @ W1, GELU, @ W2, and its grads."""
  from big_vision_lite.platform.cpu import autotune  # noqa: PLC0415
  rows = max(_TUNE_DOT_ROWS, min(rows, 2 * _TUNE_DOT_ROWS))
  rng = np.random.default_rng(0)
  ops = [rng.standard_normal(s, np.float32) * 0.05
         for s in ((rows, width), (width, 4 * width), (4 * width, width))]
  f = lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2  # noqa: E731
  ct = rng.standard_normal((rows, width), np.float32)

  def fwd_bwd(*a):
    out, vjp = jax.vjp(f, *a)
    return out, vjp(ct)

  def make(opts):
    def prepare():
      compiled = jax.jit(fwd_bwd).lower(*ops).compile(opts)
      return lambda: compiled(*ops)
    return prepare
  shape = f"mlp float32[{rows},{width}]x[{width},{4 * width}]"
  return autotune.choose("cpu_dots", shape, "eigen",
                         {name: make(opts) for name, opts in CPU_DOTS.items()})
