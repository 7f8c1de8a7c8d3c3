"""The config error type, importable without ml_collections (the models and platform use it)."""


class ConfigError(ValueError):
  """A config problem; the message names the offending key."""
