"""A trained reward model as a reward: load the folder ``postrl.trainers.reward_model`` saves and
score (prompt, completion) pairs.

    scorer = RewardModelScorer("runs/rm_arith/model")
    scores = scorer.score(completions, prompts)             # list of floats, batched under jit
    rm = make_reward_model_reward("runs/rm_arith/model")    # (completion, prompt) -> float
    total, per_name = combine_rewards(completions, weights={"rm": 1.0},
                                      registry={**REWARDS, "rm": rm}, problems=problems)

The score of a reply is r(x, y) = w · h_last + b: the scalar head on the final hidden state of the
reply's last token (its end-of-turn token), the sequence score of ``ScoredTransformer``
(InstructGPT, Ouyang et al. 2022). Rows are tokenised exactly as in training
(``postrl.data.preference.prompt_and_response_ids``: the chat template with the system prompt the
model was trained with, then the reply through its end-of-turn token) and scored in fixed-shape
batches of ``batch_size`` rows x ``max_len`` tokens, so one compiled program serves every call.

The folder (``save_reward_model``) is an HF folder: ``config.json`` + ``model.safetensors`` with
the backbone under transformers' names, the head as ``score.weight`` [1, D] (the tensor of
transformers' ``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification``) plus
``score.bias`` [1], and ``tokenizer.json``. ``config.json`` keeps the causal-LM architecture (so
``postrl.models.load_pretrained`` reads the backbone), sets ``id2label`` to one label (num_labels
= 1) and a ``pad_token_id`` that is not an end-of-turn token, and records ``postrl_reward_model``
(system prompt, max_len). ``transformers.AutoModelForSequenceClassification.from_pretrained``
therefore loads it and, for inputs right-padded with that pad id, reads the score at the same
token. transformers' head has no bias: it drops ``score.bias`` (a warning), which shifts every
score by the same constant b. Bradley-Terry and Plackett-Luce training leaves b at 0 (they only
see score differences, so b gets no gradient); a process-reward model learns it.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Sequence

import numpy as np

# JAX, Flax and postrl.models are imported inside the functions: ``import postrl.rewards`` (the
# verifiable rewards, pure Python) stays free of them.
# pylint: disable=import-outside-toplevel

CONFIG_KEY = "postrl_reward_model"


def _hf_pad_id(tokenizer, eos_ids: Sequence[int]) -> int:
  """A pad id transformers can tell from the reply's last token (never an end-of-turn id)."""
  for candidate in (tokenizer.pad_id, 0, 1, 2):
    if candidate is not None and candidate not in eos_ids:
      return int(candidate)
  raise ValueError(f"no pad id outside the end-of-turn ids {eos_ids}")


def write_score_head(path: str, kernel_Dx1, bias_1, tokenizer, *, system_prompt: str | None = None,
                     max_len: int | None = None) -> None:
  """Adds the head to an HF folder holding the backbone (``save_pretrained``): ``score.weight``
  [1, D] and ``score.bias`` [1] in ``model.safetensors``, the reward-model fields in
  ``config.json`` (module doc), and the tokenizer. Each file is replaced atomically."""
  from postrl.models import save_tokenizer
  from postrl.models.weights import read_safetensors, write_safetensors
  weights = os.path.join(path, "model.safetensors")
  tensors = read_safetensors(weights)
  dtype = tensors["model.embed_tokens.weight"].dtype
  tensors = {k: np.asarray(v) for k, v in tensors.items()}
  tensors["score.weight"] = np.asarray(kernel_Dx1, np.float32).T.astype(dtype)
  tensors["score.bias"] = np.asarray(bias_1, np.float32).reshape(1).astype(dtype)
  tmp = weights + ".tmp"
  write_safetensors(tmp, tensors)
  os.replace(tmp, weights)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  eos = config.get("eos_token_id")
  eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
  eos_ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                pad_token_id=_hf_pad_id(tokenizer, eos_ids))
  config[CONFIG_KEY] = {"head": "score", "system_prompt": system_prompt or "", "max_len": max_len}
  tmp = os.path.join(path, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(path, "config.json"))
  save_tokenizer(tokenizer, path)


def save_reward_model(model, path: str, tokenizer, *, system_prompt: str | None = None,
                      max_len: int | None = None) -> None:
  """Writes a ``ScoredTransformer`` as the folder described in the module doc."""
  from postrl.models import save_pretrained
  save_pretrained(model.backbone, path)
  write_score_head(path, np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...]),
                   tokenizer, system_prompt=system_prompt, max_len=max_len)


def load_reward_model(path: str, *, param_dtype: str = "float32", dtype: str | None = None):
  """(``ScoredTransformer``, tokenizer, the ``postrl_reward_model`` config fields) of a folder
  written by ``save_reward_model``."""
  import jax.numpy as jnp
  from flax import nnx
  from postrl.models import ScoredTransformer, check_fits, load_pretrained, load_tokenizer
  from postrl.models.weights import WeightsError, read_safetensors
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise WeightsError(f"{path}: no config.json (not a saved reward model folder)")
  with open(config_path) as f:
    meta = json.load(f).get(CONFIG_KEY)
  tensors = read_safetensors(os.path.join(path, "model.safetensors"))
  if meta is None or "score.weight" not in tensors:
    raise WeightsError(f"{path}: not a reward model (no {CONFIG_KEY!r} in config.json or no "
                       f"'score.weight' tensor); save one with postrl.trainers.reward_model")
  backbone = load_pretrained(path, param_dtype=param_dtype, dtype=dtype)
  model = ScoredTransformer(backbone, rngs=nnx.Rngs(0))
  D = backbone.config.hidden_size
  weight = np.asarray(tensors["score.weight"], np.float32)
  if weight.shape != (1, D):
    raise WeightsError(f"{path}: tensor 'score.weight' has shape {weight.shape}, expected (1, {D})")
  bias = np.asarray(tensors.get("score.bias", np.zeros((1,))), np.float32).reshape(1)
  pdt = model.head.kernel[...].dtype
  model.head.kernel.set_value(jnp.asarray(weight.T, pdt))
  model.head.bias.set_value(jnp.asarray(bias, pdt))
  return model, check_fits(load_tokenizer(path), backbone.config.vocab_size, path), meta


class RewardModelScorer:
  """Scores replies with a saved reward model (module doc).

  Args:
    path: a folder written by ``save_reward_model`` (``workdir/model`` of a reward-model run).
    batch_size: rows per compiled call (a short last batch is padded).
    max_len: tokens per row (default: the training seq_len recorded in the folder, else 512);
      a longer reply keeps its first ``max_len - len(prompt)`` tokens.
    system_prompt: the system message (default: the one the model was trained with).
    param_dtype, dtype: parameter and compute dtypes.
  """

  def __init__(self, path: str, *, batch_size: int = 16, max_len: int | None = None,
               system_prompt: str | None = None, param_dtype: str = "float32",
               dtype: str | None = None):
    for key, value in (("batch_size", batch_size), ("max_len", max_len)):
      if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                or value < 1):  # batch_size < 0 scored nothing, silently
        raise ValueError(f"RewardModelScorer: {key} must be a positive integer, got {value!r}")
    import jax
    from flax import nnx
    from postrl.data.preference import prompt_and_response_ids
    self._ids = prompt_and_response_ids
    self.model, self.tokenizer, meta = load_reward_model(path, param_dtype=param_dtype,
                                                         dtype=dtype)
    self.max_len = int(max_len or meta.get("max_len") or 512)
    self.system_prompt = meta.get("system_prompt") if system_prompt is None else system_prompt
    self.batch_size = batch_size
    graphdef, self._params = nnx.split(self.model)
    self._score = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s))

  def tokens(self, completion: str, prompt: str) -> np.ndarray:
    """The row's token ids (prompt through the assistant header, reply through end-of-turn)."""
    p_ids, r_ids = self._ids(prompt, completion, self.tokenizer,
                             system_prompt=self.system_prompt or None)
    room = self.max_len - len(p_ids)
    if room < 1:
      raise ValueError(f"the prompt has {len(p_ids)} tokens, no room for a reply in max_len="
                       f"{self.max_len}: {prompt[:80]!r}")
    return np.concatenate([p_ids, r_ids[:room]]).astype(np.int32)

  def score(self, completions: Sequence[str], prompts: Sequence[str]) -> list[float]:
    """r(prompt_i, completion_i) for every i, as floats (one pair: ``scorer(c, p)``)."""
    if any(isinstance(x, (str, bytes)) for x in (completions, prompts)):  # scored char by char
      raise ValueError("completions and prompts must be sequences of texts, got a single string; "
                       "score one pair with scorer(completion, prompt)")
    if len(completions) != len(prompts):
      raise ValueError(f"{len(completions)} completions but {len(prompts)} prompts")
    rows = [self.tokens(c, p) for c, p in zip(completions, prompts)]
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      tokens = np.zeros((self.batch_size, self.max_len), np.int32)
      segments = np.zeros((self.batch_size, self.max_len), np.int32)
      for b, ids in enumerate(chunk):
        tokens[b, :len(ids)] = ids
        segments[b, :len(ids)] = 1
      scores = np.asarray(self._score(self._params, tokens, segments))
      out += [float(s) for s in scores[:len(chunk)]]
    return out

  def __call__(self, completion: str, prompt: str) -> float:
    return self.score([completion], [prompt])[0]


def make_reward_model_reward(path: str, **scorer_kwargs):
  """A reward ``(completion, prompt) -> float`` from a saved reward model, for
  ``postrl.rewards.combine_rewards`` registries (``prompt`` is filled from ``problems[i].prompt``).
  ``reward.batch(completions, prompts) -> list[float]`` scores many at once (one compiled call
  per ``batch_size`` rows), and ``reward.scorer`` is the ``RewardModelScorer``."""
  scorer = RewardModelScorer(path, **scorer_kwargs)

  def reward_model_reward(completion: str, prompt: str) -> float:
    return scorer(completion, prompt)

  reward_model_reward.batch = scorer.score
  reward_model_reward.scorer = scorer
  return reward_model_reward
