"""Decoder transformer (Llama / Qwen2 / SmolLM2), weight import/export, tokenizers."""

from postrl.models.config import ConfigError, ModelConfig
from postrl.models.heads import ScalarHead, ScoredTransformer
from postrl.models.transformer import KVCache, Transformer
from postrl.models.weights import (SHIPPED_MODELS, WeightsError, load_pretrained, save_pretrained,
                                   state_dict)
from postrl.models.tokenizer import (Tokenizer, TokenizerError, check_fits, load_tokenizer,
                                      save_tokenizer)
