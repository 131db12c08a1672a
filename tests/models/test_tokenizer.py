"""Tokenizers: GGUF-embedded BPE vs transformers, tokenizer.json and SentencePiece round trips."""

import os

import pytest

from postrl.models import TokenizerError, load_tokenizer, save_tokenizer
from postrl.models.tokenizer import CHATML_TEMPLATE, Tokenizer, render_chat_template
from postrl.models.weights import resolve_model_path

TEXTS = [
    "What is 12 + 30?",
    "héllo wörld — naïve café, 你好世界 🙂👍🏽",
    "  leading spaces\n\nnew lines\ttabs  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "1234567 x 89 = -0.5e3",
    "don't I'll we've THEY'RE",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def smol():
  return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_round_trips(smol, text):
  assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skippable(smol):
  ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == smol.token_to_id("<|im_start|>") == 1
  assert ids[-1] == smol.eos_id == 2
  assert smol.decode(ids) == "user\nhi"


def test_gguf_tokenizer_matches_transformers(smol):
  transformers = pytest.importorskip("transformers")
  path = resolve_model_path("smollm2-135m-instruct")
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  for text in TEXTS:
    assert smol.encode(text) == ref(text, add_special_tokens=False).input_ids, text
  messages = [{"role": "user", "content": "What is 12 + 30?"}]
  assert smol.apply_chat_template(messages) == ref.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}]
  assert smol.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=False)


def test_chat_template_is_the_models_own(smol):
  text = smol.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert smol.encode_chat([{"role": "user", "content": "Hi"}]) == smol.encode(text)


def test_chatml_default_template():
  text = render_chat_template(CHATML_TEMPLATE, [{"role": "user", "content": "Hi"}],
                              add_generation_prompt=True)
  assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  with pytest.raises(ValueError, match="chat message 0"):
    render_chat_template(CHATML_TEMPLATE, [{"content": "no role"}], add_generation_prompt=True)


def test_tokenizer_json_round_trip(smol, tmp_path):
  save_tokenizer(smol, str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  for text in TEXTS:
    assert again.encode(text) == smol.encode(text)
  assert (again.bos_id, again.eos_id, again.pad_id) == (smol.bos_id, smol.eos_id, smol.pad_id)
  assert again.chat_template == smol.chat_template


def test_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog",
                               "héllo wörld, naïve café", "numbers 0 1 2 3 4 5 6 7 8 9"] * 50))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=304, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
                                 bos_id=1, eos_id=2, pad_id=0, unk_id=3)
  tok = load_tokenizer(str(tmp_path / "sp.model"))
  assert isinstance(tok, Tokenizer) and tok.is_sentencepiece
  for text in ["the lazy fox", "naïve café 你好"]:  # 你好 is unseen: byte fallback
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1
    assert tok.decode(ids) == text


def test_bad_tokenizer_files(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
    load_tokenizer(str(bad))
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
    load_tokenizer(str(tmp_path / "x.txt"))
