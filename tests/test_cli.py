"""The newcomer commands: `python -m postrl.generate` and `python launch.py` (tiny runs)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from configs import eval_arith
from postrl import evaluate
from postrl import generate as generate_cli
from postrl.models import ConfigError, TokenizerError, Transformer, save_pretrained
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_generate_cli_prints_a_completion(capsys):
  assert generate_cli.main(["--prompt", "What is 12 + 30?", "--max-new-tokens", "8"]) == 0
  out = capsys.readouterr()
  assert out.out.startswith("### What is 12 + 30?\n")
  assert len(out.out.splitlines()[1].strip()) > 0
  assert "tokens/s" in out.err


def test_generate_cli_bad_model_is_a_clear_error(capsys):
  assert generate_cli.main(["--model", "/no/such/model", "--prompt", "hi"]) == 2
  assert "error: /no/such/model: no such file or directory" in capsys.readouterr().err


def _launch(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_launch_eval_config_writes_results(tmp_path):
  proc = _launch("--config", "configs/eval_arith.py", "--workdir", str(tmp_path),
                 "--config.task.num_problems=4", "--config.batch_size=4",
                 "--config.max_new_tokens=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["num_problems"] == 4 and 0.0 <= results["accuracy"] <= 1.0
  assert len(results["records"]) == 4 and "exact-match accuracy" in proc.stdout


def test_launch_rejects_unknown_config_key(tmp_path):
  proc = _launch("--config", "configs/eval_arith.py", "--config.no_such_key=1", timeout=120)
  assert proc.returncode != 0
  assert "no_such_key" in proc.stderr


def test_launch_without_arguments_runs_the_main_job_config(tmp_path):
  # no --config: configs/grpo_arith.py; no --workdir: runs/grpo_arith under the current directory
  # (a bad override stops it before any work, so this only checks what was picked)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         "--config.loss.algorithm=nope"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "workdir: runs/grpo_arith" in proc.stdout
  assert "config.loss.algorithm: unknown 'nope'" in proc.stderr


def test_launch_bad_config_path_is_one_line_not_a_trace():
  proc = _launch("--config", "configs/no_such.py", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == "error: --config configs/no_such.py: no such file"


def test_launch_workdir_under_a_file_fails_before_any_work(tmp_path):
  blocker = tmp_path / "results.json"
  blocker.write_text("{}")
  proc = _launch("--config", "configs/eval_arith.py", "--workdir", str(blocker / "run"),
                 timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == (f"error: --workdir {blocker / 'run'}: {blocker} is a file, "
                                 "not a folder")
  assert "workdir:" not in proc.stdout  # stopped before JAX started or the model loaded


def _eval_config(**overrides):
  config = eval_arith.get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("overrides,message", [
    ({"task.name": "nope"}, "config.task.name: unknown task 'nope'"),
    ({"task.digits": 0}, "config.task: need n >= 0 and digits >= 1"),
    ({"task.num_problems": 0}, "config.task.num_problems must be >= 1, got 0"),
    ({"batch_size": 0}, "config.batch_size must be >= 1, got 0"),
    ({"temperature": -1.0}, "config.temperature must be a finite number >= 0, got -1.0"),
])
def test_eval_job_config_errors_name_the_key_before_the_model_loads(overrides, message):
  config = _eval_config(model="/no/such/model", **overrides)  # loading it would fail differently
  with pytest.raises(ConfigError, match=re.escape(message)):
    evaluate.run(config, None)


def test_eval_job_tokenizer_larger_than_the_model_vocabulary(tiny_model_dir, tmp_path):
  save_pretrained(Transformer(tiny_config(), rngs=nnx.Rngs(0)), str(tmp_path))  # vocab 101
  for name in ("tokenizer.json", "tokenizer_config.json"):  # SmolLM2's: 49152 tokens
    shutil.copy(os.path.join(tiny_model_dir, name), tmp_path / name)
  config = _eval_config(model=str(tmp_path), **{"task.num_problems": 1, "batch_size": 1})
  with pytest.raises(TokenizerError, match="the tokenizer has 49152 tokens, more than the "
                                           "model's vocabulary of 101"):
    evaluate.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
