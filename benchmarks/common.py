"""Shared pieces of the benchmark scripts: model shapes with random weights, the run's environment,
a wall-clock budget, and JSON written after every measurement (a killed run keeps what it had).

The scripts run from a checkout without installing postrl (``python benchmarks/<script>.py``):
they put the repository root first on ``sys.path`` (an installed postrl never shadows the
checkout) and then import this module as ``benchmarks.common``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import select
import subprocess
import time

# Published shapes (config.json of HuggingFaceTB/SmolLM2-135M and meta-llama/Llama-3.2-1B); the
# weights are random, so nothing is downloaded. "tiny" is for smoke tests on CPU.
PRESETS = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001),
    "llama-8b": dict(  # meta-llama/Llama-3.1-8B's shape
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0),
}


def model_config(name: str, *, param_dtype: str, dtype: str):
  """The ``postrl.models.ModelConfig`` of preset ``name`` in the given dtypes."""
  from postrl.models import ConfigError, ModelConfig  # pylint: disable=import-outside-toplevel
  if name not in PRESETS:
    raise ConfigError(f"--config: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return ModelConfig(**PRESETS[name], param_dtype=param_dtype, dtype=dtype)


def random_model(cfg, seed: int = 0):
  """A ``postrl.models.Transformer`` with random weights (normal, std 0.02) on the default
  device."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def default_dtype() -> str:
  """bfloat16 on an accelerator, float32 on CPU (where bfloat16 matmuls are emulated and slow)."""
  import jax  # pylint: disable=import-outside-toplevel
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def environment() -> dict:
  """Device, host and package versions of this run (no accelerator is touched beyond jax's)."""
  import jax  # pylint: disable=import-outside-toplevel
  versions = dict(python=platform.python_version(), jax=jax.__version__)
  for name in ("jaxlib", "flax", "optax", "numpy"):
    try:
      versions[name] = __import__(name).__version__
    except ImportError:
      pass
  device = jax.devices()[0]
  env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             backend=jax.default_backend(), device=device.device_kind,
             device_count=jax.device_count(), cpu_count=os.cpu_count(),
             host=platform.node(), versions=versions)
  stats = _memory_stats(device)
  if stats and "bytes_limit" in stats:
    env["device_memory_bytes"] = int(stats["bytes_limit"])
  return env


def _memory_stats(device) -> dict | None:
  try:
    return device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU backends may not implement it)
    return None


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 so far (None where the backend does not report it)."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = _memory_stats(jax.devices()[0])
  return None if not stats else stats.get("peak_bytes_in_use")


class Budget:
  """A wall-clock limit for a whole run: ``left()`` seconds remain; ``over(need)`` is True when
  fewer than ``need`` seconds are left (the caller skips the rest and still writes its results)."""

  def __init__(self, seconds: float | None):
    self.start = time.perf_counter()
    self.seconds = seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return float("inf") if self.seconds is None else self.seconds - self.elapsed()

  def over(self, need: float = 0.0) -> bool:
    return self.left() < need


class Results:
  """A JSON document rewritten (atomically) after every change, so a killed run keeps its rows."""

  def __init__(self, path: str, **fields):
    self.path = path
    self.doc = dict(fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.write()

  def update(self, **fields):
    self.doc.update(fields)
    self.write()

  def append(self, key: str, row: dict):
    self.doc.setdefault(key, []).append(row)
    self.write()

  def write(self):
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.doc, f, indent=1, default=str)
    os.replace(tmp, self.path)


def log(msg: str):
  """Progress on stdout, flushed at once (a killed run still shows every finished step)."""
  print(msg, flush=True)


# ------------------------------------------------------------------ what one loop step launches

# Instructions of optimised HLO that launch nothing on their own (views, plumbing, constants).
_NO_LAUNCH = frozenset({
    "parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"})
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")


def _computations(hlo_text: str) -> tuple[dict, str | None]:
  """{name: [(opcode, rest of line)]} of every computation, and the ENTRY's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and "->" in line:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      comps[current].append((m.group(1), m.group(2)))
  return comps, entry


def loop_launches(hlo_text: str) -> dict:
  """Operations launched per iteration of the main loop of a compiled program (e.g. a decode step).

  Reads the optimised HLO (``jax.jit(f).lower(...).compile().as_text()``): the main loop is the
  ENTRY computation's ``while`` with the most instructions in its body. Every instruction that is
  not plumbing (``_NO_LAUNCH``) counts once: a fusion, a library call (``custom-call``: cuBLAS,
  cuDNN, a Pallas kernel), a copy, a scatter ... A nested ``while`` counts its body (and its
  condition, when its trip count is unknown) times its known trip count; a ``conditional`` its
  largest branch; a ``call`` its callee. On a GPU each counted instruction is roughly one kernel
  launch (an XLA runtime thunk; command buffers / CUDA graphs batch them), so launches x
  per-launch overhead bounds how fast a small step can be. Returns ``{"launches": n, "by_op":
  {opcode: n}, "nested_loops": [(trip count, launches per trip)], "unknown_trip_counts": k}``;
  ``launches`` is None when the program has no loop.
  """
  comps, entry = _computations(hlo_text)
  by_op, nested, unknown = {}, [], [0]

  def count(name, scale, depth):
    total = 0
    for opcode, rest in comps.get(name, ()):
      if opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
        trip = re.search(r'known_trip_count"?:\{"n":"(\d+)"', rest)
        if trip is None:
          unknown[0] += 1
        n = int(trip.group(1)) if trip else 1
        inner = count(body, scale * n, depth + 1)
        if trip is None:  # a data-dependent condition runs (and is read back) every iteration
          inner += count(cond, scale, depth + 1)
        if depth == 0:
          nested.append((n, inner // max(n, 1)))
        total += inner
      elif opcode == "conditional":
        if "branch_computations={" in rest:
          listed = rest.split("branch_computations={", 1)[1].split("}", 1)[0]
          branches = re.findall(r"%?([\w.\-]+)", listed)
        else:
          branches = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)
        total += max((count(b, scale, depth) for b in branches), default=0)
      elif opcode == "call":
        callee = re.search(r"to_apply=%?([\w.\-]+)", rest)
        total += count(callee.group(1), scale, depth) if callee else scale
      elif opcode not in _NO_LAUNCH:
        key = opcode
        if opcode == "custom-call":
          target = re.search(r'custom_call_target="([^"]+)"', rest)
          key = f"custom-call:{target.group(1)}" if target else opcode
        by_op[key] = by_op.get(key, 0) + scale
        total += scale
    return total

  loops = [rest for opcode, rest in comps.get(entry, ()) if opcode == "while"]
  if not loops:
    return dict(launches=None, by_op={}, nested_loops=[], unknown_trip_counts=0)
  body_of = lambda rest: re.search(r"body=%?([\w.\-]+)", rest).group(1)  # noqa: E731
  main = max(loops, key=lambda rest: len(comps.get(body_of(rest), ())))
  launches = count(body_of(main), 1, 0)
  if 'known_trip_count' not in main:
    launches += count(re.search(r"condition=%?([\w.\-]+)", main).group(1), 1, 0)
  return dict(launches=launches, by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
              nested_loops=nested, unknown_trip_counts=unknown[0])



class ChildProcess:
  """A worker process that answers one JSON request per stdin line with lines
  ``<prefix>{json}`` on its stdout (anything else it prints is skipped). ``read(timeout)`` returns
  the next reply; a failure or a timeout kills the process, and every later call returns
  ``{"error": ...}``, so the parent goes on without that baseline."""

  def __init__(self, prefix: str, name: str):
    self.prefix, self.name = prefix, name
    self.proc = None
    self.buffer = b""
    self.error = None

  def launch(self, cmd, env=None):
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                 env=env)

  def read(self, timeout: float) -> dict:
    if self.error is not None:
      return {"error": self.error}
    deadline = time.perf_counter() + timeout
    while True:
      while b"\n" in self.buffer:
        line, self.buffer = self.buffer.split(b"\n", 1)
        text = line.decode(errors="replace")
        if self.prefix in text:
          return json.loads(text[text.index(self.prefix) + len(self.prefix):])
      left = deadline - time.perf_counter()
      if left <= 0:
        return self.fail(f"no answer within {timeout:.0f} s (time limit)")
      ready, _, _ = select.select([self.proc.stdout], [], [], left)
      if ready:
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
          return self.fail(f"the {self.name} process exited (rc {self.proc.wait()})")
        self.buffer += chunk

  def fail(self, message: str) -> dict:
    self.error = message
    self.close()
    return {"error": message}

  def send(self, request: dict):
    self.proc.stdin.write((json.dumps(request) + "\n").encode())
    self.proc.stdin.flush()

  def close(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
