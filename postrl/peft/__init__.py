"""Parameter-efficient fine-tuning as parameter-tree transforms on an NNX model.

    from postrl import peft
    peft.apply_lora(model, rank=8, alpha=16, targets=r"self_attn\\.(q|v)_proj")
    graphdef, trainable, frozen = peft.split_trainable(model)   # AdapterParam vs the rest
    peft.merged_model(model)                                    # plain model for save_pretrained

Methods: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024), QLoRA (Dettmers et al. 2023) in
``lora``; prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) in ``prompt``;
the config-driven entry points, trainable/frozen split, export and adapter files in ``api``.
Trainers take ``config.peft`` (``default_config()``) through ``postrl.trainers.common.start``.
"""

from postrl.peft.lora import (AdapterParam, DropoutKey, LoRA, PEFTError, apply_dora, apply_lora,
                              apply_qlora, linear_layers, lora_layers, merge_lora, strip_lora,
                              unmerge_lora)
from postrl.peft.prompt import (PrefixKV, PromptEmbeddings, apply_prefix_tuning,
                                apply_prompt_tuning)
from postrl.peft.api import (ADAPTER_CONFIG, ADAPTER_FILE, DEFAULT_TARGETS, METHODS,
                             adapter_tensors, apply_peft, base_digest, base_view, check_config,
                             combine, default_config, enabled, has_prompt_or_prefix, load_adapters,
                             merged_model, num_elements, remove_adapters, save_adapters,
                             set_dropout_keys, split_trainable)
