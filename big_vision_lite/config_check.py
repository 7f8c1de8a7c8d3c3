"""Checks the component sections of a config (model, task, data, evaluators) against the code
that reads them, before any dataset is read, workdir written or step compiled."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable

import ml_collections

from big_vision_lite.config import ConfigError
from big_vision_lite.registry import UnknownNameError

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def accepted_keys(factory: Callable[..., Any]) -> list[str]:
  """The keyword arguments `factory` (a Flax module class or a builder function) takes."""
  names: list[str] = list(getattr(factory, "extra_keys", ()))
  target = factory
  if not inspect.isclass(factory):
    sig = inspect.signature(factory)
    names += [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    ret = sig.return_annotation
    if isinstance(ret, str):
      ret = getattr(factory, "__globals__", {}).get(ret)
    target = ret if inspect.isclass(ret) else None
  if target is not None and dataclasses.is_dataclass(target):
    names += [f.name for f in dataclasses.fields(target) if f.init and f.name not in ("parent", "name")]
  return sorted(set(names))


def suggest(key: str, known: list[str]) -> str:
  close = difflib.get_close_matches(key, known, n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def build_model(name: str, kwargs: dict[str, Any], key: str = "config.model") -> Any:
  """The Flax module `name` built from `kwargs`, with its sub-model sections checked too.

  A key the model does not take, a bad value its constructor refuses, or a variant that
  clashes with explicit sizes is a ConfigError naming the key.
  """
  from big_vision_lite import models  # pylint: disable=import-outside-toplevel (needs JAX)
  try:
    factory = models.MODELS.get(name)
  except UnknownNameError as e:
    where = "config.model_name" if key == "config.model" else key  # a tower's name is under its own key
    raise ConfigError(f"{where}: {e}") from None
  if key == "config.model":  # the platform layer's keys (models.PLATFORM_KEYS), not the module's
    kwargs = {k: v for k, v in kwargs.items() if k not in models.PLATFORM_KEYS}
  model = construct(factory, kwargs, key, f"model {name!r}")
  for field, (sub_factory, sub_kwargs) in getattr(model, "submodels", lambda: {})().items():
    if isinstance(sub_factory, str):
      build_model(sub_factory, sub_kwargs, f"{key}.{field}")
    else:
      construct(sub_factory, sub_kwargs, f"{key}.{field}", f"{key}.{field}")
  return model


def construct(factory: Callable[..., Any], kwargs: dict[str, Any], key: str, what: str) -> Any:
  """factory(**kwargs), its TypeError/ValueError turned into a one-line ConfigError at `key`."""
  try:
    built = factory(**kwargs)
    if callable(getattr(built, "validate", None)):
      built.validate()
    return built
  except TypeError as e:
    match = _UNEXPECTED.search(str(e))
    if not match:
      raise ConfigError(f"{key}: {e}") from None
    bad = match.group(1)
    known = accepted_keys(factory)
    raise ConfigError(f"{key}.{bad}: unknown key for {what}{suggest(bad, known)} "
                      f"(known: {', '.join(known)})") from None
  except ValueError as e:
    if type(e).__name__ == "VariantClash":
      raise ConfigError(f"{key}.variant: {e}") from None
    raise ConfigError(f"{key} ({what}): {e}") from None


def check_task(task_config: ml_collections.ConfigDict, model: Any) -> None:
  from big_vision_lite import tasks  # pylint: disable=import-outside-toplevel
  try:
    tasks.get_task(task_config, model)
  except UnknownNameError as e:
    raise ConfigError(f"config.task.name: {e}") from None
  except TypeError as e:
    raise ConfigError(f"config.task: {e}") from None


def check_evaluators(config: ml_collections.ConfigDict) -> None:
  from big_vision_lite import evaluators  # pylint: disable=import-outside-toplevel
  for name, ev in config.evals.items():
    key = f"config.evals.{name}"
    if "type" not in ev:
      raise ConfigError(f"{key}.type: missing (e.g. 'classification')")
    try:
      cls = evaluators.EVALUATORS.get(ev.type)
    except UnknownNameError as e:
      raise ConfigError(f"{key}.type: {e}") from None
    allowed = list(cls.allowed_keys)
    for k in ev.keys():
      if k not in allowed:
        raise ConfigError(f"{key}.{k}: unknown key for evaluator {ev.type!r}{suggest(k, allowed)} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    for k, v in ev.items():
      if k == "data" or k.endswith("_data"):  # linear_probe's train_data, ...
        check_data(v, f"{key}.{k}")


def check_data(data: ml_collections.ConfigDict, key: str) -> None:
  from big_vision_lite.data import sources  # pylint: disable=import-outside-toplevel
  allowed = sorted(sources.data_keys(data.get("name") or ""))
  for k, v in data.items():
    if k not in allowed and v is not None:  # the schema's defaults carry data_dir/files as None
      raise ConfigError(f"{key}.{k}: unknown key for data source {data.get('name')!r}{suggest(k, allowed)} "
                        f"(allowed: {', '.join(allowed)})")
  if data.get("name") == "mixture":
    from big_vision_lite.data import sources_mixture  # pylint: disable=import-outside-toplevel
    for member, member_data, _, pp in sources_mixture.members_of(data, key):
      check_data(member_data, f"{key}.members.{member}")
      check_pp(pp, f"{key}.members.{member}.pp")


def check_pp(spec: str, key: str) -> None:
  """Builds the preprocessing function of `spec` (ops, their arguments), as the input pipeline will."""
  from big_vision_lite.data import ops  # pylint: disable=import-outside-toplevel
  try:
    ops.get_preprocess_fn(spec)
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(f"{key}: {str(e).strip(chr(39))}") from None


def check_no_stand_in_tokenizer(config: ml_collections.ConfigDict) -> None:
  """The plan's stand-in tokenizer has no vocabulary: a run trained with it would learn nothing."""
  from big_vision_lite.data.tokenizers import STAND_IN_PREFIX  # pylint: disable=import-outside-toplevel
  places = {"config.task.tokenizer": str(config.task.get("tokenizer", "")), "config.input.pp": config.input.pp}
  places.update({f"config.evals.{n}.pp": str(ev.get("pp", "")) for n, ev in config.evals.items()})
  for key, text in places.items():
    if STAND_IN_PREFIX in text:
      raise ConfigError(f"{key}: the tokenizer {STAND_IN_PREFIX}... stands in for a vocabulary in `plan` "
                        "only; give a real one (the recipe's spm=/path/to/spm.model)")


def check_components(config: ml_collections.ConfigDict) -> Any:
  """Checks model, task, input data, preprocessing and evaluator sections; returns the model."""
  check_no_stand_in_tokenizer(config)
  model = build_model(config.model_name, config.model.to_dict())
  check_task(config.task, model)
  check_data(config.input.data, "config.input.data")
  check_pp(config.input.pp, "config.input.pp")
  check_evaluators(config)
  for name, ev in config.evals.items():
    if "pp" in ev:
      check_pp(ev.pp, f"config.evals.{name}.pp")
  return model
