"""The trainer's command line: arguments, the config (loaded, overridden, checked), exit codes.

    python -m big_vision_lite.train --config configs/vit_shapes.py --workdir runs/vit \
        [--config.total_steps=100 ...]
    bvl-train --config vit_shapes --workdir runs/vit   # a shipped recipe by name, from anywhere

The run itself is run.py (the loop in loop.py, its periodic work in hooks/).
"""

from __future__ import annotations

import sys

# First of all (two light imports, no JAX), so a SIGTERM/SIGINT during start-up is not lost:
# the imports below take seconds. main() installs the handlers again.
from big_vision_lite import signals as _early_signals

if __name__ == "__main__":
  _early_signals.install(sys.argv[1:])
elif __name__ == "__mp_main__":  # a spawned input worker imports this module: signals are the trainer's
  _early_signals.ignore_in_worker()

import argparse
import json
import logging
from typing import Sequence

from absl import flags as absl_flags
import jax

from big_vision_lite import checkpoint, config as config_lib, config_check, distributed, platform
from big_vision_lite import recipes, schedules, sharding, signals, workdir_lock
from big_vision_lite.data import worker_watch
from big_vision_lite.data.errors import BadInputError
from big_vision_lite.hooks import Hook
from big_vision_lite.hooks.checkpoint import Preempted
from big_vision_lite.platform.gpu import xla_flags
from big_vision_lite.registry import UnknownNameError
from big_vision_lite.run import train_and_evaluate

# The parts of a run, where callers of this module used to find them.
from big_vision_lite.build import Setup, build, example_batch, total_steps_of  # noqa: F401
from big_vision_lite.train_step import make_train_step  # noqa: F401
from big_vision_lite.workdir import check_workdir  # noqa: F401

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "Setup", "build", "check_workdir", "example_batch",
           "main", "make_train_step", "parse_args", "total_steps_of", "train_and_evaluate"]

log = logging.getLogger("big_vision_lite")

# Exit status after a preemption (SIGTERM) was handled by saving a checkpoint:
# EX_TEMPFAIL from sysexits.h, "try again later", so launchers can tell it from a failure.
PREEMPTED_EXIT_CODE = 75


# ----------------------------------------------------------------------------- command line


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
  """Joins a multi-process job when flags or the environment (TPU pod, SLURM) ask for it."""
  distributed.maybe_initialize(args.coordinator_address, args.num_processes, args.process_id)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m big_vision_lite.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=f"shipped recipes (--config NAME[:arg]):\n{recipes.table()}")
  parser.add_argument("--config", help="path/to/config.py[:arg], or a shipped recipe's NAME[:arg]")
  parser.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
  parser.add_argument("--workdir", default="", help="checkpoints, metrics and logs go here; "
                      "an existing workdir is resumed")
  parser.add_argument("--overwrite", action="store_true", help="start afresh in a workdir that holds "
                      "another run (its files are moved to <workdir>/overwritten-<time>/, not deleted)")
  parser.add_argument("--coordinator_address", default="", help="host:port of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args, rest = parser.parse_known_args(argv)
  if args.list_recipes:
    print(recipes.table())
    parser.exit()
  if not args.config:
    parser.error("the following arguments are required: --config")
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
    overrides.append(item)
  return args, overrides


def main(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
  """The command line: exit 0 done, 75 preempted (SIGTERM), 130 interrupted (SIGINT), 2 config, 1 failure.

  `hooks`: more periodic work for the loop (see run.train_and_evaluate), for programs that
  call main() themselves.
  """
  # First: a signal during start-up (before any state exists) exits at once with one line.
  signals.install(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv, hooks)
  finally:
    if argv is not None:  # an in-process caller gets its handlers back
      signals.uninstall()
    else:  # the command line: its exit status stands, whatever arrives while the process exits
      signals.ignore_after_run()


def _main(argv: Sequence[str] | None, hooks: Sequence[Hook]) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # grain's worker processes read absl flags; we take no absl flags of our own.
  absl_flags.FLAGS.mark_as_parsed()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config = config_lib.load_config(args.config)
    config = config_lib.apply_overrides(config, overrides)
    # XLA reads XLA_FLAGS when its backend starts: the config's preset goes in first.
    if note := xla_flags.apply(config):
      print(note, file=sys.stderr)
    maybe_initialize_distributed(args)  # before anything asks JAX about devices
    config_lib.validate(config, jax.device_count(), jax.process_count())
    platform.configure(config, workdir=args.workdir)  # attention/norm/compiler choices
    # Before any dataset is read or built, the workdir written or a step compiled.
    config_check.check_components(config)
    if config.total_steps > 0:
      schedules.make_schedule(config, int(config.total_steps))
  except (config_lib.ConfigError, sharding.MeshError, UnknownNameError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    # One run per workdir; process 0 holds it for the job.
    with workdir_lock.hold(args.workdir if jax.process_index() == 0 else None):
      result = train_and_evaluate(config, args.workdir or None, overwrite=args.overwrite,
                                  hooks=hooks)
  except workdir_lock.WorkdirBusy as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"{e}; resume with: {signals.resume_command()}", file=sys.stderr)
    return signals.exit_code()
  except (config_lib.ConfigError, sharding.MeshError) as e:
    # Found only once the data is read (an epoch count's step count, the first example's shapes).
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (checkpoint.CheckpointError, UnknownNameError, BadInputError, OSError, FloatingPointError,
          worker_watch.InputWorkerDied) as e:
    # Expected failure modes get one line; anything else keeps its traceback. (grain appends
    # a note about its traceback filtering to errors raised in the input pipeline.)
    print(f"error: {str(e).split(chr(10) + '----------')[0]}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(result, default=float), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
