"""One decoder layer's cached one-token step as ONE persistent Pallas (Triton) launch.

``gpu.py`` runs the layer as five launches because each phase needs the whole output of the one
before it, and a new launch is what guarantees that. Here P resident programs (at most one per
multiprocessor) run all five phases in one launch and wait for each other at a barrier across the
grid between them:

    phase 1  RMSNorm + q / k / v + RoPE + cache writes   (H + 2K) x Dh / (2 head_block) tasks
    barrier
    phase 2  flash-decoding attention of each chunk      B x K x C tasks
    barrier
    phase 3  merge of the chunks + W_o + residual         D / block_n tasks
    barrier
    phase 4  RMSNorm + gate / up + SiLU x up              F / block_n tasks
    barrier
    phase 5  W_down + residual                            D / block_n tasks

Each phase is the same task body as the five-launch layer (``gpu._attn_in_kernel``,
``decode_attention.gpu.attend_chunk``, ``gpu._attn_out_kernel``, ``gpu._mlp_in_kernel``,
``gpu._mlp_out_kernel``, given their task's ids instead of the grid's); program ``i`` takes tasks
i, i + P, i + 2P, ... The intermediate results (q, the attention chunks' partials, a, the MLP
activation) go through global memory (outputs of the call, not read by the caller).

Why: at batch 1 the SmolLM2-135M step is bound by its launches (~2.7 us each on an H200,
docs/benchmarks.md); a barrier costs a round trip to L2 (an atomic add, then polling), so a layer
becomes one launch + four barriers instead of five launches (~12 with XLA's layer). Not yet run on
a GPU: opt-in (``impl="pallas_persistent"``).

The barrier (``grid_barrier``), the pattern of CUDA cooperative groups' grid sync: a CTA barrier
(every thread's stores issued), one thread's atomic add of 1 to ``sync[ARRIVALS]`` (acquire-release
at GPU scope, Triton's default: a fence before it, so the CTA's stores are visible before its
arrival is), polling until the counter reaches the barrier's target (k P at barrier k), the last
read an atomic one (acquire: the L1 invalidated after it), then a CTA barrier. What a program then
reads of another's writes is correct because of that acquire and the CTA barrier after it: the
reads outside the K loops are volatile loads, but Triton's pipeliner turns the loop loads into
``cp.async`` copies (from L2, or through the just-invalidated L1), which have no volatile form.
Each program counts itself out at its end (``sync[EXITS]``); the last one out subtracts 4P and P
from the two counters, so every launch starts from 0 and the same ``sync`` serves every layer of a
step (``decode_layers`` passes it on), with any P.

Safety: every program must be resident at once, or the barrier never fills. P is at most the
device's multiprocessor count and each program needs far less than a multiprocessor (83 KB of
shared memory and 168 registers per thread at the SmolLM2-135M shape), so a launch that starts on
an idle GPU has all of them resident. Should one wait anyway (another stream holding the SMs), a
wait gives up after ``max_polls`` reads, counts a timeout in ``sync[TIMEOUTS]`` and goes on; every
later wait on the same ``sync`` then ends at once, and each program writes NaN into its columns of
x', so the step fails visibly (and ``barrier_timeouts(sync) > 0``) instead of hanging the GPU.
Interpret mode runs the programs one after another, so it runs one program (P = 1), which passes
every barrier at once: it tests the phases, their task split and the barrier arithmetic, not the
GPU's memory ordering (the compiled check in ``benchmarks/decode_block.py`` does that, on a GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.decode_attention import gpu as attention_gpu
from kernels.decode_block import gpu

BARRIERS = 4  # per layer: between the five phases
# the barrier state: arrivals in this launch (targets P, 2P, 3P, 4P), barrier waits that ended
# before their target (all launches on this state), programs done (the last resets both counters)
ARRIVALS, TIMEOUTS, EXITS = 0, 1, 2
SYNC_WORDS = 3
# the timestamps of one program with GpuConfig(trace=True), in this order
TRACE = ("entry",) + tuple(f"{e}_{k}" for k in range(1, BARRIERS + 1)
                           for e in ("arrive", "leave")) + ("exit",)
i32 = jnp.int32


def new_sync():
  """A zeroed barrier state for one step's layers (``decode_layer_persistent``'s ``sync``)."""
  return jnp.zeros((SYNC_WORDS,), i32)


def barrier_timeouts(sync):
  """How many barrier waits gave up (``GpuConfig.max_polls``): 0 unless the programs were not all
  resident at once, in which case the layers' outputs are wrong."""
  return sync[TIMEOUTS]


def device_multiprocessors() -> int:
  """Streaming multiprocessors of the default device (``decode_attention.gpu.NUM_SMS``, the
  H100 / H200's 132, when the backend does not say: a CPU, or an offline compile)."""
  try:
    count = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:
    count = None
  return int(count) if count else attention_gpu.NUM_SMS


def phase_tasks(B: int, D: int, F: int, H: int, K: int, Dh: int, chunks: int,
                cfg: gpu.GpuConfig) -> tuple[int, ...]:
  """Tasks of the five phases (module doc), in order."""
  return ((H + 2 * K) * (Dh // 2 // cfg.head_block), B * K * chunks, D // cfg.block_n,
          F // cfg.block_n, D // cfg.block_n)


def num_programs(tasks: tuple[int, ...], cfg: gpu.GpuConfig, interpret: bool) -> int:
  """P: ``cfg.programs`` if set; else 1 in interpret mode (programs run one after another) and on
  a GPU the most tasks of any phase, at most one program per multiprocessor."""
  if cfg.programs is not None:
    return cfg.programs
  return 1 if interpret else min(max(tasks), device_multiprocessors())


def _now(after, interpret: bool):
  """[1]: the GPU's ``%globaltimer`` (ns, low 32 bits) read after ``after`` (an int32 this program
  just got from an atomic: the read waits for it); interpret mode: ``after`` itself. (A [1] block:
  Triton's inline assembly gives a tensor, which a scalar store does not take.)"""
  after = jnp.full((1,), after, i32)
  if interpret:
    return after
  [t] = plgpu.elementwise_inline_asm("mov.u32 $0, %globaltimer_lo;", args=[after],
                                     constraints="=r,r", pack=1,
                                     result_shape_dtypes=[jax.ShapeDtypeStruct((1,), i32)])
  return t


def grid_barrier(sync_ref, target: int, *, max_polls: int, poll: str, interpret: bool,
                 trace=None):
  """Add this program's arrival to ``sync[ARRIVALS]`` and wait until it reaches ``target``
  (module doc). The wait reads the counter by atomic adds of 0 (``poll="atomic"``: each read
  an acquire) or by volatile loads and one atomic read at the end (``poll="load"``: lighter
  polls, one more round trip). It ends early once any wait of the launches on this ``sync`` has
  failed (``sync[TIMEOUTS] > 0``), and after ``max_polls`` reads; a wait that ends below the
  target counts in ``sync[TIMEOUTS]``. ``trace``: a function (name, after) that records a
  timestamp ("arrive" once the arrival is counted, "leave" once the wait ended)."""
  if not interpret:
    plgpu.debug_barrier()  # every thread's stores issued before the arrival
  seen = plgpu.atomic_add(sync_ref, i32(ARRIVALS), i32(1)) + 1
  if trace is not None:
    trace("arrive", seen)

  def waiting(carry):
    seen, failed, polls, _ = carry
    return (seen < target) & (failed == 0) & (polls < max_polls)

  def read(carry):  # the indices ride in the carry: constants captured here break interpret mode
    _, _, polls, index = carry
    if poll == "atomic":  # an atomic read (add 0): acquire, at GPU scope
      seen = plgpu.atomic_add(sync_ref, index[0], index[2])
    else:
      seen = plgpu.load(sync_ref.at[index[0]], volatile=True)
    return seen, plgpu.load(sync_ref.at[index[1]], volatile=True), polls + 1, index

  index = (i32(ARRIVALS), i32(TIMEOUTS), i32(0))
  failed = plgpu.load(sync_ref.at[index[1]], volatile=True)
  seen, _, _, _ = lax.while_loop(waiting, read, (seen, failed, i32(0), index))
  if poll == "load":  # the acquire: an atomic read once the loads saw the target
    seen = plgpu.atomic_add(sync_ref, i32(ARRIVALS), i32(0))
  if trace is not None:
    trace("leave", seen)

  @pl.when(seen < target)
  def _():
    plgpu.atomic_add(sync_ref, i32(TIMEOUTS), i32(1))

  if not interpret:
    plgpu.debug_barrier()  # no thread reads before the wait ended


def _exit(sync_ref, programs: int, interpret: bool):
  """Count this program out (``sync[EXITS]``); the last one out resets the arrival and exit
  counters to 0 for the next launch on this ``sync`` (every program has left every barrier by
  then, and the next launch starts after this one ends). Returns the atomic's old value."""
  if not interpret:
    plgpu.debug_barrier()
  old = plgpu.atomic_add(sync_ref, i32(EXITS), i32(1))

  @pl.when(old == programs - 1)
  def _():  # both counters are exactly 4P and P now: subtract them
    plgpu.atomic_add(sync_ref, i32(ARRIVALS), i32(-BARRIERS * programs))
    plgpu.atomic_add(sync_ref, i32(EXITS), i32(-programs))
  return old


def _for_tasks(n: int, programs: int, task, pid=None, first=None):
  """Run ``task(t)`` for this program's tasks t = i, i + P, ... < n (i = ``pid``, None: its id;
  P programs). (Interpret mode takes the program id at the kernel's top level only.) ``first``:
  given to the first task as ``task(t, first)`` (weights loaded before a barrier)."""
  pid = pl.program_id(0) if pid is None else pid

  def one(r, given=None):
    t = pid + r * programs

    @pl.when(t < n)
    def _():
      if given is None:
        task(t)
      else:
        task(t, given)

  one(0, first)
  rounds = -(-n // programs)
  if rounds == 2:
    one(1)
  elif rounds > 2:
    def body(r, carry):
      one(r)
      return carry
    lax.fori_loop(1, rounds, body, i32(0))


def _layer_kernel(*refs, names: tuple[str, ...], heads: int, kv_heads: int, head_dim: int,
                  chunk: int, chunks: int, eps: float, dtype, cfg: gpu.GpuConfig, programs: int,
                  tasks: tuple[int, ...], interpret: bool):
  r = dict(zip(names, refs))
  qkv_bias, o_bias, mlp_bias = "q_bias" in r, "o_bias" in r, "gate_bias" in r
  sync = r["sync_out"]
  pid = pl.program_id(0)
  record = None
  if cfg.trace:  # each timestamp stored at once: the store keeps it in place (module doc)
    def record(name, after):
      r["trace"][pid, pl.ds(TRACE.index(name), 1)] = _now(after, interpret)
    record("entry", plgpu.load(r["sync"].at[i32(ARRIVALS)], volatile=True))

  def barrier(k):  # barrier k of 4: its target is k P
    trace = None if record is None else (lambda event, after: record(f"{event}_{k}", after))
    grid_barrier(sync, k * programs, max_polls=cfg.max_polls, poll=cfg.poll,
                 interpret=interpret, trace=trace)
  B = r["x"].shape[0]
  S = r["cache_k_out"].shape[1]
  half_blocks = head_dim // 2 // cfg.head_block

  # phase 1: RMSNorm + q / k / v + RoPE + the cache writes
  attn_in = functools.partial(
      gpu._attn_in_kernel, heads=heads, kv_heads=kv_heads, head_dim=head_dim,  # pylint: disable=protected-access
      head_block=cfg.head_block, block_k=cfg.block_k, eps=eps, dtype=dtype, bias=qkv_bias)
  biases = [r["q_bias"], r["k_bias"], r["v_bias"]] if qkv_bias else []
  _for_tasks(tasks[0], programs, lambda t: attn_in(
      r["x"], r["positions"], r["inv_freq"], r["input_norm"], r["q"], r["k"], r["v"], *biases,
      None, None, r["q_buf"], r["cache_k_out"], r["cache_v_out"],
      program=(lax.div(t, i32(half_blocks)), lax.rem(t, i32(half_blocks)))))
  barrier(1)

  # phase 2: the attention of each (row, kv head, chunk)
  att = cfg.attention
  def attend(t):
    b, rest = lax.div(t, i32(kv_heads * chunks)), lax.rem(t, i32(kv_heads * chunks))
    kv, c = lax.div(rest, i32(chunks)), lax.rem(rest, i32(chunks))
    length = jnp.clip(r["positions"][b] + 1, 1, S)
    attention_gpu.attend_chunk(
        length, c, r["q_buf"].at[b, kv], r["cache_k_out"], r["cache_v_out"],
        r["acc"].at[b, kv, c], r["m"].at[b, kv, c], r["l"].at[b, kv, c], block_s=att.block_s,
        chunk=chunk, scale=1 / math.sqrt(head_dim), groups=heads // kv_heads, lead=(b,),
        trail=(kv, slice(None)), volatile=True)
  _for_tasks(tasks[1], programs, attend)
  barrier(2)

  # phase 3: the chunks merged + W_o + the residual
  attn_out = functools.partial(
      gpu._attn_out_kernel, heads=heads, kv_heads=kv_heads, head_dim=head_dim,  # pylint: disable=protected-access
      block_n=cfg.block_n, heads_per_step=gpu._heads_per_step(heads, cfg), dtype=dtype,  # pylint: disable=protected-access
      cache_dtype=r["cache_k_out"].dtype, bias=o_bias, volatile=True)
  o_refs = [r["o_bias"]] if o_bias else []
  _for_tasks(tasks[2], programs, lambda j: attn_out(
      r["x"], r["acc"], r["m"], r["l"], r["o"], *o_refs, r["a"], program=j))
  # GpuConfig.prefetch: a program's first MLP task's first weights, loaded before it waits (a
  # program past the tasks loads the last task's: harmless, unused)
  first_task = jnp.minimum(pid, i32(tasks[3] - 1))
  first4 = gpu.mlp_in_first_weights(r["gate"], r["up"], first_task, cfg.block_n, cfg.block_k) \
      if cfg.prefetch else None
  barrier(3)

  # phase 4: RMSNorm + gate / up + SiLU x up
  mlp_in = functools.partial(gpu._mlp_in_kernel, block_n=cfg.block_n, block_k=cfg.block_k,  # pylint: disable=protected-access
                             eps=eps, dtype=dtype, bias=mlp_bias, volatile=True)
  gu_refs = [r["gate_bias"], r["up_bias"]] if mlp_bias else []
  _for_tasks(tasks[3], programs, lambda j, first=None: mlp_in(
      r["a"], r["post_norm"], r["gate"], r["up"], *gu_refs, r["act"], program=j, first=first),
             pid, first4)
  first_task = jnp.minimum(pid, i32(tasks[4] - 1))
  first5 = gpu.mlp_out_first_weights(r["down"], first_task, cfg.block_n, cfg.block_k) \
      if cfg.prefetch else None
  barrier(4)

  # phase 5: W_down + the residual
  mlp_out = functools.partial(gpu._mlp_out_kernel, block_n=cfg.block_n, block_k=cfg.block_k,  # pylint: disable=protected-access
                              dtype=dtype, bias=mlp_bias, volatile=True)
  d_refs = [r["down_bias"]] if mlp_bias else []
  _for_tasks(tasks[4], programs, lambda j, first=None: mlp_out(
      r["a"], r["act"], r["down"], *d_refs, r["out"], program=j, first=first), pid, first5)

  # a wait that failed anywhere on this state: this program's columns of x' become NaN, so the
  # wrong result cannot pass for a right one (the rows and the caches are not repaired)
  @pl.when(plgpu.load(sync.at[i32(TIMEOUTS)], volatile=True) > 0)
  def _():
    def poison(j):
      cols = pl.ds(j * cfg.block_n, cfg.block_n)
      gpu._store_rows(r["out"], B, cols, jnp.full((gpu.ROWS, cfg.block_n), jnp.nan, jnp.float32))  # pylint: disable=protected-access
    _for_tasks(tasks[4], programs, poison, pid)

  old = _exit(sync, programs, interpret)
  if record is not None:  # after this program's last stores (the exit atomic is fenced)
    record("exit", old)


def decode_layer_persistent(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *,
                            eps: float, dtype, config: gpu.GpuConfig | None = None,
                            interpret: bool = False, sync=None):
  """One layer of one cached decode step in one launch (module doc) -> (x' [B, D], cache_k,
  cache_v, sync[, trace]). Same arguments and result as ``gpu.decode_layer_gpu`` (caches
  [B, S, K, Dh] updated in place), plus ``sync``: the barrier state [``SYNC_WORDS``] int32,
  ``new_sync()`` (the default) or the one a previous launch returned (its counters are back at 0);
  ``barrier_timeouts(sync)`` says whether a barrier gave up. ``config.trace``: also [P,
  len(TRACE)] timestamps (``summarise_trace``)."""
  B, D = x_BxD.shape
  S, K, Dh = cache_k.shape[1:]
  H = weights["q"].shape[1] // Dh
  F = weights["gate"].shape[1]
  cfg = gpu._layer_config(B, D, F, H, K, S, Dh, config)  # pylint: disable=protected-access
  chunk, chunks = attention_gpu.chunk_layout(B, K, S, cfg.attention)
  tasks = phase_tasks(B, D, F, H, K, Dh, chunks, cfg)
  programs = num_programs(tasks, cfg, interpret)
  dtype = jnp.dtype(dtype)
  sync = new_sync() if sync is None else sync
  if getattr(sync, "shape", None) != (SYNC_WORDS,) or sync.dtype != i32:
    raise ValueError(f"decode_layer_persistent: sync must be int32 [{SYNC_WORDS}] (new_sync()), "
                     f"got {getattr(sync, 'dtype', None)} {getattr(sync, 'shape', None)}")

  inputs = {"x": x_BxD.astype(dtype), "positions": positions_B.astype(i32),
            "inv_freq": inv_freq.astype(jnp.float32)}
  for name in ("input_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "o_bias",
               "post_norm", "gate", "up", "gate_bias", "up_bias", "down", "down_bias"):
    if name in weights:
      inputs[name] = weights[name]
  inputs.update(cache_k=cache_k, cache_v=cache_v, sync=sync)
  f32, sds = jnp.float32, jax.ShapeDtypeStruct
  P = attention_gpu.PAD_GROUPS
  outputs = {"out": sds((B, D), dtype), "a": sds((B, D), dtype), "act": sds((B, F), dtype),
             "q_buf": sds((B, K, P, Dh), cache_k.dtype),
             "acc": sds((B, K, chunks, P, Dh), f32), "m": sds((B, K, chunks, P), f32),
             "l": sds((B, K, chunks, P), f32), "cache_k_out": sds(cache_k.shape, cache_k.dtype),
             "cache_v_out": sds(cache_v.shape, cache_v.dtype), "sync_out": sds(sync.shape, i32)}
  if cfg.trace:
    outputs["trace"] = sds((programs, len(TRACE)), i32)
  in_names, out_names = list(inputs), list(outputs)
  aliases = {in_names.index(n): out_names.index(n + "_out")
             for n in ("cache_k", "cache_v", "sync")}
  kernel = functools.partial(
      _layer_kernel, names=tuple(in_names + out_names), heads=H, kv_heads=K, head_dim=Dh,
      chunk=chunk, chunks=chunks, eps=eps, dtype=dtype, cfg=cfg, programs=programs, tasks=tasks,
      interpret=interpret)
  params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages)
  result = pl.pallas_call(kernel, grid=(programs,), out_shape=list(outputs.values()),
                          input_output_aliases=aliases, compiler_params=params,
                          interpret=interpret, name="decode_layer_persistent")(*inputs.values())
  result = dict(zip(out_names, result))
  out = result["out"], result["cache_k_out"], result["cache_v_out"], result["sync_out"]
  return out + (result["trace"],) if cfg.trace else out


def summarise_trace(traces) -> dict:
  """Where a persistent launch's time goes, from ``GpuConfig(trace=True)`` timestamps ``traces``
  [L, P, len(TRACE)] (one launch per layer, in order; ns, the low 32 bits of the GPU's clock,
  taken as signed differences from each launch's first program's entry, so a wrap of the clock
  inside a launch does not matter). Medians over the launches, in µs:

    phase_k: from the last program to leave barrier k - 1 (the launch's first entry for k = 1)
      to the last to arrive at barrier k (the last program's exit for k = 5): the phase's
      critical path;
    barrier_k: from the last arrival at barrier k to the last program leaving it (so the phases
      and barriers add up to the launch); wait_k: the median program's wait there;
    launch: the first entry to the last exit; gap: the last exit of launch l to the first entry
      of launch l + 1 (the time between layers' launches);
    resolution_ns: the smallest nonzero step between a launch's sorted timestamps (the clock's
      update granularity, or less: the times above are no finer than it).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  def signed(d):  # differences of 32-bit clocks as signed 32-bit numbers
    return ((d + (1 << 31)) % (1 << 32)) - (1 << 31)
  raw = np.asarray(traces, np.int64) & 0xFFFFFFFF
  t = signed(raw - raw[:, :1, :1])  # [L, P, T], relative to program 0's entry of each launch
  col = {name: t[:, :, i] for i, name in enumerate(TRACE)}
  ends = [col["entry"].min(axis=1)] + [col[f"leave_{k}"].max(axis=1)
                                       for k in range(1, BARRIERS + 1)]
  stops = [col[f"arrive_{k}"].max(axis=1) for k in range(1, BARRIERS + 1)]
  stops.append(col["exit"].max(axis=1))
  out = {}
  for k in range(BARRIERS + 1):
    out[f"phase_{k + 1}_us"] = float(np.median(stops[k] - ends[k])) / 1e3
  for k in range(1, BARRIERS + 1):
    out[f"barrier_{k}_us"] = float(np.median(ends[k] - stops[k - 1])) / 1e3
    out[f"wait_{k}_us"] = float(np.median(col[f"leave_{k}"] - col[f"arrive_{k}"])) / 1e3
  out["launch_us"] = float(np.median(stops[-1] - ends[0])) / 1e3
  if len(t) > 1:
    first_entry = raw[1:, 0, 0] + signed(raw[1:, :, 0] - raw[1:, :1, 0]).min(axis=1)
    last_exit = raw[:-1, 0, 0] + signed(raw[:-1, :, -1] - raw[:-1, :1, 0]).max(axis=1)
    out["gap_us"] = float(np.median(signed(first_entry - last_exit))) / 1e3
  steps = np.diff(np.sort(t.reshape(len(t), -1), axis=1), axis=1)
  out["resolution_ns"] = int(steps[steps > 0].min()) if (steps > 0).any() else 0
  return out
