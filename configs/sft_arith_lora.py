r"""SFT of SmolLM2-135M-Instruct on 2-digit arithmetic with LoRA (Hu et al. 2021) on W_q and W_v.

    python launch.py --config configs/sft_arith_lora.py --workdir runs/sft_arith_lora

``configs/sft_arith.py`` plus ``config.peft`` (``postrl.peft.default_config``): rank 8, alpha 16
(update scaled by alpha / rank = 2), targets ``self_attn.(q|v)_proj``. Only the adapters are
trained, kept in the optimizer state and checkpointed; with ``--config.save_model=True`` the run
writes the merged model (``workdir/model``) and the adapters (``workdir/adapter.safetensors``).
LoRA wants a larger learning rate than full fine-tuning (1e-3 here vs 5e-5).

Other methods: ``--config.peft.method=qlora`` (NF4 base + LoRA), ``dora``, ``prompt``, ``prefix``
(``--config.peft.num_virtual_tokens=16``), ``none`` (full fine-tuning).
"""

from configs import sft_arith
from postrl import peft


def get_config():
  config = sft_arith.get_config()
  config.peft = peft.default_config()
  config.peft.method = "lora"
  config.optim.lr = 1e-3
  return config
