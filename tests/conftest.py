"""Test setup: 8 fake CPU devices before JAX starts, absl flags parsed for grain workers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Start the backend now, so that an in-process train.main() never changes this process's malloc
# settings.
jax.devices()

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
