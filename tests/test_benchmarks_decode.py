"""benchmarks/decode.py end to end on CPU with the tiny preset (bf16 / int8 / int4 rows, JSON)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_benchmark_tiny(tmp_path):
  out = tmp_path / "decode.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "benchmarks/decode.py", "--config", "tiny", "--batch", "1",
                         "--new-tokens", "3", "--repeats", "1", "--out", str(out)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete"
  rows = {r["format"]: r for r in doc["rows"]}
  assert set(rows) == {"bf16", "int8", "int4_g128"}
  assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows.values())
  # quantized storage really is smaller (embeddings stay float, so less than 2x / 4x overall)
  assert rows["int4_g128"]["model_bytes"] < rows["int8"]["model_bytes"] < rows["bf16"]["model_bytes"]
  assert rows["bf16"]["speedup_vs_bf16"] == 1.0
