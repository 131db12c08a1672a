r"""Baseline: exact-match accuracy of SmolLM2-135M-Instruct on 2-digit addition/subtraction.

    python launch.py --config configs/eval_arith.py --workdir runs/eval_arith

Runs on one CPU in under a minute (model load, one compilation, 64 greedy answers of up to 96
tokens) and prints the accuracy: 7.8% (5 of 64) on 2026-11-25. The model answers "What is 12 + 30?"
with "12 + 30 = 32" often enough that this is a real target for the SFT and RL configs. Override anything on the command line, e.g.
``--config.task.num_problems=256 --config.task.digits=3``.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "evaluate"
  config.model = "smollm2-135m-instruct"
  config.param_dtype = "float32"
  config.seed = 0
  config.task = ml_collections.ConfigDict(dict(
      name="arithmetic", num_problems=64, seed=1234, digits=2, ops="+-"))
  config.batch_size = 16
  config.max_new_tokens = 96
  config.temperature = 0.0
  config.system_prompt = ""
  return config
