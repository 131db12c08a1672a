"""Every Pallas kernel compiled to Hopper (sm_90) machine code on this CPU-only machine, through
the standalone Triton compiler (``triton==3.4.0``, a test dependency) as
``benchmarks/triton_offline.py`` does: a kernel that Triton cannot compile for a GPU fails here,
not in a lent GPU's time. Also a few facts of the generated code that the kernels' designs rely
on (counted in the SASS, static counts, no timing).

XLA compiles the same Triton IR with its own Triton build, so passing here is strong evidence,
not proof, that the GPU compile passes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton", reason="the standalone Triton compiler is a test dependency")

from benchmarks.triton_offline import capture_kernels, compile_report  # noqa: E402
from kernels.beam_step.gpu import beam_step_gpu  # noqa: E402
from kernels.decode_attention import gpu as dgpu  # noqa: E402
from kernels.decode_block import decode_layer_gpu  # noqa: E402
from kernels.quantized_matmul import gpu as qgpu  # noqa: E402
from kernels.sampling.gpu import GpuConfig, sample_gpu  # noqa: E402

S = jax.ShapeDtypeStruct


def compiled(f, *shapes):
  """[report] for each Pallas kernel of ``f(*shapes)``, compiled for sm_90; fails on an error."""
  rows = [compile_report(*kernel) for kernel in capture_kernels(f, *shapes)]
  assert rows
  for row in rows:
    assert "error" not in row, row
    assert row["registers"] <= 255 and row["local_bytes"] == 0, row  # no spills
  return rows


@pytest.mark.parametrize("split", [False, True])
def test_sampling_kernels_compile_and_fast_math_halves_the_loop(split):
  shapes = (S((64, 151936), jnp.float32), S((64,), jnp.uint32))
  exact = compiled(functools.partial(sample_gpu, top_p=0.9,
                                     config=GpuConfig(split=split, fast_math=False)), *shapes)
  fast = compiled(functools.partial(sample_gpu, top_p=0.9,
                                    config=GpuConfig(split=split, fast_math=True)), *shapes)
  assert [r["kernel"] for r in exact] == [r["kernel"] for r in fast]
  # the drawing kernel (the first): PTX special-function instructions instead of libdevice's
  # accurate functions, and far fewer instructions per loop iteration
  assert fast[0]["sass_loop"].get("MUFU", 0) > exact[0]["sass_loop"].get("MUFU", 0)
  assert fast[0]["loop_instructions"] < 0.7 * exact[0]["loop_instructions"]
  for settings in (dict(top_k=50, min_p=0.05), dict(temperature=0.8)):
    compiled(functools.partial(sample_gpu, config=GpuConfig(split=split), **settings), *shapes)


def test_cdf_draw_compiles_and_streams_with_a_fraction_of_the_gumbel_work():
  """The "cdf" draw's launches compile without spills; its full passes (statistics, mass) carry
  no hash or noise: the statistics pass's loop has < 0.4x the instructions of the Gumbel path's
  launch 0 (statistics + draw; both with fast_math) and no integer multiplies of the hash."""
  shapes = (S((64, 151936), jnp.float32), S((64,), jnp.uint32))
  cdf = compiled(functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(draw="cdf")), *shapes)
  names = [r["kernel"] for r in cdf]
  assert names[:3] == ["sample_split_s", "sample_cdf_locate_first", "sample_cdf_mass"]
  assert names[-1] == "sample_split_finish"  # decides and continues in one launch, no spills
  gumbel = compiled(functools.partial(sample_gpu, top_p=0.9, config=GpuConfig()), *shapes)
  assert gumbel[0]["kernel"] == "sample_split_sd"
  assert cdf[0]["loop_instructions"] < 0.4 * gumbel[0]["loop_instructions"]
  assert cdf[0]["sass_loop"].get("IMAD", 0) < 0.1 * gumbel[0]["sass_loop"]["IMAD"]
  # 4 candidates per round (the locate launch draws 4, the mass launch checks 4): no spills
  for settings in (dict(top_p=0.9), dict(top_k=50, min_p=0.05)):
    compiled(functools.partial(sample_gpu, config=GpuConfig(draw="cdf", candidates=4,
                                                            split_rounds=2), **settings), *shapes)


def test_grid_combine_compiles_with_the_ordering_it_relies_on(tmp_path):
  """``GpuConfig(grid_combine=True)``'s mass launches compile without spills, and their SASS has
  what the in-launch combine relies on: the atomic arrival count at GPU scope, a GPU-scope fence
  before it (release: the partials' stores are visible first), the L1 invalidated after it
  (acquire) and the partials read as strong (volatile) loads."""
  shapes = (S((64, 151936), jnp.float32), S((64,), jnp.uint32))
  f = functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(draw="cdf", chunk=2048,
                                                                 num_warps=4, grid_combine=True))
  rows = [compile_report(*kernel, sass_dir=str(tmp_path)) for kernel in capture_kernels(f, *shapes)]
  assert [r["kernel"] for r in rows][2:] == ["sample_cdf_mass_combine"] * 2 + [
      "sample_cdf_mass_combine_finish"]
  for row in rows:
    assert "error" not in row and row["local_bytes"] == 0, row
  for name in ("sample_cdf_mass_combine", "sample_cdf_mass_combine_finish"):
    with open(tmp_path / f"{name}_4w.sass") as fh:
      sass = fh.read()
    for op in ("ATOMG.E.ADD.STRONG.GPU", "MEMBAR.ALL.GPU", "CCTL.IVALL", "LDG.E.STRONG.SYS",
               "BAR.SYNC"):
      assert op in sass, (name, op)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
def test_quantized_matmul_kernels_compile(bits, group):
  k, n = 4096, 4096
  loops = {}
  for m, kernel, reduce in ((1, "dot", "step"), (16, "dot", "step"), (1, "dot_t", "step"),
                            (1, "fma", "step"), (1, "fma", "end"), (4, "fma", "end")):
    for unpack in ("shift", "magic"):
      cfg = dataclasses.replace(
          qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel=kernel),
          unpack=unpack, fma_reduce=reduce)
      shapes = (S((m, k), jnp.bfloat16),
                S((k // 2, n) if bits == 4 else (k, n), jnp.uint8 if bits == 4 else jnp.int8),
                S((1 if group is None else k // group, n), jnp.float32))
      (row,) = compiled(functools.partial(qgpu.quantized_matmul_gpu, bits=bits, group_size=group,
                                          config=cfg), *shapes)
      loops[m, kernel, reduce, unpack] = row
  # the dot kernel runs on the tensor cores; the fma kernel does not
  assert loops[1, "dot", "step", "shift"]["sass_loop"].get("HMMA", 0) > 0
  assert not {"HMMA", "HGMMA"} & set(loops[1, "fma", "end", "magic"]["sass_loop"])
  # the magic unpack leaves no integer-to-float conversion in the fma loop
  assert not {"I2F", "I2FP"} & set(loops[1, "fma", "end", "magic"]["sass_loop"])
  # reducing once after the loop: no cross-thread shuffles per step, and a shorter loop
  end, step = loops[1, "fma", "end", "magic"], loops[1, "fma", "step", "magic"]
  assert "SHFL" not in end["sass_loop"] and step["sass_loop"].get("SHFL", 0) > 0
  assert end["loop_instructions"] < step["loop_instructions"]


def test_transposed_codes_and_prmt_unpack_compile_and_shorten_the_decode_loop():
  """At a decode shape (M = 16, "dot"): codes stored K-contiguous (w_layout="nk") reach the
  tensor-core operand through matrix loads instead of one shared-memory load per int8 weight, and
  the int4 "prmt" unpack's inline PTX assembles (no ``I2F`` left, packed ``HFMA2`` instead) in
  both layouts; each shortens the K loop. Also compiled: "dot_t" with both, and M = 1 / 512."""
  k, n = 4096, 4096
  rows = {}
  for m, kernel in ((16, "dot"), (1, "dot"), (16, "dot_t"), (512, "dot")):
    for bits, group in ((8, None), (4, 128)):
      for unpack, layout in (("shift", "kn"), ("shift", "nk"), ("prmt", "kn"), ("prmt", "nk")):
        if unpack == "prmt" and bits == 8:
          continue
        cfg = dataclasses.replace(
            qgpu.default_config(m, k, n, bits=bits, group_size=group, kernel=kernel),
            unpack=unpack, w_layout=layout)
        kk = k // 2 if bits == 4 else k
        (rows[m, kernel, bits, unpack, layout],) = compiled(
            functools.partial(qgpu.quantized_matmul_gpu, bits=bits, group_size=group, config=cfg),
            S((m, k), jnp.bfloat16),
            S((n, kk) if layout == "nk" else (kk, n), jnp.uint8 if bits == 4 else jnp.int8),
            S((1 if group is None else k // group, n), jnp.float32))
  kn8, nk8 = rows[16, "dot", 8, "shift", "kn"], rows[16, "dot", 8, "shift", "nk"]
  assert nk8["sass_loop"].get("LDS", 0) < kn8["sass_loop"]["LDS"] / 4
  assert nk8["sass_loop"].get("LDSM", 0) > 0
  assert nk8["loop_instructions"] < 0.75 * kn8["loop_instructions"]
  shift4 = rows[16, "dot", 4, "shift", "kn"]
  assert shift4["sass_loop"].get("I2F", 0) > 0
  for layout in ("kn", "nk"):
    prmt4 = rows[16, "dot", 4, "prmt", layout]
    assert not {"I2F", "I2FP"} & set(prmt4["sass_loop"]), prmt4["sass_loop"]
    assert prmt4["sass_loop"].get("HFMA2", 0) > 0
    assert prmt4["loop_instructions"] < 0.9 * shift4["loop_instructions"]


def test_int4_split_x_load_streams_x_with_async_copies_at_prefill_shapes():
  """int4 "dot" at M = 512 (block 128 x 128): the strided even / odd x loads compile to scalar
  global loads and shared stores inside the K loop; the split load (one contiguous load, split in
  registers) leaves them to cp.async (LDGSTS) copies and shortens the loop."""
  m, k, n = 512, 4096, 4096
  rows = {}
  for x_load in ("strided", "split"):
    cfg = dataclasses.replace(qgpu.default_config(m, k, n, bits=4, group_size=128),
                              x_load=x_load)
    (rows[x_load],) = compiled(functools.partial(qgpu.quantized_matmul_gpu, bits=4,
                                                 group_size=128, config=cfg),
                               S((m, k), jnp.bfloat16), S((k // 2, n), jnp.uint8),
                               S((k // 128, n), jnp.float32))
  strided, split = rows["strided"]["sass_loop"], rows["split"]["sass_loop"]
  assert split.get("LDG", 0) < strided["LDG"] / 2 and split.get("STS", 0) < strided["STS"] / 2
  assert split.get("LDGSTS", 0) > strided.get("LDGSTS", 0)
  assert rows["split"]["loop_instructions"] < 0.9 * rows["strided"]["loop_instructions"]
  assert split.get("HGMMA", 0) > 0  # Hopper's wgmma at this tile


def test_beam_step_and_decode_attention_compile():
  compiled(lambda x, s: beam_step_gpu(x, s, 8), S((1, 4, 151936), jnp.float32),
           S((1, 4), jnp.float32))
  for b, h, kv in ((1, 9, 3), (64, 32, 8)):
    compiled(dgpu.decode_attention_gpu, S((b, h, 64), jnp.bfloat16),
             S((b, 4096, kv, 64), jnp.bfloat16), S((b, 4096, kv, 64), jnp.bfloat16),
             S((b,), jnp.int32))


@pytest.mark.parametrize("d,f,h,kv,bias", [(576, 1536, 9, 3, False),   # SmolLM2-135M
                                           (896, 4864, 14, 2, True)])  # Qwen2-0.5B (q/k/v biases)
def test_fused_decode_layer_compiles(d, f, h, kv, bias):
  """kernels.decode_block's four matmul kernels and the attention kernel, as the model calls them
  for two rows: five kernels, no spills, the tensor-core dot in each matmul kernel's loop."""
  bf = jnp.bfloat16
  w = dict(input_norm=S((d,), bf), q=S((d, h * 64), bf), k=S((d, kv * 64), bf),
           v=S((d, kv * 64), bf), o=S((h * 64, d), bf), post_norm=S((d,), bf),
           gate=S((d, f), bf), up=S((d, f), bf), down=S((f, d), bf))
  if bias:
    w.update(q_bias=S((h * 64,), bf), k_bias=S((kv * 64,), bf), v_bias=S((kv * 64,), bf))
  cache = S((2, 320, kv, 64), bf)
  rows = compiled(lambda x, p, i, w, k, v: decode_layer_gpu(x, p, i, w, k, v, eps=1e-6, dtype=bf),
                  S((2, d), bf), S((2,), jnp.int32), S((32,), jnp.float32), w, cache, cache)
  assert [r["kernel"].split("_", 2)[-1] if "layer" in r["kernel"] else r["kernel"]
          for r in rows] == ["attn_in", "decode_attention", "attn_out", "mlp_in", "mlp_out"]
  for r in rows:
    assert r["sass"].get("HMMA", 0) + r["sass"].get("HGMMA", 0) > 0, r


@pytest.mark.parametrize("d,f,h,kv,bias", [(576, 1536, 9, 3, False),     # SmolLM2-135M
                                           (2048, 8192, 32, 8, False)])  # Llama-3.2-1B
def test_persistent_layer_compiles_with_the_ordering_its_barriers_rely_on(tmp_path, d, f, h, kv,
                                                                          bias):
  """The persistent layer (``kernels/decode_block/persistent.py``): one kernel, no spills, the
  tensor-core dot, and in its SASS what the barrier across the grid relies on: the atomic add at
  GPU scope (arrival, then the polling reads), a GPU-scope fence before it (release), the L1
  invalidated after it (acquire), CTA barriers, and strong (volatile) loads of what other programs
  wrote."""
  from kernels.decode_block import decode_layer_persistent  # pylint: disable=import-outside-toplevel
  bf = jnp.bfloat16
  w = dict(input_norm=S((d,), bf), q=S((d, h * 64), bf), k=S((d, kv * 64), bf),
           v=S((d, kv * 64), bf), o=S((h * 64, d), bf), post_norm=S((d,), bf),
           gate=S((d, f), bf), up=S((d, f), bf), down=S((f, d), bf))
  cache = S((2, 320, kv, 64), bf)
  kernels = capture_kernels(
      lambda x, p, i, w, k, v: decode_layer_persistent(x, p, i, w, k, v, eps=1e-6, dtype=bf),
      S((2, d), bf), S((2,), jnp.int32), S((32,), jnp.float32), w, cache, cache)
  (row,) = [compile_report(*k, sass_dir=str(tmp_path)) for k in kernels]
  assert row["kernel"] == "decode_layer_persistent", row
  assert "error" not in row and row["local_bytes"] == 0 and row["registers"] <= 255, row
  assert row["sass"].get("HMMA", 0) + row["sass"].get("HGMMA", 0) > 0, row
  with open(tmp_path / "decode_layer_persistent_4w.sass") as fh:
    sass = fh.read()
  for op in ("ATOMG.E.ADD.STRONG.GPU", "MEMBAR.ALL.GPU", "CCTL.IVALL", "LDG.E.STRONG.SYS",
             "BAR.SYNC"):
    assert op in sass, op
  # 4 barriers: an arrival and a poll each (and a timeout count), then the exit count (and the
  # last program's two resets)
  assert sass.count("ATOMG.E.ADD.STRONG.GPU") >= 9
  assert "GLOBALTIMER" not in sass
  from kernels.decode_block import GpuConfig as BlockConfig  # pylint: disable=import-outside-toplevel
  for name, config in (("traced", BlockConfig(trace=True)), ("load", BlockConfig(poll="load")),
                       ("prefetch", BlockConfig(prefetch=True))):
    kernels = capture_kernels(
        lambda x, p, i, w, k, v, config=config: decode_layer_persistent(
            x, p, i, w, k, v, eps=1e-6, dtype=bf, config=config),
        S((2, d), bf), S((2,), jnp.int32), S((32,), jnp.float32), w, cache, cache)
    (tmp_path / name).mkdir()
    (row,) = [compile_report(*k, sass_dir=str(tmp_path / name)) for k in kernels]
    assert "error" not in row and row["local_bytes"] == 0, (name, row)
    with open(tmp_path / name / "decode_layer_persistent_4w.sass") as fh:
      sass = fh.read()
    if name == "traced":  # ten clock reads: entry, arrival and leaving at 4 barriers, exit
      assert sass.count("SR_GLOBALTIMERLO") == 10
    elif name == "load":  # polls by volatile loads, each wait ended by one atomic read (acquire)
      assert "LDG.E.STRONG.SYS" in sass and sass.count("CCTL.IVALL") >= 8


def test_fused_output_projection_does_not_grow_with_the_chunks():
  """The output-projection kernel merges the attention chunks in a loop: 64 chunks of a 16k-slot
  cache compile to the registers of a few (a Python-unrolled merge took minutes and hit 255)."""
  from kernels.decode_attention import GpuConfig as AttentionConfig  # pylint: disable=import-outside-toplevel
  from kernels.decode_block import GpuConfig as BlockConfig  # pylint: disable=import-outside-toplevel
  bf, d, f, h, kv = jnp.bfloat16, 576, 1536, 9, 3
  w = dict(input_norm=S((d,), bf), q=S((d, h * 64), bf), k=S((d, kv * 64), bf),
           v=S((d, kv * 64), bf), o=S((h * 64, d), bf), post_norm=S((d,), bf),
           gate=S((d, f), bf), up=S((d, f), bf), down=S((f, d), bf))
  cache = S((1, 16384, kv, 64), bf)
  regs = {}
  for chunks in (2, 64):
    cfg = BlockConfig(attention=AttentionConfig(chunks=chunks))
    kernels = capture_kernels(
        lambda x, p, i, w, k, v, cfg=cfg: decode_layer_gpu(x, p, i, w, k, v, eps=1e-6, dtype=bf,
                                                           config=cfg),
        S((1, d), bf), S((1,), jnp.int32), S((32,), jnp.float32), w, cache, cache)
    (row,) = [compile_report(*k) for k in kernels if "attn_out" in k[0]]
    assert "error" not in row and row["local_bytes"] == 0, row
    regs[chunks] = row["registers"]
  assert regs[64] <= regs[2] + 16, regs
