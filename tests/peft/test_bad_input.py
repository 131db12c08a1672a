"""Bad PEFT settings and adapter folders: a PEFTError naming the setting / file, never NaN
outputs, a trace from inside JAX or adapters dropped silently."""

import json
import math
import os

import pytest
from flax import nnx

from postrl import peft
from postrl.models import Transformer
from tests.conftest import tiny_config

QV = r"self_attn\.(q|v)_proj"


def _model(**over):
  return Transformer(tiny_config(**over), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("alpha", [math.inf, "16", None])
def test_alpha_must_be_a_finite_number(alpha):
  # alpha = inf made the scale inf: every adapted layer output inf * 0 = NaN at initialisation
  with pytest.raises(peft.PEFTError, match="alpha must be a finite number"):
    peft.apply_lora(_model(), rank=2, alpha=alpha, targets=QV)


@pytest.mark.parametrize("dropout", ["0.1", None])
def test_dropout_must_be_a_number(dropout):
  with pytest.raises(peft.PEFTError, match="dropout must be a number in"):
    peft.apply_lora(_model(), rank=2, alpha=4, targets=QV, dropout=dropout)


@pytest.mark.parametrize("apply", [
    lambda m, seed: peft.apply_lora(m, rank=2, alpha=4, targets=QV, seed=seed),
    lambda m, seed: peft.apply_prompt_tuning(m, num_virtual_tokens=4, seed=seed),
    lambda m, seed: peft.apply_prefix_tuning(m, num_virtual_tokens=4, seed=seed),
])
@pytest.mark.parametrize("seed", [None, "0", 1.5])
def test_seed_must_be_an_integer(apply, seed):
  with pytest.raises(peft.PEFTError, match="seed must be an integer"):
    apply(_model(), seed)


def test_config_seed_is_checked_before_the_model_loads():
  cfg = peft.default_config()
  cfg.method = "lora"
  cfg.seed = None
  with pytest.raises(peft.PEFTError, match="config.peft.seed"):
    peft.check_config(cfg)


@pytest.mark.parametrize("apply", [peft.apply_prompt_tuning, peft.apply_prefix_tuning])
def test_more_virtual_tokens_than_positions(apply):
  model = _model(max_position_embeddings=16)
  with pytest.raises(peft.PEFTError, match="max_position_embeddings=16"):
    apply(model, num_virtual_tokens=16)
  assert getattr(model, "prompt", None) is None


def _saved(tmp_path, **over):
  model = peft.apply_lora(_model(**over), rank=2, alpha=4, targets=QV)
  cfg = peft.default_config()
  cfg.update(method="lora", rank=2, alpha=4.0)
  peft.save_adapters(model, str(tmp_path), cfg)
  return str(tmp_path)


def test_adapters_of_layers_the_model_lacks_are_not_dropped(tmp_path):
  d = _saved(tmp_path)  # 2 layers
  with pytest.raises(peft.PEFTError, match=r"layers\.1\..*has no place in the model"):
    peft.load_adapters(_model(num_hidden_layers=1), d)


@pytest.mark.parametrize("text, match", [("{bad json", "not valid JSON"),
                                         ('["lora"]', "expected a JSON object")])
def test_broken_adapter_config_names_the_file(tmp_path, text, match):
  d = _saved(tmp_path)
  with open(os.path.join(d, peft.ADAPTER_CONFIG), "w") as f:
    f.write(text)
  with pytest.raises(peft.PEFTError, match=match) as e:
    peft.load_adapters(_model(), d)
  assert peft.ADAPTER_CONFIG in str(e.value)


def test_missing_adapter_file_leaves_the_model_unchanged(tmp_path):
  d = _saved(tmp_path)
  os.remove(os.path.join(d, peft.ADAPTER_FILE))
  model = _model()
  with pytest.raises(Exception, match=peft.ADAPTER_FILE):
    peft.load_adapters(model, d)
  assert not peft.lora_layers(model)


def test_bad_setting_in_the_adapter_config_names_the_file(tmp_path):
  d = _saved(tmp_path)
  path = os.path.join(d, peft.ADAPTER_CONFIG)
  with open(path) as f:
    cfg = json.load(f)
  cfg["rank"] = 0
  with open(path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(peft.PEFTError, match=f"{peft.ADAPTER_CONFIG}: config.peft.rank"):
    peft.load_adapters(_model(), d)
