"""Bad PEFT settings and adapter folders: a PEFTError naming the setting / file, never NaN
outputs, a trace from inside JAX or adapters dropped silently."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
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


def _config(**over):
  cfg = peft.default_config()
  cfg.update(dict(method="lora", rank=2, alpha=4.0, targets=QV), **over)
  return cfg


@pytest.mark.parametrize("apply, over, match", [
    # alpha is not in the tensors: the folder loaded without error, every update scaled x4
    (lambda m: peft.apply_lora(m, rank=2, alpha=16, targets=QV), {}, "alpha 16.0.* alpha=4.0"),
    (lambda m: peft.apply_lora(m, rank=4, alpha=4, targets=QV), {}, "rank 4.* rank=2"),
    (lambda m: peft.apply_dora(m, rank=2, alpha=4, targets=QV), {}, "DoRA.*method='lora'"),
    (lambda m: peft.apply_lora(m, rank=2, alpha=4, targets=QV), dict(method="dora"),
     "LoRA.*method='dora'"),
    (lambda m: peft.apply_lora(m, rank=2, alpha=4, targets=r"mlp\.up_proj"), {},
     r"layers\.0\.mlp\.up_proj has an adapter.*targets"),
    (lambda m: peft.apply_prompt_tuning(m, num_virtual_tokens=4), {}, "method='lora'"),
    (lambda m: peft.apply_prompt_tuning(m, num_virtual_tokens=4),
     dict(method="prompt", num_virtual_tokens=8), "4 virtual tokens.*num_virtual_tokens=8"),
    (lambda m: peft.apply_prefix_tuning(m, num_virtual_tokens=4), dict(method="prompt"),
     "method='prompt'"),
])
def test_saved_config_must_describe_the_model_adapters(tmp_path, apply, over, match):
  model = apply(_model())
  with pytest.raises(peft.PEFTError, match=match):
    peft.save_adapters(model, str(tmp_path), _config(**over))
  assert not os.path.exists(os.path.join(str(tmp_path), peft.ADAPTER_CONFIG))


def test_a_failed_load_leaves_the_model_without_new_adapters(tmp_path):
  # the base of another width: the shapes fail after the adapters were added, and the fresh
  # adapters stayed: a second load_adapters (the right folder) then said "already has an adapter"
  d = _saved(tmp_path)
  model = _model(hidden_size=32, intermediate_size=48)
  with pytest.raises(peft.PEFTError, match="has shape"):
    peft.load_adapters(model, d)
  assert not peft.lora_layers(model) and not nnx.state(model, peft.AdapterParam)
  # and one that does fit loads afterwards
  other = os.path.join(str(tmp_path), "narrow")
  peft.save_adapters(peft.apply_lora(_model(hidden_size=32, intermediate_size=48), rank=2,
                                     alpha=4, targets=QV), other, _config())
  peft.load_adapters(model, other)
  assert len(peft.lora_layers(model)) == 4


@pytest.mark.parametrize("method", ["qlora", "prompt", "prefix"])
def test_a_failed_load_of_other_methods_leaves_the_model_unchanged(tmp_path, method):
  over = dict(num_virtual_tokens=4) if method in ("prompt", "prefix") else {}
  cfg = _config(method=method, **over)
  peft.save_adapters(peft.apply_peft(_model(), cfg), str(tmp_path), cfg)
  model = _model(hidden_size=32, intermediate_size=48)
  with pytest.raises(peft.PEFTError, match="has shape"):
    peft.load_adapters(model, str(tmp_path))
  assert not nnx.state(model, peft.AdapterParam)
  assert not peft.has_prompt_or_prefix(model)
  assert not any(lin.quantized for lin in peft.linear_layers(model).values())
  # the folder of a model of this width loads (the QLoRA base is quantized only now)
  narrow = _model(hidden_size=32, intermediate_size=48)
  peft.apply_peft(narrow, cfg)
  other = os.path.join(str(tmp_path), "narrow")
  peft.save_adapters(narrow, other, cfg)
  peft.load_adapters(model, other)
  assert (model.layers[0].self_attn.q_proj.quantized) == (method == "qlora")
  tok = jnp.array([[3, 5, 7, 9]])
  np.testing.assert_allclose(model(tok), narrow(tok), rtol=1e-6, atol=1e-6)
