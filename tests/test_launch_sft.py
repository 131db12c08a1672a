"""launch.py runs SFT: single process x 8 devices == 2 processes x 4 devices (gloo on loopback),
and a run killed with SIGTERM resumes to the same losses. A tiny random model with the real
SmolLM2 tokenizer keeps each run to seconds of compute."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from postrl.metrics import read_metrics
from postrl.models import Transformer, load_tokenizer, save_pretrained, save_tokenizer
from tests.conftest import tiny_config  # noqa: F401  (tiny_model_dir fixture: conftest)
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model_dir, workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/sft_arith.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--config.steps=4",
          "--config.batch_size=8", "--config.seq_len=64", "--config.data.num_train=200",
          "--config.eval.num_problems=0", "--config.optim.warmup_steps=1",
          "--config.optim.lr=1e-3", "--config.log_every=1", "--config.vocab_chunk=8192",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", *extra]


def _env(cache=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if cache:  # as conftest: the runs of one test compile the same programs once
    env.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE_DIR)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def test_two_processes_match_one(tiny_model_dir, tmp_path):
  # seq 128 packs several examples per row; a 2-step eval runs generate on 2 processes
  extra = ("--config.seq_len=128", "--config.eval.num_problems=4", "--config.eval.batch_size=4",
           "--config.eval.max_new_tokens=4")
  one = subprocess.run(_args(tiny_model_dir, tmp_path / "one", "--cpu_devices=8", *extra),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  # absl INFO lines (orbax's checkpoint manager, every save) only with --verbosity=0
  assert not re.search(r"^I\d{4} ", one.stderr, re.M), one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      _args(tiny_model_dir, tmp_path / "two", "--cpu_devices=4", *extra,
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
      # no compilation cache: process 0 alone would write it, and nothing here reads it back
      cwd=ROOT, env=_env(cache=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1 of 2: 4 local / 8 global devices" in outs[1][0]
  want, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(want) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert want[4] < want[1]
  summary = json.loads((tmp_path / "two" / "results.json").read_text())
  assert summary["num_devices"] == 8 and summary["steps"] == 4
  reference = json.loads((tmp_path / "one" / "results.json").read_text())
  assert [r["completion"] for r in summary["eval_after"]] == [
      r["completion"] for r in reference["eval_after"]]


def test_sigterm_mid_run_then_rerun_resumes(tiny_model_dir, tmp_path):
  # 12 steps: the signal lands after step 2's loss is written (step 3 running), so 8+ steps
  # (~1 s each on the CI CPU) are left to resume and compare; no periodic checkpoint: the stop
  # itself saves
  steps = ("--config.steps=12", "--config.checkpoint.every=100")
  full = subprocess.run(_args(tiny_model_dir, tmp_path / "full", "--cpu_devices=8", *steps),
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  assert sorted(_losses(tmp_path / "full")) == list(range(1, 13))
  workdir = tmp_path / "cut"
  proc = subprocess.Popen(_args(tiny_model_dir, workdir, "--cpu_devices=8", *steps),
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(_losses(workdir) if (workdir / "metrics.jsonl").exists()
                                       else {}) < 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "run the same command again to resume" in out
  cut = _losses(workdir)
  assert 2 <= len(cut) < 12
  again = subprocess.run(_args(tiny_model_dir, workdir, "--cpu_devices=8", *steps),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints'} step {len(cut)}" in again.stdout
  assert _losses(workdir) == _losses(tmp_path / "full")


def _run(*args):
  return subprocess.run(list(args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=600)


@pytest.mark.parametrize("override,message", [
    ("--config.stepz=3", "stepz"),
    ("--config.steps=many", "steps"),
    ("--config.optim.lr=fast", "lr"),
])
def test_bad_config_override_names_the_key(override, message):
  proc = _run(sys.executable, "launch.py", "--config", "configs/sft_arith.py", override)
  assert proc.returncode != 0 and message in proc.stderr


def test_missing_and_empty_dataset_files_are_named(tiny_model_dir, tmp_path):
  missing = tmp_path / "nope.jsonl"
  proc = _run(*_args(tiny_model_dir, tmp_path / "w1", f"--config.data.path={missing}"))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: DataError")
  assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  proc = _run(*_args(tiny_model_dir, tmp_path / "w2", f"--config.data.path={empty}"))
  assert proc.returncode == 1 and str(empty) in proc.stderr and "Traceback" not in proc.stderr
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
  proc = _run(*_args(tiny_model_dir, tmp_path / "w3", f"--config.data.path={bad}"))
  assert proc.returncode == 1 and f"{bad}:2" in proc.stderr and "completion" in proc.stderr


def test_incompatible_workdir_is_an_error(tiny_model_dir, tmp_path):
  workdir = tmp_path / "w"
  first = _run(*_args(tiny_model_dir, workdir, "--cpu_devices=8", "--config.steps=2"))
  assert first.returncode == 0, first.stderr[-2000:]
  other = tmp_path / "other_model"
  tok = load_tokenizer(tiny_model_dir)
  cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64,
                    tie_word_embeddings=True, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                    pad_token_id=tok.pad_id)
  save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), str(other))
  save_tokenizer(tok, str(other))
  args = _args(other, workdir, "--cpu_devices=8", "--config.steps=4")
  proc = _run(*args)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: CheckpointError" in proc.stderr and "hidden_size" in proc.stderr


def test_sft_job_evaluates_before_and_after(tiny_model_dir, tmp_path):
  proc = _run(*_args(tiny_model_dir, tmp_path, "--cpu_devices=8", "--config.steps=2",
                     "--config.eval.num_problems=4", "--config.eval.batch_size=4",
                     "--config.eval.max_new_tokens=4"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert 0.0 <= results["accuracy_before"] <= 1.0 and 0.0 <= results["accuracy_after"] <= 1.0
  assert len(results["eval_before"]) == len(results["eval_after"]) == 4
  evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2]
  assert (tmp_path / "loss.png").exists()
