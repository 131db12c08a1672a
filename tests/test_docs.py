"""What the docs tell a user exists: every command, config key, path and name they mention.

Checks README.md, docs/*.md, kernels/README.md, benchmarks/README.md, experiments/*/README.md and
the configs' docstrings, without running anything long:

* every ``--config.a.b=...`` override of a ``launch.py`` command (in a doc, in an experiment's
  ``--extra=``, or in a config's docstring) names a key of that config's ``get_config()``, and
  every other ``--flag`` is one of launch.py's flags (the configs are locked: a missing key fails
  at start);
* every ``python -m postrl.X`` and ``python experiments/X/run.py`` command parses with its own
  argparse parser (stopped right after parsing);
* every repository path in backticks and every relative Markdown link exists; every dotted
  ``postrl.*`` / ``kernels.*`` name in backticks resolves;
* every registered loss, DPO / GRPO variant, advantage estimator, divergence, PEFT method and
  merging function appears in the doc that lists them (so a new one cannot go undocumented), and
  every function named in those tables exists.

(``benchmarks/`` commands are checked by ``tests/test_benchmark_commands.py``.)
"""

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = (["README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT))
        + ["kernels/README.md", "benchmarks/README.md"]
        + sorted(glob.glob("experiments/*/README.md", root_dir=ROOT)))
DEFAULT_CONFIG = "configs/grpo_arith.py"  # launch.py with no --config
# experiments whose run.py hands --extra=... to launch.py with these configs
EXPERIMENT_CONFIGS = {
    "distillation": ["configs/distill_arith.py"],
    "preference_losses": ["configs/dpo_arith.py"],
    "reward_models": ["configs/rm_arith.py"],
    "rl_algorithms": ["configs/grpo_arith.py", "configs/ppo_arith.py"],
}


def _read(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


def _joined(text):
  """Text with shell line continuations joined."""
  return re.sub(r"\\\n\s*", " ", text)


def _command_tail(text_after):
  """A command's words up to a comment, a closing backtick or a table cell border."""
  return re.split(r"\s#|`|\s\|(?:\s|$)", text_after)[0].strip()


_CONFIGS = {}


def _config(path):
  if path not in _CONFIGS:
    spec = importlib.util.spec_from_file_location(
        "_docs_" + os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)  # the *_lora configs import ``configs.<base>``
    try:
      spec.loader.exec_module(module)
    finally:
      sys.path.remove(ROOT)
    _CONFIGS[path] = module.get_config()
  return _CONFIGS[path]


def _has_key(config, dotted):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def _launch_flags():
  return set(re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", _read("launch.py"))) | {"config"}


def _launch_commands():
  """(source, config file, [words]) of every ``launch.py`` command in the docs and configs."""
  found = []
  for doc in DOCS:
    for m in re.finditer(r"(?:python |`)launch\.py\b([^\n`]*)", _joined(_read(doc))):
      found.append((doc, _command_tail(m.group(1))))
  for path in sorted(glob.glob("configs/*.py", root_dir=ROOT)):
    doc = re.match(r'\s*r?"""(.*?)"""', _read(path), re.S)
    for m in re.finditer(r"launch\.py\b([^\n`]*)", _joined(doc.group(1)) if doc else ""):
      found.append((path, _command_tail(m.group(1))))
  out = []
  for source, tail in found:
    words = shlex.split(tail.replace("$RANK", "0"))
    config = DEFAULT_CONFIG
    for i, w in enumerate(words):
      if w == "--config" and i + 1 < len(words):
        config = words[i + 1]
      elif w.startswith("--config="):
        config = w.split("=", 1)[1]
    out.append((source, config, words))
  return out


def _override_keys(words):
  return [w[len("--config."):].split("=", 1)[0] for w in words if w.startswith("--config.")]


LAUNCH = _launch_commands()


def test_launch_commands_are_found():
  sources = {s for s, _, _ in LAUNCH}
  assert {"README.md", "docs/training.md", "docs/efficiency.md"} <= sources
  assert any(_override_keys(w) for _, _, w in LAUNCH)


@pytest.mark.parametrize("source,config,words", LAUNCH,
                         ids=[f"{s}:{i}" for i, (s, _, _) in enumerate(LAUNCH)])
def test_launch_command_names_existing_config_keys_and_flags(source, config, words):
  assert os.path.exists(os.path.join(ROOT, config)), f"{source}: no config file {config}"
  cfg = _config(config)
  for key in _override_keys(words):
    assert _has_key(cfg, key), f"{source}: {config} has no key {key!r} ({' '.join(words)})"
  flags = _launch_flags()
  for w in words:
    if w.startswith("--") and not w.startswith("--config."):
      assert w[2:].split("=", 1)[0] in flags, f"{source}: launch.py has no flag {w}"


def _experiment_extras():
  out = []
  for doc in sorted(glob.glob("experiments/*/README.md", root_dir=ROOT)):
    name = doc.split("/")[1]
    for key in re.findall(r"--extra=--config\.([\w.]+)", _read(doc)):
      out.append((doc, name, key))
  return out


@pytest.mark.parametrize("doc,name,key", _experiment_extras())
def test_experiment_extra_overrides_exist(doc, name, key):
  configs = EXPERIMENT_CONFIGS[name]
  assert any(_has_key(_config(c), key) for c in configs), f"{doc}: no {key!r} in {configs}"


class _Parsed(BaseException):  # not an Exception: a CLI's own error handling must not catch it
  pass


class _ParseError(BaseException):
  pass


def _cli_commands():
  out = []
  for doc in DOCS:
    text = _joined(_read(doc))
    for m in re.finditer(r"python3? (-m postrl\.\w+|experiments/\w+/run\.py)( [^\n`]*)", text):
      out.append((doc, m.group(1), _command_tail(m.group(2))))
  return out


CLI = _cli_commands()


def test_cli_commands_are_found():
  targets = {t for _, t, _ in CLI}
  assert {"-m postrl.generate", "-m postrl.search", "experiments/compression/run.py"} <= targets


@pytest.mark.parametrize("doc,target,args", CLI,
                         ids=[f"{d}:{t.split('/')[-2] if '/' in t else t[3:]}:{i}"
                              for i, (d, t, _) in enumerate(CLI)])
def test_cli_command_parses(doc, target, args, monkeypatch):
  if target.startswith("-m "):
    module = importlib.import_module(target[3:])
  else:
    spec = importlib.util.spec_from_file_location("_docs_" + target.split("/")[1],
                                                  os.path.join(ROOT, target))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(os.path.join(ROOT, os.path.dirname(target)))
    monkeypatch.syspath_prepend(ROOT)
    spec.loader.exec_module(module)
  parse = argparse.ArgumentParser.parse_args
  errors = []

  def parse_then_stop(self, *a, **k):
    try:
      parse(self, *a, **k)
    except SystemExit as e:
      errors.append(e)
      raise
    raise _Parsed

  def error(self, message):
    raise _ParseError(f"{doc}: {target}{args}: {message}")

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
  monkeypatch.setattr(argparse.ArgumentParser, "error", error)
  try:
    module.main(shlex.split(args.replace("...", "X")))
  except _Parsed:
    return
  except _ParseError as e:
    pytest.fail(str(e))
  pytest.fail(f"{doc}: {target}{args}: main() returned without parsing its arguments")


def _backticked(doc):
  for lineno, line in enumerate(_read(doc).split("\n"), 1):
    for span in re.findall(r"`([^`\n]+)`", line):
      yield lineno, span


def test_paths_and_links_exist():
  missing = []
  for doc in DOCS:
    for lineno, span in _backticked(doc):
      for m in re.finditer(r"(?<![\w/$.])((?:postrl|kernels|benchmarks|experiments|configs|tests|docs)"
                           r"/[\w./-]*)", span):
        path = m.group(1).rstrip("/.")
        if not os.path.exists(os.path.join(ROOT, path)):
          missing.append(f"{doc}:{lineno}: {path}")
    for lineno, line in enumerate(_read(doc).split("\n"), 1):
      for link in re.findall(r"\]\(([^)#\s]+)", line):
        if re.match(r"\w+://", link):
          continue
        target = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), link))
        if target.startswith(ROOT + os.sep) and not os.path.exists(target):  # outside: not ours
          missing.append(f"{doc}:{lineno}: link {link}")
  assert not missing, "\n".join(missing)


def _resolves(dotted):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for p in parts[i:]:
      if not hasattr(obj, p):
        return False
      obj = getattr(obj, p)
    return True
  return False


def test_dotted_names_resolve():
  bad = []
  for doc in DOCS:
    for lineno, span in _backticked(doc):
      for m in re.finditer(r"(?<![\w/.])((?:postrl|kernels)\.[A-Za-z_][\w.]*)", span):
        name = m.group(1).rstrip(".")
        if not name.endswith(".md") and not _resolves(name):
          bad.append(f"{doc}:{lineno}: {name}")
  assert not bad, "\n".join(bad)


def _table_functions(doc, section):
  """Backticked ``name(`` calls in the tables of one section of a doc."""
  text = _read(doc)
  start = text.index(section)
  end = text.find("\n## ", start + 1)
  body = text[start:end if end > 0 else None]
  rows = [line for line in body.split("\n") if line.startswith("|")]
  return set(re.findall(r"`(\w+)\(", "\n".join(rows)))


def test_every_loss_and_variant_is_in_docs_losses():
  from postrl import losses  # pylint: disable=import-outside-toplevel
  from postrl.losses import _distill, _policy  # pylint: disable=import-outside-toplevel
  text = _read("docs/losses.md")
  names = (set(losses.LOSSES) | set(losses.DPO_VARIANTS) | set(_policy.GRPO_VARIANTS)
           | {f.__name__ for f in losses.ADVANTAGES.values()} | set(losses.AGGREGATIONS)
           | set(losses.KL_ESTIMATORS) | set(_distill.DIVERGENCES))
  missing = sorted(n for n in names if not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text))
  assert not missing, f"docs/losses.md does not mention {missing}"
  named = set()
  for section in ("## Supervised", "## Preference", "## Reinforcement", "## Distillation"):
    named |= _table_functions("docs/losses.md", section)
  named |= set(re.findall(r"`(distill\w*)\(", text))  # the distillation functions, named in prose
  unknown = sorted(n for n in named if not hasattr(losses, n))
  assert not unknown, f"docs/losses.md names functions postrl.losses lacks: {unknown}"


def test_peft_and_merging_tables_match_the_code():
  from postrl import merging, peft  # pylint: disable=import-outside-toplevel
  text = _read("docs/efficiency.md")
  missing = [m for m in peft.METHODS if m != "none" and f"| `{m}` |" not in text]
  assert not missing, f"docs/efficiency.md's PEFT table lacks {missing}"
  merging_section = text[text.index("## Merging"):]
  for name in re.findall(r"^\| `(\w+)`", merging_section, re.M):
    assert hasattr(merging, name), f"docs/efficiency.md: postrl.merging has no {name}"
  for name in ("linear", "soup", "greedy_soup", "task_arithmetic", "ties", "dare", "slerp"):
    assert hasattr(merging, name) and f"`{name}`" in merging_section, name


def test_readme_config_table_lists_every_config():
  text = _read("README.md")
  for path in sorted(glob.glob("configs/*.py", root_dir=ROOT)):
    name = os.path.basename(path)
    assert f"`{path}`" in text or f"`{name}`" in text, f"README.md's config table lacks {path}"


def test_every_config_override_named_in_the_docs_exists_in_some_config():
  """Inline mentions (``--config.data.path=...`` in prose) name a key of at least one config."""
  configs = [_config(p) for p in sorted(glob.glob("configs/*.py", root_dir=ROOT))]
  missing = []
  for doc in DOCS:
    for lineno, line in enumerate(_read(doc).split("\n"), 1):
      for key in re.findall(r"--config\.([\w.]*\w)", line):
        if not any(_has_key(c, key) for c in configs):
          missing.append(f"{doc}:{lineno}: --config.{key}")
  assert not missing, "\n".join(missing)


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                                        if not p.endswith(("eval_arith.py", "__init__.py"))))
def test_every_trainer_config_declares_the_runtime_options(path):
  """``--config.remat=full`` (and attention / decode-attention) must work on every job: a locked
  ConfigDict refuses an override of a key it does not declare."""
  config = _config(path)
  for key in ("attention_impl", "remat", "decode_attention_impl", "decode_block_impl"):
    assert _has_key(config, key), f"{os.path.relpath(path, ROOT)} does not declare config.{key}"
