"""Smoke test of experiments/compression/run.py on the tiny random model (--tiny): the runner
works end to end (compress a clone, perplexity, bytes, JSON, table, plot) before a real run."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runner():
  spec = importlib.util.spec_from_file_location(
      "compression_run", os.path.join(ROOT, "experiments", "compression", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compression_runner_tiny(tmp_path):
  run = _runner()
  record = run.main(["--tiny", "--methods", "rtn_int4_g128,wanda_2:4", "--out", str(tmp_path)])
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["methods"].keys() == {"rtn_int4_g128", "wanda_2:4"} == record["methods"].keys()
  assert (tmp_path / "compression.png").stat().st_size > 0
  base, rtn, wanda = saved["fp32"], saved["methods"]["rtn_int4_g128"], saved["methods"]["wanda_2:4"]
  # The clone was compressed, not the float model: the float model's PPL is reproduced exactly
  # and the quantized one differs from it.
  assert rtn["ppl"] != base["ppl"] and wanda["ppl"] != base["ppl"]
  # int4 g128 packed: 4 bits per weight plus one float32 scale per 128 weights (4.25 bits).
  assert abs(rtn["linear_bits_per_weight"] - 4.25) < 1e-6
  assert rtn["quantized_layers"] == 14  # 2 blocks x 7 Linears
  assert rtn["model_bytes"] == base["model_bytes"] - base["linear_bytes"] + rtn["linear_bytes"]
  # Pruned models are stored dense; 2:4 packed storage is computed as K N (4 / 2 + 1 / 8) bytes.
  assert wanda["linear_bytes"] == base["linear_bytes"]
  assert wanda["sparsity_min"] == wanda["sparsity_max"] == 0.5
  assert wanda["linear_bytes_2_4_computed"] == base["linear_bytes"] * 17 // 32
  # A second call reuses the saved methods instead of recomputing them.
  again = run.main(["--tiny", "--methods", "rtn_int4_g128", "--out", str(tmp_path)])
  assert again["methods"]["rtn_int4_g128"] == rtn and again["calls"][-1]["computed"] == []
