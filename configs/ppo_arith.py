r"""PPO (actor-critic, GAE, value clipping) on SmolLM2-135M-Instruct, single-digit arithmetic.

    python launch.py --config configs/ppo_arith.py

The same task, prompts, reward and evaluation as the main job (``configs/grpo_arith.py``), so the
two are comparable step for step. By default the value function is a scalar head on the policy's
own hidden states (``shared_trunk=True``: one model in memory, one forward for log-probs and
values); ``--config.shared_trunk=False`` trains a separate critic, a copy of the model with its
own head (``--config.critic_model=PATH`` starts it from another model, e.g. a reward model's
backbone). The KL to the initial policy is a per-token reward term (InstructGPT) with
``kl_in_reward=True``, or a loss term with ``False``.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from postrl import peft


def get_config():
  config = ml_collections.ConfigDict()
  config.job = "ppo"
  config.model = "smollm2-135m-instruct"
  config.param_dtype = "float32"
  config.dtype = "float32"
  config.attention_impl = "auto"      # cuDNN flash attention on one GPU in bf16, else "xla"
  config.remat = "none"               # "full" / "dots": recompute block activations (memory)
  config.decode_attention_impl = "auto"  # flash-decoding kernel for cached steps on one GPU
  config.decode_block_impl = "auto"      # fused decoder layer for cached steps ("pallas"; auto: XLA)
  config.seed = 0
  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.steps = 20
  config.accum_steps = 4              # 4 micro-batches of 16 rows: activations stay ~2 GB on CPU
  config.logprob_chunk = None
  config.vocab_chunk = 8192
  config.log_every = 1
  config.save_model = False
  config.shared_trunk = True
  config.critic_model = ""           # separate critic's initial weights (default: config.model)
  config.system_prompt = "Answer with just the final number."
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
      clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      task=dict(name="arithmetic", digits=1, ops="+-"),
      num_train=2000, train_seed=0, eval_seed=1234, path="", skip_malformed=False))
  config.rollout = ml_collections.ConfigDict(dict(
      prompts=16, group_size=4, max_new_tokens=32, temperature=1.0, top_p=placeholder(float),
      batch_size=64, minibatches=2, epochs=1, length_bucket=16,
      continuous=False,  # generate_continuous with batch_size slots (more rows than slots)
      sampling_impl="auto"))  # auto | xla | pallas: generate's sampler (auto: XLA on CPU)
  config.loss = ml_collections.ConfigDict(dict(
      clip_eps_low=0.2, clip_eps_high=0.2, vf_coef=0.1, vf_clip=0.2, kl_coef=0.0,
      kl_in_reward=True, gamma=1.0, lam=0.95, whiten_advantages=True))
  config.rewards = ml_collections.ConfigDict(dict(math=1.0))
  config.reward_options = ml_collections.ConfigDict(dict(math=dict(method="last_number")))
  # a trained reward model (configs/rm_arith.py --config.save_model=True writes one): its score x
  # weight is added to the rewards above (set rewards.math=0 to train on the reward model alone)
  config.reward_model = ml_collections.ConfigDict(dict(path="", weight=1.0, batch_size=64))
  config.eval = ml_collections.ConfigDict(dict(
      num_problems=100, batch_size=50, max_new_tokens=32, every=0, before=True))
  config.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=1))
  config.peft = peft.default_config()  # method 'none'; e.g. --config.peft.method=lora
  return config
