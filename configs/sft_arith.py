r"""SFT of SmolLM2-135M-Instruct on 2-digit addition/subtraction, on one CPU in about 11 minutes.

    python launch.py --config configs/sft_arith.py --workdir runs/sft_arith

Trains 40 steps (16 packed rows of 128 tokens each, ~1,600 tokens, ~360 of them completion tokens)
on worked answers ("What is 12 + 30?" -> "12 + 30 = 42") generated from a seed, never on an
evaluation prompt, and reports exact-match accuracy on the same 64 held-out problems as
``configs/eval_arith.py`` before and after training.

Measured on 2026-11-25 (2-core CPU, float32, 10 min 51 s in all, ~115 tokens/s while training):
accuracy 7.8% (5/64) before -> 50.0% (32/64) after; loss 1.047 -> 0.139. Addition is now right
26 times in 33, subtraction 6 in 31 (the 135M model learns the format at once; borrowing and
negative results stay hard). Two runs gave identical losses and accuracies.

The workdir gets results.json (both accuracies and every completion), metrics.jsonl, TensorBoard
events, loss.png and a checkpoint. Stop it (SIGTERM, or Ctrl-C once) and run the same command
again: it resumes from the last checkpoint and finishes with the same losses.

Override anything on the command line, e.g. ``--config.optim.lr=3e-5 --config.steps=80`` or, on
8 devices, ``--config.mesh='(("data", -1), ("fsdp", 2), ("tensor", 1))'``.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "sft"
  config.model = "smollm2-135m-instruct"
  config.param_dtype = "float32"
  config.dtype = "float32"            # compute dtype ("bfloat16" on GPU/TPU)
  config.attention_impl = "auto"      # cuDNN flash attention on one GPU in bf16, else "xla"
  config.remat = "none"               # "full" / "dots": recompute block activations (memory)
  config.decode_attention_impl = "auto"  # flash-decoding kernel for cached steps on one GPU
  config.decode_block_impl = "auto"      # fused decoder layer for cached steps ("pallas"; auto: XLA)
  config.seed = 0
  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.steps = 40
  config.batch_size = 16              # global rows per step (packed sequences)
  config.accum_steps = 1              # micro-batches per step (exact accumulation)
  config.seq_len = 128
  config.logprob_chunk = None         # positions per log-prob chunk (None: all)
  config.vocab_chunk = 8192           # the [B, T, 49152] logits are never materialised
  config.log_every = 1
  config.save_model = False
  config.optim = ml_collections.ConfigDict(dict(
      lr=5e-5, warmup_steps=5, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      task=dict(name="arithmetic", digits=2, ops="+-"),  # built-in task: train and eval problems
      num_train=4000, train_seed=0, eval_seed=1234,      # eval_seed 1234 = configs/eval_arith.py
      path="",                 # a JSONL file of SFT records instead of the built-in task
      skip_malformed=False, pack=True))
  config.eval = ml_collections.ConfigDict(dict(
      num_problems=64, batch_size=16, max_new_tokens=96, every=0, before=True))
  config.checkpoint = ml_collections.ConfigDict(dict(every=20, keep=1))
  return config
