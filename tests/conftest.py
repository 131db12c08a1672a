"""Test set-up: 8 fake CPU devices, no hub access; a persistent compilation cache for the
subprocesses a test starts only (``tests/jax_cache.py`` says why)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# as launch.py --cpu_devices: XLA:CPU's concurrency-optimised scheduler can deadlock independent
# collectives of one step across fake devices (PPO with a separate critic on fsdp x tensor)
if "concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from postrl.models import ModelConfig  # pylint: disable=wrong-import-position


def tiny_config(**overrides) -> ModelConfig:
  """2 layers, hidden 64, 4 query / 2 key-value heads: small enough for many compilations."""
  kwargs = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=0)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A tiny random model (hidden 32, 2 layers) saved as a HF folder with the real SmolLM2
  tokenizer: runs every job end to end through ``launch.py`` in seconds."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import (Transformer, load_tokenizer, save_pretrained,  # pylint: disable=import-outside-toplevel
                             save_tokenizer)
  path = tmp_path_factory.mktemp("tiny_smol")
  tok = load_tokenizer("smollm2-135m-instruct")
  cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                    eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
  save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), str(path))
  save_tokenizer(tok, str(path))
  return str(path)


# A worker frees JAX's compiled programs when its memory maps pass this many (see below).
MAX_MEMORY_MAPS = 20_000


def memory_maps() -> int:
  """Memory maps of this process (lines of ``/proc/self/maps``; 0 where there is no such file)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def _release_compiled_programs():
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_module():
  """Frees every compiled program after each test module, and after any test that leaves the
  worker with more than ``MAX_MEMORY_MAPS`` memory maps (``_release_when_maps_pile_up``).

  XLA:CPU maps each compiled program's machine code into the process with several ``mmap``s,
  and JAX's caches keep every program alive. One pytest-xdist worker runs ~1,000 tests. Without
  this a worker reached 60,185 memory maps near the end of a full run on two workers
  (2026-11-28, ``/proc/PID/maps`` sampled every 20 s), 92% of the 65,530 Linux allows a process
  by default (``vm.max_map_count``); past it every ``mmap`` fails. CI runs lost a worker to an
  abort or a segmentation fault inside XLA, late in a run, in a different untouched test each
  time, which is what a refused map would do (not reproduced here), and pytest-xdist's
  ``--dist loadfile`` scheduler can then hang until the CI's time limit. Freeing after each
  module alone kept a run at 34,448 at most (one module compiles that much); the per-test check
  bounds it near ``MAX_MEMORY_MAPS``."""
  yield
  _release_compiled_programs()


@pytest.fixture(autouse=True)
def _release_when_maps_pile_up():
  yield
  if memory_maps() > MAX_MEMORY_MAPS:
    _release_compiled_programs()


@pytest.fixture(scope="session")
def tiny_cfg():
  return tiny_config()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: loads the real 135M model (still runs in CI)")
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set too late?)"
