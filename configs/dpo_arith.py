r"""DPO of SmolLM2-135M-Instruct on its own 1-digit addition/subtraction answers, on one CPU.

    python launch.py --config configs/dpo_arith.py --workdir runs/dpo_arith

The model answers 64 problems ("What is 7 - 3?") 8 times each (temperature 1, up to 48 new
tokens); the task's verifier (``postrl.rewards.math_reward``) scores every answer, and up to 2
(correct, wrong) pairs per problem become the training data. 16 held-out problems give the
evaluation pairs the same way (cached in ``workdir/data/``: a resumed run reuses them). Reference
log-probs of the initial model are computed once and cached in ``workdir/reference/``. Then 30
steps of DPO (β = 0.1, 8 pairs = 16 sequences of 96 tokens per step) and an evaluation before and
after: greedy exact-match accuracy on 32 held-out problems and, on the held-out pairs, the
implicit-reward accuracy and margin and the policy's own preference (log-prob accuracy).

Measured on 2026-11-25 (float32 on the 2-core CPU while other jobs ran, load average 5-15;
26.5 min in all: ~6 min sampling, two evaluations, 30 steps at a median 19.3 s/step, ~63
tokens/s): 56 training pairs from 52 prompts (reward mean 0.12, 54% of prompts with a right and a
wrong answer), 22 held-out pairs. Greedy exact-match accuracy 34.4% (11/32) before -> 59.4%
(19/32) after (the model learns to answer "7 + 1 = 8." instead of talking around it); held-out
implicit-reward accuracy 0 -> 59.1% (13/22), margin 0 -> 0.10; the policy's own log-prob
preference on those pairs 81.8% before and after; loss 0.693 -> 0.248 (the 56 pairs are seen
about 4 times; training reward accuracy is 1.0 from step 9). The 32 evaluation problems held
repeats then; ``common.eval_problems`` now drops them, so a rerun evaluates fewer.

1-digit problems because the 135M model gets 2-digit ones right too rarely to make pairs (a probe:
reward mean 0.16 and 75% of prompts with both a right and a wrong answer among 8 samples at 1
digit, 0.0 at 2 digits). seq_len 96 holds every row: the prompt with SmolLM2's default system
prompt is 38 tokens and a response at most 48 + 1.

Other losses: ``--config.loss.name=`` ``listwise_dpo`` (with ``--config.data.kind=rankings
--config.data.reward=graded``), ``kto``, ``orpo``, ``simpo`` (set ``--config.loss.beta=2.0``),
``cpo``; other DPO variants: ``--config.loss.variant=ipo`` (any of ``postrl.losses.DPO_VARIANTS``).
``--config.loss.reference=online`` recomputes the reference per batch instead of caching it.
Your own data: ``--config.data.path=pairs.jsonl [--config.data.eval_path=held_out.jsonl]`` with
``{"prompt", "chosen", "rejected"}`` lines (or ``{"prompt", "responses"}`` with kind=rankings).
"""

import ml_collections

from postrl import peft


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "dpo"
  config.model = "smollm2-135m-instruct"
  config.param_dtype = "float32"
  config.dtype = "float32"            # compute dtype ("bfloat16" on GPU/TPU)
  config.attention_impl = "auto"      # cuDNN flash attention on one GPU in bf16, else "xla"
  config.remat = "none"               # "full" / "dots": recompute block activations (memory)
  config.decode_attention_impl = "auto"  # flash-decoding kernel for cached steps on one GPU
  config.decode_block_impl = "auto"      # fused decoder layer for cached steps ("pallas"; auto: XLA)
  config.seed = 0
  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.steps = 30
  config.batch_size = 8               # records (pairs) per step: 2 sequences each
  config.accum_steps = 1              # micro-batches per step (a record never splits)
  config.seq_len = 96                 # tokens per sequence (prompt + response)
  config.logprob_chunk = None
  config.vocab_chunk = 8192           # the [B, T, 49152] logits are never materialised
  config.log_every = 1
  config.save_model = False
  config.system_prompt = ""           # "" = the chat template's default
  config.optim = ml_collections.ConfigDict(dict(
      lr=5e-6, warmup_steps=3, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  config.loss = ml_collections.ConfigDict(dict(
      name="dpo",                     # dpo | listwise_dpo | kto | orpo | simpo | cpo
      variant="sigmoid",              # dpo only: a key of postrl.losses.DPO_VARIANTS
      beta=0.1,
      label_smoothing=0.0,            # ε of sigmoid (cDPO), robust, exo_pair, aot, aot_pair
      reference="cached",             # cached | online (reference-free losses need none)
      tau=0.05,                       # discopop
      running_mean=0.0,               # bco_pair's δ (held fixed)
      gamma=0.5,                      # simpo's target margin
      lam=0.1,                        # orpo's odds-ratio weight
      alpha=1.0,                      # cpo's NLL weight
      desirable_weight=1.0, undesirable_weight=1.0))  # kto
  config.data = ml_collections.ConfigDict(dict(
      task=dict(name="arithmetic", digits=1, ops="+-"),
      kind="pairs",                   # pairs | rankings
      reward="exact",                 # exact (the task's verifier) | graded (rankings of K > 2)
      num_prompts=64, num_eval_prompts=16, num_samples=8, max_new_tokens=48, temperature=1.0,
      pairs_per_prompt=2, k=4, sample_batch_size=64,
      train_seed=0, eval_seed=1234,
      path="", eval_path="",          # JSONL pairs / rankings instead of verifier-made data
      skip_malformed=False,
      overflow="truncate"))           # truncate (cut the response, counted) | error
  config.eval = ml_collections.ConfigDict(dict(
      num_problems=32, batch_size=16, max_new_tokens=48, every=0, before=True))
  config.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=1))
  config.peft = peft.default_config()  # method 'none'; e.g. --config.peft.method=lora
  return config
