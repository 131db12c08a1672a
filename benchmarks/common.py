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
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
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
# Inside a fused computation: the plumbing above plus data movement that every fusion has.
_NOT_SHOWN_IN_FUSION = _NO_LAUNCH | {"broadcast", "reshape"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")


def _computations(hlo_text: str) -> tuple[dict, str | None]:
  """{name: [(opcode, rest of line, instruction name, output shape)]} of every computation, and
  the ENTRY's name."""
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
      comps[current].append((m.group(3), m.group(4), m.group(1), m.group(2)))
  return comps, entry


def _stack_frames(hlo_text: str) -> dict:
  """{stack_frame_id: [(file, line, function), its caller's, ...]} from the module's
  ``FileNames`` / ``FunctionNames`` / ``FileLocations`` / ``StackFrames`` tables (printed before
  the first computation by recent XLA; ``{}`` when absent)."""
  tables, current = {}, None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and re.match(r"^\d+ ", line):
      key, value = line.split(" ", 1)
      current[int(key)] = value
    elif line.strip() and current is not None:
      current = None
    if line.startswith(("%", "ENTRY")):
      break
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  field = lambda text, key: int((re.search(rf"{key}=(\d+)", text) or [0, 0])[1])  # noqa: E731
  locations = {k: (os.path.basename(files.get(field(v, "file_name_id"), "?")), field(v, "line"),
                   functions.get(field(v, "function_name_id"), "?"))
               for k, v in tables.get("FileLocations", {}).items()}
  frames = {k: (field(v, "file_location_id"), field(v, "parent_frame_id"))
            for k, v in tables.get("StackFrames", {}).items()}
  # XLA prints a root frame's parent as its own id (parents are printed one above their id);
  # where no frame names itself, the printed parent is the id, 0 meaning none.
  offset = 1 if any(parent == k for k, (_, parent) in frames.items()) else 0
  stacks = {}
  for k in frames:
    stack, frame = [], k
    while frame in frames and len(stack) < 64:
      location, parent = frames[frame]
      if location in locations:
        stack.append(locations[location])
      frame = parent - offset
      if frame == k or frame <= 0:
        break
    stacks[k] = stack
  return stacks


def _fused_ops(comps: dict, name: str, depth: int = 0) -> dict:
  """{opcode: n} of the instructions a fused computation computes (nested fusions expanded,
  plumbing left out), in order of first appearance."""
  ops = {}
  for opcode, rest, _, _ in comps.get(name, ()):
    callee = re.search(r"calls=%?([\w.\-]+)", rest)
    if opcode == "fusion" and callee and depth < 4:
      for op, n in _fused_ops(comps, callee.group(1), depth + 1).items():
        ops[op] = ops.get(op, 0) + n
    elif opcode not in _NOT_SHOWN_IN_FUSION:
      ops[opcode] = ops.get(opcode, 0) + 1
  return ops


def _launch(comps, frames, opcode, rest, name, shape, count, where) -> dict:
  """One launched instruction: its by-op key, kind, output shape and where it comes from."""
  key = kind = opcode
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    key = kind = f"custom-call:{target.group(1)}" if target else opcode
  fused = ""
  if opcode == "fusion":
    fusion_kind = re.search(r"kind=(k\w+)", rest)
    backend = re.search(r'"fusion(?:_backend)?_config":\{"kind":"([^"]+)"', rest)
    kind = ":".join(["fusion"] + [m.group(1) for m in (fusion_kind, backend) if m])
    callee = re.search(r"calls=%?([\w.\-]+)", rest)
    if callee:
      ops = _fused_ops(comps, callee.group(1))
      shown = [op if n == 1 else f"{op} x{n}" for op, n in ops.items()]
      fused = ", ".join(shown[:8] + (["..."] if len(shown) > 8 else []))
  op_name = re.search(r'op_name="([^"]*)"', rest)
  source = ""
  frame = re.search(r"stack_frame_id=(\d+)", rest)
  if frame and frames.get(int(frame.group(1))):
    source = " < ".join(f"{f}:{line} {fn}" for f, line, fn in frames[int(frame.group(1))][:2])
  else:
    file_, line = re.search(r'source_file="([^"]*)"', rest), re.search(r"source_line=(\d+)", rest)
    if file_:
      source = f"{os.path.basename(file_.group(1))}:{line.group(1) if line else '?'}"
  return dict(count=count, kind=kind, key=key, name=name,
              shape=re.sub(r"/\*index=\d+\*/|\{[^{}]*\}", "", shape), where=" > ".join(where),
              fused=fused, op_name=op_name.group(1) if op_name else "", source=source)


def _walk_main_loop(hlo_text: str):
  """(launch list, nested loops, unknown trip counts, the main loop's name) of the ENTRY's
  ``while`` with the most instructions in its body; None when the program has no loop."""
  comps, entry = _computations(hlo_text)
  frames = _stack_frames(hlo_text)
  nested, unknown = [], [0]

  def visit(name, scale, where, depth, out):
    total = 0
    for opcode, rest, inst, shape in comps.get(name, ()):
      if opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
        trip = re.search(r'known_trip_count"?:\{"n":"(\d+)"', rest)
        if trip is None:
          unknown[0] += 1
        n = int(trip.group(1)) if trip else 1
        label = f"{inst} x{n}" if trip else f"{inst} (trip count unknown)"
        inner = visit(body, scale * n, where + [label], depth + 1, out)
        if trip is None:  # a data-dependent condition runs (and is read back) every iteration
          inner += visit(cond, scale, where + [f"{inst} condition"], depth + 1, out)
        if depth == 0:
          nested.append((n, inner // max(n * scale, 1)))
        total += inner
      elif opcode == "conditional":
        if "branch_computations={" in rest:
          listed = rest.split("branch_computations={", 1)[1].split("}", 1)[0]
          branches = re.findall(r"%?([\w.\-]+)", listed)
        else:
          branches = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)
        runs = []
        for i, branch in enumerate(branches):
          sub = []
          runs.append((visit(branch, scale, where + [f"{inst} branch {i}"], depth, sub), sub))
        largest = max(range(len(runs)), key=lambda i: runs[i][0], default=None)
        for i, (branch_total, sub) in enumerate(runs):
          if i != largest:  # listed, not counted: only the largest branch counts
            for e in sub:
              e.update(count=0, where=e["where"] + " (not counted)")
          out.extend(sub)
        total += runs[largest][0] if runs else 0
      elif opcode == "call" and re.search(r"to_apply=%?([\w.\-]+)", rest):
        callee = re.search(r"to_apply=%?([\w.\-]+)", rest).group(1)
        total += visit(callee, scale, where + [f"{inst} -> {callee}"], depth, out)
      elif opcode not in _NO_LAUNCH:
        out.append(_launch(comps, frames, opcode, rest, inst, shape, scale, where))
        total += scale
    return total

  loops = [(rest, inst) for opcode, rest, inst, _ in comps.get(entry, ()) if opcode == "while"]
  if not loops:
    return None
  body_of = lambda rest: re.search(r"body=%?([\w.\-]+)", rest).group(1)  # noqa: E731
  main, main_name = max(loops, key=lambda loop: len(comps.get(body_of(loop[0]), ())))
  entries = []
  visit(body_of(main), 1, [], 0, entries)
  if "known_trip_count" not in main:
    cond = re.search(r"condition=%?([\w.\-]+)", main).group(1)
    visit(cond, 1, [f"{main_name} condition"], 0, entries)
  return entries, nested, unknown[0], main_name


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
  ``launches`` is None when the program has no loop. ``by_op`` adds up to ``launches`` (it
  counts a conditional's largest branch only). The operations one by one: ``loop_launch_list``.
  """
  walked = _walk_main_loop(hlo_text)
  if walked is None:
    return dict(launches=None, by_op={}, nested_loops=[], unknown_trip_counts=0)
  entries, nested, unknown, _ = walked
  by_op = {}
  for e in entries:
    if e["count"]:
      by_op[e["key"]] = by_op.get(e["key"], 0) + e["count"]
  return dict(launches=sum(e["count"] for e in entries),
              by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])), nested_loops=nested,
              unknown_trip_counts=unknown)


def loop_launch_list(hlo_text: str) -> list[dict]:
  """The operations ``loop_launches`` counts, one dict per launched instruction of the main
  loop's body, in program order (the order of a scheduled module's text = execution order).

  Each: ``count`` (launches per iteration: 1, a nested loop's trip count product, or 0 for a
  conditional branch other than the largest), ``kind`` (``fusion:<kLoop|kInput|kOutput|kCustom>``
  [``:<backend kind>``, e.g. ``__triton_gemm``], ``custom-call:<target>``, or the opcode:
  ``copy``, ``dot`` ...), ``key`` (``by_op``'s key), ``name``, ``shape`` (output, layouts left
  out), ``where`` (the nested ``while`` / ``call`` / ``conditional`` it sits in; ``""`` at the
  top of the body), ``fused`` (a fusion's computed opcodes, e.g. ``dot, add, rsqrt``),
  ``op_name`` (JAX's metadata) and ``source`` (innermost two Python frames, ``file:line
  function``, where XLA printed them). ``sum(e["count"]) == loop_launches(text)["launches"]``;
  ``[]`` when the program has no loop.
  """
  walked = _walk_main_loop(hlo_text)
  return [] if walked is None else walked[0]


def format_launch_list(entries: list[dict], title: str = "") -> str:
  """``loop_launch_list``'s entries as text: ``#`` header lines (title, totals by kind, column
  names), then one line per entry: count, kind, name, output shape, where, fused ops, source,
  op_name (its prefix common to all entries left out)."""
  names = [e["op_name"].split("/") for e in entries if e["op_name"]]
  common_prefix = 0
  while names and all(len(n) > common_prefix + 1 and n[common_prefix] == names[0][common_prefix]
                      for n in names):
    common_prefix += 1
  prefix = "/".join(names[0][:common_prefix]) + "/" if common_prefix else ""
  by_kind = {}
  for e in entries:
    by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + e["count"]
  lines = [f"# {title}"] if title else []
  lines += [f"# {sum(e['count'] for e in entries)} launches per iteration from {len(entries)} "
            f"instructions (count = launches per iteration; 0 = a conditional's branch that is "
            f"not counted)",
            "# by kind: " + ", ".join(f"{k} {n}" for k, n in
                                      sorted(by_kind.items(), key=lambda kv: -kv[1])),
            f"# op_name prefix left out: {prefix or '-'}",
            "# count | kind | name | output shape | where | fused ops | source | op_name"]
  for e in entries:
    op_name = e["op_name"][len(prefix):] if e["op_name"].startswith(prefix) else e["op_name"]
    lines.append(" | ".join([f"{e['count']:>5}", f"{e['kind']:<20}", f"{e['name']:<36}",
                             f"{e['shape']:<20}", e["where"] or "-", e["fused"] or "-",
                             e["source"] or "-", op_name or "-"]))
  return "\n".join(lines) + "\n"


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
