r"""DPO of SmolLM2-135M-Instruct on its own 1-digit arithmetic answers with LoRA (Hu et al. 2021).

    python launch.py --config configs/dpo_arith_lora.py --workdir runs/dpo_arith_lora

``configs/dpo_arith.py`` plus ``config.peft`` (``postrl.peft.default_config``): LoRA rank 8,
alpha 16 on W_q and W_v. Only the adapters are trained and checkpointed; the reference π_ref is
the frozen base without adapters (= the policy at initialisation for LoRA), so no second copy of
the model is kept (``postrl.trainers.dpo``). The run writes ``workdir/adapter.safetensors`` and,
with ``--config.save_model=True``, the merged model ``workdir/model``. LoRA wants a larger learning
rate than full fine-tuning: 5e-5 here vs 5e-6 (not tuned; ``configs/sft_arith_lora.py`` uses 20x
its full fine-tuning rate).

Other methods: ``--config.peft.method=qlora|dora|prompt|prefix``; ``none`` = full fine-tuning.
"""

from configs import dpo_arith
from postrl import peft


def get_config():
  config = dpo_arith.get_config()
  config.peft = peft.default_config()
  config.peft.method = "lora"
  config.optim.lr = 5e-5
  return config
