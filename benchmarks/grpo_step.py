r"""One GRPO step of postrl against TRL's ``GRPOTrainer`` on the same device, phase by phase.

    python benchmarks/grpo_step.py --time-limit 300                # one GPU: SmolLM2-135M shape
    python benchmarks/grpo_step.py --tiny                          # CPU smoke run, both frameworks
    python benchmarks/grpo_step.py --tiny --no-trl                 # CPU smoke run, postrl only

The workload (issue 9, part 3): ``--prompts`` 8 prompts x ``--group-size`` 8 samples = 64
completions per step, ``--prompt-len`` 64-token prompts, ``--new-tokens`` 256 new tokens with EOS
ignored (every completion is exactly that long), temperature 1 with no top-k / top-p, a KL
penalty to the initial model (``--kl-coef`` 0.04, k3 estimator: the reference log-probs are
computed every step), one optimizer step per rollout (``--updates-per-rollout`` μ = 1: then
neither framework computes old-policy log-probs, the ratio being 1; with μ > 1 both compute them
once per rollout and a "step" is the rollout plus its μ updates). The reward is postrl's
``boxed_format`` (``postrl.rewards.format.boxed_format_reward``), in both frameworks: trivial to
compute, 0 on random text, so the advantages are 0 (every phase still runs in full: nothing
skips work on zero advantages).

Model: a preset shape (``--config``, default smollm2-135m; ``tiny`` for CPU) with random
weights, written once as an HF folder (``config.json`` of ``LlamaForCausalLM``,
``model.safetensors``) with a synthetic word-level tokenizer of the model's vocabulary size
(``t3`` ... ``t{V-1}`` plus ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2; nothing is downloaded). Both
frameworks load that folder: the same weights, the same 64 prompt token ids. ``--dtype``
(default bfloat16 on an accelerator, float32 on CPU) is the parameter and compute dtype of both.

postrl runs what ``postrl.trainers.grpo.run`` runs per step, through its own objects:
``common.start`` (mesh, model, tokenizer from the folder), ``grpo.GRPORollouts`` (sampling, reward,
advantages, rows, reference log-probs) behind ``rollout.RolloutSource``, and
``step.make_train_step`` around ``grpo.grpo_loss_fn`` on the state of ``loop.create_state`` (what
``fit`` runs), on the config of ``configs/grpo_arith.py`` with the workload's overrides. The
rollout's stop ids are cleared (``GRPORollouts.eos = ()``) so EOS is ignored.

TRL runs ``GRPOTrainer.train()`` in a child process (its own CUDA context; JAX then preallocates
only ``--jax-mem-fraction`` of the GPU) with ``num_generations=G``,
``per_device_train_batch_size=P*G`` (one generation batch per optimizer step),
``max_completion_length=N``, ``generation_kwargs={"min_new_tokens": N}`` (EOS ignored),
``beta=--kl-coef``, ``loss_type="grpo"``, ``num_iterations=μ``, ``temperature=1``, ``top_p=1``,
``top_k=0``, ``bf16`` and the model in ``--dtype``, ``gradient_checkpointing=False`` (TRL's
default is True; off is faster and matches postrl, which does not rematerialise), transformers
``generate`` (no vLLM), AdamW lr 1e-5, betas (0.9, 0.99), clip 1.0 as postrl's config.

Phases, per step (seconds, each timed call ends synchronised with the device):

    generation   postrl ``rollout.sample`` (as ``postrl.trainers.grpo`` calls it), TRL
                 ``_generate_single_turn`` (prompt padding, ``generate``, EOS masking, to host)
    logprobs     old-policy (μ > 1) + reference log-probs: postrl ``GRPORollouts.logps``, TRL
                 ``_get_per_token_logps_and_entropies`` under ``no_grad``
    other        the rest of the rollout: tokenising / decoding, rewards, advantages, row layout
                 (postrl ``RolloutSource.next_batch``, TRL ``_generate_and_score_completions``)
    update       loss, backward, clipping and the optimizer step (μ of them)
    total        rollout + update (TRL: ``on_step_begin`` to ``on_step_end`` of its callbacks)

The first step of each framework compiles / warms up and is reported apart; the others are
``--steps`` timed steps, summarised by their median. The JSON (device, versions, date,
settings) is rewritten after every step, and each step is printed as it ends, so a killed run
keeps what it had. ``--time-limit``: postrl's timed steps stop once half of it is spent (all of
it with ``--no-trl``), TRL starts no new step once it is spent (a step in flight ends first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
  sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

_REPLY = "@@trl "  # prefix of the TRL child's protocol lines on its stdout
# Special tokens of the synthetic tokenizer (ids 0, 1, 2, as the presets' bos / eos ids).
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt text, as is
PHASES = ("generation", "logprobs", "other", "update", "total")


# ----------------------------------------------------------------------------- the workload


def word_tokenizer(vocab_size: int):
  """A ``postrl.models.Tokenizer`` over words ``t3`` ... ``t{V-1}`` (one token per
  whitespace-separated word) and ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2: exactly ``V`` ids, so a
  random-weight model of any vocabulary gets a tokenizer without downloading one."""
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
  from tokenizers import models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from postrl.models import Tokenizer  # pylint: disable=import-outside-toplevel
  vocab = {PAD: 0, BOS: 1, EOS: 2, **{f"t{i}": i for i in range(3, vocab_size)}}
  backend = HFTokenizer(models.WordLevel(vocab, unk_token=PAD))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens([PAD, BOS, EOS])
  return Tokenizer(backend=backend, bos_id=1, eos_id=2, pad_id=0, chat_template=CHAT_TEMPLATE)


def prompt_texts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
  """``count`` prompts of ``length`` random non-special words (= tokens) each."""
  ids = np.random.RandomState(seed).randint(3, vocab_size, (count, length))
  return [" ".join(f"t{i}" for i in row) for row in ids]


def write_model_folder(cfg, directory: str, seed: int = 0):
  """The preset ``cfg`` with random weights (``common.random_model``) and ``word_tokenizer`` as
  an HF folder both frameworks load; returns the tokenizer."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.models import save_pretrained, save_tokenizer
  model = common.random_model(cfg, seed)
  save_pretrained(model, directory)  # replaces the folder: the tokenizer goes in after it
  tok = word_tokenizer(cfg.vocab_size)
  save_tokenizer(tok, directory)
  return tok


# ----------------------------------------------------------------------------- timing


class PhaseTimer:
  """Seconds spent in wrapped calls, summed per phase until ``pop()``. ``sync`` runs before and
  after each call (``torch.cuda.synchronize``; nothing for postrl, whose timed calls return host
  arrays)."""

  def __init__(self, sync=None):
    self.sync = sync or (lambda: None)
    self.seconds: dict[str, float] = {}

  def add(self, phase: str, seconds: float):
    self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

  def wrap(self, phase, fn):
    """``fn`` timed into ``phase`` (a name, or ``phase(*args, **kwargs) -> name or None``, None:
    not timed)."""

    def timed(*args, **kwargs):
      name = phase(*args, **kwargs) if callable(phase) else phase
      if name is None:
        return fn(*args, **kwargs)
      self.sync()
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.sync()
        self.add(name, time.perf_counter() - t0)

    return timed

  def pop(self) -> dict[str, float]:
    out, self.seconds = self.seconds, {}
    return out


def step_row(index: int, *, rollout_s: float, update_s: float, phases: dict, **extra) -> dict:
  """One GRPO step's record: the phases (module docstring) in seconds, rounded."""
  gen = phases.get("generation", 0.0)
  old, ref = phases.get("logprobs_old", 0.0), phases.get("logprobs_ref", 0.0)
  row = dict(step=index, warmup=index == 0, generation_s=gen, logprobs_s=old + ref,
             logprobs_old_s=old, logprobs_ref_s=ref, other_s=rollout_s - gen - old - ref,
             rollout_s=rollout_s, update_s=update_s, total_s=rollout_s + update_s)
  row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
  return dict(row, **extra)


def medians(rows: list[dict]) -> dict | None:
  """Median of each phase over the timed (non-warm-up) steps; None when there are none."""
  timed = [r for r in rows if not r["warmup"]]
  if not timed:
    return None
  out = {f"{p}_s": round(statistics.median(r[f"{p}_s"] for r in timed), 4) for p in PHASES}
  return dict(out, timed_steps=len(timed))


def ratios(postrl: dict | None, trl: dict | None) -> dict | None:
  """TRL seconds / postrl seconds per phase (how many times faster postrl is)."""
  if not postrl or not trl:
    return None
  return {p: (round(trl[f"{p}_s"] / postrl[f"{p}_s"], 2) if postrl[f"{p}_s"] > 0 else None)
          for p in PHASES}


# ----------------------------------------------------------------------------- postrl


def grpo_config(args, model_dir: str):
  """``configs/grpo_arith.py`` with this benchmark's workload (module docstring)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    import grpo_arith  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = grpo_arith.get_config()
  mu = args.updates_per_rollout
  config.model = model_dir
  config.param_dtype = config.dtype = args.dtype
  config.steps = mu * (1 + args.steps)
  config.accum_steps = 1                 # the 64 completions in one batch, as TRL's
  config.vocab_chunk = args.vocab_chunk
  config.system_prompt = ""
  config.eval.num_problems = 0
  config.rollout.update(dict(prompts=args.prompts, group_size=args.group_size,
                             max_new_tokens=args.new_tokens, temperature=1.0, top_p=None,
                             batch_size=args.prompts * args.group_size, minibatches=1, epochs=mu,
                             logprob_rows=0))
  config.loss.update(dict(algorithm="grpo", kl_coef=args.kl_coef, kl_estimator="k3"))
  config.rewards = ml_collections.ConfigDict(dict(boxed_format=1.0))
  config.reward_options = ml_collections.ConfigDict()
  return config


def run_postrl(args, model_dir: str, prompts: list[str], budget, results) -> list[dict]:
  """Times warm-up + ``args.steps`` GRPO steps of postrl; appends each to ``results``."""
  import jax  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  from postrl.data.records import Problem  # pylint: disable=import-outside-toplevel
  from postrl.logprobs import model_apply_fn  # pylint: disable=import-outside-toplevel
  from postrl.trainers import common as trainer_common  # pylint: disable=import-outside-toplevel
  from postrl.trainers import grpo  # pylint: disable=import-outside-toplevel
  from postrl.trainers.loop import create_state  # pylint: disable=import-outside-toplevel
  from postrl.trainers.rollout import RolloutSource  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from postrl.trainers.step import make_optimizer, make_train_step

  config = grpo_config(args, model_dir)
  r = config.rollout
  s = grpo.settings(config.loss, max_new_tokens=r.max_new_tokens)
  run_ = trainer_common.start(config)
  problems = [Problem(prompt=p, answer="0") for p in prompts]
  rollouts = grpo.GRPORollouts(config, run_, problems, s, ref_params_host=run_.params)
  rollouts.eos = ()  # EOS ignored: every completion has exactly max_new_tokens tokens
  source = RolloutSource(rollouts, rows_per_rollout=r.prompts * r.group_size,
                         minibatches=r.minibatches, epochs=r.epochs, seed=config.seed)
  tx = make_optimizer(trainer_common.optimizer_config(config))
  state, shardings = create_state(run_.params, tx, seed=config.seed, mesh=run_.mesh)
  loss_fn = grpo.grpo_loss_fn(model_apply_fn(run_.graphdef), s,
                              chunk=config.get("logprob_chunk"), vocab_chunk=config.vocab_chunk)
  step_fn = make_train_step(loss_fn, tx, state_shardings=shardings,
                            batch_sharding=shd.batch_sharding(run_.mesh),
                            accum_steps=config.accum_steps, mesh=run_.mesh)
  results.update(postrl=dict(config=json.loads(config.to_json_best_effort()),
                             prompt_tokens=rollouts.prompt_len, steps=[]))
  timer = PhaseTimer()
  rollouts.logps = timer.wrap(
      lambda params, rows: "logprobs_ref" if params is rollouts.ref else "logprobs_old",
      rollouts.logps)
  limit = budget.seconds if args.no_trl or budget.seconds is None else budget.seconds / 2
  rows, step = [], 0
  with _patched(grpo, "sample", timer.wrap("generation", grpo.sample)):
    for index in range(1 + args.steps):
      if index > 1 and limit is not None and budget.elapsed() > limit:
        common.log(f"[postrl] time limit: {index - 1} of {args.steps} timed steps")
        break
      timer.pop()
      update_s, rollout_s, metrics = 0.0, 0.0, {}
      for _ in range(r.epochs * r.minibatches):  # a rollout, then its updates
        t0 = time.perf_counter()
        host_batch = source.next_batch(state.params, step)
        t1 = time.perf_counter()
        rollout_s += t1 - t0
        metrics.update(source.pop_metrics())
        state, dev_metrics = step_fn(state, shd.put_batch(host_batch, run_.mesh))
        jax.block_until_ready((state, dev_metrics))
        update_s += time.perf_counter() - t1
        step += 1
      dev_metrics = jax.device_get(dev_metrics)
      row = step_row(index, rollout_s=rollout_s, update_s=update_s, phases=timer.pop(),
                     loss=float(dev_metrics["loss"]), finite=float(dev_metrics["step/finite"]),
                     completion_tokens_mean=metrics.get("rollout/completion_tokens_mean"),
                     reward_mean=metrics.get("rollout/reward_mean"))
      rows.append(row)
      results.doc["postrl"]["steps"].append(row)
      results.write()
      common.log(f"[postrl] {json.dumps(row)} ({budget.elapsed():.0f} s)")
  return rows


@contextlib.contextmanager
def _patched(module, name: str, value):
  """``module.name = value`` inside the block (the timing wrapper of a module-level function)."""
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


# ----------------------------------------------------------------------------- TRL


def trl_settings(request: dict, on_gpu: bool) -> dict:
  """``GRPOConfig`` keyword arguments for the workload of ``request`` (module docstring)."""
  n, mu = request["new_tokens"], request["updates_per_rollout"]
  return dict(
      output_dir=request["output_dir"], seed=0, max_steps=mu * (1 + request["steps"]),
      per_device_train_batch_size=request["prompts"] * request["group_size"],
      gradient_accumulation_steps=1, num_generations=request["group_size"],
      max_completion_length=n, generation_kwargs={"min_new_tokens": n},
      temperature=1.0, top_p=1.0, top_k=0, num_iterations=mu, beta=request["kl_coef"],
      loss_type="grpo", epsilon=0.2, learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.99,
      weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
      bf16=on_gpu and request["dtype"] == "bfloat16", gradient_checkpointing=False,
      model_init_kwargs={"dtype": request["dtype"]}, use_vllm=False, save_strategy="no",
      report_to="none", disable_tqdm=True, log_completions=False)


def trl_worker():
  """The TRL child: imports, replies ready, then runs the one request on stdin and replies once
  per optimizer step (everything else it prints goes to stderr)."""
  reply_to = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # transformers and TRL print to stdout: keep the protocol channel clean
  sys.stdout = sys.stderr

  def reply(**fields):
    reply_to.write(_REPLY + json.dumps(fields, default=str) + "\n")
    reply_to.flush()

  try:
    import datasets  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    import trl  # pylint: disable=import-outside-toplevel
    on_gpu = torch.cuda.is_available()
    reply(ready=True, device=torch.cuda.get_device_name() if on_gpu else "cpu",
          versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                        trl=trl.__version__, datasets=datasets.__version__,
                        accelerate=__import__("accelerate").__version__))
  except Exception as e:  # pylint: disable=broad-except  (reported to the parent, which goes on)
    reply(ready=False, error=f"{type(e).__name__}: {e}")
    return
  line = sys.stdin.readline()
  if not line:
    return
  try:
    _trl_train(json.loads(line), reply, on_gpu)
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    reply(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
  reply(done=True)


def _trl_train(request: dict, reply, on_gpu: bool):
  """Builds ``GRPOTrainer`` on the request's model folder and prompts and trains, timing each
  step's phases (module docstring) with wrappers around the trainer's own methods."""
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from postrl.rewards.format import boxed_format_reward  # pylint: disable=import-outside-toplevel
  from trl import GRPOConfig, GRPOTrainer  # pylint: disable=import-outside-toplevel

  deadline = time.perf_counter() + request["time_limit"] if request["time_limit"] else None
  sync = torch.cuda.synchronize if on_gpu else None
  timer = PhaseTimer(sync)
  seen = {}  # prompt and completion lengths of the last rollout

  def boxed_format(completions, **_):
    return [boxed_format_reward(c) for c in completions]

  t0 = time.perf_counter()
  args = GRPOConfig(**trl_settings(request, on_gpu))
  tokenizer = transformers.AutoTokenizer.from_pretrained(request["model_dir"])
  dataset = datasets.Dataset.from_dict({"prompt": request["prompt_texts"]})
  mu = request["updates_per_rollout"]

  class Clock(transformers.TrainerCallback):
    """One reply per GRPO step (a rollout and its μ optimizer steps)."""

    def __init__(self):
      self.t0 = 0.0
      self.rollout = dict(rollout_s=0.0, update_s=0.0)

    def on_step_begin(self, args, state, control, **kwargs):
      del args, state, control, kwargs
      timer.sync()
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      del args, kwargs
      timer.sync()
      seconds = time.perf_counter() - self.t0
      rollout = timer.seconds.pop("rollout", 0.0)
      self.rollout["rollout_s"] += rollout
      self.rollout["update_s"] += seconds - rollout
      if state.global_step % mu:
        return
      reply(row=step_row(state.global_step // mu - 1, phases=timer.pop(), **self.rollout,
                         **seen))
      self.rollout = dict(rollout_s=0.0, update_s=0.0)
      if deadline is not None and time.perf_counter() > deadline:
        control.should_training_stop = True

  trainer = GRPOTrainer(model=request["model_dir"], reward_funcs=boxed_format, args=args,
                        train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
  # pylint: disable=protected-access
  generate = timer.wrap("generation", trainer._generate_single_turn)

  def generate_and_record(prompt_ids, *rest, **kwargs):
    completion_ids, logprobs = generate(prompt_ids, *rest, **kwargs)
    lengths = sorted({len(c) for c in completion_ids})
    seen.update(completion_tokens=[lengths[0], lengths[-1]],  # [min, max] per completion
                prompt_tokens=sorted({len(p) for p in prompt_ids}))
    return completion_ids, logprobs

  def logps_phase(*args, **kwargs):
    if torch.is_grad_enabled():
      return None  # the loss's own forward pass: part of the update
    model = args[0] if args else kwargs.get("model")
    return "logprobs_ref" if model is trainer.ref_model else "logprobs_old"

  trainer._generate_single_turn = generate_and_record
  trainer._get_per_token_logps_and_entropies = timer.wrap(
      logps_phase, trainer._get_per_token_logps_and_entropies)
  trainer._generate_and_score_completions = timer.wrap(
      "rollout", trainer._generate_and_score_completions)
  model = trainer.model
  generation = {k: v for k, v in trainer.generation_config.to_dict().items()
                if k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p",
                         "top_k", "min_p", "eos_token_id", "pad_token_id", "cache_implementation")}
  reply(built=True, build_s=round(time.perf_counter() - t0, 2),
        settings=dict(trl_settings(request, on_gpu), optim=str(trainer.args.optim),
                      attn_implementation=model.config._attn_implementation,
                      model_dtype=str(model.dtype), device=str(model.device),
                      ref_model=trainer.ref_model is not None, generation_config=generation))
  # pylint: enable=protected-access
  trainer.train()


class TRLChild(common.ChildProcess):
  """The TRL child process: ``start()`` launches it (its imports overlap the parent's set-up),
  ``ready(timeout)`` waits for its imports, ``go(request)`` sends the run, ``read(timeout)`` gets
  its next reply. A failure or timeout kills it and returns ``{"error": ...}``."""

  def __init__(self):
    super().__init__(_REPLY, "TRL")

  def start(self):
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker"]
    self.launch(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # never a second JAX pool on GPU

  def ready(self, timeout: float) -> dict:
    info = self.read(timeout)
    if not info.get("ready") and self.error is None:
      self.fail(info.get("error", "TRL failed to start"))
    return info

  def go(self, request: dict):
    self.send(request)


def run_trl(args, child: TRLChild, model_dir: str, prompts: list[str], budget,
            results) -> list[dict]:
  """Sends the run to the TRL child and records its steps as they arrive."""
  left = budget.left() if args.time_limit is not None else None
  child.go(dict(model_dir=model_dir, prompt_texts=prompts, prompts=args.prompts,
                group_size=args.group_size, new_tokens=args.new_tokens,
                steps=args.steps, updates_per_rollout=args.updates_per_rollout,
                kl_coef=args.kl_coef, dtype=args.dtype, time_limit=left,
                output_dir=os.path.join(os.path.dirname(model_dir), "trl")))
  rows, trl = [], results.doc["trl"]
  trl["steps"] = rows
  while True:
    # a step in flight may run past the limit: the child stops after it
    timeout = 3600.0 if left is None else max(budget.left(), 0) + args.trl_grace
    msg = child.read(timeout)
    if "error" in msg:
      trl["error"] = msg["error"]
      common.log(f"[trl] error: {msg['error']}")
    elif "row" in msg:
      rows.append(msg["row"])
      common.log(f"[trl] {json.dumps(msg['row'])} ({budget.elapsed():.0f} s)")
    elif msg.get("built"):
      trl.update(build_s=msg["build_s"], settings=msg["settings"])
      common.log(f"[trl] trainer built in {msg['build_s']} s: {json.dumps(msg['settings'])}")
    results.write()
    if msg.get("done") or ("error" in msg and child.error is not None):
      return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
  """Command-line arguments (``--tiny`` overrides the shape and sizes for a CPU smoke run)."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", choices=sorted(common.PRESETS), default="smollm2-135m")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="params and compute (default: bfloat16 on GPU/TPU, float32 on CPU)")
  parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
  parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
  parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
  parser.add_argument("--new-tokens", type=int, default=256, help="tokens per completion")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  parser.add_argument("--updates-per-rollout", type=int, default=1,
                      help="μ: optimizer steps per rollout (> 1: old log-probs are computed)")
  parser.add_argument("--kl-coef", type=float, default=0.04,
                      help="KL penalty (> 0: reference log-probs every step)")
  parser.add_argument("--vocab-chunk", type=int, default=None,
                      help="postrl log-prob vocabulary chunk (None: full [B, T, V] logits)")
  parser.add_argument("--no-trl", action="store_true", help="skip TRL")
  parser.add_argument("--time-limit", type=float, default=None,
                      help="seconds for the whole run (see the module docstring)")
  parser.add_argument("--trl-grace", type=float, default=120.0,
                      help="seconds a TRL step in flight may run past the time limit")
  parser.add_argument("--jax-mem-fraction", type=float, default=0.45,
                      help="GPU memory JAX preallocates when TRL runs too")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke run: --config tiny --prompt-len 16 --new-tokens 16")
  parser.add_argument("--workdir", default=None,
                      help="folder for the model and TRL's output (default: a temporary one)")
  parser.add_argument("--out", default="benchmarks/results/grpo_step.json")
  parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.tiny:
    args.config, args.prompt_len, args.new_tokens = "tiny", 16, 16
  for name in ("prompts", "group_size", "prompt_len", "new_tokens", "updates_per_rollout"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.group_size < 2:
    parser.error("--group-size must be >= 2 (group advantages)")
  return args


def print_table(postrl: dict | None, trl: dict | None, ratio: dict | None):
  """The summary (the one in docs/benchmarks.md): median seconds per step and phase."""
  fmt = lambda d, p: "-" if not d else f"{d[f'{p}_s']:.3f}"  # noqa: E731
  common.log(f"{'phase':>11} {'postrl s':>9} {'TRL s':>9} {'TRL / postrl':>13}")
  for p in PHASES:
    x = "-" if not ratio or ratio[p] is None else f"{ratio[p]:.2f}x"
    common.log(f"{p:>11} {fmt(postrl, p):>9} {fmt(trl, p):>9} {x:>13}")


def run(args) -> dict:
  """Both frameworks on one workload (module docstring); returns the JSON document."""
  budget = common.Budget(args.time_limit)
  child = None
  if not args.no_trl:
    child = TRLChild()
    child.start()  # its imports overlap our set-up; nothing is timed until it is ready
  workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_step_")
  try:
    return _run(args, budget, child, workdir)
  finally:
    if child is not None:
      child.close()
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)


def _attention_used(cfg, args) -> str:
  """How postrl's full-sequence forwards (log-probs, update) attend: the jobs' default
  ``attention_impl="auto"`` resolved for prompt + completion tokens on this machine."""
  from postrl.models.transformer import full_attention_impl  # pylint: disable=import-outside-toplevel
  return full_attention_impl("auto", args.dtype, cfg.dim_per_head,
                             args.prompt_len + args.new_tokens)


def _run(args, budget, child, workdir):
  import jax  # pylint: disable=import-outside-toplevel
  args.dtype = args.dtype or common.default_dtype()
  env = common.environment()
  cfg = common.model_config(args.config, param_dtype=args.dtype, dtype=args.dtype)
  model_dir = os.path.join(workdir, "model")
  t0 = time.perf_counter()
  write_model_folder(cfg, model_dir)
  # a new batch of prompts for every step (TRL's sampler shuffles them; postrl's permutes them)
  prompts = prompt_texts(args.prompts * (1 + args.steps), args.prompt_len, cfg.vocab_size)
  settings = {k: v for k, v in vars(args).items() if k != "trl_worker"}
  mu = args.updates_per_rollout
  results = common.Results(
      args.out, **env, settings=settings, status="running",
      xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      model=dict(name=args.config, random_weights=True, num_params=cfg.num_params(),
                 config=cfg.to_hf(), folder_s=round(time.perf_counter() - t0, 2)),
      workload=dict(prompts=args.prompts, group_size=args.group_size,
                    completions_per_step=args.prompts * args.group_size,
                    prompt_tokens=args.prompt_len, new_tokens=args.new_tokens, eos="ignored",
                    sampling="temperature 1, no top-k / top-p", kl_coef=args.kl_coef,
                    updates_per_rollout=mu, old_logprobs=mu > 1, reward="boxed_format",
                    dtype=args.dtype, attention_used=_attention_used(cfg, args)),
      trl={"skipped": "--no-trl"} if child is None else {})
  common.log(f"{env['device']} ({env['backend']}), jax {jax.__version__}; {args.config}: "
             f"{cfg.num_params() / 1e6:.1f}M params, {args.dtype}; {args.prompts} prompts x "
             f"{args.group_size} samples, {args.prompt_len} + {args.new_tokens} tokens, "
             f"μ = {mu}, kl {args.kl_coef}")
  if child is not None:
    info = child.ready(timeout=max(min(budget.left(), 600), 1))
    results.update(trl=info)
    common.log(f"[trl] {json.dumps(info)}")

  postrl_rows = run_postrl(args, model_dir, prompts, budget, results)
  trl_rows = []
  if child is not None and child.error is None:
    if budget.over():
      results.doc["trl"]["error"] = "skipped: time limit"
    else:
      trl_rows = run_trl(args, child, model_dir, prompts, budget, results)
  ours, theirs = medians(postrl_rows), medians(trl_rows)
  results.doc["postrl"]["median"] = ours
  if child is not None:
    results.doc["trl"]["median"] = theirs
  ratio = ratios(ours, theirs)
  status = "complete"
  if len(postrl_rows) < 1 + args.steps or (child is not None and len(trl_rows) < 1 + args.steps):
    status = (f"partial: postrl {max(len(postrl_rows) - 1, 0)}, TRL "
              f"{'-' if child is None else max(len(trl_rows) - 1, 0)} of {args.steps} timed steps")
  results.update(ratio_trl_over_postrl=ratio, status=status, elapsed_s=round(budget.elapsed(), 1))
  print_table(ours, theirs, ratio)
  common.log(f"{status}; wrote {args.out}")
  return results.doc


def main(argv=None):
  """The benchmark, or (``--trl-worker``) the TRL child process it starts."""
  args = parse_args(argv)
  if args.trl_worker:
    trl_worker()
    return
  if not args.no_trl:  # leave GPU memory to the TRL process (read when the backend starts)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_mem_fraction))
  run(args)


if __name__ == "__main__":
  main()
