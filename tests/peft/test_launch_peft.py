"""PEFT through launch.py (SFT, 8 CPU devices, mesh data x fsdp x tensor = 2 x 2 x 2): adapter-only
checkpoints and resume, the merged export, and one-line errors for bad settings."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from postrl import peft
from postrl.metrics import read_metrics
from postrl.models import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(model_dir, workdir, *extra):
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/sft_arith_lora.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--config.steps=2",
          "--config.batch_size=8", "--config.seq_len=64", "--config.data.num_train=200",
          "--config.eval.num_problems=0", "--config.optim.warmup_steps=1", "--config.log_every=1",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", "--cpu_devices=8", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_sft_resumes_from_adapter_only_checkpoint_and_exports(tiny_model_dir, tmp_path):
  full = _run(tiny_model_dir, tmp_path / "full", "--config.steps=4", "--config.save_model=True")
  assert full.returncode == 0, full.stderr[-3000:]
  assert "trainable of" in full.stdout
  workdir = tmp_path / "cut"
  first = _run(tiny_model_dir, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  # the checkpoint holds the adapters and their Adam moments, not the 1.6M-parameter base
  base_bytes = os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors"))
  assert _dir_bytes(workdir / "checkpoints") < base_bytes / 4
  again = _run(tiny_model_dir, workdir, "--config.steps=4", "--config.save_model=True")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout
  np.testing.assert_allclose([_losses(workdir)[s] for s in (1, 2, 3, 4)],
                             [_losses(tmp_path / "full")[s] for s in (1, 2, 3, 4)], rtol=1e-5)
  # merged export == base + adapters, through load_pretrained
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 1000, (2, 12)), jnp.int32)
  adapted = peft.load_adapters(load_pretrained(tiny_model_dir), str(workdir))
  merged = load_pretrained(str(workdir / "model"))
  base = load_pretrained(tiny_model_dir)
  assert not np.allclose(adapted(tokens), base(tokens), atol=1e-4)  # training changed something
  np.testing.assert_allclose(merged(tokens), adapted(tokens), rtol=1e-4, atol=1e-4)
  config = json.loads((workdir / "adapter_config.json").read_text())
  assert config["method"] == "lora" and config["rank"] == 8 and config["alpha"] == 16.0


def test_resume_on_another_base_is_refused(tiny_model_dir, tmp_path):
  first = _run(tiny_model_dir, tmp_path / "w")
  assert first.returncode == 0, first.stderr[-3000:]
  other = _run(tiny_model_dir, tmp_path / "w", "--config.steps=4", "--config.peft.rank=4")
  assert other.returncode == 1
  last = other.stderr.strip().splitlines()[-1]
  assert last.startswith("error: CheckpointError") and "rank" in last


@pytest.mark.parametrize("method", ["qlora", "dora", "prompt", "prefix"])
def test_other_methods_train_two_steps_on_the_mesh(tiny_model_dir, tmp_path, method):
  extra = ["--config.peft.num_virtual_tokens=4"] if method in ("prompt", "prefix") else []
  proc = _run(tiny_model_dir, tmp_path, f"--config.peft.method={method}",
              "--config.save_model=True",
              "--config.eval.num_problems=2", "--config.eval.batch_size=2",
              "--config.eval.max_new_tokens=3", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = _losses(tmp_path)
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  assert (tmp_path / "adapter.safetensors").exists()
  assert (tmp_path / "model").exists() == (method in ("qlora", "dora"))


@pytest.mark.parametrize("override,message", [
    ("--config.peft.targets=self_attn\\.qq_proj", "matches no Linear layer"),
    ("--config.peft.rank=0", "config.peft.rank must be a positive integer"),
    ("--config.peft.method=lorra", "unknown method 'lorra'"),
])
def test_bad_peft_settings_are_one_line_errors(tiny_model_dir, tmp_path, override, message):
  proc = _run(tiny_model_dir, tmp_path, override)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: PEFTError") and message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
