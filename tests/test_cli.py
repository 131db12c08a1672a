"""The newcomer commands: `python -m postrl.generate` and `python launch.py` (tiny runs)."""

import json
import os
import subprocess
import sys

import pytest

from postrl import generate as generate_cli

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
