r"""A Bradley-Terry reward model from SmolLM2-135M-Instruct on its own 1-digit arithmetic answers.

    python launch.py --config configs/rm_arith.py --workdir runs/rm_arith

The policy answers 64 problems 8 times each (temperature 1, up to 48 new tokens); the task's
verifier (``postrl.rewards.math_reward``) scores the answers and up to 2 (correct, wrong) pairs
per problem become training pairs; 16 held-out problems give the evaluation pairs (all cached in
``workdir/data/``). A scalar head on the decoder (``ScoredTransformer``) is trained for 30 steps of
8 pairs with the Bradley-Terry loss; the held-out pair accuracy (the right answer scores higher)
is reported before and after, and the model is saved to ``workdir/model`` (backbone + head
``score.weight``: ``postrl.rewards.RewardModelScorer`` and transformers'
``AutoModelForSequenceClassification`` load it).

Measured on 2026-11-25 on the pairs the DPO run made (``--config.data.path=runs/dpo_arith/data/
train_pairs.jsonl --config.data.eval_path=runs/dpo_arith/data/eval_pairs.jsonl``: 56 training,
22 held-out pairs; float32, 2-core CPU shared with other jobs, 11.4 min, median 22.0 s/step):
held-out pair accuracy 50.0% (11/22) before -> 77.3% (17/22) after, loss 0.887 -> 0.230. The
model scores "7 + 1 = 8." above "7 + 1 = 9." and "3 - 5 = -2" above "3 - 5 = 2", but by small
margins (0.1): much of what it learned is the concise "a op b = c" style of right answers.

Rankings: ``--config.loss.name=plackett_luce --config.data.kind=rankings
--config.data.reward=graded`` (K = ``data.k`` responses ordered by a graded verifier reward:
right answers first, then wrong ones by closeness to the answer, shorter first among equals);
the evaluation adds top-1 and full-order accuracy. ``--config.loss.name=bradley_terry`` with
``data.kind=rankings`` trains Bradley-Terry on all C(K,2) pairs of each ranking, averaged per
ranking (InstructGPT). Held-out rankings from ``data.eval_path`` may have another K than
``data.k`` (the models of experiments/reward_models, trained with K = 2, 4, 8, are all evaluated
on the same rankings of 8).
Step labels: ``--config.loss.name=process_reward --config.data.kind=steps
--config.data.path=steps.jsonl [--config.data.eval_path=...]`` with
``{"prompt", "steps": [...], "labels": [...]}`` lines, or without ``data.path`` Math-Shepherd
labels of the policy's own solutions: every step prefix completed ``data.step_rollouts`` times,
labelled 1 if any completion is right (``data.step_soft=True``: the fraction that are), cached
in ``workdir/data/{train,eval}_steps.jsonl``.
"""

import ml_collections

from postrl import peft


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "reward_model"
  config.model = "smollm2-135m-instruct"
  config.param_dtype = "float32"
  config.dtype = "float32"
  config.attention_impl = "auto"      # cuDNN flash attention on one GPU in bf16, else "xla"
  config.remat = "none"               # "full" / "dots": recompute block activations (memory)
  config.decode_attention_impl = "auto"  # flash-decoding kernel for cached steps on one GPU
  config.decode_block_impl = "auto"      # fused decoder layer for cached steps ("pallas"; auto: XLA)
  config.seed = 0
  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.steps = 30
  config.batch_size = 8               # records per step (a pair is 2 sequences, a ranking K)
  config.accum_steps = 1
  config.seq_len = 96                 # 38 prompt tokens + at most 49 response tokens
  config.log_every = 1
  config.save_model = True            # workdir/model: backbone + score head, HF layout
  config.system_prompt = ""
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-5, warmup_steps=3, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  config.loss = ml_collections.ConfigDict(dict(
      name="bradley_terry",           # bradley_terry | plackett_luce | process_reward
      margin=0.0))                    # bradley_terry's m
  config.data = ml_collections.ConfigDict(dict(
      task=dict(name="arithmetic", digits=1, ops="+-"),
      kind="pairs",                   # pairs | rankings | steps
      reward="exact",                 # exact | graded (rankings of K > 2)
      num_prompts=64, num_eval_prompts=16, num_samples=8, max_new_tokens=48, temperature=1.0,
      pairs_per_prompt=2, k=4, sample_batch_size=64,
      train_seed=0, eval_seed=1234,
      path="", eval_path="", skip_malformed=False,
      overflow="truncate",            # truncate (cut the response, counted) | error
      max_steps=16,                   # steps per record (process_reward)
      step_rollouts=4,                # steps without path: completions per step prefix
      step_soft=False))               # ... label = mean of their rewards (else the max)
  config.eval = ml_collections.ConfigDict(dict(
      num_problems=0,                 # a reward model does not generate: no task accuracy
      every=0, before=True))
  config.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=1))
  config.peft = peft.default_config()  # method 'none'; e.g. --config.peft.method=lora
  return config
