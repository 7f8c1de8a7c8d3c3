"""Bad training examples skipped so far, over all input processes, and the run's limit on them."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from big_vision_lite.data import pipeline
from big_vision_lite.data.errors import BadInputError


def skipped_bad_examples(train_iter: Any, step: int, global_batch_size: int) -> int | None:
  """Bad training examples skipped by all processes up to `step` (config.input.bad_examples).

  Exact and deterministic, and it survives resumes: it comes from the input iterators' state
  (pipeline.records_read), not from counters in the input workers. Every process must call it
  at the same steps (one all-gather where there are several). None where the iterator's
  state does not tell.
  """
  read = pipeline.records_read(train_iter)
  if read is None:
    return None
  bad = read - step * (global_batch_size // jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    bad = int(np.sum(multihost_utils.process_allgather(np.asarray(bad, np.int32))))
  return bad


def check_bad_fraction(bad: int, read: int, max_fraction: float, step: int) -> None:
  """Stops the run once more than `max_fraction` of all records read so far were bad.

  The input workers' own check (pipeline.Preprocess) stops as soon as one of them passes the
  fraction, but each counts only what it read since it started. This one counts every worker
  and process since step 0, resumes included, at each logged step; like the workers' it judges
  over at least pipeline.MIN_EXAMPLES_FOR_FRACTION records.
  """
  if bad > max_fraction * max(read, pipeline.MIN_EXAMPLES_FOR_FRACTION):
    raise BadInputError(
        f"too many bad examples: {bad} of the {read} records read by step {step} were bad, over "
        f"all input processes since step 0 (more than config.input.max_bad_fraction="
        f"{max_fraction:g}); the warnings above name them")
