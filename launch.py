r"""Runs an experiment: ``python launch.py --config configs/<exp>.py [--workdir DIR] [--config.x=y]``.

With no arguments it runs the main job, ``configs/grpo_arith.py`` (GRPO on SmolLM2-135M-Instruct,
arithmetic, a few minutes on a CPU), in ``runs/grpo_arith``. Without ``--workdir`` a run goes to
``runs/<config name>``; running the same command again resumes it (delete the folder to restart).

The config file's ``get_config()`` returns an ``ml_collections.ConfigDict``; it is locked, so a
mistyped override fails at start naming the key, and a value of the wrong type fails naming the key
and both types. ``config.job`` picks the function that runs it (``JOBS`` below).

One process per host. On a TPU pod, a SLURM or Open MPI allocation, JAX's multi-controller runtime
is initialised automatically (``jax.distributed.initialize()`` finds the coordinator). Elsewhere pass
it explicitly, the same command on every host with its own ``--process_id``::

    python launch.py --config configs/sft_arith.py --workdir /shared/run \
        --coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=0

``--cpu_devices=N`` fakes N CPU devices per process (multi-device tests on one machine; with
several processes their collectives go over gloo on loopback).
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "grpo_arith.py")  # the main job

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where results, metrics and checkpoints go "
                    "(default: runs/<config file name>; an existing run there is resumed).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_integer("cpu_devices", None, "Fake this many CPU devices per process.")
FLAGS = flags.FLAGS

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


# config.job -> the module whose ``run(config, workdir)`` runs it
JOBS = {"evaluate": "postrl.evaluate", "sft": "postrl.trainers.sft",
        "grpo": "postrl.trainers.grpo", "ppo": "postrl.trainers.ppo",
        "dpo": "postrl.trainers.dpo", "reward_model": "postrl.trainers.reward_model",
        "distill": "postrl.trainers.distill"}


def _job(name: str):
  """The run function of a job; imported after JAX's devices are set up."""
  import importlib  # pylint: disable=import-outside-toplevel
  return importlib.import_module(JOBS[name]).run


def _multi_host_cluster() -> bool:
  """Whether the environment is a multi-host allocation that JAX can auto-detect."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_jax():
  """Sets up devices and, when asked or detected, the multi-process runtime. Returns jax."""
  if FLAGS.cpu_devices:
    # XLA:CPU's concurrency-optimised scheduler can deadlock independent collectives of one
    # step across fake devices (seen: PPO with a separate critic on fsdp x tensor)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.cpu_devices}"
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    os.environ["JAX_PLATFORMS"] = "cpu"  # fake CPU devices, even where a GPU is present
  import jax  # pylint: disable=import-outside-toplevel
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if FLAGS.cpu_devices or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif _multi_host_cluster():
    jax.distributed.initialize()
  return jax


def default_workdir(config_path: str) -> str:
  """runs/<config file name without .py> (under the current directory)."""
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", stem)


def workdir_problem(workdir: str) -> str | None:
  """Why ``workdir`` cannot hold a run's outputs, or None: checked before any work, so a run
  never ends with results, metrics or checkpoints it cannot write."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):  # the folder is made later: its nearest existing parent counts
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    return f"{path} is a file, not a folder"
  if not os.access(path, os.W_OK | os.X_OK):
    return f"{path} is not writable"
  return None


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    # warnings and errors only: orbax and JAX log dozens of INFO lines per run (checkpoint
    # manager set-up, every save); --verbosity=0 shows them
    absl_logging.set_verbosity(absl_logging.WARNING)
  config_file = config_flags.get_config_filename(FLAGS["config"])
  path = config_file.split(":")[0]  # "file.py:arg" passes arg to get_config
  if not os.path.isfile(path):  # ml_collections would raise two chained tracebacks
    print(f"error: --config {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}",
          file=sys.stderr)
    return 2
  config = FLAGS.config
  if "job" not in config or config.job not in JOBS:
    print(f"error: config.job must be one of {list(JOBS)}, got {config.get('job')!r}",
          file=sys.stderr)
    return 2
  workdir = FLAGS.workdir or default_workdir(config_file)
  problem = workdir_problem(workdir)
  if problem:
    print(f"error: --workdir {workdir}: {problem}", file=sys.stderr)
    return 2
  jax = initialize_jax()
  if jax.process_count() > 1:
    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices")
  run = _job(config.job)
  if jax.process_index() == 0:
    print(f"workdir: {workdir}")
  try:
    run(config, workdir)
  except _user_errors() as e:  # bad input: one clear line, not a stack trace from inside JAX
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  return 0


def _user_errors() -> tuple[type[Exception], ...]:
  """Errors that describe a problem with the config, the data, the weights or the workdir."""
  # pylint: disable=import-outside-toplevel
  from postrl.checkpoint import CheckpointError
  from postrl.data.records import DataError
  from postrl.models import ConfigError, TokenizerError, WeightsError
  from postrl.sharding import ShardingError
  from postrl.trainers.loop import NonFiniteError
  return (CheckpointError, DataError, ConfigError, TokenizerError, WeightsError, ShardingError,
          NonFiniteError, FileNotFoundError)


if __name__ == "__main__":
  app.run(main)
