"""Bad input to generate, pad_prompts, generate_text, process_logits and sample_token: a clear
error naming the argument, never a silently wrong result (each case here used to run on, or fail
deep inside JAX / numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.sampling import generate, generate_text, pad_prompts, process_logits, sample_token
from tests.conftest import tiny_config

PROMPTS = [[5, 6, 7], [10, 11]]  # V = 101
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


def _greedy(model, tokens, lengths, **kw):
  out = generate(model, tokens, lengths, temperature=0.0, max_new_tokens=3, **kw)
  return np.asarray(out.tokens_BxN)


def test_prompt_ids_outside_the_vocabulary_are_refused(model):
  # the embedding gather clamped / wrapped them: a row of garbage tokens, no error
  for bad in (101, -1):
    tokens, lengths = pad_prompts([[5, bad, 7], [10, 11]])
    with pytest.raises(ValueError, match=rf"prompt_BxP: token id {bad} \(row 0, position 1\) is "
                                         r"outside the model's vocabulary \[0, 101\)"):
      generate(model, tokens, lengths, temperature=0.0, max_new_tokens=3)


def test_padding_never_reaches_the_rows_whatever_its_id(model):
  # padding with an id past V gave NaN keys / values in the padded slots, and the short row's
  # prefill attention multiplied them by 0: NaN logits, token 0 every step
  want = _greedy(model, *pad_prompts(PROMPTS))
  for pad in (500, -1):
    np.testing.assert_array_equal(_greedy(model, *pad_prompts(PROMPTS, pad_id=pad)), want)
  # whole-number float tokens and a single EOS id are taken as they are
  tokens, lengths = pad_prompts(PROMPTS)
  np.testing.assert_array_equal(_greedy(model, tokens.astype(np.float32), lengths, eos_ids=2),
                                _greedy(model, tokens, lengths, eos_ids=(2,)))


def test_prompt_arrays_that_a_cast_would_change_are_refused(model):
  tokens, lengths = pad_prompts(PROMPTS)
  with pytest.raises(ValueError, match="prompt_BxP must hold integers .* not whole numbers"):
    generate(model, tokens + 0.5, lengths, temperature=0.0)  # was truncated to the ids below
  with pytest.raises(ValueError, match="lengths_B must hold integers .* not whole numbers"):
    generate(model, tokens, lengths + 0.5, temperature=0.0)
  with pytest.raises(ValueError, match="pad ragged lists with pad_prompts"):
    generate(model, PROMPTS, [3, 2], temperature=0.0)
  with pytest.raises(ValueError, match=r"no rows \(B = 0\)"):  # numpy's "zero-size array"
    generate(model, np.zeros((0, 4), np.int32), np.zeros((0,), np.int32), temperature=0.0)


def test_settings_that_used_to_run_or_crash_deep_are_refused(model):
  tokens, lengths = pad_prompts(PROMPTS)
  cases = [
      (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),  # IndexError in jit
      (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 1"),
      (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),  # ran 2 steps
      (dict(key=KEY, top_k=0), "top_k must be an integer >= 1"),  # ran untruncated
      (dict(key=KEY, top_k=-1), "top_k must be an integer >= 1"),
      (dict(key=KEY, top_k=2.5), "top_k must be an integer >= 1"),  # kept 3 tokens
      (dict(key=KEY, top_k=True), "top_k must be an integer >= 1"),  # top-1
      (dict(key=KEY, temperature="0.7"), "temperature must be a finite number >= 0"),
      (dict(temperature=0.0, eos_ids=(500,)), r"eos_ids must be token ids in \[0, 101\)"),
      (dict(temperature=0.0, eos_ids=(-3,)), r"eos_ids must be token ids in \[0, 101\)"),
      (dict(temperature=0.0, pad_id=2**40), "pad_id must be an int32 integer"),
      (dict(key=0), "key must be one jax.random key"),  # a seed, not a key
      (dict(key=jax.random.split(KEY, 2)), "key must be one jax.random key"),
  ]
  for kwargs, msg in cases:
    with pytest.raises(ValueError, match=msg):
      generate(model, tokens, lengths, **dict(dict(max_new_tokens=3), **kwargs))


def test_pad_prompts_refuses_what_it_would_mangle():
  cases = [
      (([[1, 2]],), dict(multiple=0), "multiple must be an integer >= 1"),  # ZeroDivisionError
      (([[1, 2, 3]],), dict(multiple=-2), "multiple must be an integer >= 1"),
      (([[1.5, 2.0]],), {}, r"prompt #0 must hold integers .* not whole numbers"),  # truncated
      ((["abc"],), {}, "prompt #0 is a string"),
      (("abc",), {}, "got a string"),
      (([[1], []],), {}, "at least one token: prompt #1 is empty"),
      (([],), {}, "no prompts"),
      (([[2**40]],), {}, "do not fit int32"),
      (([[[1, 2]]],), {}, "flat list of token ids"),
      (([[1]],), dict(pad_id=2**40), "pad_id must be an int32 integer"),
  ]
  for args, kwargs, msg in cases:
    with pytest.raises(ValueError, match=msg):
      pad_prompts(*args, **kwargs)
  # a numpy batch used to fail on its truth value
  tokens, lengths = pad_prompts(np.array([[1, 2], [3, 4]]))
  np.testing.assert_array_equal(tokens, [[1, 2], [3, 4]])
  np.testing.assert_array_equal(lengths, [2, 2])


def test_generate_text_refuses_a_bare_string(model):
  # a string is a sequence: it became one prompt per character
  with pytest.raises(ValueError, match="prompts must be a list of strings, got one string"):
    generate_text(model, None, "What is 1 + 1?")
  with pytest.raises(ValueError, match="prompts is empty"):
    generate_text(model, None, [])
  with pytest.raises(ValueError, match="prompt #1 is int"):
    generate_text(model, None, ["a", 3])


def test_process_logits_and_sample_token_check_their_settings():
  x = jax.random.normal(KEY, (2, 10))
  # each used to return garbage: inf / NaN logits (T = 0), the least likely tokens (T < 0), no
  # truncation (k = 0), every token removed (top_p = 0, min_p > 1)
  for kwargs, msg in ((dict(temperature=0.0), "temperature must be a finite number > 0"),
                      (dict(temperature=-1.0), "temperature must be a finite number > 0"),
                      (dict(top_k=0), "top_k must be an integer >= 1"),
                      (dict(top_k=2.5), "top_k must be an integer >= 1"),
                      (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                      (dict(min_p=1.5), r"min_p must be in \[0, 1\)")):
    with pytest.raises(ValueError, match="process_logits: " + msg):
      process_logits(x, **kwargs)
  settings = dict(top_k=None, top_p=None, min_p=None)
  with pytest.raises(ValueError, match="sample_token: temperature must be a finite number >= 0"):
    sample_token(KEY, x, temperature=-1.0, **settings)
  with pytest.raises(ValueError, match="sample_token: key must be one jax.random key"):
    sample_token(jax.random.split(KEY, 2), x, temperature=1.0, **settings)
  with pytest.raises(ValueError, match="non-empty vocabulary axis"):
    sample_token(KEY, jnp.float32(1.0), temperature=1.0, **settings)


def test_leading_dimensions_are_rows():
  # [..., V] used to fail in the threshold search's loop carry (3-D) or its indexing (1-D)
  x = jax.random.normal(KEY, (2, 3, 10))
  rows = x.reshape(6, 10)
  for kwargs in (dict(top_k=3), dict(top_p=0.5, min_p=0.1, temperature=0.7)):
    z = process_logits(x, **kwargs)
    np.testing.assert_array_equal(z, process_logits(rows, **kwargs).reshape(2, 3, 10))
    if "top_k" in kwargs:
      kept = np.isfinite(np.asarray(z))
  token, logp, model_logp = sample_token(KEY, x[0, 0], temperature=0.0, top_k=None, top_p=None,
                                         min_p=None)
  assert token.shape == logp.shape == model_logp.shape == ()
  assert int(token) == int(jnp.argmax(x[0, 0]))
  token, _, _ = sample_token(KEY, x, temperature=1.0, top_k=3, top_p=None, min_p=None)
  assert token.shape == (2, 3)
  assert kept[np.arange(2)[:, None], np.arange(3)[None, :], np.asarray(token)].all()
