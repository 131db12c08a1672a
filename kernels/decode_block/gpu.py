"""One decoder layer's cached one-token step in five Pallas (Triton backend) launches.

At decode sizes (a few rows) XLA runs a Llama / Qwen2 block as ~12 launches (RMSNorm, the q / k / v
GEMM, RoPE, the k and v cache writes, attention and its merge of chunks, the o GEMM, RMSNorm with
the residual, the gate / up GEMM, SiLU x up, the down GEMM), and at the SmolLM2-135M shape each
launch, not the bytes it moves, sets the step's time (docs/benchmarks.md, "Batch-1 decode"). Here
the layer is the five dependent phases that need no barrier across the GPU:

  1. ``_attn_in_kernel``  n = RMSNorm(x); q, k, v = n W_q, n W_k, n W_v (+ bias); RoPE on q and k;
                          k and v written into the caches at each row's position (in place)
  2. ``kernels.decode_attention``'s kernel: per-chunk (acc, m, l) of flash-decoding
  3. ``_attn_out_kernel`` a = x + combine(acc, m, l) W_o (+ bias)   (the chunks merged in-kernel)
  4. ``_mlp_in_kernel``   m = RMSNorm(a); act = silu(m W_gate) * (m W_up)
  5. ``_mlp_out_kernel``  x' = a + act W_down (+ bias)

Every kernel computes its RMSNorm itself (each program normalises all rows: D values per row, far
cheaper than a launch) and pads the B <= 16 rows to 16, the tensor-core dot's smallest tile. Each
program owns ``block_n`` output columns (kernel 1: ``head_block`` columns of each RoPE half of one
head) and loops over the input in steps of ``block_k``. The casts follow the model
(``postrl.models.transformer``): the norm and RoPE's angles in float32, each matmul accumulated in
float32 and rounded to the compute dtype, the residual adds in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.decode_attention import gpu as attention_gpu

ROWS = 16  # rows per program: the tensor-core dot's smallest tile; B <= ROWS
# attention chunks per (row, kv head) at most, by default: each of the D / block_n programs of the
# output projection merges all of them again (L2 reads grow with B x chunks)
MAX_CHUNKS = 8
f32 = jnp.float32


class KernelShapeError(ValueError):
  """The fused layer cannot take these shapes or settings (the model then runs XLA's layer)."""


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Launch settings of the four matmul kernels (the attention kernel has its own).

  Attributes:
    block_k: input features per loop step (a power of two >= 16); a remainder of the input size
      runs as power-of-two steps after the loop, so any multiple of 16 works. Large steps keep
      many bytes in flight per program: at decode sizes a program's weight stream, not the
      arithmetic, sets its time.
    block_n: output columns per program of kernels 3-5 (a power of two >= 16).
    head_block: columns per program in each RoPE half of a head (kernel 1; a power of two >= 16
      dividing head_dim / 2).
    heads_per_step: query heads per loop step of the output projection (kernel 3; divides H;
      None: the largest of 4, 3, 2, 1 that does).
    num_warps, num_stages: Triton's warps per program and pipelining depth.
    attention: ``kernels.decode_attention.GpuConfig`` of the attention kernel (None: default).
    programs: the persistent layer's (``persistent.py``) resident programs; None: the most tasks
      of any phase, at most one per multiprocessor (1 in interpret mode).
    max_polls: the persistent layer's reads of the barrier counter before a wait gives up and
      counts a timeout (each read is an atomic round trip to L2, ~1 us: about a second in all).
    poll: how the persistent layer's barrier waits read the counter: "atomic" (atomic adds of 0,
      each an acquire) or "load" (volatile loads, then one atomic read: lighter polls).
    prefetch: the persistent layer loads the first K step's weights of a program's first MLP
      task (gate / up, down) before the barrier it waits at: they do not depend on it, so their
      latency overlaps the wait.
    trace: the persistent layer also returns each program's timestamps (``persistent.TRACE``:
      entry, arrival at and departure from each barrier, exit; the GPU's ``%globaltimer`` in ns,
      low 32 bits), for ``persistent.summarise_trace``: where a launch's time goes.
  """
  block_k: int = 256
  block_n: int = 16
  head_block: int = 16
  heads_per_step: int | None = None
  num_warps: int = 4
  num_stages: int = 4
  attention: attention_gpu.GpuConfig | None = None
  programs: int | None = None
  max_polls: int = 1 << 20
  poll: str = "atomic"
  prefetch: bool = False
  trace: bool = False


def default_config(d: int, f: int, h: int, dh: int) -> GpuConfig:
  """The default ``GpuConfig`` (the shapes are for a future tuned choice; not tuned on a GPU yet:
  16 output columns per program spread the few-MB matrices of a small model over as many programs
  as their widths allow, e.g. 36 and 96 programs for SmolLM2-135M's hidden size and MLP width, and
  256-feature steps keep 8-16 KB of weights per load in flight)."""
  del d, f, h, dh
  return GpuConfig()


def _heads_per_step(h: int, cfg: GpuConfig) -> int:
  if cfg.heads_per_step is not None:
    return cfg.heads_per_step
  return next(n for n in (4, 3, 2, 1) if h % n == 0)


def check_mlp_shapes(b: int, d: int, f: int, cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming what the fused MLP half (launches 4-5) cannot take."""
  def pow2(n):
    return n >= 16 and not n & (n - 1)
  if not 1 <= b <= ROWS:
    raise KernelShapeError(f"{b} rows: the fused decode layer takes 1 to {ROWS}")
  for name, value in (("block_k", cfg.block_k), ("block_n", cfg.block_n),
                      ("head_block", cfg.head_block)):
    if not pow2(value):
      raise KernelShapeError(f"{name}={value}: needs a power of two >= 16")
  for name, value in (("hidden size", d), ("MLP width", f)):
    if value % cfg.block_n:
      raise KernelShapeError(f"{name} {value} is not a multiple of block_n={cfg.block_n}")
    if value % 16:
      raise KernelShapeError(f"{name} {value} is not a multiple of 16 (the dot's smallest step)")


def check_shapes(b: int, d: int, f: int, h: int, k: int, dh: int, cfg: GpuConfig):
  """Raise ``KernelShapeError`` naming what the fused layer cannot take."""
  check_mlp_shapes(b, d, f, cfg)
  if cfg.programs is not None and cfg.programs < 1:
    raise KernelShapeError(f"programs={cfg.programs}: needs at least 1")
  if cfg.max_polls < 1:
    raise KernelShapeError(f"max_polls={cfg.max_polls}: needs at least 1")
  if cfg.poll not in ("atomic", "load"):
    raise KernelShapeError(f"poll={cfg.poll!r}: 'atomic' or 'load'")
  hps = _heads_per_step(h, cfg)
  if hps < 1 or h % hps:
    raise KernelShapeError(f"heads_per_step={hps} does not divide the {h} query heads")
  if dh % 2 or (dh // 2) % cfg.head_block:
    raise KernelShapeError(f"head_dim {dh}: half of it must be a multiple of "
                           f"head_block={cfg.head_block}")
  try:
    attention_gpu.check_shapes(h, k, dh, cfg.attention or attention_gpu.GpuConfig())
  except attention_gpu.KernelShapeError as e:
    raise KernelShapeError(f"attention: {e}") from None


# ----------------------------------------------------------------------------------- helpers


def _rows(b: int):
  rows = lax.broadcasted_iota(jnp.int32, (ROWS,), 0)
  return rows, rows < b


def _load_rows(ref, b: int, cols, other=0.0, volatile: bool = False):
  """[ROWS, n] from a [B, N] ref: rows past B read as ``other`` (``volatile``: past L1, for data
  other programs of the same launch wrote)."""
  _, ok = _rows(b)
  return plgpu.load(ref.at[pl.ds(0, ROWS), cols], mask=ok[:, None], other=other,
                    volatile=volatile)


def _store_rows(ref, b: int, cols, value):
  _, ok = _rows(b)
  plgpu.store(ref.at[pl.ds(0, ROWS), cols], value.astype(ref.dtype), mask=ok[:, None])


def _k_loop(k_len: int, block_k: int, step, carry, k0=0, first=None):
  """carry = step(start, size, carry) over [k0, k0 + k_len): a loop of ``block_k`` steps, then
  the remainder (a multiple of 16) as static power-of-two steps, so no load runs past the array.
  ``first``: the weights of the first ``block_k`` step, loaded already (``step(start, size,
  carry, first)`` then runs that step on them; k_len >= block_k)."""
  n = k_len // block_k
  if first is not None:
    carry = step(k0, block_k, carry, first)
    k0, k_len, n = k0 + block_k, k_len - block_k, n - 1
  if n:
    carry = lax.fori_loop(0, n, lambda i, c: step(k0 + i * block_k, block_k, c), carry)
  start, rest, size = k0 + n * block_k, k_len - n * block_k, block_k // 2
  while rest:
    if rest >= size:
      carry = step(start, size, carry)
      start, rest = start + size, rest - size
    size //= 2
  return carry


def _inv_rms(x_ref, b: int, block_k: int, eps: float, volatile: bool = False):
  """[ROWS] float32 1 / sqrt(mean_j x_j^2 + eps) of each row of x [B, D]."""
  d = x_ref.shape[1]

  def step(start, size, ss):
    x = _load_rows(x_ref, b, pl.ds(start, size), volatile=volatile).astype(f32)
    return ss + jnp.sum(x * x, axis=1)
  ss = _k_loop(d, block_k, step, jnp.zeros((ROWS,), f32))
  return lax.rsqrt(ss / d + eps)


def _normed_block(x_ref, w_ref, b: int, start, size: int, inv_rms, dtype, volatile: bool = False):
  """Columns [start, start + size) of RMSNorm(x) [ROWS, size] as the model rounds it:
  w_dtype * dtype(x / rms) (``postrl.models.transformer.RMSNorm``)."""
  cols = pl.ds(start, size)
  x = _load_rows(x_ref, b, cols, volatile=volatile).astype(f32)
  w = w_ref[cols].astype(dtype)
  return w[None, :] * (x * inv_rms[:, None]).astype(dtype)


def _silu(x):
  return x / (1.0 + jnp.exp(-x))


# ----------------------------------------------------------------------------------- kernels


def _attn_in_kernel(x_ref, pos_ref, freq_ref, norm_ref, wq_ref, wk_ref, wv_ref, *refs, heads: int,
                    kv_heads: int, head_dim: int, head_block: int, block_k: int, eps: float,
                    dtype, bias: bool, program=None):
  """Program (p, c): head p of [q heads | k heads | v heads], columns c of each RoPE half
  (``program``: (p, c) given, as the persistent layer's tasks do; None: the grid's ids)."""
  if bias:
    bq_ref, bk_ref, bv_ref, _, _, q_ref, ck_ref, cv_ref = refs
  else:
    (_, _, q_ref, ck_ref, cv_ref), bq_ref, bk_ref, bv_ref = refs, None, None, None
  b, d = x_ref.shape
  half = head_dim // 2
  p, c = program if program is not None else (pl.program_id(0), pl.program_id(1))
  col = c * head_block
  rows, ok = _rows(b)
  inv_rms = _inv_rms(x_ref, b, block_k, eps)

  def project(w_ref, b_ref, head):
    """The two [ROWS, head_block] column blocks of n W (+ bias) that RoPE pairs, in dtype."""
    base = head * head_dim + col

    def step(start, size, carry):
      lo, hi = carry
      a = _normed_block(x_ref, norm_ref, b, start, size, inv_rms, dtype)
      rows_k = pl.ds(start, size)
      lo = lo + jnp.dot(a, w_ref[rows_k, pl.ds(base, head_block)].astype(dtype),
                        preferred_element_type=f32)
      hi = hi + jnp.dot(a, w_ref[rows_k, pl.ds(base + half, head_block)].astype(dtype),
                        preferred_element_type=f32)
      return lo, hi
    zero = jnp.zeros((ROWS, head_block), f32)
    lo, hi = _k_loop(d, block_k, step, (zero, zero))
    lo, hi = lo.astype(dtype), hi.astype(dtype)
    if b_ref is not None:
      lo = lo + b_ref[pl.ds(base, head_block)].astype(dtype)[None, :]
      hi = hi + b_ref[pl.ds(base + half, head_block)].astype(dtype)[None, :]
    return lo, hi

  def rope(lo, hi):
    """x' = x cos + rotate_half(x) sin on the pair (lo, hi) = (x_j, x_{j + Dh/2})."""
    pos = plgpu.load(pos_ref.at[pl.ds(0, ROWS)], mask=ok, other=0).astype(f32)
    angle = pos[:, None] * freq_ref[pl.ds(col, head_block)][None, :]
    cos = jnp.cos(angle).astype(dtype).astype(f32)
    sin = jnp.sin(angle).astype(dtype).astype(f32)
    lo, hi = lo.astype(f32), hi.astype(f32)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)

  def write_cache(cache_ref, head, lo, hi):
    """cache[r, pos[r], head, columns] = row r of (lo, hi), for each real row r whose position is
    a slot of the cache (others are dropped, as the model's ``write_slots`` drops them)."""
    slots = cache_ref.shape[1]
    for r in range(b):
      pick = (rows == r)[:, None]
      pos_r = pos_ref[r]

      @pl.when((pos_r >= 0) & (pos_r < slots))
      def _():
        for part, start in ((lo, col), (hi, col + half)):
          row = jnp.sum(jnp.where(pick, part.astype(f32), 0.0), axis=0)
          cache_ref[r, pl.ds(pos_r, 1), head, pl.ds(start, head_block)] = (
              row[None].astype(cache_ref.dtype))

  @pl.when(p < heads)
  def _():  # q in the attention kernel's layout [B, K, PAD_GROUPS, Dh]: head p = (p // G, p % G)
    lo, hi = rope(*project(wq_ref, bq_ref, p))
    groups = heads // kv_heads
    kv, g = lax.div(p, jnp.int32(groups)), lax.rem(p, jnp.int32(groups))
    for part, start in ((lo, col), (hi, col + half)):
      plgpu.store(q_ref.at[pl.ds(0, ROWS), kv, g, pl.ds(start, head_block)],
                  part.astype(q_ref.dtype), mask=ok[:, None])

  @pl.when((p >= heads) & (p < heads + kv_heads))
  def _():
    head = p - heads
    write_cache(ck_ref, head, *rope(*project(wk_ref, bk_ref, head)))

  @pl.when(p >= heads + kv_heads)
  def _():
    head = p - heads - kv_heads
    write_cache(cv_ref, head, *project(wv_ref, bv_ref, head))


def _attn_out_kernel(x_ref, acc_ref, m_ref, l_ref, wo_ref, *refs, heads: int, kv_heads: int,
                     head_dim: int, block_n: int, heads_per_step: int, dtype, cache_dtype,
                     bias: bool, program=None, volatile: bool = False):
  """Program j: columns [j block_n, (j + 1) block_n) of x + attn W_o (+ bias), the attention of
  each head merged from its chunks first (``decode_attention.gpu.combine_chunks``, as a running
  merge over the chunks: a loop, so the code does not grow with the cache). ``program``: j given
  (None: the grid's id); ``volatile``: the partials read past L1 (the persistent layer)."""
  bo_ref, out_ref = refs if bias else (None, refs[0])
  b = x_ref.shape[0]
  chunks = acc_ref.shape[2]
  groups = heads // kv_heads
  cols = pl.ds((pl.program_id(0) if program is None else program) * block_n, block_n)
  _, ok = _rows(b)

  def head(h, acc_o):
    k, g = lax.div(h, jnp.int32(groups)), lax.rem(h, jnp.int32(groups))

    def chunk(c, carry):  # running merge: sum_c e^{m_c - M} acc_c, sum_c e^{m_c - M} l_c
      top, num, den = carry
      m_c = plgpu.load(m_ref.at[pl.ds(0, ROWS), k, c, g], mask=ok, other=-jnp.inf,
                       volatile=volatile)
      new_top = jnp.maximum(top, m_c)
      rescale = jnp.where(new_top == -jnp.inf, 0.0, jnp.exp(top - new_top))
      w = jnp.where(m_c == -jnp.inf, 0.0, jnp.exp(m_c - new_top))  # empty chunks weigh 0
      acc = plgpu.load(acc_ref.at[pl.ds(0, ROWS), k, c, g, :], mask=ok[:, None], other=0.0,
                       volatile=volatile)
      l_c = plgpu.load(l_ref.at[pl.ds(0, ROWS), k, c, g], mask=ok, other=0.0, volatile=volatile)
      return new_top, num * rescale[:, None] + w[:, None] * acc, den * rescale + w * l_c
    _, num, den = lax.fori_loop(0, chunks, chunk, (jnp.full((ROWS,), -jnp.inf, f32),
                                                  jnp.zeros((ROWS, head_dim), f32),
                                                  jnp.zeros((ROWS,), f32)))
    out = (num / jnp.where(ok, den, 1.0)[:, None]).astype(cache_dtype).astype(dtype)
    w_o = wo_ref[pl.ds(h * head_dim, head_dim), cols].astype(dtype)
    return acc_o + jnp.dot(out, w_o, preferred_element_type=f32)

  def heads_step(i, acc_o):  # heads_per_step heads unrolled: their loads issue together
    for j in range(heads_per_step):
      acc_o = head(i * heads_per_step + j, acc_o)
    return acc_o
  o = lax.fori_loop(0, heads // heads_per_step, heads_step,
                    jnp.zeros((ROWS, block_n), f32)).astype(dtype)
  if bo_ref is not None:
    o = o + bo_ref[cols].astype(dtype)[None, :]
  _store_rows(out_ref, b, cols, _load_rows(x_ref, b, cols).astype(dtype) + o)


def mlp_in_first_weights(wg_ref, wu_ref, j, block_n: int, block_k: int):
  """The gate / up weights of program j's first K step (``_mlp_in_kernel(first=...)``), or None
  where the input is shorter than one step."""
  if wg_ref.shape[0] < block_k:
    return None
  cols = pl.ds(j * block_n, block_n)
  return wg_ref[pl.ds(0, block_k), cols], wu_ref[pl.ds(0, block_k), cols]


def mlp_out_first_weights(wd_ref, j, block_n: int, block_k: int):
  """The down weights of program j's first K step (``_mlp_out_kernel(first=...)``), or None."""
  if wd_ref.shape[0] < block_k:
    return None
  return wd_ref[pl.ds(0, block_k), pl.ds(j * block_n, block_n)]


def _mlp_in_kernel(x_ref, norm_ref, wg_ref, wu_ref, *refs, block_n: int, block_k: int,
                   eps: float, dtype, bias: bool, program=None, volatile: bool = False,
                   first=None):
  """Program j: columns [j block_n, (j + 1) block_n) of silu(m W_gate) * (m W_up), m = RMSNorm(x)
  (``program``: j given, None: the grid's id; ``volatile``: x read past L1; ``first``: the first
  K step's weights, loaded before (``mlp_in_first_weights``))."""
  bg_ref, bu_ref, out_ref = refs if bias else (None, None, refs[0])
  b, d = x_ref.shape
  cols = pl.ds((pl.program_id(0) if program is None else program) * block_n, block_n)
  inv_rms = _inv_rms(x_ref, b, block_k, eps, volatile)

  def step(start, size, carry, w=None):
    g, u = carry
    a = _normed_block(x_ref, norm_ref, b, start, size, inv_rms, dtype, volatile)
    rows_k = pl.ds(start, size)
    wg, wu = w if w is not None else (wg_ref[rows_k, cols], wu_ref[rows_k, cols])
    g = g + jnp.dot(a, wg.astype(dtype), preferred_element_type=f32)
    u = u + jnp.dot(a, wu.astype(dtype), preferred_element_type=f32)
    return g, u
  zero = jnp.zeros((ROWS, block_n), f32)
  g, u = _k_loop(d, block_k, step, (zero, zero), first=first)
  g, u = g.astype(dtype), u.astype(dtype)
  if bg_ref is not None:
    g = g + bg_ref[cols].astype(dtype)[None, :]
    u = u + bu_ref[cols].astype(dtype)[None, :]
  act = _silu(g.astype(f32)).astype(dtype).astype(f32) * u.astype(f32)
  _store_rows(out_ref, b, cols, act.astype(dtype))


def _mlp_out_kernel(x_ref, act_ref, wd_ref, *refs, block_n: int, block_k: int, dtype,
                    bias: bool, program=None, volatile: bool = False, first=None):
  """Program j: columns [j block_n, (j + 1) block_n) of x + act W_down (+ bias) (``program``: j
  given, None: the grid's id; ``volatile``: x and act read past L1; ``first``: the first K step's
  weights, loaded before (``mlp_out_first_weights``))."""
  bd_ref, out_ref = refs if bias else (None, refs[0])
  b, f = act_ref.shape
  cols = pl.ds((pl.program_id(0) if program is None else program) * block_n, block_n)

  def step(start, size, acc, w=None):
    rows_k = pl.ds(start, size)
    a = _load_rows(act_ref, b, rows_k, volatile=volatile).astype(dtype)
    w = wd_ref[rows_k, cols] if w is None else w
    return acc + jnp.dot(a, w.astype(dtype), preferred_element_type=f32)
  y = _k_loop(f, block_k, step, jnp.zeros((ROWS, block_n), f32), first=first).astype(dtype)
  if bd_ref is not None:
    y = y + bd_ref[cols].astype(dtype)[None, :]
  _store_rows(out_ref, b, cols, _load_rows(x_ref, b, cols, volatile=volatile).astype(dtype) + y)


# ----------------------------------------------------------------------------------- the layer


def _call(kernel, grid, out_shape, args, cfg: GpuConfig, interpret: bool, name: str,
          aliases=None):
  params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages)
  return pl.pallas_call(kernel, grid=grid, out_shape=out_shape,
                        input_output_aliases=aliases or {}, compiler_params=params,
                        interpret=interpret, name=name)(*args)


def _layer_config(B: int, D: int, F: int, H: int, K: int, S: int, Dh: int,
                  config: GpuConfig | None) -> GpuConfig:
  """``config`` (None: ``default_config``) checked for these shapes, with the attention kernel's
  chunks set (capped at ``MAX_CHUNKS``: every output-projection program merges every chunk)."""
  cfg = config or default_config(D, F, H, Dh)
  check_shapes(B, D, F, H, K, Dh, cfg)
  if cfg.attention is None or cfg.attention.chunks is None:
    att = cfg.attention or attention_gpu.GpuConfig()
    chunks = min(attention_gpu.default_chunks(B, K, S, att.block_s), MAX_CHUNKS)
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(att, chunks=chunks))
  return cfg


def attention_half_gpu(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *,
                       eps: float, dtype, config: GpuConfig | None = None,
                       interpret: bool = False):
  """Launches 1-3 of the layer (module doc) -> (a [B, D], cache_k, cache_v), a = x + Attn(...) W_o:
  RMSNorm + q / k / v + RoPE + the cache writes; the attention kernel; the merge of its chunks +
  the o projection + the residual add. Caches [B, S, K, Dh] are updated in place (aliased)."""
  B, D = x_BxD.shape
  S, K, Dh = cache_k.shape[1:]
  H = weights["q"].shape[1] // Dh
  cfg = _layer_config(B, D, weights["gate"].shape[1], H, K, S, Dh, config)
  dtype = jnp.dtype(dtype)
  x_BxD = x_BxD.astype(dtype)  # the residual stream in the compute dtype, as the model's
  positions_B = positions_B.astype(jnp.int32)
  sds = jax.ShapeDtypeStruct

  qkv_bias = "q_bias" in weights
  args = [x_BxD, positions_B, inv_freq.astype(f32), weights["input_norm"], weights["q"],
          weights["k"], weights["v"]]
  if qkv_bias:
    args += [weights["q_bias"], weights["k_bias"], weights["v_bias"]]
  args += [cache_k, cache_v]
  n_in = len(args)
  kernel = functools.partial(_attn_in_kernel, heads=H, kv_heads=K, head_dim=Dh,
                             head_block=cfg.head_block, block_k=cfg.block_k, eps=eps,
                             dtype=dtype, bias=qkv_bias)
  q_shape = (B, K, attention_gpu.PAD_GROUPS, Dh)  # rows past H / K per kv head: not written
  q, cache_k, cache_v = _call(
      kernel, (H + 2 * K, Dh // 2 // cfg.head_block),
      [sds(q_shape, cache_k.dtype), sds(cache_k.shape, cache_k.dtype),
       sds(cache_v.shape, cache_v.dtype)],
      args, cfg, interpret, "decode_layer_attn_in", aliases={n_in - 2: 1, n_in - 1: 2})

  # slots 0 .. position are attended; a position past the cache attends all of it (as the
  # model's mask slot <= position does), and the kernel never reads past the cache. (A negative
  # position, which no caller makes, attends slot 0 here and no slot in the model.)
  lengths = jnp.clip(positions_B + 1, 1, S)
  acc, m, l = attention_gpu.decode_attention_partials(q, cache_k, cache_v, lengths,
                                                      groups=H // K, config=cfg.attention,
                                                      interpret=interpret)

  o_bias = "o_bias" in weights
  kernel = functools.partial(_attn_out_kernel, heads=H, kv_heads=K, head_dim=Dh,
                             block_n=cfg.block_n, heads_per_step=_heads_per_step(H, cfg),
                             dtype=dtype, cache_dtype=cache_k.dtype, bias=o_bias)
  args = [x_BxD, acc, m, l, weights["o"]] + ([weights["o_bias"]] if o_bias else [])
  a = _call(kernel, (D // cfg.block_n,), sds((B, D), dtype), args, cfg, interpret,
            "decode_layer_attn_out")
  return a, cache_k, cache_v


def mlp_half_gpu(a_BxD, weights: dict, *, eps: float, dtype, config: GpuConfig | None = None,
                 interpret: bool = False):
  """Launches 4-5 of the layer (module doc) -> x' [B, D] = a + W_down (silu(m W_gate) * m W_up),
  m = RMSNorm(a): RMSNorm + gate / up + SiLU x up; the down projection + the residual add."""
  B, D = a_BxD.shape
  F = weights["gate"].shape[1]
  cfg = config or default_config(D, F, 0, 0)
  check_mlp_shapes(B, D, F, cfg)
  dtype = jnp.dtype(dtype)
  a = a_BxD.astype(dtype)
  sds = jax.ShapeDtypeStruct
  mlp_bias = "gate_bias" in weights
  kernel = functools.partial(_mlp_in_kernel, block_n=cfg.block_n, block_k=cfg.block_k, eps=eps,
                             dtype=dtype, bias=mlp_bias)
  args = [a, weights["post_norm"], weights["gate"], weights["up"]]
  args += [weights["gate_bias"], weights["up_bias"]] if mlp_bias else []
  act = _call(kernel, (F // cfg.block_n,), sds((B, F), dtype), args, cfg, interpret,
              "decode_layer_mlp_in")

  kernel = functools.partial(_mlp_out_kernel, block_n=cfg.block_n, block_k=cfg.block_k,
                             dtype=dtype, bias=mlp_bias)
  args = [a, act, weights["down"]] + ([weights["down_bias"]] if mlp_bias else [])
  return _call(kernel, (D // cfg.block_n,), sds((B, D), dtype), args, cfg, interpret,
               "decode_layer_mlp_out")


def decode_layer_gpu(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *,
                     eps: float, dtype, config: GpuConfig | None = None,
                     interpret: bool = False):
  """One layer of one cached decode step (module doc) -> (x' [B, D], cache_k, cache_v): the
  attention half (``attention_half_gpu``), then the MLP half (``mlp_half_gpu``).

  ``weights``: ``input_norm`` [D], ``q`` [D, H Dh], ``k`` / ``v`` [D, K Dh], ``o`` [H Dh, D],
  ``post_norm`` [D], ``gate`` / ``up`` [D, F], ``down`` [F, D], and optionally ``q_bias``,
  ``k_bias``, ``v_bias`` (all three or none), ``o_bias``, ``gate_bias`` / ``up_bias`` /
  ``down_bias`` (all three or none). Caches [B, S, K, Dh] are updated in place (aliased).
  """
  a, cache_k, cache_v = attention_half_gpu(x_BxD, positions_B, inv_freq, weights, cache_k,
                                           cache_v, eps=eps, dtype=dtype, config=config,
                                           interpret=interpret)
  x = mlp_half_gpu(a, weights, eps=eps, dtype=dtype, config=config, interpret=interpret)
  return x, cache_k, cache_v
