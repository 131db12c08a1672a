r"""GRPO on SmolLM2-135M-Instruct, 1-digit arithmetic, with LoRA (Hu et al. 2021) on W_q and W_v.

    python launch.py --config configs/grpo_arith_lora.py --workdir runs/grpo_arith_lora

``configs/grpo_arith.py`` plus ``config.peft`` (``postrl.peft.default_config``): LoRA rank 8,
alpha 16. Rollouts are sampled from the adapted policy; only the adapters are trained and
checkpointed. With ``--config.loss.kl_coef=0.04`` the KL reference is the frozen base without
adapters (= the initial policy for LoRA), read out of the policy's parameters: no second copy of
the model (``postrl.trainers.grpo``). The run writes ``workdir/adapter.safetensors`` and, with
``--config.save_model=True``, the merged model ``workdir/model``. Learning rate 1e-4 vs 1e-5 for
full fine-tuning (not tuned).

Other methods: ``--config.peft.method=qlora|dora|prompt|prefix``; ``none`` = full fine-tuning.
"""

from configs import grpo_arith
from postrl import peft


def get_config():
  config = grpo_arith.get_config()
  config.peft = peft.default_config()
  config.peft.method = "lora"
  config.optim.lr = 1e-4
  return config
