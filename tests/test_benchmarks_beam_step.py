"""benchmarks/beam_step.py end to end on CPU: the kernel check, the copy bandwidth, one table row
(XLA, the kernel + merge, the kernel alone) and the JSON, with the kernel in interpret mode."""

import json
import os
import subprocess
import sys

from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_beam_step_benchmark_interpret(tmp_path):
  out = tmp_path / "beam_step.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  proc = subprocess.run([sys.executable, "benchmarks/beam_step.py", "--interpret", "--b", "1",
                         "--w", "2", "--v", "300", "--repeats", "1", "--out", str(out)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["check_ok"] and doc["copy_bw_Bps"] > 0
  assert doc["backend"] == "cpu" and "jax" in doc["versions"]
  assert all(r["ok"] for r in doc["check"]) and len(doc["check"]) == 3
  (row,) = doc["rows"]
  assert (row["b"], row["w"], row["v"], row["k"]) == (1, 2, 300, 4)
  for name in ("xla", "pallas", "kernel"):
    assert row[f"{name}_us"] > 0 and f"{name}_error" not in row
  assert row["tokens_equal"] == 1.0 and row["max_value_diff"] < 1e-4  # it times what it checked
  assert row["speedup"] == row["xla_us"] / row["pallas_us"]
  assert row["read_us"] == 1e6 * row["logits_bytes"] / doc["copy_bw_Bps"]


def test_beam_step_benchmark_time_limit_still_writes_json(tmp_path):
  out = tmp_path / "beam_step.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "benchmarks/beam_step.py", "--interpret", "--no-check",
                         "--time-limit", "0", "--out", str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["status"] == "time_limit" and doc["rows"] == [] and "check" not in doc
