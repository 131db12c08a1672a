r"""Training-step throughput and MFU of the library's own SFT and DPO steps, one run.

    python benchmarks/train_step.py --config llama-1b --seq 2048 --batch 4 --steps 10 \
        --time-limit 420                                            # one GPU
    python benchmarks/train_step.py --tiny                          # CPU smoke test, seconds

What runs is what ``launch.py`` runs for a user on one device: ``postrl.trainers.loop.create_state``
on the mesh ``(("data", -1), ("fsdp", 1), ("tensor", 1))`` (params placed by their logical axes,
AdamW state created sharded), and ``postrl.trainers.step.make_train_step`` (jitted, state donated,
loss + grad + clip + AdamW update + NaN guard) around the trainers' loss functions
``postrl.trainers.sft.sft_loss_fn`` and ``postrl.trainers.dpo.preference_loss_fn`` (sigmoid DPO,
reference log-probs cached in the batch, as ``config.loss.reference = "cached"``). The model is a
preset shape with random weights (``--config``; llama-1b = Llama-3.2-1B, 1.24B params, tied
embeddings); params in ``--param-dtype``, activations and matmuls in ``--dtype``.

``--batch`` counts sequences of ``--seq`` tokens per step for both jobs: SFT trains ``batch``
rows, DPO ``batch / 2`` pairs (chosen and rejected: ``batch`` sequences), so both steps see the
same tokens. Random tokens; SFT trains on every token, DPO on the last 3/4 of each sequence.

Timing: the step is lowered and compiled ahead of time (compile time reported), run once to warm
up, then ``--steps`` times back to back with one ``block_until_ready`` at the end (as ``fit``
pipelines steps); tokens/s = steps x batch x seq / that time.

MFU (model FLOPs utilisation; PaLM, Chowdhery et al. 2022, appendix B; ``postrl.metrics``):

    flops/token = 6 N + 12 L D T
    N = non-embedding parameters + the output projection (V x D, a matmul per token; tied here)
    L layers, D = hidden size (= heads x head_dim in these presets), T = --seq (attention
    scores and values, no causal halving)
    MFU = tokens/s x flops/token / peak

against two peaks: the datasheet dense bf16 peak (``postrl.metrics.peak_flops``: H100 SXM / H200
989 TFLOP/s; None on CPU) and the rate of a large ``--dtype`` matmul measured in this run
(``--matmul-n``). ``mfu_causal_*`` counts attention as 6 L D T (only the causal half is needed).
Recomputation is not counted (vocabulary chunks under ``jax.checkpoint`` when ``--vocab-chunk``
is set do recompute the output projection).

``--breakdown`` also times parts of each step alone (``step_breakdown``): the forward, the forward
and backward, the update as the difference to the step, the model's attention call (forward and
backward, all layers) and the linear layers at the measured matmul rate: where the step's time
goes without a profiler (Nsight Systems cannot make a report on the lent machines).

The JSON (device, versions, date) is rewritten after every measurement and each step is printed
as it ends, so a killed run keeps what it had; ``--time-limit`` stops early and still writes it.
A step that runs out of device memory is retried with half the batch (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
  sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))  # the configs' default: one device, or pure DP


def matmul_flops(n: int, dtype: str, repeats: int = 10) -> float:
  """FLOP/s of a jitted [n, n] x [n, n] matmul in ``dtype`` (2 n^3 FLOPs; best of ``repeats``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def flops_per_token(cfg, seq: int, *, causal: bool = False) -> float:
  """6 N + 12 L D T (``postrl.trainers.common.model_flops``); ``causal``: 6 N + 6 L D T."""
  from postrl.trainers.common import model_flops  # pylint: disable=import-outside-toplevel
  full = model_flops(cfg, seq)
  attention = 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq
  return full - attention / 2 if causal else full


def sft_batch(rng, rows: int, seq: int, vocab: int) -> dict:
  """Random [rows, seq] tokens, one segment per row, every token but the first trained."""
  mask = np.ones((rows, seq), np.int32)
  mask[:, 0] = 0
  return dict(tokens=rng.randint(0, vocab, (rows, seq)).astype(np.int32),
              segment_ids=np.ones((rows, seq), np.int32), loss_mask=mask)


def dpo_batch(rng, pairs: int, seq: int, vocab: int) -> dict:
  """Random [pairs, 2, seq] chosen / rejected sequences, prompt = the first quarter, and cached
  reference log-probs (their values do not change the cost)."""
  mask = np.zeros((pairs, 2, seq), np.int32)
  mask[:, :, seq // 4:] = 1
  return dict(tokens=rng.randint(0, vocab, (pairs, 2, seq)).astype(np.int32),
              segment_ids=np.ones((pairs, 2, seq), np.int32), loss_mask=mask,
              response_mask=np.ones((pairs, 2), np.int32),
              ref_logps=rng.normal(-2.0 * seq, 10.0, (pairs, 2)).astype(np.float32))


def loss_fn_for(job: str, graphdef, vocab_chunk):
  """The trainers' own loss functions (SFT token mean; sigmoid DPO, beta 0.1)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from postrl.logprobs import model_apply_fn  # pylint: disable=import-outside-toplevel
  from postrl.trainers.dpo import preference_loss_fn  # pylint: disable=import-outside-toplevel
  from postrl.trainers.sft import sft_loss_fn  # pylint: disable=import-outside-toplevel
  apply_fn = model_apply_fn(graphdef)
  if job == "sft":
    return sft_loss_fn(apply_fn, vocab_chunk=vocab_chunk)
  loss_cfg = ml_collections.ConfigDict(dict(name="dpo", variant="sigmoid", beta=0.1,
                                            label_smoothing=0.0, reference="cached"))
  return preference_loss_fn(apply_fn, loss_cfg, vocab_chunk=vocab_chunk)


def _is_oom(e: Exception) -> bool:
  text = str(e).lower()
  return "resource_exhausted" in text or "out of memory" in text or "resource exhausted" in text


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class Trainer:
  """A fresh random model's TrainState on the mesh (rebuilt after an out-of-memory failure, which
  may leave donated buffers deleted), reused by both jobs (same parameter tree)."""

  def __init__(self, cfg, tx, mesh, seed: int = 0):
    self.cfg, self.tx, self.mesh, self.seed = cfg, tx, mesh, seed
    self.graphdef = None
    self.state = self.shardings = None

  def fresh(self):
    """Builds a random model and its sharded TrainState (the old state is dropped first)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from postrl.trainers.loop import create_state  # pylint: disable=import-outside-toplevel
    self.state = None  # free the old state first
    graphdef, params = nnx.split(common.random_model(self.cfg, self.seed))
    self.graphdef = graphdef
    self.state, self.shardings = create_state(params, self.tx, seed=self.seed, mesh=self.mesh)
    return self


def run_job(job: str, trainer: Trainer, args, budget, rows: int) -> dict:
  """Compiles and times one job's step at ``rows`` sequences per step; returns its record."""
  import jax  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  from postrl.trainers.step import make_train_step  # pylint: disable=import-outside-toplevel
  cfg, seq = trainer.cfg, args.seq
  rng = np.random.RandomState(0)
  host = (sft_batch(rng, rows, seq, cfg.vocab_size) if job == "sft"
          else dpo_batch(rng, rows // 2, seq, cfg.vocab_size))
  batch = shd.put_batch(host, trainer.mesh)
  step_fn = make_train_step(loss_fn_for(job, trainer.graphdef, args.vocab_chunk), trainer.tx,
                            state_shardings=trainer.shardings,
                            batch_sharding=shd.batch_sharding(trainer.mesh), mesh=trainer.mesh)
  record = dict(job=job, sequences_per_step=rows, tokens_per_step=rows * seq, seq=seq)
  common.log(f"[{job}] rows {rows}: lowering and compiling ... ({budget.elapsed():.0f} s)")
  t0 = time.perf_counter()
  lowered = step_fn.lower(trainer.state, batch)
  record["lower_s"] = round(time.perf_counter() - t0, 2)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  record["compile_s"] = round(time.perf_counter() - t0, 2)
  memory = _memory_analysis(compiled)
  record.update(memory)
  common.log(f"[{job}] rows {rows}: lowered in {record['lower_s']} s, compiled in "
             f"{record['compile_s']} s; {json.dumps(memory)} ({budget.elapsed():.0f} s)")
  limit = args.device_memory_bytes
  need = memory.get("total_bytes")
  if limit and need and need > limit:
    raise MemoryError(f"RESOURCE_EXHAUSTED (predicted): the step needs {need / 2**30:.3f} GiB, "
                      f"the device has {limit / 2**30:.3f} GiB")

  state = trainer.state
  trainer.state = None  # donated from here on: rebuilt by the caller if a step fails
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  record["warmup_step_s"] = round(time.perf_counter() - t0, 3)
  record["loss_first"] = float(metrics["loss"])
  common.log(f"[{job}] warm-up step {record['warmup_step_s']} s, loss {record['loss_first']:.3f}")
  # Timed steps back to back, blocking only at the end: the device pipeline of ``fit``, which
  # never waits for a step before dispatching the next. Fewer steps if the budget is short.
  steps = args.steps
  if budget.seconds is not None:
    steps = max(1, min(steps, int(budget.left() / max(record["warmup_step_s"], 1e-3))))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  trainer.state = state
  record.update(timed_steps=steps, step_s=round(elapsed / steps, 4),
                tokens_per_s=round(rows * seq * steps / elapsed, 1),
                loss_last=float(metrics["loss"]), finite=float(metrics["step/finite"]),
                process_peak_memory_bytes=common.peak_memory_bytes())
  if steps < args.steps:
    record["stopped"] = f"time limit: {steps} of {args.steps} steps timed"
  common.log(f"[{job}] {steps} steps in {elapsed:.3f} s: {record['step_s']} s/step, "
             f"{record['tokens_per_s']:,.0f} tokens/s")
  if args.breakdown and not budget.over(4 * record["warmup_step_s"]):
    from postrl.models.transformer import full_attention_impl  # pylint: disable=import-outside-toplevel
    try:
      record["breakdown"] = step_breakdown(
          loss_fn_for(job, trainer.graphdef, args.vocab_chunk), state.params, batch, cfg,
          full_attention_impl(cfg.attention_impl, cfg.dtype, cfg.dim_per_head, seq), rows, seq,
          elapsed / steps, args.matmul_flops_per_s, max(1, min(steps, 5)))
      common.log(f"[{job}] breakdown (s per step): {json.dumps(record['breakdown'])}")
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the step)
      record["breakdown"] = dict(error=_first_line(e))
      common.log(f"[{job}] breakdown failed: {record['breakdown']['error']}")
  return record


def _time_back_to_back(f, args, reps: int) -> float:
  """Seconds per call of the jitted ``f(*args)``: one warm-up (compile) call, then ``reps`` calls
  dispatched back to back with one ``block_until_ready`` at the end."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  out = None
  for _ in range(reps):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def attention_args(cfg, rows: int, seq: int):
  """Random q, k, v [rows, seq, heads, head_dim] in the compute dtype and the causal mask, the
  shapes one decoder layer's attention sees in the step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from postrl.models.config import dtype_from_name  # pylint: disable=import-outside-toplevel
  dt = dtype_from_name(cfg.dtype)
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  d = cfg.dim_per_head
  q = jax.random.normal(kq, (rows, seq, cfg.num_attention_heads, d), jnp.float32).astype(dt)
  k = jax.random.normal(kk, (rows, seq, cfg.num_key_value_heads, d), jnp.float32).astype(dt)
  v = jax.random.normal(kv, (rows, seq, cfg.num_key_value_heads, d), jnp.float32).astype(dt)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (rows, seq, seq))
  return q, k, v, mask


def step_breakdown(loss_fn, params, batch, cfg, impl_used: str, rows: int, seq: int,
                   step_s: float, matmul_flops_per_s: float, reps: int) -> dict:
  """Where the step's time goes, by timing parts of it alone (no profiler needed; what a profile
  would attribute, measured by leaving stages out):

    forward_s            the loss alone (jit of ``loss_fn``)
    forward_backward_s   loss and gradients (``jax.value_and_grad``), no clipping / optimizer
    update_s             step_s - forward_backward_s: clipping, AdamW, the NaN guard, the
                         state's bookkeeping
    attention_s          the attention call the model makes (``fused_attention`` for cuDNN,
                         ``dot_product_attention`` for XLA), forward and backward, at one layer's
                         shapes, times the number of layers
    matmul_ideal_s       6 N tokens / the measured matmul rate: the linear layers (and output
                         projection) if they ran at the rate of the large matmul
    other_s              forward_backward_s - attention_s - matmul_ideal_s: norms, RoPE,
                         activations, the loss, and the linear layers' shortfall from that rate
  """
  import jax  # pylint: disable=import-outside-toplevel
  from postrl.models import transformer  # pylint: disable=import-outside-toplevel
  from postrl.trainers.common import model_flops  # pylint: disable=import-outside-toplevel
  forward = jax.jit(lambda p, b: loss_fn(p, b)[0])
  forward_backward = jax.jit(lambda p, b: jax.value_and_grad(lambda q: loss_fn(q, b)[0])(p))
  out = dict(forward_s=_time_back_to_back(forward, (params, batch), reps))
  out["forward_backward_s"] = _time_back_to_back(forward_backward, (params, batch), reps)
  out["update_s"] = step_s - out["forward_backward_s"]
  q, k, v, mask = attention_args(cfg, rows, seq)
  if impl_used == "xla":
    attend = lambda q, k, v: transformer.dot_product_attention(q, k, v, mask)  # noqa: E731
  else:
    attend = lambda q, k, v: transformer.fused_attention(  # noqa: E731
        q, k, v, mask, implementation=impl_used)

  def attention_fwd_bwd(q, k, v):
    y, vjp = jax.vjp(attend, q, k, v)
    return vjp(y)
  layer = _time_back_to_back(jax.jit(attention_fwd_bwd), (q, k, v), reps)
  out["attention_s"] = layer * cfg.num_hidden_layers
  attention_flops = 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq
  linear_flops = model_flops(cfg, seq) - attention_flops  # 6 N per token
  out["matmul_ideal_s"] = linear_flops * rows * seq / matmul_flops_per_s
  out["other_s"] = out["forward_backward_s"] - out["attention_s"] - out["matmul_ideal_s"]
  return {key: round(value, 7) for key, value in out.items()}


def _memory_analysis(compiled) -> dict:
  """Bytes the compiled step needs (XLA's buffer assignment), where the backend reports them."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out = {f"{k}_bytes": v for k, v in out.items()}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def add_mfu(record: dict, fpt: float, fpt_causal: float, peaks: dict):
  """MFU of a job's tokens/s against each peak (``None`` where a peak is unknown)."""
  tps = record.get("tokens_per_s")
  record["model_tflops_per_s"] = round(tps * fpt / 1e12, 2)
  for name, peak in peaks.items():
    record[f"mfu_{name}"] = None if not peak else round(tps * fpt / peak, 4)
    record[f"mfu_causal_{name}"] = None if not peak else round(tps * fpt_causal / peak, 4)


def parse_args(argv=None):
  """Command-line arguments (``--tiny`` overrides config, seq, batch and steps)."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", choices=sorted(common.PRESETS), default="llama-1b")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4,
                      help="sequences per step (DPO: batch/2 pairs)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per job (after warm-up)")
  parser.add_argument("--jobs", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
  parser.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                      help="default: bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="activations and matmuls; default: bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--attention", nargs="+", choices=["auto", "xla", "cudnn"],
                      default=["auto"],
                      help="attention implementations to time, each with both jobs "
                           "(postrl.models.ModelConfig.attention_impl; cudnn: GPU, bf16; auto, "
                           "the default: cudnn on one GPU in bf16, else xla)")
  parser.add_argument("--remat", choices=["none", "full", "dots"], default="none",
                      help="block rematerialisation (postrl.models.ModelConfig.remat)")
  parser.add_argument("--vocab-chunk", type=int, default=None,
                      help="log-prob vocabulary chunk (None: full [B, T, V] logits)")
  parser.add_argument("--matmul-n", type=int, default=None,
                      help="size of the measured-peak matmul (default 16384 on GPU, 512 on CPU)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the forward, forward + backward and the attention alone "
                      "(where the step's time goes; step_breakdown)")
  parser.add_argument("--time-limit", type=float, default=None,
                      help="seconds for the whole run; stops early and still writes the JSON")
  parser.add_argument("--jax-mem-fraction", type=float, default=0.9,
                      help="GPU memory JAX preallocates (unless XLA_PYTHON_CLIENT_MEM_FRACTION "
                           "is set)")
  parser.add_argument("--memory-limit-gib", type=float, default=None,
                      help="device memory a compiled step may need (default: JAX's pool size); "
                           "a step predicted to need more is retried with half the batch")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: --config tiny --seq 64 --batch 4 --steps 2")
  parser.add_argument("--out", default="benchmarks/results/train_step.json")
  args = parser.parse_args(argv)
  if args.tiny:
    args.config, args.seq, args.batch, args.steps = "tiny", 64, 4, 2
  if args.batch < 2 or args.batch % 2:
    parser.error(f"--batch must be even (DPO uses batch/2 pairs), got {args.batch}")
  return args


def main(argv=None):
  """Measures the matmul peak, then each job (see the module docstring); returns the JSON dict."""
  args = parse_args(argv)
  budget = common.Budget(args.time_limit)
  # read when the backend starts; JAX's default (0.75) would leave a fifth of an H100 unused
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_mem_fraction))
  import jax  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  from postrl.metrics import peak_flops  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from postrl.trainers.step import OptimizerConfig, make_optimizer
  on_cpu = jax.default_backend() == "cpu"
  args.param_dtype = args.param_dtype or common.default_dtype()
  args.dtype = args.dtype or common.default_dtype()
  env = common.environment()
  args.device_memory_bytes = (int(args.memory_limit_gib * 2**30) if args.memory_limit_gib
                              else env.get("device_memory_bytes"))
  cfg = common.model_config(args.config, param_dtype=args.param_dtype,
                            dtype=args.dtype).replace(remat=args.remat)
  mesh = shd.make_mesh(MESH)
  shards = shd.batch_shards(mesh)
  if args.batch % shards or (args.batch // 2) % shards:
    raise SystemExit(f"error: --batch {args.batch} (and batch/2 DPO pairs) must be divisible by "
                     f"the {shards} devices of mesh {dict(mesh.shape)}")
  fpt, fpt_causal = flops_per_token(cfg, args.seq), flops_per_token(cfg, args.seq, causal=True)
  results = common.Results(
      args.out, **env, settings=vars(args), mesh=dict(mesh.shape), status="running",
      xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      model=dict(name=args.config, random_weights=True, num_params=cfg.num_params(),
                 config=cfg.to_hf()),
      flops_per_token=fpt, flops_per_token_causal=fpt_causal,
      mfu_formula="tokens/s x (6 N + 12 L D T) / peak; N = non-embedding params + output "
                  "projection (V D); D = hidden size; T = seq (PaLM app. B, no causal "
                  "halving); causal: 6 N + 6 L D T", jobs=[])
  common.log(f"{env['device']} x{env['device_count']} ({env['backend']}), jax {jax.__version__}; "
             f"{args.config}: {cfg.num_params() / 1e9:.3f}B params, params {args.param_dtype}, "
             f"compute {args.dtype}; seq {args.seq}, {args.batch} sequences per step; "
             f"{fpt / 1e9:.2f} GFLOP/token")

  n = args.matmul_n or (512 if on_cpu else 16384)
  measured = matmul_flops(n, args.dtype)
  peaks = dict(datasheet=peak_flops(jax.devices()[0]), measured=measured)
  args.matmul_flops_per_s = measured
  results.update(peak_flops_datasheet=peaks["datasheet"], peak_flops_measured=measured,
                 matmul=dict(n=n, dtype=args.dtype, flops_per_s=measured))
  sheet = "-" if not peaks["datasheet"] else f"{peaks['datasheet'] / 1e12:.0f}"
  common.log(f"matmul {n}^3 {args.dtype}: {measured / 1e12:.1f} TFLOP/s; datasheet peak {sheet} "
             f"TFLOP/s ({budget.elapsed():.0f} s)")

  tx = make_optimizer(OptimizerConfig(lr=1e-5, total_steps=1000))
  skipped = []
  for impl in args.attention:  # one model (and state) per attention implementation
    trainer = None
    try:
      trainer = Trainer(cfg.replace(attention_impl=impl), tx, mesh).fresh()
    except Exception as e:  # pylint: disable=broad-except  (e.g. cudnn without a GPU / bf16)
      for job in args.jobs:
        results.append("jobs", dict(job=job, attention=impl, sequences_per_step=args.batch,
                                    error=_first_line(e)))
      common.log(f"[{impl}] cannot build the model: {_first_line(e)}")
      continue
    common.log(f"[{impl}] state created ({budget.elapsed():.0f} s)")
    fits = args.batch  # the batch that last fitted: the next job starts there
    for job in args.jobs:
      if budget.over():
        skipped.append(f"{job}/{impl}")
        continue
      rows, record = fits, None
      while record is None:
        try:
          record = run_job(job, trainer, args, budget, rows)
        except Exception as e:  # pylint: disable=broad-except  (out of memory: halve the batch)
          failure = dict(job=job, attention=impl, sequences_per_step=rows, error=_first_line(e))
          results.append("failures", failure)
          common.log(f"[{job}/{impl}] rows {rows} failed: {failure['error']}")
          if trainer.state is None:
            trainer.fresh()
          retry = _is_oom(e) and rows // 2 >= 2 * shards and not budget.over()
          if retry:
            rows //= 2
          else:
            record = dict(job=job, sequences_per_step=rows, error=failure["error"])
      record["attention"] = impl
      # what "auto" resolved to for this shape (postrl.models.transformer.full_attention_impl)
      from postrl.models.transformer import full_attention_impl  # pylint: disable=import-outside-toplevel
      record["attention_used"] = full_attention_impl(impl, cfg.dtype, cfg.dim_per_head, args.seq)
      if "tokens_per_s" in record:
        add_mfu(record, fpt, fpt_causal, peaks)
        fits = rows
      results.append("jobs", record)
      common.log(f"[{job}/{impl}] {json.dumps(record)}")
    del trainer
  failed = [f"{r['job']}/{r.get('attention', 'xla')}" for r in results.doc["jobs"]
            if "error" in r]
  status = ("complete" if not skipped and not failed else
            "; ".join(([f"failed jobs {failed}"] if failed else []) +
                      ([f"time limit: skipped jobs {skipped}"] if skipped else [])))
  results.update(status=status, elapsed_s=round(budget.elapsed(), 1))
  common.log(f"{'job':>5} {'attn':>5} {'seqs':>5} {'tokens/s':>10} {'TFLOP/s':>8} "
             f"{'MFU datasheet':>14} {'MFU measured':>13} {'step s':>8} {'compile s':>10}")
  for r in results.doc["jobs"]:
    if "tokens_per_s" not in r:
      common.log(f"{r['job']:>5} {r['attention']:>5} {r['sequences_per_step']:>5} failed: "
                 f"{r['error']}")
      continue
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    common.log(f"{r['job']:>5} {r['attention']:>5} {r['sequences_per_step']:>5} "
               f"{r['tokens_per_s']:>10,.0f} "
               f"{r['model_tflops_per_s']:>8.1f} {pct(r['mfu_datasheet']):>14} "
               f"{pct(r['mfu_measured']):>13} {r['step_s']:>8.3f} {r['compile_s']:>10.1f}")
  common.log(f"{status}; wrote {args.out}")
  return results.doc


if __name__ == "__main__":
  main()
