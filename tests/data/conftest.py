"""Tokenizers for the data tests: the real SmolLM2 one (session-scoped) and a tiny fake."""

import re

import pytest


class FakeTokenizer:
  """One id per character (``ord(c) + 10``); ChatML specials are single ids, like SmolLM2's.

  pad 0, ``<s>`` 1 (bos), ``<|im_end|>`` 2 (eos, the end-of-turn token), ``<|im_start|>`` 3.
  ``encode_chat`` renders ChatML exactly as ``postrl.models.tokenizer.CHATML_TEMPLATE``.
  """

  SPECIAL = {"<pad>": 0, "<s>": 1, "<|im_end|>": 2, "<|im_start|>": 3}
  _SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")

  def __init__(self, add_bos=False):
    self.pad_id, self.bos_id, self.eos_id, self.add_bos = 0, 1, 2, add_bos

  def encode(self, text, *, add_bos=None):
    ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
    for part in self._SPLIT.split(text):
      ids += [self.SPECIAL[part]] if part in self.SPECIAL else [ord(c) + 10 for c in part]
    return ids

  def decode(self, ids):
    inverse = {v: k for k, v in self.SPECIAL.items()}
    return "".join(inverse.get(int(i)) or chr(int(i) - 10) for i in ids)

  @staticmethod
  def render(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

  def encode_chat(self, messages, *, add_generation_prompt=True):
    return self.encode(self.render(messages, add_generation_prompt), add_bos=False)


@pytest.fixture(scope="session")
def fake_tokenizer():
  return FakeTokenizer()


@pytest.fixture(scope="session")
def smollm_tokenizer():
  from postrl.models import load_tokenizer  # pylint: disable=import-outside-toplevel
  return load_tokenizer("smollm2-135m-instruct")
