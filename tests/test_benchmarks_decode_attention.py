"""benchmarks/decode_attention.py end to end on CPU: the kernel check, the copy bandwidth, one table
row (XLA and the kernel in interpret mode), two sweep points and the JSON; a kernel that cannot
run still leaves the XLA column. What a GPU run executes once, so a broken argument, import or JSON
field fails here, not on the borrowed GPU."""

import json
import os
import subprocess
import sys

from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "benchmarks/decode_attention.py"


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, **kw)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_decode_attention_benchmark_interpret(tmp_path):
  out = tmp_path / "decode_attention.json"
  _run(["--interpret", "--heads", "4,2", "--batch", "1", "--slots", "64", "--repeats", "1",
        "--sweep", "--sweep-shapes", "4,2,1,64", "--sweep-block-s", "16", "--sweep-chunks", "2",
        "--sweep-warps", "4", "--sweep-stages", "2", "--out", str(out)])
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["check_ok"] is True and doc["copy_bw_Bps"] > 0
  assert doc["backend"] == "cpu" and "jax" in doc["versions"]
  checks = doc["check"]
  assert [(c["g"], c["dtype"], c["poisoned"]) for c in checks] == [
      (1, "float32", False), (3, "bfloat16", True)]
  assert all(c["ok"] and c["max_abs_diff"] <= c["tol"] and c["seconds"] > 0 for c in checks)
  (row,) = doc["rows"]
  assert (row["h"], row["k"], row["b"], row["s"], row["length"], row["d"]) == (4, 2, 1, 64, 32, 64)
  # bf16: k + v over the 32 valid slots of 2 kv heads, plus q [1, 4, 64]; XLA reads all 64 slots
  q_bytes = 1 * 4 * 64 * 2
  assert row["kernel_bytes"] == 2 * 1 * 32 * 2 * 64 * 2 + q_bytes == 16896
  assert row["xla_bytes"] == 2 * 1 * 64 * 2 * 64 * 2 + q_bytes == 33280
  assert row["floor_us"] == 1e6 * row["kernel_bytes"] / doc["copy_bw_Bps"]
  for name in ("xla", "pallas"):
    assert row[f"{name}_us"] > 0 and row[f"{name}_loop"] >= 1 and f"{name}_error" not in row
  assert row["xla_over_pallas"] == row["xla_us"] / row["pallas_us"]
  assert row["pallas_over_floor"] == row["pallas_us"] / row["floor_us"]
  assert row["max_abs_diff"] <= 2e-2  # it times what it checked (bf16 output rounding)
  # 3 buffers of 16.5 KB exceed the 16 KiB stand-in L2 of --interpret; 1 chunk of 64 slots
  assert row["buffers"] == 3 and row["l2_resident"] is False
  assert (row["chunks"], row["busy_chunks"]) == (1, 1)
  swept, default = doc["sweep"]
  assert (swept["config"]["block_s"], swept["config"]["chunks"], swept["default"]) == (16, 2, False)
  assert (swept["chunks"], swept["busy_chunks"]) == (2, 1)  # 32 valid slots fill one 32-slot chunk
  assert default["default"] and default["config"]["block_s"] == 64
  for s in (swept, default):
    assert s["pallas_us"] > 0 and "xla_us" not in s and s["max_abs_diff"] <= 2e-2


def test_a_kernel_that_cannot_run_still_leaves_the_xla_column(tmp_path):
  """Without --interpret on a CPU the Triton kernel refuses to run, as if it failed to compile on
  the GPU: the row records the error and XLA is still timed; the run completes."""
  out = tmp_path / "decode_attention.json"
  _run(["--no-check", "--heads", "4,2", "--batch", "1", "--slots", "64", "--repeats", "1",
        "--copy-mib", "4", "--out", str(out)])
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and "check" not in doc
  (row,) = doc["rows"]
  assert "needs a GPU" in row["pallas_error"] and "pallas_us" not in row
  assert row["xla_us"] > 0 and "xla_over_pallas" not in row


def test_help_and_time_limit(tmp_path):
  assert "--interpret" in _run(["--help"]).stdout
  out = tmp_path / "decode_attention.json"
  _run(["--interpret", "--time-limit", "0", "--out", str(out)])
  doc = json.loads(out.read_text())
  assert doc["status"] == "time_limit" and doc["rows"] == [] and "check" not in doc
