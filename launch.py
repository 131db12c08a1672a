r"""Runs an experiment: ``python launch.py --config configs/<exp>.py [--workdir DIR] [--config.x=y]``.

The config file's ``get_config()`` returns a locked ``ml_collections.ConfigDict`` (a mistyped
override fails at start, naming the key); ``config.job`` picks the function that runs it.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where results, metrics and checkpoints go.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _jobs():
  # pylint: disable=import-outside-toplevel
  from postrl import evaluate
  from postrl.trainers import sft
  return {"evaluate": evaluate.run, "sft": sft.run}


def main(argv):
  del argv
  config = FLAGS.config
  jobs = _jobs()
  if "job" not in config or config.job not in jobs:
    print(f"error: config.job must be one of {sorted(jobs)}, got {config.get('job')!r}",
          file=sys.stderr)
    return 2
  jobs[config.job](config, FLAGS.workdir)
  return 0


if __name__ == "__main__":
  app.run(main)
