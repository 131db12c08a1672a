"""What every trainer's ``run(config, workdir)`` shares around ``fit``: load the model on the mesh,
evaluate on held-out task problems, and write the summary, ``results.json`` and the model.

A trainer module then holds only what is its own: the loss function, the batches, the metrics it
adds. The shape of a trainer (see ``sft.py``, ``dpo.py``, ``grpo.py``)::

    def run(config, workdir):
      run = common.start(config)                     # eval problems, mesh, model, tokenizer
      batches = ...                                  # iterator (or on-policy source) of batches
      result = fit(loss_fn, run.params, make_optimizer(optim), batches, mesh=run.mesh, ...,
                   eval_fn=common.task_eval_fn(run, config), ...)
      return common.finish(run, config, workdir, result)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from postrl import sharding as shd
from postrl.data.tasks import arithmetic_problems, countdown_problems
from postrl.metrics import model_flops_per_token
from postrl.models import ConfigError, check_fits, load_pretrained, load_tokenizer
from postrl.models.config import EXECUTION_OPTIONS
from postrl.trainers.step import OptimizerConfig

TASKS = {"arithmetic": arithmetic_problems, "countdown": countdown_problems}


def task_problems(task_cfg, n: int, seed: int):
  """``n`` problems of the built-in task ``task_cfg.name`` with its other fields as arguments."""
  kwargs = {k: v for k, v in task_cfg.items() if k != "name"}
  if task_cfg.name not in TASKS:
    raise ConfigError(f"config.data.task.name: unknown task {task_cfg.name!r}; "
                      f"known: {sorted(TASKS)}")
  try:
    return TASKS[task_cfg.name](n, seed=seed, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.data.task: {e} (fields: {sorted(kwargs)})") from e


def eval_problems(config) -> list:
  """The held-out problems of ``config.eval`` (``num_problems`` draws of ``config.data.task`` with
  ``data.eval_seed``), duplicates removed (a small task such as 1-digit arithmetic repeats)."""
  if config.eval.num_problems <= 0:
    return []
  seen, out = set(), []
  for p in task_problems(config.data.task, config.eval.num_problems, config.data.eval_seed):
    if p.prompt not in seen:
      seen.add(p.prompt)
      out.append(p)
  return out


def held_out_train_problems(task_cfg, n: int, seed: int, eval_problems) -> list:
  """``n`` task problems drawn with ``seed``, minus any whose prompt is an evaluation prompt."""
  held_out = {p.prompt for p in eval_problems}
  return [p for p in task_problems(task_cfg, n, seed) if p.prompt not in held_out]


def model_flops(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token of ``model_cfg`` at ``seq_len`` (6N + attention, see metrics)."""
  n = model_cfg.num_params()
  embed = model_cfg.vocab_size * model_cfg.hidden_size
  # the tied/untied output projection is a matmul per token and counts; the embedding lookup does not
  non_embedding = n - embed + (embed if model_cfg.tie_word_embeddings else 0)
  return model_flops_per_token(num_params_non_embedding=non_embedding,
                               num_layers=model_cfg.num_hidden_layers,
                               hidden_size=model_cfg.hidden_size, seq_len=seq_len)


def optimizer_config(config) -> OptimizerConfig:
  """The ``OptimizerConfig`` of ``config.optim`` with ``total_steps=config.steps``. Trainers call
  it before the (slow) model load; a key that is not a field (``learning_rate`` for ``lr``) is a
  ConfigError naming it and the valid fields, as is ``total_steps`` (``config.steps`` sets it)."""
  optim = config.optim.to_dict() if hasattr(config.optim, "to_dict") else dict(config.optim)
  valid = [f.name for f in dataclasses.fields(OptimizerConfig) if f.name != "total_steps"]
  if "total_steps" in optim:
    raise ConfigError("config.optim.total_steps: set by config.steps, not in config.optim")
  unknown = sorted(k for k in optim if k not in valid)
  if unknown:
    raise ConfigError(f"config.optim: unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(map(repr, unknown))}; the fields are {', '.join(valid)}")
  return OptimizerConfig(total_steps=config.steps, **optim)


@dataclasses.dataclass
class Run:
  """A trainer's loaded pieces. ``params`` is a host copy (``fit`` places each shard itself)."""
  mesh: Any
  graphdef: Any
  params: Any
  model_cfg: Any
  tokenizer: Any
  eval_problems: list
  t_start: float
  eval_records: dict = dataclasses.field(default_factory=dict)  # step -> per-problem records
  # PEFT (config.peft, postrl.peft): ``params`` is then only the trainable adapters and ``frozen``
  # the rest (host copy), for ``fit(..., frozen=run.frozen)``; None = full fine-tuning.
  frozen: Any = None
  peft: Any = None


def model_kwargs(config) -> dict:
  """``load_pretrained`` keyword arguments from a job config: ``param_dtype``, ``dtype`` and the
  optional runtime options of ``postrl.models.ModelConfig``: ``attention_impl`` ("auto" by
  default: cuDNN's fused flash attention for every full-sequence forward on one NVIDIA GPU in
  bf16 / f16, XLA's einsum elsewhere; "xla"; "cudnn", which needs a GPU), ``remat`` ("none" by default; "full" / "dots": recompute each block's activations
  in the backward pass) and ``decode_attention_impl`` ("auto" by default: the flash-decoding
  kernel for rollouts' cached steps on one GPU, XLA elsewhere; "xla"; "pallas") and
  ``decode_block_impl`` ("auto" by default: XLA's decoder layer until the fused kernels are
  measured faster on a GPU; "xla"; "pallas": ``kernels.decode_block`` for cached steps of 1-16
  rows; "pallas_attention" / "pallas_mlp": one half of its layer fused; "pallas_persistent": the
  fused layer in one launch with barriers across the GPU)."""
  attention_impl = config.get("attention_impl", "auto")
  if attention_impl == "cudnn" and jax.default_backend() != "gpu":  # fail before the model loads
    raise ConfigError(f"config.attention_impl='cudnn' needs an NVIDIA GPU; this run's JAX backend "
                      f"is {jax.default_backend()!r} (use 'xla')")
  return dict(param_dtype=config.param_dtype, dtype=config.dtype, attention_impl=attention_impl,
              remat=config.get("remat", "none"),
              decode_attention_impl=config.get("decode_attention_impl", "auto"),
              decode_block_impl=config.get("decode_block_impl", "auto"))


def start(config, *, model: str | None = None) -> Run:
  """Eval problems, mesh, then the (slow) model load: cheap checks fail first.

  With ``config.peft.method`` other than "none" (``postrl.peft.default_config``) the method is
  applied to the loaded model and ``run.params`` holds only the trainable adapters, ``run.frozen``
  the frozen base (pass ``frozen=run.frozen`` to ``fit``)."""
  from postrl import peft  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  held_out = eval_problems(config)
  peft_cfg = config.get("peft")
  use_peft = peft_cfg is not None and peft.enabled(peft_cfg)
  if use_peft:
    peft.check_config(peft_cfg)
  mesh = shd.make_mesh([tuple(a) for a in config.mesh])
  name = model or config.model
  module = load_pretrained(name, **model_kwargs(config))
  tokenizer = check_fits(load_tokenizer(name), module.config.vocab_size, name)
  frozen = None
  if use_peft:
    peft.apply_peft(module, peft_cfg)
    graphdef, params, frozen = peft.split_trainable(module)
    frozen = jax.tree.map(np.asarray, frozen)
    if jax.process_index() == 0:
      print(f"peft {peft_cfg.method}: {peft.num_elements(params):,} trainable of "
            f"{peft.num_elements(params) + peft.num_elements(frozen):,} stored elements")
  else:
    graphdef, params = nnx.split(module)
  params = jax.tree.map(np.asarray, params)  # the device copy is freed with the module
  return Run(mesh=mesh, graphdef=graphdef, params=params, model_cfg=module.config,
             tokenizer=tokenizer, eval_problems=held_out, t_start=t_start, frozen=frozen,
             peft=peft_cfg if use_peft else None)


def check_rows(rows: int, mesh, accum_steps: int, *, what: str) -> None:
  """ConfigError unless ``rows`` per step split over the mesh's batch shards x accum_steps."""
  shards = shd.batch_shards(mesh)
  if rows % (shards * accum_steps):
    raise ConfigError(f"{what} = {rows} rows per step, which the {shards} batch shards of mesh "
                      f"{dict(mesh.shape)} x accum_steps={accum_steps} do not divide")


def task_eval_fn(run: Run, config, *, extra: Callable[[Any, int], dict] | None = None,
                 to_model: Callable[[Any], Any] | None = None):
  """``eval_fn(params, step)`` for ``fit``: greedy exact-match accuracy on ``run.eval_problems``
  (``config.eval``: batch_size, max_new_tokens; ``config.system_prompt`` if set), plus whatever
  ``extra(params, step)`` returns. Completions are kept in ``run.eval_records[step]``.
  ``to_model(params)`` builds the model to evaluate (default ``nnx.merge(run.graphdef, params)``;
  e.g. the policy of an actor-critic)."""
  from postrl.evaluate import evaluate_task  # pylint: disable=import-outside-toplevel

  def eval_fn(params, step):
    out = {}
    if run.eval_problems:
      model = to_model(params) if to_model else nnx.merge(run.graphdef, params)
      accuracy, recs, n_tokens = evaluate_task(
          model, run.tokenizer, run.eval_problems, batch_size=config.eval.batch_size,
          max_new_tokens=config.eval.max_new_tokens, temperature=0.0, seed=config.seed,
          system_prompt=config.get("system_prompt") or None, progress=False)
      if jax.process_index() == 0:
        print(f"step {step}: exact-match accuracy {accuracy:.1%} on {len(recs)} held-out "
              f"problems ({n_tokens} tokens generated)")
      run.eval_records[step] = recs
      out.update(accuracy=accuracy, generated_tokens=n_tokens)
    if extra is not None:
      out.update(extra(params, step))
    return out

  return eval_fn


def model_fingerprint(model_cfg) -> dict:
  """A ``ModelConfig``'s fields as JSON values, less its execution options (``EXECUTION_OPTIONS``:
  how it computes, not what)."""
  fields = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in EXECUTION_OPTIONS}
  return json.loads(json.dumps(fields, default=str))


def fingerprint(config, model_cfg, *keys: str, sections=("data", "optim", "peft")) -> dict:
  """What a checkpoint must match to be resumed: the model, the config ``sections`` and ``keys``.
  ``steps`` may change (a run can be extended), as may logging and evaluation settings. (With
  PEFT, ``fit`` adds the frozen base's digest.) The model's execution options
  (``postrl.models.config.EXECUTION_OPTIONS``: attention implementation, remat, decode attention,
  decode layer) compute the same function and are left out, so a run resumes after changing them (or on a
  machine where ``attention_impl="auto"`` resolves differently)."""
  out = dict(model=model_fingerprint(model_cfg), param_dtype=config.get("param_dtype"),
             seed=config.get("seed"))
  for s in sections:
    if s in config:
      out[s] = config[s].to_dict() if hasattr(config[s], "to_dict") else config[s]
  for k in keys:
    out[k] = config.get(k)
  return json.loads(json.dumps(out, default=str))


def eval_history(history: list[dict], key: str = "eval/accuracy"
                 ) -> tuple[dict | None, dict | None]:
  """(the step-0 evaluation, the last evaluation after step 0) of ``fit``'s history."""
  evals = [h for h in history if key in h]
  before = next((h for h in evals if h["step"] == 0), None)
  after = evals[-1] if evals and evals[-1]["step"] > 0 else None
  return before, after


def finish(run: Run, config, workdir: str | None, result, *,
           export: Callable[[Any], tuple[Any, Any]] | None = None, **extra) -> dict:
  """Prints and returns the summary; writes ``results.json`` (summary, config, completions before
  and after) and, with ``config.save_model``, the trained model as a HF folder ``workdir/model``
  (``export(params) -> (graphdef, params)`` picks what is saved, e.g. an actor-critic's policy)."""
  before, after = eval_history(result.history)
  losses = [h["loss"] for h in result.history if "loss" in h]
  summary = dict(
      model=config.get("model"), steps=int(jax.device_get(result.state.step)),
      preempted=result.preempted, resumed_from=result.resumed_from,
      accuracy_before=None if before is None else before["eval/accuracy"],
      accuracy_after=None if after is None else after["eval/accuracy"],
      first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
      num_eval_problems=len(run.eval_problems), **extra,
      seconds=round(time.perf_counter() - run.t_start, 1), device=jax.devices()[0].device_kind,
      num_devices=jax.device_count())
  print(json.dumps(summary, indent=1))
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    last = max(run.eval_records, default=0)
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(dict(summary, config=config.to_dict(), eval_before=run.eval_records.get(0),
                     eval_after=run.eval_records.get(last) if last else None), f, indent=1,
                default=str)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  if workdir and run.frozen is not None and export is None:
    save_peft(run, workdir, result.state.params, merged=bool(config.get("save_model")))
  elif workdir and config.get("save_model"):
    graphdef, params = (export(result.state.params) if export
                        else (run.graphdef, result.state.params))
    save_model(graphdef, params, os.path.join(workdir, "model"), tokenizer=run.tokenizer)
  return summary


def save_peft(run: Run, workdir: str, trainable, *, merged: bool) -> None:
  """PEFT outputs: the adapters alone (``workdir/adapter.safetensors`` + ``adapter_config.json``,
  ``postrl.peft.save_adapters``) and, with ``merged``, the merged model as a HF folder
  ``workdir/model`` (``postrl.peft.merged_model``: adapters folded into the kernels, a quantized
  base dequantised; prompt / prefix tuning has no merged form and writes the adapters only)."""
  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils
  from postrl import peft
  from postrl.models import save_pretrained, save_tokenizer
  host = multihost_utils.process_allgather(trainable, tiled=True)
  if jax.process_index() != 0:
    return
  model = nnx.merge(run.graphdef, peft.combine(host, run.frozen))
  peft.save_adapters(host, workdir, run.peft)
  print(f"wrote {os.path.join(workdir, peft.ADAPTER_FILE)} (+ {peft.ADAPTER_CONFIG})")
  if not merged:
    return
  if peft.has_prompt_or_prefix(model):
    print(f"config.peft.method={run.peft.method}: no merged model (virtual tokens have no place "
          "in the base architecture); the adapters are the export")
    return
  path = os.path.join(workdir, "model")
  save_pretrained(peft.merged_model(model), path)
  if run.tokenizer is not None and not run.tokenizer.is_sentencepiece:
    save_tokenizer(run.tokenizer, path)
  print(f"wrote {path} (adapters merged; loads with load_pretrained or transformers)")


def save_model(graphdef, params, path: str, *, tokenizer=None) -> None:
  """Gathers sharded ``params`` (every process takes part) and writes a HF folder from process 0,
  with the tokenizer (tokenizer.json + tokenizer_config.json with the chat template) when given,
  so the folder works wherever a model name does (``load_pretrained``, ``load_tokenizer``,
  ``config.model`` / ``config.teacher``, transformers)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from postrl.models import save_pretrained, save_tokenizer  # pylint: disable=import-outside-toplevel
  host_params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    save_pretrained(nnx.merge(graphdef, host_params), path)
    if tokenizer is not None and not tokenizer.is_sentencepiece:
      save_tokenizer(tokenizer, path)
    print(f"wrote {path} (loads with load_pretrained or transformers)")
