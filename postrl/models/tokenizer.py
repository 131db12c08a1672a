"""Tokenizers: HF ``tokenizer.json``, the byte-level BPE embedded in GGUF files, SentencePiece.

All three are wrapped by one ``Tokenizer`` with the same small interface, and chat templates are
rendered by one function (``apply_chat_template``) for training and generation alike: the
template a model ships with (Jinja, as transformers renders it) or ChatML when it has none.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
from typing import Sequence

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# GGUF `tokenizer.ggml.pre` -> pre-tokenizer regex (llama.cpp's names; patterns as published with
# each model's tokenizer.json).
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


# Where recent transformers save a folder's chat template (read before tokenizer_config.json's).
JINJA_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(ValueError):
  """A tokenizer file that cannot be loaded (names the file and the problem)."""


@dataclasses.dataclass
class Tokenizer:
  """A tokenizer with special-token ids and a chat template.

  ``backend`` is a ``tokenizers.Tokenizer`` or a ``sentencepiece.SentencePieceProcessor``.
  """

  backend: object
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  chat_template: str | None = None
  add_bos: bool = False
  source: str = ""

  @property
  def is_sentencepiece(self) -> bool:
    return type(self.backend).__name__ == "SentencePieceProcessor"

  @property
  def vocab_size(self) -> int:
    if self.is_sentencepiece:
      return self.backend.get_piece_size()
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def bos_token(self) -> str | None:
    return None if self.bos_id is None else self.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return None if self.eos_id is None else self.id_to_token(self.eos_id)

  def id_to_token(self, i: int) -> str:
    if self.is_sentencepiece:
      return self.backend.id_to_piece(i)
    return self.backend.id_to_token(i)

  def token_to_id(self, token: str) -> int | None:
    if self.is_sentencepiece:
      i = self.backend.piece_to_id(token)
      return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
    return self.backend.token_to_id(token)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Text -> ids. Special tokens written in the text (e.g. ``<|im_start|>``) map to their ids."""
    add_bos = self.add_bos if add_bos is None else add_bos
    if self.is_sentencepiece:
      ids = list(self.backend.encode(text))
    else:
      ids = list(self.backend.encode(text, add_special_tokens=False).ids)
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self.is_sentencepiece:
      if skip_special_tokens:
        ids = [i for i in ids if not self.backend.is_control(i)]
      return self.backend.decode(ids)
    return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """Renders ``[{"role": ..., "content": ...}, ...]`` with the model's template (ChatML if none)."""
    return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=self.eos_token or "")

  def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
    return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                       add_bos=False)


def render_chat_template(template: str, messages, *, add_generation_prompt: bool, bos_token: str = "",
                         eos_token: str = "") -> str:
  """Renders a Jinja chat template the way transformers does (sandboxed, trimmed blocks)."""
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
  return _compiled_template(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt,
      bos_token=bos_token, eos_token=eos_token)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
  """Compiling a template costs ~2 ms, 30x a render: data pipelines render one per example."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def _checked_template(value, where: str) -> str | None:
  """The chat template stored as ``value`` (a Jinja string, or transformers' list of named
  templates, of which the default is taken), compiled now so that a syntax error names the file
  and field (``where``) at load rather than surfacing at the first render. None stays None."""
  import jinja2  # pylint: disable=import-outside-toplevel
  if isinstance(value, list):  # named templates: the default, as transformers picks it
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
               and isinstance(t.get("template"), str) for t in value):
      raise TokenizerError(f"{where}: must be a Jinja string or a list of {{'name': ..., "
                           f"'template': ...}} objects, got {value!r:.80}")
    named = {t["name"]: t["template"] for t in value}
    if "default" not in named:
      raise TokenizerError(f"{where}: named templates {sorted(named)} and none is 'default' "
                           "(transformers, too, refuses to pick one)")
    value = named["default"]
  if value is None:
    return None
  if not isinstance(value, str):
    raise TokenizerError(f"{where}: must be a Jinja string or a list of named templates, got "
                         f"{type(value).__name__}")
  try:
    _compiled_template(value)
  except jinja2.TemplateSyntaxError as e:
    raise TokenizerError(f"{where}: not a valid Jinja template (line {e.lineno}: "
                         f"{e.message})") from None
  return value


# --------------------------------------------------------------------------- loaders


def _from_gguf(path: str) -> Tokenizer:
  import gguf  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, Regex  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
    raise TokenizerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (postrl reads "
                         "byte-level BPE, 'gpt2'); load the model's tokenizer.json or "
                         "tokenizer.model instead")
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise TokenizerError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens / merges")
  types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  if len(types) != len(tokens):  # zip would drop the special tokens past the shorter list
    raise TokenizerError(f"{path}: GGUF metadata tokenizer.ggml.token_type has {len(types)} "
                         f"entries for {len(tokens)} tokens")
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
  if bad is not None:
    raise TokenizerError(f"{path}: GGUF metadata tokenizer.ggml.merges entry {bad} "
                         f"{merges[bad]!r} is not two tokens separated by a space")

  def token_id(key):  # a special token's id: None when absent, else a token of the vocabulary
    i = field(key)
    if i is not None and (isinstance(i, bool) or not isinstance(i, numbers.Integral)
                          or not 0 <= i < len(tokens)):
      raise TokenizerError(f"{path}: GGUF metadata {key} = {i!r} is not a token id (the "
                           f"vocabulary has {len(tokens)} tokens)")
    return None if i is None else int(i)

  vocab = {t: i for i, t in enumerate(tokens)}
  try:
    bpe = models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=False)
  except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
    raise TokenizerError(f"{path}: GGUF metadata tokenizer.ggml.tokens / merges do not make a BPE "
                         f"tokenizer ({e})") from None
  tok = HFTokenizer(bpe)
  pre = field("tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama-bpe", "llama3"):
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre == "qwen2":
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre in ("default", "gpt2", None):
    tok.pre_tokenizer = byte_level
  else:
    raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; postrl knows "
                         "'smollm', 'gpt2', 'llama-bpe', 'qwen2' (load tokenizer.json instead)")
  tok.decoder = decoders.ByteLevel()
  # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if int(ty) in (3, 4)]
  tok.add_special_tokens(special)
  return Tokenizer(
      backend=tok,
      bos_id=token_id("tokenizer.ggml.bos_token_id"),
      eos_id=token_id("tokenizer.ggml.eos_token_id"),
      pad_id=token_id("tokenizer.ggml.padding_token_id"),
      chat_template=_checked_template(field("tokenizer.chat_template"),
                                      f"{path}: GGUF metadata tokenizer.chat_template"),
      add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
      source=path)


def _special_id(tok, config: dict, key: str, config_path: str, path: str) -> int | None:
  """The id of special token ``key`` ("bos_token", ...) of tokenizer_config.json: None when the
  field is absent or null; a TokenizerError when it names a token the vocabulary lacks."""
  value = config.get(key)
  if isinstance(value, dict):  # a serialised AddedToken
    value = value.get("content", value)
  if value is None:
    return None
  if not isinstance(value, str):
    raise TokenizerError(f"{config_path}: {key} must be a token string (or an object with its "
                         f"'content'), got {value!r}")
  i = tok.token_to_id(value)
  if i is None:
    raise TokenizerError(f"{config_path}: {key} {value!r} is not in the vocabulary of {path}")
  return i


def _read_tokenizer_config(config_path: str | None) -> dict:
  """tokenizer_config.json as a dict ({} when absent), a TokenizerError naming it when broken."""
  if not config_path or not os.path.exists(config_path):
    return {}
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:  # unreadable, JSONDecodeError, UnicodeDecodeError
    raise TokenizerError(f"{config_path}: not a valid tokenizer_config.json ({e})") from None
  if not isinstance(config, dict):
    raise TokenizerError(f"{config_path}: not a valid tokenizer_config.json (a JSON "
                         f"{type(config).__name__}, not an object)")
  return config


def _config_chat_template(config: dict, config_path: str | None) -> str | None:
  """The chat template of an HF tokenizer folder: ``chat_template.jinja`` beside
  tokenizer_config.json if there is one (where recent transformers save it, and read it first),
  else tokenizer_config.json's ``chat_template``."""
  if config_path:
    jinja_path = os.path.join(os.path.dirname(config_path), JINJA_TEMPLATE_FILE)
    if os.path.exists(jinja_path):
      try:
        with open(jinja_path, encoding="utf-8") as f:
          template = f.read()
      except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{jinja_path}: unreadable ({e})") from None
      return _checked_template(template, jinja_path)
  return _checked_template(config.get("chat_template"), f"{config_path}: chat_template")


def _from_tokenizer_json(path: str, config_path: str | None) -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
  try:
    tok = HFTokenizer.from_file(path)
  except Exception as e:
    raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
  config = _read_tokenizer_config(config_path)
  add_bos = config.get("add_bos_token")
  if add_bos is not None and not isinstance(add_bos, bool):  # bool("false") would be True
    raise TokenizerError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r}")
  return Tokenizer(backend=tok, bos_id=_special_id(tok, config, "bos_token", config_path, path),
                   eos_id=_special_id(tok, config, "eos_token", config_path, path),
                   pad_id=_special_id(tok, config, "pad_token", config_path, path),
                   chat_template=_config_chat_template(config, config_path),
                   add_bos=bool(config.get("add_bos_token", False)), source=path)


def _from_sentencepiece(path: str) -> Tokenizer:
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor()
  try:
    sp.load(path)
  except Exception as e:
    raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from None

  def valid(i):
    return None if i < 0 else i

  return Tokenizer(backend=sp, bos_id=valid(sp.bos_id()), eos_id=valid(sp.eos_id()),
                   pad_id=valid(sp.pad_id()), add_bos=True, source=path)


def load_tokenizer(name_or_path: str) -> Tokenizer:
  """Loads a tokenizer from a shipped model name, a .gguf, a tokenizer.json, a SentencePiece
  ``.model`` file, or an HF directory holding one of them (with tokenizer_config.json)."""
  from postrl.models.weights import resolve_model_path  # pylint: disable=import-outside-toplevel
  path = resolve_model_path(name_or_path)
  if os.path.isdir(path):
    for candidate in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(path, candidate)):
        if candidate == "tokenizer.json":
          return _from_tokenizer_json(os.path.join(path, candidate),
                                      os.path.join(path, "tokenizer_config.json"))
        tok = _from_sentencepiece(os.path.join(path, candidate))
        config_path = os.path.join(path, "tokenizer_config.json")
        tok.chat_template = _config_chat_template(_read_tokenizer_config(config_path), config_path)
        return tok
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if ggufs:
      return _from_gguf(os.path.join(path, ggufs[0]))
    raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or .gguf file")
  if path.endswith(".gguf"):
    return _from_gguf(path)
  if path.endswith(".json"):
    return _from_tokenizer_json(path, os.path.join(os.path.dirname(path), "tokenizer_config.json"))
  if path.endswith(".model"):
    return _from_sentencepiece(path)
  raise TokenizerError(f"{path}: unknown tokenizer file type (expected .gguf, .json or .model)")


def check_fits(tok: Tokenizer, vocab_size: int, source: str) -> Tokenizer:
  """``tok`` when its ids index the model's embedding (its vocabulary <= the model's
  ``vocab_size``; models often pad theirs); else a ``TokenizerError`` naming ``source``: ids past
  the model's vocabulary would read no embedding row (NaN) or another token's."""
  if tok.vocab_size > vocab_size:
    raise TokenizerError(f"{source}: the tokenizer has {tok.vocab_size} tokens, more than the "
                         f"model's vocabulary of {vocab_size}: they do not belong together")
  return tok


def save_tokenizer(tok: Tokenizer, directory: str) -> None:
  """Writes tokenizer.json + tokenizer_config.json (HF-style) for a ``tokenizers`` backend."""
  if tok.is_sentencepiece:
    raise TokenizerError("save_tokenizer writes tokenizer.json; copy the SentencePiece .model file")
  os.makedirs(directory, exist_ok=True)
  tok.backend.save(os.path.join(directory, "tokenizer.json"))
  config = {"chat_template": tok.chat_template, "add_bos_token": tok.add_bos,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": None if tok.pad_id is None else tok.id_to_token(tok.pad_id),
            "tokenizer_class": "PreTrainedTokenizerFast"}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  jinja_path = os.path.join(directory, JINJA_TEMPLATE_FILE)
  if os.path.exists(jinja_path):  # it would be read before tokenizer_config.json's template
    if tok.chat_template is None:
      os.remove(jinja_path)
    else:
      with open(jinja_path, "w", encoding="utf-8") as f:
        f.write(tok.chat_template)
