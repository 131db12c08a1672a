"""config.peft in every trainer (DPO, GRPO, PPO, reward model, distillation): only adapters (and a
new head) are trained, the base stays bitwise what was loaded, the reference is the base without
adapters (never the adapted policy), rollouts sample from the adapted policy, checkpoints are
adapter-only and resume. Runs in process on the 8 fake CPU devices, mesh data x fsdp x tensor =
2 x 2 x 2, plus one launch.py run with resume."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl import peft
from postrl.data.records import PreferenceRecord, write_jsonl
from postrl.metrics import read_metrics
from postrl.models import ScoredTransformer, Transformer, load_pretrained
from postrl.trainers import distill, dpo, grpo, ppo, reward_model
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = (("data", -1), ("fsdp", 2), ("tensor", 2))
ADAPTER = re.compile(r"\.lora\.(a|b)$")


# ------------------------------------------------------------------------------------ helpers


def _flat(state) -> dict:
  """{dotted path: numpy array} of an NNX state or a dict of them (host copy)."""
  state = nnx.State(state) if isinstance(state, dict) else state
  return {".".join(str(p) for p in path): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(state)}


class _Captured:
  """Wraps a trainer module's ``fit``: keeps host copies of the trainable params it was given
  and of its ``frozen`` tree as it is when training ends (before the trainer exports), and the
  result."""

  def __init__(self, monkeypatch, module):
    self.calls = []
    real = module.fit

    def fit(loss_fn, params, tx, batches, **kwargs):
      initial = _flat(params)
      result = real(loss_fn, params, tx, batches, **kwargs)
      frozen = kwargs.get("frozen")
      self.calls.append(dict(initial=initial, frozen=None if frozen is None else _flat(frozen),
                             result=result))
      return result

    monkeypatch.setattr(module, "fit", fit)

  @property
  def last(self):
    return self.calls[-1]


def _nonzero_b(monkeypatch, scale=0.5):
  """``peft.apply_peft`` with every LoRA B drawn N(0, scale²) instead of 0: the adapted model
  then differs from its base at step 0."""
  real = peft.apply_peft

  def apply(model, cfg):
    real(model, cfg)
    for i, lin in enumerate(peft.lora_layers(model).values()):
      b = lin.lora.b
      b.set_value(scale * jax.random.normal(jax.random.key(100 + i), b.get_value().shape,
                                            b.get_value().dtype))
    return model

  monkeypatch.setattr(peft, "apply_peft", apply)


def _lora(config, **kw):
  config.peft = peft.default_config()
  config.peft.update(method="lora", **kw)
  return config


def _losses(history):
  return {h["step"]: h["loss"] for h in history if "loss" in h}


def _check_trained(captured, model_dir, *, head=None, prefix=""):
  """Only adapters (and ``head``) are trainable and moved; the frozen base under ``prefix`` is
  bitwise the model loaded from ``model_dir``; every loss is finite."""
  call = captured.last
  result, initial = call["result"], call["initial"]
  final = _flat(result.state.params)
  head_re = re.compile(head) if head else None
  for name in final:
    assert ADAPTER.search(name) or (head_re and head_re.search(name)), name
  assert any(ADAPTER.search(n) for n in final)
  moved = [n for n in final if not np.array_equal(final[n], initial[n])]
  assert any(n.endswith("lora.b") for n in moved), moved
  if head_re:
    assert any(head_re.search(n) for n in moved), moved
  frozen = call["frozen"]
  assert not any(ADAPTER.search(n) for n in frozen)
  base = _flat(nnx.split(load_pretrained(model_dir))[1])
  compared = 0
  for name, want in base.items():
    got = frozen[prefix + name]
    assert got.dtype == want.dtype and np.array_equal(got, want), name
    compared += 1
  assert compared == len(base) > 0
  losses = _losses(result.history)
  assert sorted(losses) == list(range(1, len(losses) + 1)) and len(losses) >= 1
  assert all(np.isfinite(v) for v in losses.values())
  return result


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _assert_merged_export(model_dir, export_dir, *, targets=r"self_attn\.(q|v)_proj"):
  """The merged export differs from the base only in the LoRA-targeted kernels."""
  base, merged = (_flat(nnx.split(load_pretrained(d))[1]) for d in (model_dir, export_dir))
  assert sorted(base) == sorted(merged)
  changed = sorted(n for n in base if not np.array_equal(base[n], merged[n]))
  assert changed and all(re.search(targets, n) for n in changed), changed


# ---------------------------------------------------------------------- peft.api extensions


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "prompt", "prefix"])
def test_base_view_is_the_model_without_adapters(method):
  """``base_view``: the loaded model (QLoRA: its quantized base, = the policy at init since B = 0),
  sharing the frozen arrays, also under jit on abstract shapes; the adapted model differs."""
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 100, (2, 9)), jnp.int32)
  before = model(tokens)
  cfg = peft.default_config()
  cfg.update(method=method, num_virtual_tokens=2, dropout=0.1)
  peft.apply_peft(model, cfg)
  for lin in peft.lora_layers(model).values():  # make the adapted model differ from its base
    lin.lora.b.set_value(jnp.ones_like(lin.lora.b.get_value()))
  graphdef, trainable, frozen = peft.split_trainable(model)
  full = peft.combine(trainable, frozen)
  base_graphdef, to_base = peft.base_view(graphdef, jax.eval_shape(lambda: full))
  base = to_base(full)
  assert not any(isinstance(v, (peft.AdapterParam, peft.DropoutKey))
                 for _, v in nnx.to_flat_state(base))
  base_ids = {id(v.get_value()) for _, v in nnx.to_flat_state(base)}
  assert base_ids <= {id(v.get_value()) for _, v in nnx.to_flat_state(frozen)}  # no copy
  out = jax.jit(lambda s: nnx.merge(base_graphdef, to_base(s))(tokens))(full)
  assert not np.allclose(nnx.merge(graphdef, full)(tokens), out, atol=1e-3)
  if method == "qlora":
    for lin in peft.lora_layers(model).values():
      lin.lora.b.set_value(jnp.zeros_like(lin.lora.b.get_value()))
    np.testing.assert_allclose(out, model(tokens), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, before, atol=1e-4)
  else:
    np.testing.assert_allclose(out, before, rtol=1e-5, atol=1e-5)


def test_split_trainable_modules_to_save_adds_a_new_head():
  rm = ScoredTransformer(Transformer(tiny_config(), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  peft.apply_lora(rm.backbone, rank=2, alpha=4.0, targets=peft.DEFAULT_TARGETS)
  _, trainable, frozen = peft.split_trainable(rm, modules_to_save=reward_model.HEAD)
  names = sorted(_flat(trainable))
  assert names[-2:] == ["head.bias", "head.kernel"]
  assert all(ADAPTER.search(n) for n in names[:-2]) and len(names) == 2 + 4 * 2
  assert not any(n.startswith("head.") for n in _flat(frozen))
  assert sorted(_flat(peft.split_trainable(rm)[1])) == names[:-2]
  with pytest.raises(peft.PEFTError, match="matches no parameter"):
    peft.split_trainable(rm, modules_to_save=r"^value_head\.")
  with pytest.raises(peft.PEFTError, match="not a valid regex"):
    peft.split_trainable(rm, modules_to_save="(")


# ----------------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  write_jsonl(path, [PreferenceRecord(f"What is {i} + 1?", f"{i + 1}", f"{i + 2} maybe")
                     for i in range(8)])
  return str(path)


def _dpo_config(model_dir, pairs, **kw):
  from configs import dpo_arith_lora  # pylint: disable=import-outside-toplevel
  config = dpo_arith_lora.get_config()
  config.update(model=model_dir, steps=2, batch_size=4, seq_len=48, mesh=MESH)
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.data.update(path=pairs)
  config.eval.update(num_problems=0, before=False)
  config.loss.update(**kw)
  return config


def test_dpo_lora_trains_only_adapters_from_the_reference_loss(tiny_model_dir, tmp_path,
                                                                monkeypatch, pairs_file):
  """B = 0 at init: policy = reference, so step 1's loss is log 2; then only adapters move."""
  captured = _Captured(monkeypatch, dpo)
  summary = dpo.run(_dpo_config(tiny_model_dir, pairs_file), str(tmp_path / "w"))
  result = _check_trained(captured, tiny_model_dir)
  assert summary["first_loss"] == pytest.approx(math.log(2), rel=1e-5)
  assert summary["num_devices"] == 8 and summary["steps"] == 2
  assert _losses(result.history)[2] != summary["first_loss"]
  assert (tmp_path / "w" / "adapter.safetensors").exists()


def test_dpo_reference_is_the_base_not_the_adapted_policy(tiny_model_dir, monkeypatch,
                                                          pairs_file):
  """With B != 0 at init the adapted policy differs from the base: a reference computed from the
  adapted params would give margin 0 and loss log 2 at step 1. Cached and online agree."""
  _nonzero_b(monkeypatch)
  captured = _Captured(monkeypatch, dpo)
  first_losses = {}
  for reference in ("cached", "online"):
    config = _dpo_config(tiny_model_dir, pairs_file, reference=reference)
    config.steps = 1
    first_losses[reference] = dpo.run(config, None)["first_loss"]
    first = captured.last["result"].history[0]
    assert abs(first["rewards/margin"]) > 1e-3 and abs(first["rewards/chosen"]) > 1e-3
    assert abs(first_losses[reference] - math.log(2)) > 1e-4
  assert first_losses["cached"] == pytest.approx(first_losses["online"], rel=1e-5)


@pytest.mark.parametrize("method,at_reference", [("qlora", True), ("prompt", False)])
def test_dpo_reference_of_other_methods(tiny_model_dir, pairs_file, method, at_reference):
  """QLoRA's reference is its quantized base, = the policy at init (loss log 2; the float model
  would not give it); prompt tuning's is the model without virtual tokens (loss != log 2).
  Cached and online agree."""
  first_losses = []
  for reference in ("cached", "online"):
    config = _dpo_config(tiny_model_dir, pairs_file, reference=reference)
    config.steps = 1
    config.peft.update(method=method, num_virtual_tokens=2)
    first_losses.append(dpo.run(config, None)["first_loss"])
  assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-5)
  assert (abs(first_losses[0] - math.log(2)) < 1e-5) == at_reference, first_losses


def test_dpo_online_reference_reads_the_base_out_of_the_policy(tiny_model_dir):
  """``OnlineReference(from_policy=base_view(...))`` gives the base model's log-probs for the
  adapted policy's params (unit level, hand-made adapters)."""
  model = load_pretrained(tiny_model_dir)
  base_graphdef, base_params = nnx.split(load_pretrained(tiny_model_dir))
  peft.apply_lora(model, rank=2, alpha=4.0, targets=peft.DEFAULT_TARGETS)
  for lin in peft.lora_layers(model).values():
    lin.lora.b.set_value(jnp.ones_like(lin.lora.b.get_value()))
  graphdef, trainable, frozen = peft.split_trainable(model)
  full = peft.combine(trainable, frozen)
  ref_graphdef, to_base = peft.base_view(graphdef, full)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 500, (2, 10)), jnp.int32)
  base_out = nnx.merge(base_graphdef, base_params)(tokens)
  np.testing.assert_array_equal(nnx.merge(ref_graphdef, to_base(full))(tokens), base_out)
  assert not np.allclose(nnx.merge(graphdef, full)(tokens), base_out, atol=1e-3)
  assert len(jax.tree.leaves(to_base(full))) == len(jax.tree.leaves(base_params))


# ---------------------------------------------------------------------------------------- GRPO


def _grpo_config(model_dir, **loss):
  from configs import grpo_arith_lora  # pylint: disable=import-outside-toplevel
  config = grpo_arith_lora.get_config()
  config.update(model=model_dir, steps=2, mesh=MESH, accum_steps=1)
  config.rollout.update(prompts=2, group_size=4, max_new_tokens=6, batch_size=8)
  config.eval.update(num_problems=2, batch_size=2, max_new_tokens=3, before=False)
  config.data.update(num_train=20)
  config.optim.update(lr=1e-2)
  config.checkpoint.update(every=2)
  config.loss.update(kl_coef=0.1, **loss)
  return config


def test_grpo_lora_samples_from_the_adapted_policy_against_the_base(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
  """B != 0: the sampler's log-probs equal the trainer's adapted ones (mismatch ~ 0: rollouts
  come from the adapted model) while the KL to the reference is clearly > 0 (the reference is
  the base). Only adapters move; the base stays bitwise."""
  _nonzero_b(monkeypatch)
  captured = _Captured(monkeypatch, grpo)
  grpo.run(_grpo_config(tiny_model_dir), str(tmp_path / "w"))
  result = _check_trained(captured, tiny_model_dir)
  first = result.history[0]
  assert first["rollout/logp_mismatch"] < 1e-4
  assert first["kl/ref"] > 1e-3


def test_grpo_lora_adapter_only_checkpoint_resumes_like_a_straight_run(tiny_model_dir, tmp_path,
                                                                      monkeypatch):
  """2 steps, then steps=4 in the same workdir: resumes at step 2 from a checkpoint far smaller
  than the base, with the losses of an uninterrupted 4-step run (KL term with B = 0: KL(0) = 0)."""
  captured = _Captured(monkeypatch, grpo)
  config = _grpo_config(tiny_model_dir)
  config.eval.num_problems = 0
  first = grpo.run(config, str(tmp_path / "cut"))
  assert first["steps"] == 2 and captured.last["result"].history[0]["kl/ref"] < 1e-6
  base_bytes = os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors"))
  assert _dir_bytes(tmp_path / "cut" / "checkpoints") < base_bytes / 4
  config.steps = 4
  again = grpo.run(config, str(tmp_path / "cut"))
  assert again["resumed_from"] == 2 and again["steps"] == 4
  resumed = _losses(captured.last["result"].history)
  straight = grpo.run(config, str(tmp_path / "straight"))
  assert straight["resumed_from"] is None
  want = _losses(captured.last["result"].history)
  assert sorted(resumed) == [3, 4]
  np.testing.assert_allclose([resumed[3], resumed[4]], [want[3], want[4]], rtol=1e-5)


# ----------------------------------------------------------------------------------------- PPO


def _ppo_config(model_dir, **kw):
  from configs import ppo_arith  # pylint: disable=import-outside-toplevel
  config = _lora(ppo_arith.get_config())
  config.update(model=model_dir, steps=2, mesh=MESH, accum_steps=1, **kw)
  config.rollout.update(prompts=4, group_size=2, max_new_tokens=6, batch_size=8)
  config.eval.update(num_problems=2, batch_size=2, max_new_tokens=3, before=False)
  config.data.update(num_train=20)
  config.optim.update(lr=1e-2)
  return config


@pytest.mark.parametrize("shared", [True, False])
def test_ppo_lora_trains_adapters_and_value_head(tiny_model_dir, tmp_path, monkeypatch, shared):
  """Trainable: the policy's (and a separate critic's) adapters plus the new value head; the
  policy base is bitwise the loaded model; rollouts come from the adapted policy (B != 0,
  mismatch ~ 0) and the KL reference is its base (KL > 0); the export is the policy."""
  _nonzero_b(monkeypatch)
  captured = _Captured(monkeypatch, ppo)
  config = _ppo_config(tiny_model_dir, shared_trunk=shared, save_model=True)
  config.loss.update(kl_coef=0.1, kl_in_reward=shared)
  ppo.run(config, str(tmp_path / "w"))
  result = _check_trained(captured, tiny_model_dir, head=r"^(value_head|critic\.head)\.",
                          prefix="policy.")
  names = _flat(result.state.params)
  assert any(n.startswith("value_head." if shared else "critic.head.") for n in names)
  assert shared or any(n.startswith("critic.backbone.") for n in names)  # the critic's adapters
  first = result.history[0]
  assert first["rollout/logp_mismatch"] < 1e-4
  assert first["rollout/kl_ref"] > 1e-3 if shared else first["kl/ref"] > 1e-3
  assert (tmp_path / "w" / "adapter.safetensors").exists()
  _assert_merged_export(tiny_model_dir, tmp_path / "w" / "model")


# -------------------------------------------------------------------------------- reward model


def test_reward_model_lora_trains_adapters_and_head_and_saves_both(tiny_model_dir, tmp_path,
                                                                  monkeypatch, pairs_file):
  from configs import rm_arith  # pylint: disable=import-outside-toplevel
  from postrl.models.weights import read_safetensors  # pylint: disable=import-outside-toplevel
  from postrl.rewards import RewardModelScorer  # pylint: disable=import-outside-toplevel
  captured = _Captured(monkeypatch, reward_model)
  config = _lora(rm_arith.get_config())
  config.update(model=tiny_model_dir, steps=2, batch_size=4, seq_len=48, save_model=True,
                mesh=MESH)
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.data.update(path=pairs_file)
  config.eval.update(before=False)
  reward_model.run(config, str(tmp_path / "w"))
  result = _check_trained(captured, tiny_model_dir, head=r"^head\.", prefix="backbone.")
  head = _flat(result.state.params["head"])
  saved = read_safetensors(str(tmp_path / "w" / reward_model.HEAD_FILE))
  np.testing.assert_array_equal(saved["score.weight"], head["kernel"].T)
  np.testing.assert_array_equal(saved["score.bias"], head["bias"])
  model_dir = tmp_path / "w" / "model"
  _assert_merged_export(tiny_model_dir, model_dir)
  scorer = RewardModelScorer(str(model_dir))
  scores = scorer.score(["1", "2 maybe"], ["What is 0 + 1?", "What is 0 + 1?"])
  assert np.all(np.isfinite(scores)) and scores[0] != scores[1]


# ------------------------------------------------------------------------------ distillation


def test_distill_lora_adapts_the_student_only(tiny_model_dir, tmp_path, monkeypatch):
  """The student (1 of the teacher's 2 layers) gets the adapters; the teacher is not adapted,
  rides in the frozen tree (bitwise the loaded model) and is not checkpointed."""
  from configs import distill_arith  # pylint: disable=import-outside-toplevel
  captured = _Captured(monkeypatch, distill)
  config = _lora(distill_arith.get_config())
  config.update(teacher=tiny_model_dir, steps=2, batch_size=8, seq_len=64, mesh=MESH,
                save_model=True)
  config.student.update(num_layers=1)
  config.data.update(num_train=40)
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.eval.update(num_problems=2, batch_size=2, max_new_tokens=3, before=False, teacher=False)
  config.loss.update(name="distill", lmbda=0.0)
  config.loss_positions = 0
  summary = distill.run(config, str(tmp_path / "w"))
  result = _check_trained(captured, tiny_model_dir, prefix="teacher.")
  assert all(n.startswith("student.") for n in _flat(result.state.params))
  frozen = captured.last["frozen"]
  assert any(n.startswith("student.layers.0.") for n in frozen)
  assert not any(n.startswith("student.layers.1.") for n in frozen)
  assert summary["kl_after"] is not None and np.isfinite(summary["kl_after"])
  base_bytes = os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors"))
  assert _dir_bytes(tmp_path / "w" / "checkpoints") < base_bytes / 4  # no teacher, no base
  adapters = json.loads((tmp_path / "w" / peft.ADAPTER_CONFIG).read_text())
  assert adapters["method"] == "lora"
  student = load_pretrained(str(tmp_path / "w" / "model"))
  assert student.config.num_hidden_layers == 1


# ------------------------------------------------------------------------------- launch.py


def _launch(model_dir, workdir, pairs, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/dpo_arith_lora.py",
          "--workdir", str(workdir), f"--config.model={model_dir}", "--cpu_devices=8",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", "--config.steps=2",
          "--config.batch_size=4", "--config.seq_len=48", f"--config.data.path={pairs}",
          "--config.eval.num_problems=0", "--config.optim.lr=1e-2",
          "--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0", *extra]
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_launch_dpo_lora_on_8_devices_resumes_from_the_adapters(tiny_model_dir, tmp_path,
                                                               pairs_file):
  first = _launch(tiny_model_dir, tmp_path, pairs_file)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "peft lora:" in first.stdout and "trainable of" in first.stdout
  metrics = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
  assert [m["step"] for m in metrics] == [1, 2]
  assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
  again = _launch(tiny_model_dir, tmp_path, pairs_file, "--config.steps=4",
                  "--config.save_model=True")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["steps"] == 4 and results["resumed_from"] == 2 and results["num_devices"] == 8
  _assert_merged_export(tiny_model_dir, tmp_path / "model")
