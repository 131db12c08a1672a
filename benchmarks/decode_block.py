r"""The decoder layers of one cached decode step: XLA's layer (the model as written, ~12 launches
per layer at batch 1) against ``kernels.decode_block``'s five fused Pallas (Triton) launches per
layer, against each half of the layer fused alone (``impl="pallas_attention"``: launches 1-3
then XLA's MLP; ``"pallas_mlp"``: XLA's attention then launches 4-5) and against the five phases in
one persistent launch per layer (``"pallas_persistent"``: barriers across the GPU between them),
beside the time to read the step's weights and valid cache once, in one run.

    timeout 300 python benchmarks/decode_block.py --config smollm2-135m llama-1b --batch 1 16 \
        --time-limit 240 --out $OUT/decode_block.json                 # GPU, about 3-4 min
    python benchmarks/decode_block.py --interpret --config tiny --batch 1 --steps 2 \
        --out /tmp/decode_block.json                                  # CPU smoke test

Phases:

1. check (compiled kernels, before any timing): ``decode_layer`` with each kernel --impls against
   ``impl="xla"`` (``decode_layer_reference``, the model's arithmetic) on random weights of each
   --config's layer shape (normal, std 0.02; norms 1 + N(0, 0.1); every bias group where
   --biases), B in --batch (a batch of 1 decodes as 2 rows, as ``generate`` does on one GPU) and
   16, positions spread over the cache (0, ragged, the last slot). Pass: the layer output and both
   caches within 2e-2 x max|reference| in bf16 (rounding: the kernels round where the model does,
   but sum in another order); a wrong mask, RoPE pairing or cache slot errs by O(1). The
   persistent layer also needs no barrier wait to have timed out (``barrier_timeouts``).
2. the copy bandwidth of the device (``quantized_matmul.copy_bandwidth``: read + write bytes).
3. the table: per --config and --batch, ``<impl>_us``: all L layers of one decode step (L distinct
   weight sets, as the model has: 212 MB for SmolLM2-135M, more than the 50-60 MB L2 cache), each
   implementation inside one ``fori_loop`` of --steps decode steps in one jit (the carried x and
   caches of step t feed step t + 1; positions advance from --prompt-len), median of --repeats
   calls / steps; where XLA runs the attention half ("xla", "pallas_mlp"), its attention is
   ``kernels.decode_attention`` with impl "auto" (``ATTENTION``: the flash-decoding kernel on one
   GPU, as ``generate`` runs XLA's layer). ``floor_us`` = (weights + the valid cache read per
   step) / copy bandwidth; ``launches`` per step counted from each compiled program
   (``common.loop_launches``);
   ``xla_over_<impl>``: XLA's time over each kernel implementation's (> 1: the kernels win);
   ``pallas_persistent_trace``: one step of the persistent layers with GPU timestamps per program
   (``trace_step``): each phase's critical path, each barrier's latency, the launch and the gap
   between launches, in µs (interpret mode: counter values, not times).
4. ``--sweep``: the fused layers (five launches, and the persistent launch where timed) at the
   first --config / --batch under each ``SWEEP`` launch setting (K step, pipelining, warps,
   columns per program, heads per step; the persistent layer's program count, barrier polls and
   early weight loads), each setting checked first, in the time left.

An implementation whose check fails anywhere is named in ``check_failed`` and not timed (the
others are). ``LAST_IMPLS`` (the persistent layer) are checked and timed after every other row is
written: a crash in their first GPU run keeps the rest. Prints each row as it goes and rewrites
the JSON after each (--out); no new point starts after --time-limit; a failure is recorded in its
row (``<impl>_error``), never a crash.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from kernels.decode_block import barrier_timeouts, decode_layers  # noqa: E402

IMPLS = ("xla", "pallas", "pallas_attention", "pallas_mlp", "pallas_persistent")  # decode_block's
# checked and timed after the others' rows are written: a crash in its first GPU run keeps them
LAST_IMPLS = ("pallas_persistent",)
REPEAT_LAUNCHES = 16  # the persistent layer's check also runs this many layers in a row
# the attention of the halves XLA runs ("xla" and "pallas_mlp"), as the model's cached step runs
# it by default: kernels.decode_attention's flash-decoding kernel on one GPU, XLA on a CPU
ATTENTION = "auto"


def layer_shapes(cfg, biases: bool = False) -> dict:
  """name -> shape of one layer's ``decode_layer`` weights for ``cfg`` (a ``ModelConfig``)."""
  d, f, h, k, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                    cfg.num_key_value_heads, cfg.dim_per_head)
  shapes = dict(input_norm=(d,), q=(d, h * dh), k=(d, k * dh), v=(d, k * dh), o=(h * dh, d),
                post_norm=(d,), gate=(d, f), up=(d, f), down=(f, d))
  if biases:
    shapes.update(q_bias=(h * dh,), k_bias=(k * dh,), v_bias=(k * dh,), o_bias=(d,),
                  gate_bias=(f,), up_bias=(f,), down_bias=(d,))
  return shapes


def random_layer(cfg, key, dtype, biases: bool = False) -> dict:
  shapes = layer_shapes(cfg, biases)
  keys = jax.random.split(key, len(shapes))
  out = {}
  for kk, (name, shape) in zip(keys, sorted(shapes.items())):
    w = jax.random.normal(kk, shape, jnp.float32)
    out[name] = (1.0 + 0.1 * w if name.endswith("norm") else 0.02 * w).astype(dtype)
  return out


def _inv_freq(cfg):
  from postrl.models.transformer import rope_inv_freq  # pylint: disable=import-outside-toplevel
  return rope_inv_freq(cfg)


def check(cfg, batch: int, slots: int, dtype, interpret: bool, biases: bool, seed: int = 0,
          impls=IMPLS[1:], config=None):
  """Per kernel impl of ``impls``: max |impl - xla| / max |xla| of the layer output and the two
  caches at one layer (``max_rel_err[impl]``; for the persistent layer also ``x_after_layers``:
  the output after ``REPEAT_LAUNCHES`` launches in a row, one barrier state through all, which a
  race that strikes now and then would move), the persistent layer's barrier waits that gave up
  (``barrier_timeouts[impl]``); ``ok_by_impl[impl]`` when every error is within 2e-2 and no wait
  gave up; an exception fails its impl alone (``error[impl]``). ``config``: the kernels'
  ``GpuConfig`` (None: the default)."""
  rows = max(batch, 2) if batch == 1 and not interpret else batch
  keys = jax.random.split(jax.random.key(seed), 4)
  w = random_layer(cfg, keys[0], dtype, biases)
  x = jax.random.normal(keys[1], (rows, cfg.hidden_size), jnp.float32).astype(dtype)
  shape = (rows, slots, cfg.num_key_value_heads, cfg.dim_per_head)
  ck = jax.random.normal(keys[2], shape, jnp.float32).astype(dtype)
  cv = jax.random.normal(keys[3], shape, jnp.float32).astype(dtype)
  pos = jnp.array([0, slots // 2 + 3, slots - 1, 7][:rows] + [slots // 3] * max(rows - 4, 0),
                  jnp.int32)

  # the reference with the exact masked attention; pallas_mlp's XLA half as timed (ATTENTION)
  def layers(x, p, ck, cv, impl, n):
    x, ks, vs, sync = decode_layers(
        x, p, _inv_freq(cfg), [w] * n, [ck] * n, [cv] * n, eps=cfg.rms_norm_eps, dtype=dtype,
        impl=impl, interpret=interpret, config=None if impl == "xla" else config,
        attention_impl="xla" if impl == "xla" else ATTENTION)
    return x, ks[0], vs[0], jnp.int32(0) if sync is None else barrier_timeouts(sync)
  run = jax.jit(layers, static_argnums=(4, 5))

  def rel(got, ref):
    ref = ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))
                 / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
  want = run(x, pos, ck, cv, "xla", 1)
  err, timeouts, ok, errors = {}, {}, {}, {}
  for impl in impls:
    try:
      got = run(x, pos, ck, cv, impl, 1)
      err[impl] = {name: rel(got[i], want[i]) for name, i in (("x", 0), ("cache_k", 1),
                                                              ("cache_v", 2))}
      timeouts[impl] = int(got[3])  # the persistent layer's barrier waits that gave up
      if impl in LAST_IMPLS:  # launches in a row: a race that strikes now and then
        again = run(x, pos, ck, cv, impl, REPEAT_LAUNCHES)
        err[impl]["x_after_layers"] = rel(again[0], run(x, pos, ck, cv, "xla", REPEAT_LAUNCHES)[0])
        timeouts[impl] += int(again[3])
      ok[impl] = all(e <= 2e-2 for e in err[impl].values()) and not timeouts[impl]
    except Exception as e:  # pylint: disable=broad-except
      errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      ok[impl] = False
  out = dict(config_rows=rows, biases=biases, max_rel_err=err, barrier_timeouts=timeouts,
             ok_by_impl=ok, ok=all(ok.values()))
  return dict(out, error=errors) if errors else out


def step_inputs(cfg, rows: int, slots: int, dtype, seed: int = 0):
  """(x [rows, D], [(cache_k, cache_v)] zeroed, [weights]) of a step: one weight set per layer."""
  layers = [random_layer(cfg, k, dtype) for k in jax.random.split(jax.random.key(seed),
                                                                   cfg.num_hidden_layers)]
  shape = (rows, slots, cfg.num_key_value_heads, cfg.dim_per_head)
  caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layers]
  x = jax.random.normal(jax.random.key(seed + 1), (rows, cfg.hidden_size)).astype(dtype)
  return x, caches, layers


def step_program(cfg, rows: int, slots: int, dtype, impl: str, steps: int, prompt_len: int,
                 interpret: bool, seed: int = 0, config=None):
  """(jitted fn, args): ``steps`` decode steps of all layers, carried x and caches."""
  x, caches, layers = step_inputs(cfg, rows, slots, dtype, seed)
  inv = _inv_freq(cfg)

  def run(x, caches, layers):
    def body(t, carry):
      x, caches, timeouts = carry
      pos = jnp.full((rows,), prompt_len, jnp.int32) + t
      # as the model's step: one barrier state per step for the persistent layer
      x, ks, vs, sync = decode_layers(x, pos, inv, layers, [k for k, _ in caches],
                                      [v for _, v in caches], eps=cfg.rms_norm_eps, dtype=dtype,
                                      impl=impl, interpret=interpret, config=config,
                                      attention_impl=ATTENTION)
      if sync is not None:
        timeouts = timeouts + barrier_timeouts(sync)
      return x, list(zip(ks, vs)), timeouts
    return jax.lax.fori_loop(0, steps, body, (x, caches, jnp.int32(0)))
  return jax.jit(run, donate_argnums=(1,)), (x, caches, layers)


def trace_step(cfg, rows: int, slots: int, dtype, prompt_len: int, interpret: bool,
               seed: int = 0, repeats: int = 3) -> dict:
  """Where the persistent layer's time goes: one decode step of all layers with
  ``GpuConfig(trace=True)`` (each program's timestamps at entry, at each barrier and at exit),
  run ``repeats`` times; ``persistent.summarise_trace`` of the last (warm) run, plus the barrier
  waits that gave up."""
  from kernels.decode_block import persistent  # pylint: disable=import-outside-toplevel
  from kernels.decode_block.gpu import default_config  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(
      default_config(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.dim_per_head), trace=True)
  x, caches, layers = step_inputs(cfg, rows, slots, dtype, seed)
  pos = jnp.full((rows,), prompt_len, jnp.int32)

  def step(x, layers, caches):  # the caches donated, as the timed program's: updated in place
    sync, traces, new = persistent.new_sync(), [], []
    for w, (ck, cv) in zip(layers, caches):
      x, ck, cv, sync, trace = persistent.decode_layer_persistent(
          x, pos, _inv_freq(cfg), w, ck, cv, eps=cfg.rms_norm_eps, dtype=dtype,
          config=config, interpret=interpret, sync=sync)
      traces.append(trace)
      new.append((ck, cv))
    return jnp.stack(traces), barrier_timeouts(sync), new
  step = jax.jit(step, donate_argnums=(2,))
  for _ in range(repeats):
    traces, timeouts, caches = jax.block_until_ready(step(x, layers, caches))
  summary = persistent.summarise_trace(traces)
  return dict(summary, programs=int(traces.shape[1]), barrier_timeouts=int(timeouts))


def time_steps(fn, args, repeats: int, steps: int) -> tuple[float, float, int]:
  """(median µs per step over ``repeats`` calls, first-call seconds, barrier waits that gave up
  over all calls: 0 unless the persistent layer's programs were not all resident)."""
  x, caches, layers = args
  t0 = time.perf_counter()
  x, caches, timeouts = jax.block_until_ready(fn(x, caches, layers))
  first = time.perf_counter() - t0
  times, total = [], int(timeouts)
  for _ in range(repeats):
    t0 = time.perf_counter()
    x, caches, timeouts = jax.block_until_ready(fn(x, caches, layers))
    times.append(time.perf_counter() - t0)
    total += int(timeouts)
  return 1e6 * statistics.median(times) / steps, first, total


def step_bytes(cfg, rows: int, valid_slots: int, dtype) -> int:
  """Bytes one step must read: every layer's weights and the valid k / v cache slots."""
  size = jnp.dtype(dtype).itemsize
  per_layer = sum(int(jnp.prod(jnp.array(s))) for s in layer_shapes(cfg).values())
  kv = 2 * rows * valid_slots * cfg.num_key_value_heads * cfg.dim_per_head
  return cfg.num_hidden_layers * (per_layer + kv) * size


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", nargs="+", default=["smollm2-135m", "llama-1b"],
                      choices=sorted(common.PRESETS))
  parser.add_argument("--batch", nargs="+", type=int, default=[1, 16],
                      help="prompts (1 decodes as 2 rows on a GPU, as generate does); at most 16")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--slots", type=int, default=320, help="cache slots (prompt + new tokens)")
  parser.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--biases", action="store_true", help="also check every bias group")
  parser.add_argument("--quick-check", action="store_true",
                      help="check at the timed --batch only (by default also at 16 rows, the "
                           "most the fused layer takes)")
  parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                      help="implementations to check and time (xla, the baseline, always runs)")
  parser.add_argument("--interpret", action="store_true",
                      help="the kernels in Pallas interpret mode (CPU smoke test; float32)")
  parser.add_argument("--sweep", action="store_true",
                      help="after the table: the fused layer's launch settings (SWEEP) at the "
                           "first --config and --batch, in the time left")
  parser.add_argument("--time-limit", type=float, default=None)
  parser.add_argument("--out", default="decode_block.json")
  args = parser.parse_args(argv)
  if any(not 1 <= b <= 16 for b in args.batch):
    parser.error(f"--batch: the fused layer takes 1 to 16 prompts, got {args.batch}")
  if args.prompt_len + args.steps * (args.repeats + 1) > args.slots:
    args.slots = args.prompt_len + args.steps * (args.repeats + 1)  # positions never pass the cache
  return args


def main(argv=None):
  args = parse_args(argv)
  budget = common.Budget(args.time_limit)
  dtype = jnp.float32 if args.interpret else jnp.bfloat16
  env = common.environment()
  results = common.Results(args.out, tool="benchmarks/decode_block.py", environment=env,
                           settings=vars(args), checks=[], rows=[], check_failed=[])
  common.log(f"{env['device']}, jax {env['versions']['jax']}")
  kernel_impls = [impl for impl in args.impls if impl != "xla"]
  # LAST_IMPLS are checked and timed after every other implementation's rows are written, so a
  # crash there (the persistent layer's first run on a GPU) loses nothing else
  stages = [[i for i in kernel_impls if i not in LAST_IMPLS],
            [i for i in kernel_impls if i in LAST_IMPLS]]
  checks, rows, bandwidth = {}, {}, None
  for stage, impls in enumerate(stages):
    if stage and not impls:
      break
    passed = run_checks(args, dtype, impls, checks, results)
    if stage == 0:
      from benchmarks.quantized_matmul import copy_bandwidth  # pylint: disable=import-outside-toplevel
      bandwidth = copy_bandwidth(n_bytes=2**30 if not args.interpret else 2**23)
      results.update(copy_bandwidth_bytes_per_s=bandwidth)
      common.log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    if not time_table(args, dtype, ["xla"] * (stage == 0) + passed, rows, bandwidth, budget,
                      results):
      results.update(status="time limit")
      return results.doc
  swept = [i for i in ("pallas", "pallas_persistent")  # not one whose table row failed
           if i in kernel_impls and i not in results.doc["check_failed"]
           and not any(r.get(f"{i}_error") for r in results.doc["rows"])]
  if args.sweep and swept:
    sweep(args, dtype, bandwidth, budget, results, swept)
  results.update(status="complete")
  return results.doc


def run_checks(args, dtype, impls, checks: dict, results) -> list[str]:
  """``check`` of ``impls`` at every --config / --batch (and 16) / bias setting, merged into the
  check rows (``checks``: by point); returns the impls that passed everywhere (the others are
  named in the JSON's ``check_failed`` and not timed)."""
  failed = set()
  for name in args.config:
    cfg = common.model_config(name, param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
    extra = set() if args.interpret or args.quick_check else {16}
    for batch in sorted(set(args.batch) | extra):
      for biases in ((False, True) if args.biases else (False,)):
        try:
          got = check(cfg, batch, args.slots, dtype, args.interpret, biases, impls=impls)
        except Exception as e:  # pylint: disable=broad-except
          err = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
          got = dict(biases=biases, ok_by_impl=dict.fromkeys(impls, False),
                     error={impl: err for impl in impls})
        row = checks.get((name, batch, biases))
        if row is None:
          row = checks[name, batch, biases] = dict(config=name, batch=batch, biases=biases)
          results.append("checks", row)
        for key, value in got.items():
          if isinstance(value, dict):
            row.setdefault(key, {}).update(value)
          else:
            row[key] = value
        row["ok"] = all(row["ok_by_impl"].values())
        failed |= {impl for impl, ok in got["ok_by_impl"].items() if not ok}
        results.update(check_failed=sorted(set(results.doc["check_failed"]) | failed))
        common.log(f"check {name} batch {batch}{' biases' if biases else ''} {impls}: {got}")
  if failed:
    common.log(f"check failed, not timed: {sorted(failed)}")
  return [impl for impl in impls if impl not in failed]


def time_table(args, dtype, impls, rows: dict, bandwidth, budget, results) -> bool:
  """All layers of one step with each of ``impls`` at every --config / --batch, into the table's
  rows (``rows``: by point; a later stage adds its columns to the same rows). False when the time
  limit stopped it before a row."""
  for name in args.config:
    cfg = common.model_config(name, param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
    for batch in args.batch:
      if budget.over():
        return False
      n_rows = 2 if batch == 1 and not args.interpret else batch
      valid = args.prompt_len + args.steps // 2  # the mean valid slots over a call's steps
      floor = step_bytes(cfg, n_rows, valid, dtype) / bandwidth * 1e6
      row = rows.get((name, batch))
      if row is None:
        row = rows[name, batch] = dict(config=name, batch=batch, rows=n_rows,
                                       floor_us=round(floor, 2),
                                       bytes_per_step=step_bytes(cfg, n_rows, valid, dtype))
        results.append("rows", row)
      for impl in impls:
        if impl != "xla" and budget.over():  # a row keeps what it timed
          row[f"{impl}_error"] = "skipped: time limit"
          continue
        try:
          fn, fargs = step_program(cfg, n_rows, args.slots, dtype, impl, args.steps,
                                   args.prompt_len, args.interpret)
          row[f"{impl}_launches"] = common.loop_launches(
              fn.lower(*fargs).compile().as_text())["launches"]
          us, first, timeouts = time_steps(fn, fargs, args.repeats, args.steps)
          row.update({f"{impl}_us": round(us, 2), f"{impl}_first_call_s": round(first, 2),
                      f"{impl}_over_floor": round(us / floor, 2)})
          if timeouts:  # a wrong result: the time does not count
            row[f"{impl}_error"] = f"{timeouts} barrier waits timed out (programs not resident)"
            del row[f"{impl}_us"]
        except Exception as e:  # pylint: disable=broad-except
          row[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if impl != "xla" and "xla_us" in row and f"{impl}_us" in row:
          row[f"xla_over_{impl}"] = round(row["xla_us"] / row[f"{impl}_us"], 3)
        results.update()
        if impl == "pallas_persistent" and f"{impl}_us" in row and not budget.over():
          try:  # each phase's and each barrier's time inside the launches (GPU timestamps)
            row[f"{impl}_trace"] = {k: round(v, 3) if isinstance(v, float) else v
                                    for k, v in trace_step(cfg, n_rows, args.slots, dtype,
                                                           args.prompt_len,
                                                           args.interpret).items()}
          except Exception as e:  # pylint: disable=broad-except
            row[f"{impl}_trace_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
          results.update()
      common.log(f"{name} batch {batch}: {row}")
  return True


# (name, GpuConfig fields) tried by --sweep; "default" is kernels.decode_block.default_config
SWEEP = (("default", {}), ("block_k 64", dict(block_k=64)), ("block_k 128", dict(block_k=128)),
         ("stages 2", dict(num_stages=2)), ("stages 3", dict(num_stages=3)),
         ("warps 2", dict(num_warps=2)), ("warps 8", dict(num_warps=8)),
         ("block_n 32", dict(block_n=32)), ("heads_per_step 1", dict(heads_per_step=1)),
         # the persistent layer only: fewer resident programs (each then takes more tasks), the
         # barrier's polls as volatile loads and one atomic read at the end
         ("programs 64", dict(programs=64)), ("programs 32", dict(programs=32)),
         ("poll load", dict(poll="load")),
         # ... and the first MLP weights loaded before the barrier wait
         ("prefetch", dict(prefetch=True)), ("prefetch poll load", dict(prefetch=True, poll="load")))
PERSISTENT_ONLY = ("programs", "poll", "prefetch")


def sweep(args, dtype, bandwidth, budget, results, impls=("pallas",)):
  """The fused layers of one step under each SWEEP setting (first --config / --batch), for each
  of ``impls`` in turn (the five launches first, then the persistent launch, so that a crash in
  the latter keeps the former's rows; ``PERSISTENT_ONLY`` settings: the persistent one only).
  Each setting is checked (``check``, one layer) before it is timed."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from kernels.decode_block import default_config  # pylint: disable=import-outside-toplevel
  name, batch = args.config[0], args.batch[0]
  cfg = common.model_config(name, param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
  rows = 2 if batch == 1 and not args.interpret else batch
  base = default_config(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.dim_per_head)
  floor = step_bytes(cfg, rows, args.prompt_len + args.steps // 2, dtype) / bandwidth * 1e6
  for impl in impls:
    for label, fields in SWEEP:
      if impl != "pallas_persistent" and any(f in fields for f in PERSISTENT_ONLY):
        continue
      if budget.over(20):
        return
      row = dict(config=name, batch=batch, impl=impl, setting=label, **fields)
      config = dataclasses.replace(base, **fields)
      try:
        checked = check(cfg, batch, args.slots, dtype, args.interpret, False, impls=[impl],
                        config=config)
        if not checked["ok"]:
          row["error"] = f"check failed: {checked.get('error') or checked['max_rel_err']}"[:300]
          results.append("sweep", row)
          common.log(f"sweep {name} batch {batch} {impl} {label}: {row}")
          continue
        fn, fargs = step_program(cfg, rows, args.slots, dtype, impl, args.steps,
                                 args.prompt_len, args.interpret, config=config)
        us, _, timeouts = time_steps(fn, fargs, args.repeats, args.steps)
        if timeouts:
          row["error"] = f"{timeouts} barrier waits timed out"
        else:
          row.update(us=round(us, 2), over_floor=round(us / floor, 2))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      results.append("sweep", row)
      common.log(f"sweep {name} batch {batch} {impl} {label}: {row}")


if __name__ == "__main__":
  main()
