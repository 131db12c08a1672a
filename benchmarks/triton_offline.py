r"""Compile the Pallas kernels to Hopper machine code on a machine without a GPU, and report what
the compiler made of them: registers, spills, shared memory and the SASS instruction mix.

    pip install -e ".[test]"           # brings triton==3.4.0 (a test dependency, not a runtime one)
    python benchmarks/triton_offline.py --out /tmp/triton_offline.json
    python benchmarks/triton_offline.py --only sampling --sass-dir /tmp/sass

How: each configuration is lowered for CUDA with ``lowering_platforms=("cuda",)`` (what
``tests/kernels/triton_ir.py`` verifies); a hook on the Pallas Triton lowering keeps every Triton
module's text, and the warps / stages of each kernel come from its custom call. The standalone
``triton`` package then compiles that Triton IR for sm_90 through its own pipeline (TTGIR, LLVM,
PTX, then ``ptxas`` to a cubin: all on the CPU) and its bundled ``cuobjdump`` reports the resources
and disassembles the SASS.

What it tells and what it does not: it catches a kernel that Triton cannot compile for sm_90 and
shows register pressure, spills (``local`` bytes), shared memory, and static instruction counts
(each instruction once, loops not unrolled by their trip count): e.g. how many special-function
(``MUFU``), conversion (``I2F`` / ``F2F``), shared-memory (``LDS`` / ``STS``) and tensor-core
(``HMMA`` / ``HGMMA``) instructions a kernel has. XLA compiles the same IR with its own Triton
(a different version), so this is evidence about the kernels, not a measurement of what runs on
the GPU; times come only from the ``benchmarks/*.py`` device runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax._src.pallas.triton import pallas_call_registration  # noqa: E402

# instruction classes worth counting in a kernel's SASS (opcode before the first '.')
WATCH = ("MUFU", "I2F", "I2FP", "F2F", "F2FP", "HMMA", "HGMMA", "IMMA", "LDS", "STS", "LDSM",
         "LDG", "LDGSTS", "STG", "SHFL", "BAR", "FFMA", "FADD", "FMUL", "IMAD", "LOP3", "SHF",
         "PRMT", "HFMA2", "HADD2")


def capture_kernels(f, *args):
  """Lower ``f(*args)`` for CUDA; return [(name, triton_ir_text, num_warps, num_stages)] for its
  Pallas kernels, in order."""
  lowering = pallas_call_registration.lowering
  original = lowering.lower_jaxpr_to_triton_module
  modules = []

  def keep(*a, **k):
    result = original(*a, **k)
    op = result.module.operation
    modules.append((op.attributes["sym_name"].value if "sym_name" in op.attributes else "",
                    op.get_asm(enable_debug_info=False)))
    return result

  lowering.lower_jaxpr_to_triton_module = keep
  try:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  calls = re.findall(r'name = "([^"]+)".*?num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
  if len(calls) != len(modules):  # the attribute order differs: match the two fields separately
    names = re.findall(r'__gpu\$xla\.gpu\.triton.*?name = "([^"]+)"', text)
    stages = re.findall(r"num_stages = (\d+) : i32", text)
    warps = re.findall(r"num_warps = (\d+) : i32", text)
    calls = list(zip(names, stages, warps))
  if len(calls) != len(modules):
    raise RuntimeError(f"{len(modules)} Triton modules but {len(calls)} kernel calls in the "
                       "lowered program: cannot pair their warps / stages")
  out = []
  for (name, ir_text), (call_name, stages, warps) in zip(modules, calls):
    if name and name != call_name:  # the calls come in another order than the modules
      raise RuntimeError(f"kernel {name!r} paired with the call of {call_name!r}")
    out.append((name, ir_text, int(warps), int(stages)))
  return out


def _tools():
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  return triton, GPUTarget("cuda", 90, 32), os.path.join(bin_dir, "cuobjdump")


def compile_report(name: str, ir_text: str, num_warps: int, num_stages: int, sass_dir=None):
  """Compile one Triton module for sm_90 and summarise its cubin."""
  triton, target, cuobjdump = _tools()
  row = dict(kernel=name, num_warps=num_warps, num_stages=num_stages)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{name or 'kernel'}.ttir")
    with open(path, "w") as f:
      f.write(ir_text)
    try:
      compiled = triton.compile(path, target=target,
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 - reported as the row's result
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      return row
    cubin = os.path.join(tmp, "k.cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True,
                           text=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
  for key, field in (("registers", "REG"), ("local_bytes", "LOCAL"), ("shared_bytes", "SHARED"),
                     ("stack_bytes", "STACK")):
    m = re.search(rf"\b{field}:(\d+)", usage)
    row[key] = int(m.group(1)) if m else None
  row.update(sass_counts(sass))
  if sass_dir:
    os.makedirs(sass_dir, exist_ok=True)
    with open(os.path.join(sass_dir, f"{name or 'kernel'}_{num_warps}w.sass"), "w") as f:
      f.write(sass)
  return row


def sass_counts(sass: str) -> dict:
  """Static instruction counts of a SASS listing: all of it, and inside its loops (the spans
  [target, branch] of backward branches: what runs once per iteration), for the WATCH classes
  (opcode before the first '.')."""
  lines = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)"
                     r"([^;]*);", sass, re.M)
  ops = [(int(addr, 16), op.split(".")[0], rest) for addr, op, rest in lines]
  loops = []
  for addr, op, rest in ops:
    target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
    if target and int(target.group(1), 16) < addr:
      loops.append((int(target.group(1), 16), addr))
  in_loop = [op for addr, op, _ in ops if any(lo <= addr <= hi for lo, hi in loops)]
  total, loop = collections.Counter(op for _, op, _ in ops), collections.Counter(in_loop)
  return dict(sass_instructions=len(ops), sass={k: total[k] for k in WATCH if total[k]},
              loop_instructions=len(in_loop), sass_loop={k: loop[k] for k in WATCH if loop[k]})


def _s(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def sampling_configs():
  from kernels.sampling.gpu import GpuConfig, sample_gpu  # pylint: disable=import-outside-toplevel
  for split in (False, True):
    for fast in (False, True):
      cfg = GpuConfig(split=split, fast_math=fast)
      yield (f"sampling top_p=0.9 split={split} fast_math={fast}",
             functools.partial(sample_gpu, top_p=0.9, config=cfg),
             (_s((64, 151936), jnp.float32), _s((64,), jnp.uint32)))
  yield ("sampling top_p=0.9 split=True fast_math=True draw=cdf",
         functools.partial(sample_gpu, top_p=0.9, config=GpuConfig(draw="cdf")),
         (_s((64, 151936), jnp.float32), _s((64,), jnp.uint32)))


def qmm_configs():
  from kernels.quantized_matmul import gpu as qgpu  # pylint: disable=import-outside-toplevel
  k, n = 4096, 14336
  variants = (("shift", "strided", "kn"), ("magic", "strided", "kn"), ("shift", "split", "kn"),
              ("prmt", "strided", "kn"), ("shift", "strided", "nk"), ("prmt", "strided", "nk"))
  for m, kernels in ((1, ("dot", "dot_t", "fma", "fma_end")), (16, ("dot", "dot_t")),
                     (512, ("dot", "dot_t"))):
    for bits, group in ((8, None), (4, 128)):
      for kernel in kernels:
        for unpack, x_load, w_layout in variants:
          if (x_load == "split" or unpack == "prmt") and (bits == 8 or kernel.startswith("fma")):
            continue  # the x load and the prmt unpack are for the int4 dot kernels only
          if w_layout == "nk" and kernel.startswith("fma"):
            continue
          if m == 512 and unpack == "magic":
            continue
          cfg = dataclasses.replace(
              qgpu.default_config(m, k, n, bits=bits, group_size=group,
                                  kernel=kernel.removesuffix("_end")),
              unpack=unpack, fma_reduce="end" if kernel.endswith("_end") else "step",
              x_load=x_load, w_layout=w_layout)
          rows = k // 2 if bits == 4 else k
          args = (_s((m, k), jnp.bfloat16),
                  _s((n, rows) if w_layout == "nk" else (rows, n),
                     jnp.uint8 if bits == 4 else jnp.int8),
                  _s((1 if group is None else k // group, n), jnp.float32))
          yield (f"quantized_matmul M={m} int{bits} kernel={kernel} unpack={unpack}"
                 f"{' x_load=split' if x_load == 'split' else ''}"
                 f"{' w_layout=nk' if w_layout == 'nk' else ''}",
                 functools.partial(qgpu.quantized_matmul_gpu, bits=bits, group_size=group,
                                   config=cfg), args)


def beam_configs():
  from kernels.beam_step.gpu import beam_step_gpu  # pylint: disable=import-outside-toplevel
  yield ("beam_step B=1 W=4 V=151936 K=8", lambda x, s: beam_step_gpu(x, s, 8),
         (_s((1, 4, 151936), jnp.float32), _s((1, 4), jnp.float32)))


def decode_attention_configs():
  from kernels.decode_attention import gpu as dgpu  # pylint: disable=import-outside-toplevel
  for b, h, kv in ((1, 9, 3), (64, 32, 8)):
    yield (f"decode_attention B={b} H={h} KV={kv} D=64 S=4096", dgpu.decode_attention_gpu,
           (_s((b, h, 64), jnp.bfloat16), _s((b, 4096, kv, 64), jnp.bfloat16),
            _s((b, 4096, kv, 64), jnp.bfloat16), _s((b,), jnp.int32)))


GROUPS = {"sampling": sampling_configs, "quantized_matmul": qmm_configs, "beam_step": beam_configs,
          "decode_attention": decode_attention_configs}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
  p.add_argument("--sass-dir", default=None, help="also write each kernel's SASS here")
  p.add_argument("--out", default=None, help="JSON with every row")
  args = p.parse_args(argv)
  try:
    _tools()
  except ImportError:
    sys.exit("error: this tool needs the standalone Triton compiler: pip install triton==3.4.0 "
             "(in the test extras: pip install -e '.[test]')")
  rows = []
  for group in args.only:
    for label, f, shapes in GROUPS[group]():
      for name, ir_text, warps, stages in capture_kernels(f, *shapes):
        row = dict(config=label, **compile_report(name, ir_text, warps, stages, args.sass_dir))
        rows.append(row)
        if "error" in row:
          print(f"{label} | {name}: COMPILE ERROR {row['error']}", flush=True)
          continue
        mix = " ".join(f"{k} {v}" for k, v in row["sass_loop"].items())
        print(f"{label} | {name} ({warps}w {stages}s): reg {row['registers']} local "
              f"{row['local_bytes']} shared {row['shared_bytes']} | {row['sass_instructions']} "
              f"SASS, {row['loop_instructions']} in loops: {mix}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(jax=jax.__version__, target="sm_90", rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
