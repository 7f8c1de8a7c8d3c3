"""Exceptions shared by preprocessing ops and the input pipeline (no heavy imports)."""


class BadExample(ValueError):
  """An op found one example's content unusable (undecodable or zero-size image, ...).

  The train pipeline treats it per `config.input.bad_examples`: skip (counted,
  logged) or stop naming the record.
  """


class BadInputError(ValueError):
  """A bad example under bad_examples='error', or more bad examples than allowed; names the record."""
